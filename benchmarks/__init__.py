"""Benchmarks of protoseg, run as modules (``python -m benchmarks.kernels``); results in
``benchmarks/RESULTS.md``. Not part of the installed packages."""
from __future__ import annotations

__all__: list[str] = []
