"""``protoseg merge PARTS... -o run.h5``: join shards into one store (issue 16).

Registered on the ``protoseg`` group at the end of :mod:`cli.main`. Thin: calls
:func:`engine.store.merge_parts` on ``<store>.parts`` folders, part files or finished
stores (e.g. one per ``--shard I/N`` machine of a batch array) and prints what it wrote.
"""
from __future__ import annotations

from pathlib import Path

import click

from cli._errors import handle_errors

__all__ = ["merge"]


@click.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The merged store to write.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT when it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def merge(parts: tuple[Path, ...], out: Path, overwrite: bool, as_json: bool) -> None:
    """Merge shards (STORE.parts folders, part files or finished stores) into one store.

    The shards must come from runs with the same settings (each difference is named);
    a case in two shards is refused. Cases are written in dataset order.

    \b
    Example (a batch array of 4 machines, each `protoseg score ... --shard I/4 -o sI.h5`):
      protoseg merge s0.h5 s1.h5 s2.h5 s3.h5 -o run.h5
    """
    from engine.store import merge_parts, open_store

    path = merge_parts(list(parts), out, overwrite=overwrite)
    st = open_store(path)
    result = {"store": str(path), "cases": int(len(st.cases)), "sources": [str(p) for p in parts]}
    if as_json:
        from cli.main import _echo_json

        _echo_json(result)
        return
    click.echo(f"store: {path}  ({result['cases']} cases from {len(parts)} shard(s))")
