"""The channels-last projection ``z = F·(P-N)`` (``channels_last.project_range``) in its fixed order.

From eight channels on, ``engine._kernels.simd.project_rows`` computes each position's sum in an
order it defines (the first block's eight products, the further whole blocks fused into them
lane by lane, a fixed tree over the eight lanes, then the channels after the last whole block
fused in one by one), eight positions at a time. The twin below computes that order for one
position at a time in Python with exact rational arithmetic (``fractions.Fraction``, rounded
once per operation), so every value must have its bits: for 8 to 40 channels, float32 and
float64 features, tiles cut short (a position count that is no multiple of eight), one and two
threads. Below eight channels the Numba loop stays; its sums are checked against float64 dot
products and across thread counts.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from numba import njit

from engine._kernels import channels_last as cl
from engine._kernels._pool import parallel_for
from tests.engine.test_guide_weights_parallel import _threads


def _fma(a: float, b: float, c: float) -> float:
    """``a·b + c`` rounded once (``float(Fraction)`` rounds to nearest, ties to even)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def _twin(f: np.ndarray, d: np.ndarray) -> float:
    """One position's ``Σ_c f[c]·d[c]`` in ``project_rows``' order (C >= 8)."""
    C = len(d)
    k = C // 8
    v = [float(f[i]) * float(d[i]) for i in range(8)]
    for j in range(1, k):
        for i in range(8):
            v[i] = _fma(float(f[8 * j + i]), float(d[8 * j + i]), v[i])
    a = [v[i] + v[i + 4] for i in range(4)]
    t = (a[0] + a[2]) + (a[1] + a[3])
    for c in range(8 * k, C):
        t = _fma(float(f[c]), float(d[c]), t)
    return t


def _case(C: int, dtype: type, seed: int, S: int = 2 * cl._CL_TILE + 45) -> tuple[np.ndarray, ...]:
    """Features (2, S, C) over several orders of magnitude (a different order of the terms
    would show in the last bits), D (2, C), ok and z filled with NaN."""
    rng = np.random.default_rng(seed)
    F = (rng.standard_normal((2, S, C)) * 10.0 ** rng.integers(-3, 4, size=(2, S, C))).astype(dtype)
    D = rng.standard_normal((2, C)) * 10.0 ** rng.integers(-2, 3, size=(2, C))
    return F, D, np.ones(2, np.bool_), np.full((2, S), np.nan)


def _project(F: np.ndarray, D: np.ndarray, ok: np.ndarray, z: np.ndarray) -> np.ndarray:
    B, S, _ = F.shape
    nt = (S + cl._CL_TILE - 1) // cl._CL_TILE
    parallel_for(cl.project_range, B * nt, F, D, ok, z, chunks_per_thread=4)
    return z


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [8, 9, 15, 16, 17, 24, 40])
def test_projection_has_the_twins_bits(C: int, dtype: type, threads: int) -> None:
    F, D, ok, z = _case(C, dtype, seed=C)
    with _threads(threads):
        got = _project(F, D, ok, z)
    # every position of the last tile (45: five groups of eight and five alone) and a sample of
    # the others (the twin is slow: exact arithmetic)
    S = F.shape[1]
    pos = np.r_[np.arange(0, S, 97), np.arange(S - 45, S)]
    for b in range(2):
        want = np.array([_twin(F[b, s], D[b]) for s in pos])
        diff = got[b, pos].view(np.uint64) != want.view(np.uint64)
        assert not diff.any(), f"{int(diff.sum())} of {len(pos)} values differ, e.g. {got[b, pos][diff][:3]} vs {want[diff][:3]}"


@pytest.mark.parametrize("C", [1, 3, 7])
def test_fewer_than_eight_channels(C: int) -> None:
    """The Numba loop: float64 dot products to rounding, the same bits on 1 and 2 threads."""
    F, D, ok, z = _case(C, np.float32, seed=C)
    with _threads(1):
        one = _project(F, D, ok, z.copy())
    with _threads(2):
        two = _project(F, D, ok, z.copy())
    assert (one.view(np.uint64) == two.view(np.uint64)).all()
    want = np.einsum("bsc,bc->bs", F.astype(np.float64), D)
    np.testing.assert_allclose(one, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_samples_without_prototypes_are_left_alone() -> None:
    F, D, ok, z = _case(16, np.float32, seed=2)
    ok[1] = False
    got = _project(F, D, ok, z)
    assert not np.isnan(got[0]).any() and np.isnan(got[1]).all()


def test_projection_rows_refuse_a_strided_tile() -> None:
    """``project_rows`` reads rows as contiguous vectors: a tile that is not C-contiguous
    does not compile (a typing error)."""
    from numba.core.errors import TypingError

    from engine._kernels.simd import project_rows

    @njit
    def call(Ft, D, z):  # pragma: no cover - compiled
        project_rows(Ft, Ft.shape[0], D, z)

    F = np.ones((9, 16), np.float32)
    z = np.zeros(9)
    call(F, np.ones(16), z)
    assert (z == 16.0).all()
    with pytest.raises(TypingError):
        call(F[:, ::2], np.ones(8), z)
