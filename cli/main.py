"""The ``protoseg`` click group. Commands are thin: they parse options, call one
engine/exporters function and print the result (stdout) or progress (stderr)."""
from __future__ import annotations

import click

from engine import __version__

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="protoseg")
def cli() -> None:
    """protoseg: what can each layer of a segmentation network segment?

    Scores the hidden layers of any ONNX segmentation model with ProtoSeg
    segmentation-ability (SA) scores, estimates output quality without ground
    truth, and writes framework-independent reports.
    """


def main() -> None:
    cli(prog_name="protoseg")


if __name__ == "__main__":  # pragma: no cover
    main()
