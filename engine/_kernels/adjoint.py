"""The adjoint of the separable linear resize applied to the guide weights: ``Rᵀ(g·m)`` and
``Rᵀ((1-g)·m)`` on the features' grid (SPEC §3), scattered row by row, gathered along x."""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels._common import _FM

__all__: list[str] = []  # private module


# --------------------------------------------------------------------------- prototypes
@njit(cache=True, fastmath=_FM)
def _scatter_row(gr, mr, has_mask, c0, c1, fa, fb, ka, kb):
    """One target row into two source rows: fa += c0·g·m, fb += c1·g·m (k: (1-g)·m).

    ``fa`` and ``fb`` may be the same row (at the last source row). Returns the row's
    (Σm, Σg·m, Σ(1-g)·m, values outside [0, 1] or NaN).
    """
    n = gr.shape[0]
    sm = 0.0
    sf = 0.0
    sb = 0.0
    bad = 0
    if has_mask:
        for x in range(n):
            gv = np.float64(gr[x])
            mv = np.float64(mr[x])
            f = gv * mv
            k = (1.0 - gv) * mv
            sm += mv
            sf += f
            sb += k
            bad += (gv < 0.0) | (gv > 1.0) | (gv != gv) | (mv < 0.0) | (mv > 1.0) | (mv != mv)
            fa[x] += c0 * f
            fb[x] += c1 * f
            ka[x] += c0 * k
            kb[x] += c1 * k
    else:
        for x in range(n):
            f = np.float64(gr[x])
            k = 1.0 - f
            sf += f
            sb += k
            bad += (f < 0.0) | (f > 1.0) | (f != f)
            fa[x] += c0 * f
            fb[x] += c1 * f
            ka[x] += c0 * k
            kb[x] += c1 * k
        sm = float(n)
    return sm, sf, sb, bad


@njit(cache=True, fastmath=_FM)
def _scatter_row1(gr, c0, c1, fa, fb):
    """One target row of g into two source rows (no mask): fa += c0·g, fb += c1·g.

    Returns the row's (Σg, Σ(1-g), values outside [0, 1] or NaN).
    """
    sf = 0.0
    sb = 0.0
    bad = 0
    for x in range(gr.shape[0]):
        f = np.float64(gr[x])
        sf += f
        sb += 1.0 - f
        bad += (f < 0.0) | (f > 1.0) | (f != f)
        fa[x] += c0 * f
        fb[x] += c1 * f
    return sf, sb, bad


@njit(cache=True)
def _column_sums(i0, i1, w0, w1, n_src):
    """Rᵀ1 along one axis: the total weight each source position receives."""
    out = np.zeros(n_src)
    for t in range(len(i0)):
        out[i0[t]] += w0[t]
        out[i1[t]] += w1[t]
    return out


@njit(cache=True)
def _ranges(i, n_src):
    """For each source index j, the range [lo[j], hi[j]) of target positions with i[x] == j
    (``i`` is non-decreasing, as :func:`engine.resize.linear_weights` guarantees)."""
    lo = np.zeros(n_src, dtype=np.int64)
    hi = np.zeros(n_src, dtype=np.int64)
    n = len(i)
    x = 0
    for j in range(n_src):
        while x < n and i[x] < j:
            x += 1
        lo[j] = x
        while x < n and i[x] == j:
            x += 1
        hi[j] = x
    return lo, hi


@njit(cache=True, fastmath=_FM)
def _adjoint_x1(tf, ix0, ix1, wx0, wx1, Wf):
    """Wf = tf·Rxᵀ row by row: (R, Xt) -> (R, Xs).

    Gathered per source position (the target positions that read it form two contiguous
    ranges), four rows at a time: only register accumulators are written in the inner loops,
    so nothing aliases (a scatter over runs of equal indices was 2-3x slower, measured).
    """
    R, Xt = tf.shape
    Xs = Wf.shape[1]
    lo0, hi0 = _ranges(ix0, Xs)
    lo1, hi1 = _ranges(ix1, Xs)
    R4 = R - R % 4
    for r in range(0, R4, 4):
        f0 = tf[r]
        f1 = tf[r + 1]
        f2 = tf[r + 2]
        f3 = tf[r + 3]
        for j in range(Xs):
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            a3 = 0.0
            for x in range(lo0[j], hi0[j]):
                w = wx0[x]
                a0 += w * f0[x]
                a1 += w * f1[x]
                a2 += w * f2[x]
                a3 += w * f3[x]
            for x in range(lo1[j], hi1[j]):
                w = wx1[x]
                a0 += w * f0[x]
                a1 += w * f1[x]
                a2 += w * f2[x]
                a3 += w * f3[x]
            Wf[r, j] = a0
            Wf[r + 1, j] = a1
            Wf[r + 2, j] = a2
            Wf[r + 3, j] = a3
    for r in range(R4, R):
        f = tf[r]
        for j in range(Xs):
            a = 0.0
            for x in range(lo0[j], hi0[j]):
                a += wx0[x] * f[x]
            for x in range(lo1[j], hi1[j]):
                a += wx1[x] * f[x]
            Wf[r, j] = a


#: Below this share of background weight, Rᵀ((1-g)·m) is accumulated on its own instead of
#: taken as Rᵀ1 - Rᵀ(g): the subtraction's rounding (~1e-16 of Rᵀ1) stays below 1e-14 of N.
_MIN_BACKGROUND_SHARE = 0.01


@njit(cache=True, fastmath=_FM)
def _guide_identity(gb, mb, has_mask, Wf, Wb):
    """Wf = g·m, Wb = (1-g)·m when the grids are equal (float64).

    Returns (Σm, Σg·m, Σ(1-g)·m, count of guide or mask values outside [0, 1] or NaN).
    """
    Zt, Yt, Xt = gb.shape
    sm = 0.0
    sf = 0.0
    sb = 0.0
    bad = 0
    for z in range(Zt):
        for y in range(Yt):
            for x in range(Xt):
                gv = np.float64(gb[z, y, x])
                mv = np.float64(mb[z, y, x]) if has_mask else 1.0
                f = gv * mv
                k = (1.0 - gv) * mv
                Wf[z, y, x] = f
                Wb[z, y, x] = k
                sm += mv
                sf += f
                sb += k
                bad += (gv < 0.0) | (gv > 1.0) | (gv != gv) | (mv < 0.0) | (mv > 1.0) | (mv != mv)
    return sm, sf, sb, bad


@njit(cache=True, fastmath=_FM)
def _guide_adjoint(gb, mb, has_mask, Zs, Ys, Xs,
                   iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Wf, Wb):
    """Wf = Rᵀ(g·m), Wb = Rᵀ((1-g)·m) on the source grid (a resized grid: see
    :func:`_guide_identity` for equal grids, kept apart so that the paths which never meet
    equal grids here do not compile that loop).

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
                f_, k_, n_ = _scatter_row1(gr, wz0[zt] * wy0[yt], wz0[zt] * wy1[yt],
                                           tf[iz0[zt], ya], tf[iz0[zt], yb])
                sf += f_
                sb += k_
                bad += n_
                if wz1[zt] != 0.0:
                    _scatter_row1(gr, wz1[zt] * wy0[yt], wz1[zt] * wy1[yt], tf[iz1[zt], ya], tf[iz1[zt], yb])
        sm = float(Zt * Yt * Xt)
        if sb >= _MIN_BACKGROUND_SHARE * sm:
            _adjoint_x1(tf.reshape((Zs * Ys, Xt)), ix0, ix1, wx0, wx1, Wf.reshape((Zs * Ys, Xs)))
            cz = _column_sums(iz0, iz1, wz0, wz1, Zs)
            cy = _column_sums(iy0, iy1, wy0, wy1, Ys)
            cx = _column_sums(ix0, ix1, wx0, wx1, Xs)
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
            a, f_, k_, n_ = _scatter_row(gr, mr, has_mask, c0, c1, tf[iz0[zt], ya], tf[iz0[zt], yb],
                                         tb[iz0[zt], ya], tb[iz0[zt], yb])
            sm += a
            sf += f_
            sb += k_
            bad += n_
            if wz1[zt] != 0.0:  # 3-D: the second z plane (sums already counted)
                c0 = wz1[zt] * wy0[yt]
                c1 = wz1[zt] * wy1[yt]
                _scatter_row(gr, mr, has_mask, c0, c1, tf[iz1[zt], ya], tf[iz1[zt], yb],
                             tb[iz1[zt], ya], tb[iz1[zt], yb])
    _adjoint_x1(tf.reshape((Zs * Ys, Xt)), ix0, ix1, wx0, wx1, Wf.reshape((Zs * Ys, Xs)))
    _adjoint_x1(tb.reshape((Zs * Ys, Xt)), ix0, ix1, wx0, wx1, Wb.reshape((Zs * Ys, Xs)))
    return sm, sf, sb, bad
