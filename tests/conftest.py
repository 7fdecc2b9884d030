"""Hypothesis profiles shared by every property test, and a fixture that runs a module.

- ``ci`` (chosen when the ``CI`` environment variable is set, as CI services do): derandomized,
  so that a clean clone always runs the same examples and a failure seen once is seen again;
  no example database (nothing saved on one machine changes what another runs); no deadline
  (shared runners and Numba compiles make timings meaningless); the failing example's
  reproduction blob printed.
- ``dev`` (the default elsewhere): random exploration, a new set of examples every run.

``HYPOTHESIS_PROFILE=ci|dev`` overrides the choice, and so does pytest's
``--hypothesis-profile``. A test's own ``@settings(max_examples=...)`` keeps its count under
both profiles. To replay a random run, pass the seed it printed: ``--hypothesis-seed=N``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True, max_examples=100)
settings.register_profile("dev")


def _profile() -> str:
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    return "ci" if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no") else "dev"


settings.load_profile(_profile())


@pytest.fixture(scope="session")
def run_module() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_module("benchmarks.kernels", "--quick", ...)``: ``python -m`` in a fresh process, from
    the repository root, output captured. The benchmarks are tested this way: they build on
    ``tests/`` (twins, models), so tests do not import them."""

    def run(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, check=False)

    return run
