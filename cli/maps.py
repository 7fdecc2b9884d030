"""``protoseg maps STORE -o DIR``: saved SA maps as NIfTI/NRRD files for viewers (issue 17).

Registered on the ``protoseg`` group at the end of :mod:`cli.main`. Thin: parses the
options, calls :func:`engine.store.maps_export.export_maps`, prints one line per file (or
``--json``) on stdout.
"""
from __future__ import annotations

from pathlib import Path

import click

from cli._errors import handle_errors

__all__ = ["maps"]


@click.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the files (created when missing).")
@click.option("--case", "cases", multiple=True, metavar="ID",
              help="Case to export (repeatable) [default: every case with saved maps].")
@click.option("--layer", "layers", multiple=True, metavar="L",
              help="Layer to export: tensor, framework layer or saved map name (repeatable) "
                   "[default: all]; the input, prediction and reference are always written.")
@click.option("--format", "fmt", type=click.Choice(["nifti", "nrrd"]), default=None,
              help="File format [default: NRRD for NRRD images, else NIfTI (.nii.gz)].")
@click.option("--json", "as_json", is_flag=True, help="Print the files written as JSON.")
@handle_errors
def maps(store: Path, out_dir: Path | None, cases: tuple[str, ...], layers: tuple[str, ...],
         fmt: str | None, as_json: bool) -> None:
    """Write the SA maps saved in STORE as NIfTI/NRRD files on each image's grid.

    Every saved layer's binary map (`<case>_<layer>.nii.gz`) and probability map
    (`<case>_<layer>_probability.nii.gz`), and the case's input, prediction and reference,
    with the image's affine and shape (resampled back when the model card resized the
    input), to open overlaid on the image in ITK-SNAP or 3D Slicer (docs/viewers.md).
    Maps exist for the cases scored with `protoseg score --maps`.

    \b
    Example:
      protoseg maps run.h5 -o maps/ --case case7 --layer enc.conv2
    """
    from engine.store.maps_export import export_maps

    if out_dir is None:
        raise click.UsageError("missing option -o/--output: the folder to write the maps to")
    files = export_maps(store, out_dir, cases=list(cases) or None, layers=list(layers) or None,
                        format=fmt)
    if as_json:
        import json

        click.echo(json.dumps([{"case": f.case, "map": f.name, "kind": f.kind, "path": str(f.path),
                                "shape": list(f.shape), "resampled": f.resampled} for f in files],
                              indent=2))
        return
    for f in files:
        click.echo(str(f.path))
    n_cases = len({f.case for f in files})
    click.echo(f"{len(files)} file(s) for {n_cases} case(s) in {out_dir}", err=True)
