"""Unit-level counts of channels-last features on the target grid (issue 15).

``engine._kernels.units`` counts them with per-channel closed intervals of feature values
(``unit_intervals``) over flat runs of positions; these tests hold it to the float64 rule of
SPEC §2 (``sign(P - N)·(f - mid) > 0``), evaluated here in NumPy, to the channels-first path
(the same features transposed, the transposing kernel's arithmetic), and to itself on one and
two threads.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from engine._kernels import units
from engine.scores import sa_scores


def _rule(F: np.ndarray, ref: np.ndarray, P: np.ndarray, N: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, ...]:
    """(npos, tp) per (sample, channel): the float64 decision of SPEC §2, position by position."""
    B, S, C = F.shape
    d = P - N
    sign = np.sign(d)
    mid = 0.5 * (P + N)
    with np.errstate(invalid="ignore"):
        pos = sign[:, None, :] * F.astype(np.float64) > (sign * mid)[:, None, :]
    pos &= (sign != 0)[:, None, :] & valid[:, None, None]
    y = ref.reshape(B, S, 1) != 0
    return pos.sum(axis=1), (pos & y).sum(axis=1)


def _counts(F: np.ndarray, ref: np.ndarray, P: np.ndarray, N: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, ...]:
    B, S, C = F.shape
    npos = np.full((B, C), -1, dtype=np.int64)
    tp = np.full((B, C), -1, dtype=np.int64)
    weights = (np.zeros(1, np.int64),) * 12  # unused on an identity grid
    units.unit_counts(F.reshape(B, 1, 1, S, C), ref.reshape(B, 1, 1, S), True, True, 16, weights,
                      P, N, valid, npos, tp)
    return npos, tp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_intervals_decide_like_the_float64_rule_at_the_threshold(dtype: type) -> None:
    """Values one ulp either side of the midpoint, on it, beyond the dtype's range, ±inf, NaN."""
    mids = np.array([0.1, -3.0, 1e-40, 7.0 + 2 ** -30, 1e300 if dtype is np.float64 else 3.5e38, 0.0])
    C = mids.size
    P = (mids + 1.0)[None, :].copy()
    N = (mids - 1.0)[None, :].copy()
    N[0, 1], P[0, 1] = P[0, 1], N[0, 1]  # channel 1: P < N, positives below the midpoint
    N[0, 5] = P[0, 5]  # channel 5: P == N, never positive
    mid = 0.5 * (P + N)
    vals = []
    for m in mid[0]:
        with np.errstate(over="ignore"):
            near = np.array(m).astype(dtype)
        vals += [near, np.nextafter(near, dtype(np.inf)), np.nextafter(near, dtype(-np.inf)),
                 np.nextafter(np.nextafter(near, dtype(np.inf)), dtype(np.inf))]
    vals += [np.inf, -np.inf, np.nan, 0.0, -0.0, np.finfo(dtype).max, -np.finfo(dtype).max]
    v = np.array(vals, dtype=dtype)
    F = np.repeat(v[:, None], C, axis=1)[None]  # every value in every channel
    ref = (np.arange(v.size) % 2).astype(np.uint8)[None]
    valid = np.array([True])
    with np.errstate(over="ignore"):
        got = _counts(np.ascontiguousarray(F), ref, P, N, valid)
    want = _rule(F, ref, P, N, valid)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][0, 5] == 0 and got[0][0, 0] > 0 and got[0][0, 1] > 0


def test_runs_items_and_invalid_samples() -> None:
    """Reference runs longer than a stretch, sizes not a multiple of an item, an invalid sample;
    the counts equal the rule's and the channels-first path's, on one and two threads."""
    rng = np.random.default_rng(7)
    B, S, C = 3, units._ITEM * 2 + 517, 5
    F = rng.standard_normal((B, S, C)).astype(np.float32)
    ref = np.zeros((B, S), dtype=np.uint8)
    ref[0, 100:100 + 3 * units._RUN + 11] = 1  # one long run
    ref[1] = rng.random(S) < 0.5  # short runs everywhere
    ref[2, ::3] = 1
    P = rng.standard_normal((B, C))
    N = rng.standard_normal((B, C))
    N[0, 2] = P[0, 2]
    valid = np.array([True, True, False])
    want = _rule(F, ref, P, N, valid)
    before = numba.get_num_threads()
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            got = _counts(F, ref, P, N, valid)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    finally:
        numba.set_num_threads(before)
    assert (got[0][2] == 0).all() and (got[0][0] > 0).any()


def test_sa_scores_units_equal_the_channels_first_path() -> None:
    """sa_scores on NDHWC features (the interval kernel) and on the same values channels-first
    (the per-channel kernel): identical unit counts and scores."""
    rng = np.random.default_rng(3)
    f = rng.standard_normal((2, 6, 9, 10, 7)).astype(np.float32)  # (B, C, Z, Y, X)
    g = (rng.random((2, 9, 10, 7)) < 0.4).astype(np.float32)
    y = (rng.random((2, 9, 10, 7)) < 0.5).astype(np.uint8)
    last = np.ascontiguousarray(np.moveaxis(f, 1, -1))
    a = sa_scores(last, g, y, level="unit", layout="channels_last")
    b = sa_scores(np.ascontiguousarray(f), g, y, level="unit")
    for field in ("tp", "fp", "fn", "status"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.score, b.score)
