"""``protoseg export nnunet`` and ``protoseg export monai-bundle``: trained-model folders of the
medical-imaging frameworks to ONNX files protoseg scores.

Registered on the ``export`` group at the end of :mod:`cli.main`. The commands are thin: they
parse options and call :func:`exporters.nnunet.export` or :func:`exporters.monai.export`;
what the model card cannot express is logged (stderr) and listed under ``messages`` with
``--json``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cli._errors import handle_errors

__all__ = ["nnunet_cmd", "monai_cmd"]


def _size(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        size = tuple(int(v) for v in value.lower().replace("x", ",").split(",") if v.strip())
    except ValueError:
        size = ()
    if not size or any(s < 1 for s in size):
        raise click.BadParameter(f"expected a spatial size like 128,128,128; got {value!r}",
                                 param_hint="--input-size")
    return size


def _fold(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected a fold number or 'all'; got {value!r}", param_hint="--fold") from None


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="ONNX file to write."),
        click.option("--layers", multiple=True,
                     help="Modules to expose (paths, globs, types); default: the encoder/decoder stages "
                          "(nnU-Net), the network's blocks (MONAI)."),
        click.option("--input-size", help="Spatial size of the export's numeric check, e.g. 96,96,96 "
                                          "(default: the patch / window size)."),
        click.option("--json", "as_json", is_flag=True, help="Print the export result as JSON."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _print(result: Any, as_json: bool) -> None:
    from cli.main import _print_export

    _print_export(result, as_json)


@click.command("nnunet")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fold", default="0", show_default=True, help="Fold to export (fold_F/), or 'all'.")
@click.option("--checkpoint", type=click.Choice(["final", "best"]), default="final", show_default=True,
              help="checkpoint_final.pth or checkpoint_best.pth.")
@click.option("--configuration", help="Plans configuration (default: the checkpoint's, e.g. 3d_fullres).")
@_common
@handle_errors
def nnunet_cmd(folder: Path, fold: str, checkpoint: str, configuration: str | None, out: Path,
               layers: tuple[str, ...], input_size: str | None, as_json: bool) -> None:
    """Export an nnU-Net v2 trained model (FOLDER holds plans.json, dataset.json, fold_F/).

    \b
    The network is rebuilt from the plans (pip install 'protoseg[torch,nnunet]'), nnU-Net's
    softmax is part of the ONNX file, and the model card records the input channels, the
    labels, the normalisation, spacing, patch size and the size multiple the network needs.
    Example:
      protoseg export nnunet nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres \\
          --fold 0 --checkpoint final -o hippocampus.onnx
    """
    from exporters.nnunet import export as nnunet_export

    result = nnunet_export(folder, out, fold=_fold(fold), checkpoint=checkpoint, configuration=configuration,
                           input_size=_size(input_size), layers=list(layers) or None)
    _print(result, as_json)


@click.command("monai-bundle")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", help="Inference config (default: configs/inference.json or .yaml).")
@click.option("--network-id", default="network_def", show_default=True, help="Config id of the network.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="State dict (default: models/model.pt).")
@_common
@handle_errors
def monai_cmd(folder: Path, config: str | None, network_id: str, weights: Path | None, out: Path,
              layers: tuple[str, ...], input_size: str | None, as_json: bool) -> None:
    """Export a MONAI bundle's network (FOLDER holds configs/ and models/model.pt).

    \b
    The network is built by MONAI's ConfigParser (pip install 'protoseg[torch,monai]'); the
    post-processing activation is part of the ONNX file; the model card records the input
    channels, output classes and the pre-processing it can express (configs/metadata.json,
    configs/inference.json).
    Example:
      protoseg export monai-bundle spleen_ct_segmentation -o spleen.onnx
    """
    from exporters.monai import export as monai_export

    result = monai_export(folder, out, config=config, network_id=network_id, weights=weights,
                          input_size=_size(input_size), layers=list(layers) or None)
    _print(result, as_json)
