"""Device kernels against their CPU twins, bitwise, under Numba's CUDA simulator.

Not collected by the normal run (the name does not start with ``test_``): numba must be
imported with ``NUMBA_ENABLE_CUDASIM=1`` already set, so :mod:`.test_simulator` runs this
file in its own ``python -m pytest`` process. Shapes are tiny: the simulator runs every
thread of a block as a Python thread (tens of thousands of times slower than the twins).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0"):  # pragma: no cover - guarded by the runner
    pytest.skip("run by tests/engine/gpu/test_simulator.py with NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from engine import gpu  # noqa: E402
from engine.status import Status  # noqa: E402


def _both(F, guide, ref, *, cl=False, mask=None, resize="upsample", items=1, layer=True, unit=True):
    """(device trace, twin trace) of the same features, all intermediates recorded."""
    F = np.ascontiguousarray(F, dtype=np.float32)
    spatial = tuple(F.shape[1:-1] if cl else F.shape[2:])
    tg = gpu._targets(spatial, F.shape[0], guide, ref, mask, resize)
    ops = gpu._DeviceOps()
    dev = gpu._run(ops, ops.put(F), cl, spatial, tg, layer=layer, unit=unit, record=True, items=items)
    twin = gpu._run(gpu._HostOps(), F, cl, spatial, tg, layer=layer, unit=unit, record=True, items=items)
    gpu.compare_traces(dev, twin, tensor="test")  # raises on any bit of difference
    return dev, twin


def _random(shape_f, grid, seed=0, fg=0.5):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=shape_f).astype(np.float32)
    B = shape_f[0]
    g = (rng.random((B,) + grid) < fg)
    ref = rng.random((B,) + grid) < 0.5
    return F, g, ref


def test_sanity_simulator_is_on():
    from numba import cuda

    assert gpu.simulated() and cuda.is_available()


@pytest.mark.parametrize("shape_f, grid, items", [
    ((2, 3, 5, 7), (11, 13), 1),        # 2-D upsample, 35 positions: one partial chunk of 128
    ((1, 2, 10, 15), (20, 29), 1),      # 150 positions: two chunks, the second partial
    ((2, 2, 8, 10), (5, 6), 1),         # features finer than the grid: linear down
    ((1, 2, 3, 4, 5), (6, 7, 9), 1),    # 3-D upsample, 60 positions
    ((2, 3, 9), (20,), 1),              # 1-D
    ((1, 2, 6, 6), (6, 6), 2),          # identity grid, two items per lane
])
def test_random_bitwise(shape_f, grid, items):
    F, g, ref = _random(shape_f, grid)
    dev, twin = _both(F, g, ref, items=items)
    assert dev.npos is not None and dev.upos is not None
    assert (dev.status == Status.OK).all()
    assert np.array_equal(dev.npos, twin.npos) and np.array_equal(dev.upos, twin.upos)


def test_soft_guide_and_mask_bitwise():
    rng = np.random.default_rng(3)
    F = rng.normal(size=(2, 2, 4, 5)).astype(np.float32)
    g = rng.random((2, 9, 11)).astype(np.float32)
    mask = (rng.random((2, 9, 11)) < 0.8).astype(np.float32)
    ref = rng.random((2, 9, 11)) < 0.5
    _both(F, g, ref, mask=mask)


def test_channels_last_bitwise_and_equal_to_channels_first():
    F, g, ref = _random((2, 3, 4, 6), (7, 9), seed=1)
    cl = np.ascontiguousarray(np.moveaxis(F, 1, -1))
    dev_cl, _ = _both(cl, g, ref, cl=True)
    dev_cf, _ = _both(F, g, ref)
    # same positions, same channel order: the layout changes only how memory is read
    for what in ("partials", "Wf", "npos", "tp", "upos", "utp"):
        assert np.array_equal(getattr(dev_cl, what), getattr(dev_cf, what)), what


def test_downsample_bitwise():
    F, g, ref = _random((2, 2, 3, 4, 4), (6, 8, 8), seed=2)
    dev, _ = _both(F, g, ref, resize="downsample")
    assert dev.Wf.shape == (2, 48)


def test_exact_ties_go_to_background():
    # one channel: foreground 1, background 0 -> P = 1, N = 0, threshold exactly 0.5
    F = np.array([[[0.0, 1.0, 0.5, 1.0, 0.0, 0.5]]], dtype=np.float32)
    g = np.array([[0, 1, 0, 1, 0, 0]], dtype=bool)
    g[0, 2] = False
    ref = np.ones((1, 6), dtype=bool)
    # the tied positions (0.5) have guide 0: P = 1, N = mean(0, 0.5, 0, 0.5) = 0.25 -> no tie;
    # so give the ties zero weight through a mask instead
    mask = np.array([[1, 1, 0, 1, 1, 0]], dtype=np.float32)
    dev, twin = _both(F, g, ref, mask=mask)
    assert dev.P[0, 0] == 1.0 and dev.N[0, 0] == 0.0
    assert int(dev.npos[0]) == 2 and int(dev.upos[0, 0]) == 2  # the two 0.5 ties are background


def test_interpolated_tie():
    # x = [0, 1] upsampled 2 -> 4: [0, .25, .75, 1]; threshold .5 never hit; 1 -> 2: [.5, .5]
    F = np.array([[[0.0, 1.0, 0.5]]], dtype=np.float32)  # 3 -> 6
    g = np.array([[0, 0, 1, 1, 0, 0]], dtype=bool)
    ref = np.ones((1, 6), dtype=bool)
    _both(F, g, ref)


def test_all_zero_channel_has_no_unit_positives():
    F, g, ref = _random((2, 3, 4, 5), (8, 10), seed=4)
    F[:, 1] = 0.0
    dev, _ = _both(F, g, ref)
    assert (dev.upos[:, 1] == 0).all() and (dev.utp[:, 1] == 0).all()


def test_empty_foreground_and_background():
    F, g, ref = _random((3, 2, 4, 5), (8, 10), seed=5)
    g[0] = False          # empty foreground
    g[1] = True           # empty background
    dev, _ = _both(F, g, ref)
    assert dev.status.tolist() == [int(Status.EMPTY_FOREGROUND), int(Status.EMPTY_BACKGROUND), int(Status.OK)]
    assert dev.npos[:2].tolist() == [0, 0] and (dev.upos[:2] == 0).all()


def test_nonfinite_features():
    F, g, ref = _random((2, 2, 4, 5), (8, 10), seed=6)
    F[1, 0, 2, 3] = np.nan
    dev, _ = _both(F, g, ref)
    assert dev.status.tolist() == [int(Status.OK), int(Status.NONFINITE)]


def test_scorer_results_equal_twin_and_self_check_runs():
    F, g, ref = _random((2, 3, 5, 7), (11, 13), seed=7)
    scorer = gpu.DeviceScorer(self_check=True)
    assert scorer.begin_batch()
    dt = gpu.DeviceTensor(gpu.device_view(F), False, "t")
    lay, uni = scorer.sa_scores(dt, g, ref, level="both")
    tl, tu = gpu.score_twin(F, g, ref, level="both")
    for a, b in ((lay, tl), (uni, tu)):
        for what in ("score", "status", "tp", "fp", "fn"):
            assert np.array_equal(getattr(a, what), getattr(b, what), equal_nan=True), what
    assert scorer.checked == 1
    assert not scorer.begin_batch()  # batch 2 of 100: not checked


def test_self_check_stops_on_a_flipped_bit():
    F, g, ref = _random((1, 2, 5, 7), (11, 13), seed=8)
    scorer = gpu.DeviceScorer(self_check=True)
    scorer.begin_batch()
    real = scorer.ops.partials

    def corrupt(F_, cl, Wf, Wb, items, out):
        real(F_, cl, Wf, Wb, items, out)
        host = out.copy_to_host()
        host[0, 0, 0, 0] = np.nextafter(host[0, 0, 0, 0], np.inf)  # one ulp
        out.copy_to_device(host)

    scorer.ops.partials = corrupt
    with pytest.raises(gpu.DeviceMismatchError, match="prototype partial sums") as info:
        scorer.sa_scores(gpu.DeviceTensor(gpu.device_view(F), False, "enc1"), g, ref, level="layer")
    assert info.value.tensor == "enc1" and info.value.what == "partials"
