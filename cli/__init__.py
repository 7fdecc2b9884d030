"""protoseg command-line interface (``protoseg``)."""
from __future__ import annotations

__all__ = ["main"]


def main() -> None:  # pragma: no cover - thin wrapper for the console script
    from cli.main import main as _main

    _main()
