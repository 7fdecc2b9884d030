"""``protoseg compare A.h5 B.h5 -o DIR``: two stores' SA, layer by layer (issue 18).

Registered on the ``protoseg`` group at the end of :mod:`cli.main`. Thin: parses the
options, calls :func:`engine.report.compare.compare_stores`, prints the per-layer table
(or ``--json``) on stdout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli._errors import handle_errors

__all__ = ["compare"]


def _interval(row: dict[str, Any]) -> str:
    from engine.report.tables import fmt

    if row["ci_lo"] is None or row["ci_lo"] != row["ci_lo"]:
        return fmt(row["mean_diff"])
    return f"{row['mean_diff']:+.3f} [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}]"


@click.command()
@click.argument("store_a", metavar="A", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("store_b", metavar="B", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for compare.html, figures (PNG, SVG) and tables (CSV, JSON).")
@click.option("--allow-different", is_flag=True,
              help="Compare stores on other cases (on the common ones) or scored with other settings.")
@click.option("--match", type=click.Choice(["auto", "name", "depth"]), default="auto", show_default=True,
              help="Pair layers by name, by relative depth, or by name when every layer of the "
                   "smaller store has a namesake in the other (auto).")
@click.option("--n-boot", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Bootstrap replicates of each 95 % interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--top-cases", type=click.IntRange(min=0), default=3, show_default=True,
              help="Cases listed per layer: those that changed most.")
@click.option("--unit-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Count units whose SA is above this (per-unit summary).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON object.")
@handle_errors
def compare(store_a: Path, store_b: Path, out_dir: Path | None, allow_different: bool, match: str,
            n_boot: int, seed: int, top_cases: int, unit_threshold: float, as_json: bool) -> None:
    """Compare two stores scored on the same cases, layer by layer (B − A).

    Two checkpoints of one network (layers matched by name) or two networks (matched by
    relative depth). Per layer: each store's mean SA and the paired difference with a
    bootstrap 95 % interval over cases, and the cases that changed most; per unit when
    both stores hold unit-level SA. Stores on other cases or scored with other settings
    are refused unless --allow-different.

    \b
    Example:
      protoseg compare epoch10.h5 epoch50.h5 -o cmp/        # cmp/compare.html
      protoseg compare unet.h5 resunet.h5 --match depth --json
    """
    from engine.report.compare import compare_stores

    result = compare_stores(store_a, store_b, out_dir, allow_different=allow_different,
                            match=match, n_boot=n_boot, seed=seed, top_cases=top_cases,
                            unit_threshold=unit_threshold)
    if as_json:
        from cli.main import _echo_json

        _echo_json(result.as_json())
        return
    from cli.main import _table

    def num(v: float) -> float | None:
        return round(v, 3) if v == v else None  # NaN: an empty cell

    multi = len(result.classes) > 1
    rows = [{**({"class": r["class"]} if multi else {}),
             "layer A": r["layer_a"], **({} if result.match == "name" else {"layer B": r["layer_b"]}),
             "mean A": num(r["mean_a"]), "mean B": num(r["mean_b"]),
             "B − A [95 % CI]": _interval(r), "n": r["n"]} for r in result.layers]
    click.echo(f"A: {result.a}\nB: {result.b}\n{len(result.cases)} cases; layers matched "
               f"{result.match_text}")
    for d in result.differences:
        click.echo(f"compared although different: {d}")
    click.echo("")
    click.echo(_table(rows, list(rows[0]) if rows else ["layer A"]))
    if result.path is not None:
        click.echo("")
        click.echo(str(result.path))
