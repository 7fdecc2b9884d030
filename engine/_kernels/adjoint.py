"""The adjoint of the separable linear resize applied to the guide weights: ``Rᵀ(g·m)`` and
``Rᵀ((1-g)·m)`` on the features' grid (SPEC §3), scattered row by row, gathered along x."""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from engine._kernels._common import _FM
from engine._kernels._pool import parallel_for, threads

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
    equal grids here do not compile that loop), for one sample: :func:`_planes_block` on all
    its source planes, then its row sums added in row order (:func:`_row_totals`).

    Without a mask only Rᵀg is accumulated and Rᵀ(1-g) = Rᵀ1 - Rᵀg, Rᵀ1 being separable (half
    the work), unless the background is so small that the subtraction would cost precision:
    then the sample is done again with (1-g) accumulated on its own.

    Returns (Σm, Σg·m, Σ(1-g)·m, count of guide or mask values outside [0, 1] or NaN).
    """
    Zt, Yt, Xt = gb.shape
    rs = np.empty((1, Zt * Yt, 3))
    rn = np.empty((1, Zt * Yt), dtype=np.int64)
    tot = np.empty((1, 3))
    bad = np.empty(1, dtype=np.int64)
    if not has_mask:
        _planes_block(gb, mb, has_mask, False, 0, Zs, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                      ix0, ix1, wx0, wx1, rs[0], rn[0], Wf, Wb)
        _row_totals(rs, rn, tot, bad)
        sm = float(Zt * Yt * Xt)
        if tot[0, 2] >= _MIN_BACKGROUND_SHARE * sm:
            return sm, tot[0, 1], tot[0, 2], bad[0]
    _planes_block(gb, mb, has_mask, True, 0, Zs, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                  ix0, ix1, wx0, wx1, rs[0], rn[0], Wf, Wb)
    _row_totals(rs, rn, tot, bad)
    return tot[0, 0], tot[0, 1], tot[0, 2], bad[0]


# --------------------------------------------------------------------------- split over the threads
@njit(nogil=True, cache=True, fastmath=_FM)
def _planes_block(gb, mb, has_mask, full, z0, n0, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                  ix0, ix1, wx0, wx1, rs, rn, Wf, Wb):
    """The adjoint of one sample restricted to its source planes [z0, z0 + n0) (``z0·Ys`` a
    multiple of four, or ``z0 = 0``): ``Wf``, ``Wb`` (Zs, Ys, Xs) on those planes, and the
    (Σm, Σg·m, Σ(1-g)·m) and bad-value count of each target row whose first source plane lies
    there (``rs[zt·Yt + yt]``, ``rn[zt·Yt + yt]``; Σm only with ``full``, else 0).

    One pass over the target grid: the target rows are visited in (zt, yt) order and each is
    scattered, weighted, into those of its (up to four) source (z, y) rows that lie in the
    planes (``tf``, ``tb``: (n0, Ys, Xt)), so every element receives its terms in the same
    order whatever the planes; then the x adjoint runs on them, each row in the same group of
    four rows as over all planes. With ``full``, g·m and (1-g)·m are accumulated (the mask
    path); without it g alone and ``Wb = Rᵀ1 - Wf``, Rᵀ1 being separable.
    """
    Zs, Ys, Xs = Wf.shape
    Zt, Yt, Xt = gb.shape
    if n0 <= 0:
        return
    R = Zs * Ys
    tf = np.zeros((n0, Ys, Xt))
    tb = np.zeros((n0 if full else 0, Ys, Xt))
    for zt in range(Zt):
        za = np.int64(iz0[zt]) - z0  # planes of this block
        zb = np.int64(iz1[zt]) - z0
        p0 = 0 <= za and za < n0
        p1 = wz1[zt] != 0.0 and 0 <= zb and zb < n0
        if not (p0 or p1):
            continue
        for yt in range(Yt):
            gr = gb[zt, yt]
            ya = iy0[yt]
            yb = iy1[yt]
            r = zt * Yt + yt
            if full:
                mr = mb[zt, yt] if has_mask else mb[0, 0]
                if p0:
                    c0 = wz0[zt] * wy0[yt]
                    c1 = wz0[zt] * wy1[yt]
                    a, f_, k_, n_ = _scatter_row(gr, mr, has_mask, c0, c1, tf[za, ya], tf[za, yb],
                                                 tb[za, ya], tb[za, yb])
                    rs[r, 0] = a
                    rs[r, 1] = f_
                    rs[r, 2] = k_
                    rn[r] = n_
                if p1:
                    c0 = wz1[zt] * wy0[yt]
                    c1 = wz1[zt] * wy1[yt]
                    _scatter_row(gr, mr, has_mask, c0, c1, tf[zb, ya], tf[zb, yb], tb[zb, ya], tb[zb, yb])
            else:
                if p0:
                    f_, k_, n_ = _scatter_row1(gr, wz0[zt] * wy0[yt], wz0[zt] * wy1[yt], tf[za, ya], tf[za, yb])
                    rs[r, 0] = 0.0
                    rs[r, 1] = f_
                    rs[r, 2] = k_
                    rn[r] = n_
                if p1:
                    _scatter_row1(gr, wz1[zt] * wy0[yt], wz1[zt] * wy1[yt], tf[zb, ya], tf[zb, yb])
    r0 = z0 * Ys
    r1 = r0 + n0 * Ys
    _adjoint_x1(tf.reshape((n0 * Ys, Xt)), ix0, ix1, wx0, wx1, Wf.reshape((R, Xs))[r0:r1])
    if full:
        _adjoint_x1(tb.reshape((n0 * Ys, Xt)), ix0, ix1, wx0, wx1, Wb.reshape((R, Xs))[r0:r1])
    else:
        cz = _column_sums(iz0, iz1, wz0, wz1, Zs)
        cy = _column_sums(iy0, iy1, wy0, wy1, Ys)
        cx = _column_sums(ix0, ix1, wx0, wx1, Xs)
        for z in range(z0, z0 + n0):
            for y in range(Ys):
                czy = cz[z] * cy[y]
                for x in range(Xs):
                    Wb[z, y, x] = czy * cx[x] - Wf[z, y, x]


@njit(nogil=True, cache=True, fastmath=_FM)
def _planes_range(lo, hi, g, m, has_mask, full, q, samples, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                  ix0, ix1, wx0, wx1, rsum, rbad, Wf, Wb):
    """Work items [lo, hi) = (sample ``samples[j]``, block ``k`` of ``q`` source z planes),
    ``i = j·nk + k``: :func:`_planes_block` of each sample met on the planes of its blocks in
    the range (``q·Ys`` must be a multiple of four, or ``q >= Zs``), its row sums into
    ``rsum[j]`` and ``rbad[j]`` (every row written by the block of its first source plane) for
    :func:`_row_totals` to add in row order. ``g``, ``m``, ``Wf`` (B, Zs, Ys, Xs) and ``Wb`` are
    indexed by the sample. Each target row is read once per range and sample (twice at most
    where two ranges meet).
    """
    Zs = Wf.shape[1]
    nk = (Zs + q - 1) // q
    i = lo
    while i < hi:
        j = i // nk
        k0 = i - j * nk
        k1 = min(nk, k0 + hi - i)
        i += k1 - k0
        b = samples[j]
        z0 = k0 * q
        _planes_block(g[b], m[b] if has_mask else m[0], has_mask, full, z0, min(k1 * q, Zs) - z0,
                      iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, rsum[j], rbad[j], Wf[b], Wb[b])


@njit(cache=True)  # no fast-math: each sample's row sums are added one after the other, in row order
def _row_totals(rsum, rbad, sums, bad):
    """``sums[j] = Σ_r rsum[j, r]`` (Σm, Σg·m, Σ(1-g)·m) and ``bad[j] = Σ_r rbad[j, r]``, each
    sum from 0.0 in row order (a NumPy reduction would add in another order, an accumulate along
    the rows cost ~0.2 ms per 128² rows)."""
    for j in range(rsum.shape[0]):
        sm = 0.0
        sf = 0.0
        sb = 0.0
        n = 0
        for r in range(rsum.shape[1]):
            sm += rsum[j, r, 0]
            sf += rsum[j, r, 1]
            sb += rsum[j, r, 2]
            n += rbad[j, r]
        sums[j, 0] = sm
        sums[j, 1] = sf
        sums[j, 2] = sb
        bad[j] = n


def guide_adjoint(g: np.ndarray, m: np.ndarray, has_mask: bool, src: tuple[int, int, int],
                  weights: tuple[np.ndarray, ...], Wf: np.ndarray, Wb: np.ndarray, sums: np.ndarray,
                  bad: np.ndarray) -> None:
    """:func:`_guide_adjoint` of every sample, split over the threads, with the same bits.

    The work items are (sample, block of source z planes) (:func:`_planes_range`), so a
    single 3-D volume uses every thread (whole samples when the threads divide the batch:
    nothing is read twice). Any split gives the same bits: each element of the weights
    receives its terms in the serial order whichever range computes it, and each sample's
    per-row sums are added in target-row order afterwards (:func:`_row_totals`), as the serial
    pass adds them.

    Parameters
    ----------
    g, m : numpy.ndarray
        Guide (B, Zt, Yt, Xt) and mask (read only with ``has_mask``: ``m[0]`` otherwise).
    has_mask : bool
        Whether ``m`` is a mask.
    src : tuple of int
        The source grid (Zs, Ys, Xs), different from the guide's.
    weights : tuple of numpy.ndarray
        ``(iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)``, the resize's weights.
    Wf, Wb : numpy.ndarray
        Outputs, (B, Zs, Ys, Xs) float64, C-contiguous: Rᵀ(g·m) and Rᵀ((1-g)·m).
    sums : numpy.ndarray
        Output, (B, 3) float64: (Σm, Σg·m, Σ(1-g)·m).
    bad : numpy.ndarray
        Output, (B,) int64: the count of guide or mask values outside [0, 1] or NaN.
    """
    B, Zt, Yt, Xt = g.shape
    Zs, Ys, Xs = src
    if B % threads() == 0:  # whole samples, as many on each thread
        q, chunks = Zs, 1
    else:  # blocks of planes, each starting at a row that is a multiple of 4
        q, chunks = 4 // math.gcd(Ys, 4), 2
    nk = (Zs + q - 1) // q

    def run(samples: np.ndarray, full: bool) -> None:
        k = len(samples)
        rsum = np.empty((k, Zt * Yt, 3))  # every row is written (by the range of its first source plane)
        rbad = np.empty((k, Zt * Yt), dtype=np.int64)
        parallel_for(_planes_range, k * nk, g, m, has_mask, full, q, samples, *weights, rsum, rbad, Wf, Wb,
                     chunks_per_thread=chunks)
        s = np.empty((k, 3))
        c = np.empty(k, dtype=np.int64)
        _row_totals(rsum, rbad, s, c)
        if not full:
            s[:, 0] = float(Zt * Yt * Xt)
        sums[samples] = s
        bad[samples] = c

    samples = np.arange(B, dtype=np.int64)
    run(samples, has_mask)
    if not has_mask:  # as _guide_adjoint (NaN included): (1-g) on its own when Rᵀ1 - Rᵀg would lose it
        redo = samples[~(sums[:, 2] >= _MIN_BACKGROUND_SHARE * sums[:, 0])]
        if len(redo):
            run(redo, True)
