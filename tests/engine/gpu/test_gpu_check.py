"""``benchmarks/gpu_check.py --simulate``: the device check's whole logic, without a GPU.

Runs in a fresh process (the script sets ``NUMBA_ENABLE_CUDASIM=1`` before Numba is
imported): a U-Net's hidden tensors are scored by the simulated device kernels and by the
CPU twins (bitwise equal), a 3-D workload is timed (times meaningless), and ``score_batch``
runs with the device backend and its self-check.
"""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_gpu_check_simulated(run_module):
    proc = run_module("benchmarks.gpu_check", "--simulate", timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "device vs CPU twin bitwise equal" in out
    assert "backend cuda, self-check compared" in out
    assert "RESULT: OK" in out
