"""The channels-last prototype sums (``channels_last.sums_range``) against their twin, bit for bit.

The twin is the kernel as it was before its tile was indexed in two dimensions (one array view
per position, ``Fb[t0 + k][c]``) and before its blocks of eight channels were summed in vector
registers (``engine._kernels.simd``): the same terms in the same order, so every per-tile sum
must have the same bits, for any channel count (blocks of 32, 16 and 8 channels and the
scalar loop for the rest), for tiles cut short at the end of a sample, in each weight mode
(guide, guide and mask, resized weights), float32 and float64, on one and two threads.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from engine._kernels import channels_last as cl
from engine._kernels._pool import parallel_for
from engine._kernels.fused import _MODE_GUIDE, _MODE_GUIDE_MASK, _MODE_WEIGHTS
from tests.engine.test_guide_weights_parallel import _threads


@njit(nogil=True, fastmath={"contract"})
def _twin_range(lo, hi, F, g, m, has_mask, modes, Wf, Wb, part):  # pragma: no cover - compiled
    """``sums_range`` before (row views), kept as the reference."""
    B, S, C = F.shape
    nt = part.shape[1]
    T = cl._CL_TILE
    wf = np.empty(T)
    wb = np.empty(T)
    for i in range(lo, hi):
        b = i // nt
        t = i - b * nt
        t0 = t * T
        n = min(t0 + T, S) - t0
        mode = modes[b]
        if mode == 0:
            gg = g[b].reshape(g[b].size)[t0:t0 + n]
            for k in range(n):
                u = np.float64(gg[k])
                wf[k] = u
                wb[k] = 1.0 - u
        elif mode == 1:
            gg = g[b].reshape(g[b].size)[t0:t0 + n]
            mm = m[b].reshape(m[b].size)[t0:t0 + n]
            for k in range(n):
                gv = np.float64(gg[k])
                mv = np.float64(mm[k])
                wf[k] = gv * mv
                wb[k] = (1.0 - gv) * mv
        else:
            af = Wf[b, t0:t0 + n]
            ab = Wb[b, t0:t0 + n]
            for k in range(n):
                wf[k] = af[k]
                wb[k] = ab[k]
        a = part[b, t, 0]
        bb = part[b, t, 1]
        for c in range(C):
            a[c] = 0.0
            bb[c] = 0.0
        Fb = F[b]
        k = 0
        while k + 4 <= n:
            r0 = Fb[t0 + k]
            r1 = Fb[t0 + k + 1]
            r2 = Fb[t0 + k + 2]
            r3 = Fb[t0 + k + 3]
            u0, u1, u2, u3 = wf[k], wf[k + 1], wf[k + 2], wf[k + 3]
            v0, v1, v2, v3 = wb[k], wb[k + 1], wb[k + 2], wb[k + 3]
            for c in range(C):
                f0 = np.float64(r0[c])
                f1 = np.float64(r1[c])
                f2 = np.float64(r2[c])
                f3 = np.float64(r3[c])
                x = a[c]
                x += f0 * u0
                x += f1 * u1
                x += f2 * u2
                x += f3 * u3
                a[c] = x
                y = bb[c]
                y += f0 * v0
                y += f1 * v1
                y += f2 * v2
                y += f3 * v3
                bb[c] = y
            k += 4
        while k < n:
            u = wf[k]
            v = wb[k]
            r = Fb[t0 + k]
            for c in range(C):
                f = np.float64(r[c])
                a[c] += f * u
                bb[c] += f * v
            k += 1


SPATIAL = (3, 17, 41)  # 2091 positions: two full tiles and one of 43 (not a multiple of four)


def _case(C: int, mode: int, seed: int, dtype: type = np.float32) -> tuple:
    """Features (2, S, C) over several orders of magnitude, guide, mask, modes and weights."""
    rng = np.random.default_rng(seed)
    S = int(np.prod(SPATIAL))
    F = (rng.standard_normal((2, S, C)) * 10.0 ** rng.integers(-3, 4, size=(2, S, C))).astype(dtype)
    g = (rng.random((2, *SPATIAL)) < 0.4).astype(np.float32)
    g[:, 1, 3:9] = 0.25  # soft values too
    m = (rng.random((2, *SPATIAL)) < 0.9).astype(np.float32)
    modes = np.full(2, mode, np.uint8)
    if mode == _MODE_WEIGHTS:
        Wf, Wb = rng.random((2, S)), rng.random((2, S))
    else:
        Wf = Wb = np.empty((2, 0))
    return F, g, m, mode == _MODE_GUIDE_MASK, modes, Wf, Wb


def _sums(kernel, case: tuple) -> np.ndarray:
    F = case[0]
    B, S, C = F.shape
    nt = (S + cl._CL_TILE - 1) // cl._CL_TILE
    part = np.full((B, nt, 2, C), np.nan)
    parallel_for(kernel, B * nt, *case, part, chunks_per_thread=4)
    return part


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", [_MODE_GUIDE, _MODE_GUIDE_MASK, _MODE_WEIGHTS])
@pytest.mark.parametrize("C", [1, 2, 3, 5, 8, 16, 24, 33, 64, 77])
def test_sums_have_the_twins_bits(C: int, mode: int, threads: int) -> None:
    case = _case(C, mode, seed=C * 10 + mode)
    with _threads(threads):
        got = _sums(cl.sums_range, case)
    want = _sums(_twin_range, case)
    assert not np.isnan(want).any()
    diff = got.view(np.uint64) != want.view(np.uint64)
    assert not diff.any(), f"{int(diff.sum())} of {diff.size} sums differ, e.g. {got[diff][:3]} vs {want[diff][:3]}"


@pytest.mark.parametrize("C", [8, 19, 40])
def test_float64_features_have_the_twins_bits(C: int) -> None:
    """float64 features take the vector blocks unwidened: still the twin's bits."""
    case = _case(C, _MODE_GUIDE_MASK, seed=C, dtype=np.float64)
    got, want = _sums(cl.sums_range, case), _sums(_twin_range, case)
    assert not (got.view(np.uint64) != want.view(np.uint64)).any()


def test_vector_blocks_refuse_a_strided_tile() -> None:
    """The intrinsic reads rows as contiguous vectors: a tile that is not C-contiguous does
    not compile (a typing error), instead of reading the wrong values."""
    from numba.core.errors import TypingError

    from engine._kernels.simd import fmuladd_rows8

    @njit
    def call(Ft, wf, wb, a, b):  # pragma: no cover - compiled
        fmuladd_rows8(Ft, Ft.shape[0], 0, wf, wb, a, b)

    F = np.ones((4, 16), np.float32)
    w, s = np.ones(4), np.zeros(16)
    call(F, w, w, s, s.copy())
    with pytest.raises(TypingError):
        call(F[:, ::2], w, w, s, s.copy())
