"""Run the device kernels under Numba's CUDA simulator, in a fresh process.

``NUMBA_ENABLE_CUDASIM`` must be set before numba is first imported, which this process has
done already; so the bitwise comparisons of :mod:`.simulated_kernels` run in a child
``python -m pytest``. No GPU and no CUDA library is needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_device_kernels_equal_cpu_twins_bitwise_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).with_name("simulated_kernels.py")), "-q",
         "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
