"""The guide weights of one sample split over the threads (issue 15, "every core in every kernel").

``engine._kernels.adjoint.guide_adjoint`` (``channels_last.guide_weights`` on a resized grid)
cuts each sample's ``Rᵀ(g·m)``, ``Rᵀ((1-g)·m)`` into blocks of source z planes. Its weights,
sums and counts must be the bits of the serial ``_guide_adjoint`` (the engine's stores and their
bit-equality tests depend on them; that function is kept below as the twin, ``_twin_guide_adjoint``,
since the engine's ``_guide_adjoint`` is now the one-block case of the split), on one thread, two
threads and any order of the work items,
on resized 3-D and 2-D grids, with and without a mask, with the no-mask shortcut (Rᵀ1 - Rᵀg)
taken and refused, with whole samples or blocks of planes as the work items.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import pytest
from numba import njit

from engine._kernels import adjoint
from engine._kernels import channels_last as cl
from engine._kernels._common import _FM
from engine._kernels.fused import _MODE_WEIGHTS
from engine.scores import _kernel_weights

TARGET = (12, 10, 9)
# (source grid, grid the weights resize to): up (iz0 == iz1 with a weight at the end), down,
# Ys = 6 and Ys = 3 (blocks of two and four planes: each block starts at a row that is a
# multiple of four), and a target that is the corner of a larger grid (cropped weights)
GRIDS = [((5, 6, 4), TARGET), ((7, 3, 5), TARGET), ((16, 13, 11), TARGET), ((4, 8, 4), TARGET),
         ((6, 5, 5), (15, 12, 13))]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _weights(src: tuple[int, ...], tgt: tuple[int, ...], cover: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    return tuple(a for s, t, c in zip(src, tgt, cover) for a in _kernel_weights(s, t, c))


def _guide(kind: str, B: int, tgt: tuple[int, ...]) -> np.ndarray:
    """(B, *tgt) float32: ``soft`` values in [0, 1] with exact 0s and 1s; ``full`` almost all
    1 (background share below ``_MIN_BACKGROUND_SHARE``: the no-mask shortcut is refused);
    ``bad`` soft with NaN, -0.5 and 1.5 (counted, and NaN sums)."""
    rng = np.random.default_rng(5)
    g = rng.random((B, *tgt)).astype(np.float32)
    g[g < 0.2] = 0.0
    g[g > 0.8] = 1.0
    if kind == "full":
        g[:] = 1.0
        g[:, 0, 0, :3] = 0.5
    elif kind == "bad":
        g[0, 1, 2, 3] = np.nan
        g[-1, 2, 0, 1] = -0.5
        g[-1, 3, 4, 0] = 1.5
    return g


def _mask(B: int, tgt: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(6)
    m = rng.random((B, *tgt)).astype(np.float32)
    m[m < 0.3] = 0.0
    return m


@njit(fastmath=_FM)
def _twin_guide_adjoint(gb, mb, has_mask, Zs, Ys, Xs,
                   iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Wf, Wb):
    """The serial ``_guide_adjoint`` as it was before the planes were split (issue 15), kept
    here as the twin: Wf = Rᵀ(g·m), Wb = Rᵀ((1-g)·m) of one sample on the source grid.

    Returns (Σm, Σg·m, Σ(1-g)·m, count of guide or mask values outside [0, 1] or NaN).
    """
    Zt, Yt, Xt = gb.shape
    sm = 0.0
    sf = 0.0
    sb = 0.0
    bad = 0
    # one pass over the target grid: each target row goes, weighted, into the (up to four)
    # source (z, y) rows it reads from; then the x adjoint runs on the reduced grid.
    # Without a mask only Rᵀg is accumulated and Rᵀ(1-g) = Rᵀ1 - Rᵀg, Rᵀ1 being separable
    # (half the work), unless the background is so small that the subtraction would cost
    # precision.
    if not has_mask:
        tf = np.zeros((Zs, Ys, Xt))
        for zt in range(Zt):
            for yt in range(Yt):
                gr = gb[zt, yt]
                ya = iy0[yt]
                yb = iy1[yt]
                f_, k_, n_ = adjoint._scatter_row1(gr, wz0[zt] * wy0[yt], wz0[zt] * wy1[yt],
                                           tf[iz0[zt], ya], tf[iz0[zt], yb])
                sf += f_
                sb += k_
                bad += n_
                if wz1[zt] != 0.0:
                    adjoint._scatter_row1(gr, wz1[zt] * wy0[yt], wz1[zt] * wy1[yt], tf[iz1[zt], ya], tf[iz1[zt], yb])
        sm = float(Zt * Yt * Xt)
        if sb >= adjoint._MIN_BACKGROUND_SHARE * sm:
            adjoint._adjoint_x1(tf.reshape((Zs * Ys, Xt)), ix0, ix1, wx0, wx1, Wf.reshape((Zs * Ys, Xs)))
            cz = adjoint._column_sums(iz0, iz1, wz0, wz1, Zs)
            cy = adjoint._column_sums(iy0, iy1, wy0, wy1, Ys)
            cx = adjoint._column_sums(ix0, ix1, wx0, wx1, Xs)
            for z in range(Zs):
                for y in range(Ys):
                    czy = cz[z] * cy[y]
                    for x in range(Xs):
                        Wb[z, y, x] = czy * cx[x] - Wf[z, y, x]
            return sm, sf, sb, bad
        sm = 0.0
        sf = 0.0
        sb = 0.0
        bad = 0
    tf = np.zeros((Zs, Ys, Xt))
    tb = np.zeros((Zs, Ys, Xt))
    for zt in range(Zt):
        for yt in range(Yt):
            gr = gb[zt, yt]
            mr = mb[zt, yt] if has_mask else mb[0, 0]
            ya = iy0[yt]
            yb = iy1[yt]
            c0 = wz0[zt] * wy0[yt]
            c1 = wz0[zt] * wy1[yt]
            a, f_, k_, n_ = adjoint._scatter_row(gr, mr, has_mask, c0, c1, tf[iz0[zt], ya], tf[iz0[zt], yb],
                                         tb[iz0[zt], ya], tb[iz0[zt], yb])
            sm += a
            sf += f_
            sb += k_
            bad += n_
            if wz1[zt] != 0.0:  # 3-D: the second z plane (sums already counted)
                c0 = wz1[zt] * wy0[yt]
                c1 = wz1[zt] * wy1[yt]
                adjoint._scatter_row(gr, mr, has_mask, c0, c1, tf[iz1[zt], ya], tf[iz1[zt], yb],
                             tb[iz1[zt], ya], tb[iz1[zt], yb])
    adjoint._adjoint_x1(tf.reshape((Zs * Ys, Xt)), ix0, ix1, wx0, wx1, Wf.reshape((Zs * Ys, Xs)))
    adjoint._adjoint_x1(tb.reshape((Zs * Ys, Xt)), ix0, ix1, wx0, wx1, Wb.reshape((Zs * Ys, Xs)))
    return sm, sf, sb, bad


def _serial(g, m, has_mask, src, weights, kernel=_twin_guide_adjoint) -> list[tuple[np.ndarray, ...]]:
    """Each sample's (Wf, Wb, (sm, sf, sb), bad) from the serial twin (or ``kernel``)."""
    out = []
    for b in range(g.shape[0]):
        Wf = np.full(src, -1.0)
        Wb = np.full(src, -1.0)
        sm, sf, sb, bad = kernel(g[b], m[b] if has_mask else m[0], has_mask, *src, *weights, Wf, Wb)
        out.append((Wf, Wb, np.array([sm, sf, sb]), bad))
    return out


def _split(g, m, has_mask, src, weights) -> list[tuple[np.ndarray, ...]]:
    B = g.shape[0]
    Wf = np.full((B, *src), -1.0)
    Wb = np.full((B, *src), -1.0)
    sums = np.full((B, 3), -1.0)
    bad = np.full(B, -1, dtype=np.int64)
    adjoint.guide_adjoint(g, m, has_mask, src, weights, Wf, Wb, sums, bad)
    return [(Wf[b], Wb[b], sums[b], int(bad[b])) for b in range(B)]


def _assert_same_bits(a: list[tuple[np.ndarray, ...]], b: list[tuple[np.ndarray, ...]]) -> None:
    assert len(a) == len(b)
    for (wf1, wb1, s1, n1), (wf2, wb2, s2, n2) in zip(a, b):
        assert wf1.tobytes() == wf2.tobytes()
        assert wb1.tobytes() == wb2.tobytes()
        assert s1.tobytes() == s2.tobytes()
        assert n1 == n2


def _case(kind: str, has_mask: bool, B: int, grids):
    src, cover = grids
    g = _guide(kind, B, TARGET)
    m = _mask(B, TARGET) if has_mask else np.ones((1, 1, 1, 1), np.float32)
    return g, m, src, _weights(src, TARGET, cover)


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("kind, has_mask", [("soft", False), ("full", False), ("bad", False), ("soft", True),
                                            ("full", True), ("bad", True)])
@pytest.mark.parametrize("B", [1, 3])
def test_split_gives_the_serial_bits_on_one_and_two_threads(grids, kind, has_mask, B) -> None:
    g, m, src, weights = _case(kind, has_mask, B, grids)
    want = _serial(g, m, has_mask, src, weights)
    for n in (1, 2):
        with _threads(n):
            _assert_same_bits(_split(g, m, has_mask, src, weights), want)


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("kind, has_mask", [("soft", False), ("full", False), ("bad", False), ("soft", True),
                                            ("full", True), ("bad", True)])
def test_the_serial_kernel_of_the_channels_first_paths_gives_the_twin_bits(grids, kind, has_mask) -> None:
    """``_guide_adjoint`` (inside fused.py's and general.py's per-sample kernels) is the one-block
    case of the split: the twin's bits, the shortcut taken and refused (2-D grids: below)."""
    src, tgt = grids
    g = _guide(kind, 2, tgt)
    m = _mask(2, tgt) if has_mask else np.ones((1, 1, 1, 1), np.float32)
    weights = _weights(src, tgt, tgt)
    _assert_same_bits(_serial(g, m, has_mask, src, weights, kernel=adjoint._guide_adjoint),
                      _serial(g, m, has_mask, src, weights))


@pytest.mark.parametrize("grids", GRIDS[:4])
@pytest.mark.parametrize("kind, has_mask", [("soft", False), ("full", False), ("soft", True)])
@pytest.mark.parametrize("n_threads", [1, 4])
def test_any_order_of_the_work_items_gives_the_serial_bits(monkeypatch, grids, kind, has_mask, n_threads) -> None:
    """Each work item run on its own, the last first: whole samples (a thread count that
    divides the batch of 3) or blocks of planes (one that does not)."""
    calls = []

    def reversed_items(kernel, n_items, *args, chunks_per_thread=1):
        calls.append(n_items)
        for k in reversed(range(n_items)):
            kernel(k, k + 1, *args)

    g, m, src, weights = _case(kind, has_mask, 3, grids)
    want = _serial(g, m, has_mask, src, weights)
    monkeypatch.setattr(adjoint, "parallel_for", reversed_items)
    monkeypatch.setattr(adjoint, "threads", lambda: n_threads)
    _assert_same_bits(_split(g, m, has_mask, src, weights), want)
    assert calls[0] == (3 if n_threads == 1 else 3 * -(-src[0] // (4 // np.gcd(src[1], 4))))


@pytest.mark.parametrize("has_mask", [False, True])
def test_two_dimensional_grids(has_mask) -> None:
    """Zs = Zt = 1: one block of planes; the result is still the serial one (and the engine's
    serial ``_guide_adjoint`` gives it too)."""
    tgt = (1, 21, 17)
    src = (1, 9, 7)
    g = _guide("soft", 2, tgt)
    m = _mask(2, tgt) if has_mask else np.ones((1, 1, 1, 1), np.float32)
    weights = _weights(src, tgt, tgt)
    want = _serial(g, m, has_mask, src, weights)
    _assert_same_bits(_serial(g, m, has_mask, src, weights, kernel=adjoint._guide_adjoint), want)
    for n in (1, 2):
        with _threads(n):
            _assert_same_bits(_split(g, m, has_mask, src, weights), want)


def test_a_batch_whose_middle_sample_refuses_the_shortcut() -> None:
    """Samples 0 and 2 take Rᵀ1 - Rᵀg, sample 1 (almost all foreground) is redone alone."""
    g, m, src, weights = _case("soft", False, 3, GRIDS[1])
    g[1] = _guide("full", 1, TARGET)[0]
    want = _serial(g, m, False, src, weights)
    assert want[1][2][2] < 0.01 * want[1][2][0] <= want[0][2][2]
    for n in (1, 2):
        with _threads(n):
            _assert_same_bits(_split(g, m, False, src, weights), want)


@pytest.mark.parametrize("kind, has_mask", [("soft", False), ("full", False), ("bad", True)])
@pytest.mark.parametrize("B", [1, 3])
def test_guide_weights_are_the_serial_weights(kind, has_mask, B) -> None:
    """``guide_weights`` on a resized grid: the serial weights, flattened, mode WEIGHTS."""
    g, m, src, weights = _case(kind, has_mask, B, GRIDS[0])
    want = _serial(g, m, has_mask, src, weights)
    for n in (1, 2):
        with _threads(n):
            Wf, Wb, modes, sums, bad = cl.guide_weights(g, m, has_mask, False, src, weights)
        assert Wf.shape == Wb.shape == (B, int(np.prod(src)))
        assert (modes == _MODE_WEIGHTS).all()
        _assert_same_bits([(Wf[b].reshape(src), Wb[b].reshape(src), sums[b], bad[b]) for b in range(B)], want)
