"""Prototype sums and decisions of the channels-last kernels on a hard (0/1) guide (issue 15).

A hard guide's weights are exactly 0 and 1: a non-finite feature must still make its sample
NONFINITE wherever it is (foreground, background, or where the mask is 0), the per-tile sums
must not depend on the thread count, and ``decide(count_ref=False)`` (the caller already has
``|ref|``) must give the counts of ``count_ref=True``. A single-sum path for such weights (one
addition instead of two FMAs) was measured and left out: see ``benchmarks/RESULTS.md``,
"Prototype sums on a hard guide".
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from engine._kernels import channels_last as cl
from engine._kernels._common import _NONFINITE, _OK
from engine._kernels._pool import parallel_for
from engine._kernels.fused import _MODE_GUIDE, _MODE_GUIDE_MASK
from engine.scores import _kernel_weights

SPATIAL = (5, 23, 19)  # 2185 positions: two full tiles and one of 137 (not a multiple of four)


def _guide(kind: str) -> np.ndarray:
    """(2, *SPATIAL) float32 guides: ``blob`` hard (0/1), ``band`` the same with slices of 0.25
    and 0.5."""
    g = np.zeros((2, *SPATIAL), np.float32)
    g[0, 1:4, 5:17, 3:15] = 1.0
    g[1, 2:, :9, 4:] = 1.0
    if kind == "band":
        g[:, 2, 7:9] = 0.25
        g[1, 3, :, 6] = 0.5
    return g


def _features(rng: np.random.Generator, C: int, shape: tuple[int, ...] = SPATIAL) -> np.ndarray:
    """(2, S, C) float32 channels-last features over several orders of magnitude (rounding
    differences would show), with exact zeros and negative values."""
    S = int(np.prod(shape))
    F = rng.standard_normal((2, S, C)) * 10.0 ** rng.integers(-4, 5, size=(2, S, C))
    F[rng.random((2, S, C)) < 0.05] = 0.0
    return F.astype(np.float32)


def _identity_weights() -> tuple[np.ndarray, ...]:
    """Dummy grid weights of an identity grid (not read by the kernels)."""
    return tuple(np.zeros(1, np.uint32) if i % 4 < 2 else np.zeros(1) for i in range(12))


def _part(kernel, F: np.ndarray, g: np.ndarray, m: np.ndarray, has_mask: bool, gw) -> np.ndarray:
    B, S, C = F.shape
    nt = (S + cl._CL_TILE - 1) // cl._CL_TILE
    Wf, Wb, modes = gw[0], gw[1], gw[2]
    part = np.full((B, nt, 2, C), np.nan)
    parallel_for(kernel, B * nt, F, g, m, has_mask, modes, Wf, Wb, part)
    return part


def _assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = a.view(np.uint64) != b.view(np.uint64)
    assert not diff.any(), f"{int(diff.sum())} of {diff.size} sums differ, e.g. {a[diff][:3]} vs {b[diff][:3]}"


def _prototypes(F: np.ndarray, g: np.ndarray, m: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """``channels_last.prototypes`` on an identity grid: (P, N, status, mid, z), ``z`` zeroed
    where not written (samples whose status is not OK)."""
    B, S, C = F.shape
    has_mask = m is not None
    m = m if has_mask else np.ones((1, 1, 1, 1), np.float32)
    gw = cl.guide_weights(g, m, has_mask, True, SPATIAL, _identity_weights())
    assert (gw[2] == (_MODE_GUIDE_MASK if has_mask else _MODE_GUIDE)).all()
    P = np.empty((B, C))
    N = np.empty((B, C))
    status = np.empty(B, np.uint8)
    mid = np.empty(B)
    bad = np.zeros(B, np.int64)
    z = np.empty((B, S))
    cl.prototypes(F, g, m, has_mask, gw, True, P, N, status, mid, bad, z)
    z[status != _OK] = 0.0
    return P, N, status, mid, z


def _assert_nonfinite_sample_0(out: tuple[np.ndarray, ...], clean: tuple[np.ndarray, ...]) -> None:
    """Sample 0 NONFINITE (NaN prototypes, no z), sample 1 as without the bad value."""
    P, N, status, mid, z = out
    assert status[0] == _NONFINITE and status[1] == _OK
    assert np.isnan(P[0]).all() and np.isnan(N[0]).all() and mid[0] == 0.0 and not z[0].any()
    for a, b in zip(out, clean):
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["foreground", "background", "soft"])
def test_a_nonfinite_feature_gives_nonfinite(value: float, where: str) -> None:
    """Where the guide is exactly 1 (f·0 = NaN in the background sums), exactly 0, or 0.25."""
    rng = np.random.default_rng(7)
    g = _guide("band")
    F = _features(rng, 8)
    clean = _prototypes(F, g)
    assert (clean[2] == _OK).all()
    target = {"foreground": 1.0, "background": 0.0, "soft": 0.25}[where]
    s = int(np.flatnonzero(g[0].reshape(-1) == target)[7])
    F[0, s, 5] = value  # sample 0 only
    _assert_nonfinite_sample_0(_prototypes(F, g), clean)


def test_a_nonfinite_feature_where_the_mask_is_zero_gives_nonfinite() -> None:
    """Weights (0, 0) where the mask is 0: f·0 is still NaN for f = ±inf or NaN."""
    rng = np.random.default_rng(9)
    g = _guide("blob")
    m = np.ones((2, *SPATIAL), np.float32)
    m[:, 1, 0, :12] = 0.0  # positions 437..448 of tile 0
    F = _features(rng, 8)
    clean = _prototypes(F, g, m)
    F[0, 441, 2] = np.inf
    _assert_nonfinite_sample_0(_prototypes(F, g, m), clean)


def test_one_and_two_threads_give_the_same_bits() -> None:
    rng = np.random.default_rng(8)
    g = _guide("band")
    F = _features(rng, 8)
    gw = cl.guide_weights(g, np.ones((1, 1, 1, 1), np.float32), False, True, SPATIAL, _identity_weights())
    before = numba.get_num_threads()
    parts = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            parts.append(_part(cl.sums_range, F, g, g, False, gw))
    finally:
        numba.set_num_threads(before)
    _assert_same_bits(parts[0], parts[1])


@pytest.mark.parametrize("identity", [True, False])
def test_decide_without_counting_the_reference_gives_the_same_counts(identity: bool) -> None:
    """``decide(..., count_ref=False)``: the same positives and true positives, ``ny`` left
    as it was (the caller has it)."""
    rng = np.random.default_rng(10)
    src = SPATIAL if identity else tuple(s // 2 + 1 for s in SPATIAL)
    weights = _identity_weights() if identity else tuple(
        a for s, t in zip(src, SPATIAL) for a in _kernel_weights(s, t))
    z = rng.standard_normal((2, int(np.prod(src))))
    mid = np.array([0.1, -0.2])
    status = np.array([0, 0], np.uint8)
    ref = (rng.random((2, *SPATIAL)) < 0.3).astype(np.uint8)
    none4 = (np.empty((0, 0, 0, 0), np.bool_), np.empty((0, 0, 0, 0), np.float32))
    counts = []
    for count_ref in (True, False):
        npos, tp, ny = (np.full(2, -7, np.int64) for _ in range(3))
        cl.decide(z, mid, status, ref, True, False, identity, src, SPATIAL, weights, npos, tp, ny, *none4,
                  count_ref=count_ref)
        counts.append((npos, tp, ny))
    (np1, tp1, ny1), (np2, tp2, ny2) = counts
    np.testing.assert_array_equal(np1, np2)
    np.testing.assert_array_equal(tp1, tp2)
    np.testing.assert_array_equal(ny1, ref.reshape(2, -1).sum(axis=1))
    np.testing.assert_array_equal(ny2, [-7, -7])
    assert (np1 > 0).all() and (tp1 > 0).all()


def test_decide_range_skips_the_reference_count() -> None:
    """The kernel itself: with ``count_ref=False`` the per-block ``|ref|`` stays 0 (the pass
    over ``ref`` is skipped), the other counts as with ``count_ref=True``."""
    rng = np.random.default_rng(12)
    Zt, Yt, Xt = SPATIAL
    z = rng.standard_normal((2, Zt * Yt * Xt))
    ref = (rng.random((2, *SPATIAL)) < 0.3).astype(np.uint8)
    w = _identity_weights()
    nch = (Zt * Yt + cl._ROWS - 1) // cl._ROWS
    cnts = []
    for count_ref in (True, False):
        cnt = np.zeros((2, nch, 3), np.int64)
        parallel_for(cl.decide_range, 2 * nch, z, np.empty((2, 0, Xt)), np.zeros(2), np.ones(2, np.bool_), ref,
                     True, count_ref, False, True, Yt, Zt, Yt, Xt, *w[:8], cnt,
                     np.empty((0, 0, 0, 0), np.bool_), np.empty((0, 0, 0, 0), np.float32))
        cnts.append(cnt)
    np.testing.assert_array_equal(cnts[0][..., :2], cnts[1][..., :2])
    np.testing.assert_array_equal(cnts[0][..., 2].sum(axis=1), ref.reshape(2, -1).sum(axis=1))
    assert not cnts[1][..., 2].any()
