"""Decisions and confusion counts on the target grid: the scalar map ``z`` interpolated along x
once, then two (2-D) or four (3-D) rows per target row; Dice from the counts."""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels._common import _EMPTY_DICE, _FM, _OK

__all__: list[str] = []  # private module


# --------------------------------------------------------------------------- maps and counts
@njit(cache=True, fastmath=_FM)
def _interp_x(a, Xt, ix0, ix1, wx0, wx1):
    """Interpolate every source row along x: (Zs, Ys, Xs) -> (Zs, Ys, Xt) float64.

    Each source row is copied to a contiguous float64 buffer with its forward differences,
    so every output is one gather: ``row[i0] + w1·(row[i1] - row[i0])`` (``i1`` is ``i0 + 1``
    or, at the last position, ``i0``, as :func:`engine.resize.linear_weights` guarantees).
    The rows are :func:`_interp_x_rows` over all of them (the split path runs it over parts).
    """
    Zs, Ys, Xs = a.shape
    out = np.empty((Zs, Ys, Xt))
    _interp_x_rows(a, out, 0, Zs * Ys, ix0, wx1)
    return out


@njit(nogil=True, cache=True, fastmath=_FM)
def _interp_x_rows(a, out, r0, r1, ix0, wx1):
    """Source rows [r0, r1) (flattened (z, y)) of :func:`_interp_x` into ``out`` (Zs, Ys, Xt)."""
    Zs, Ys, Xs = a.shape
    Xt = out.shape[2]
    base = np.empty(Xs)
    diff = np.empty(Xs)
    for r in range(r0, r1):
        z = r // Ys
        y = r - z * Ys
        for i in range(Xs):
            base[i] = np.float64(a[z, y, i])
        for i in range(Xs - 1):
            diff[i] = base[i + 1] - base[i]
        diff[Xs - 1] = 0.0
        for x in range(Xt):
            j = ix0[x]
            out[z, y, x] = base[j] + wx1[x] * diff[j]


@njit(cache=True, fastmath=_FM)
def _count_rows(A, refb, mid, sign, r0, r1, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1):
    """Counts over target rows [r0, r1) (flattened (zt, yt)) of ``sign·(v - mid) > 0``.

    ``A`` is the map already interpolated along x (:func:`_interp_x`, float64); each target
    row combines two (2-D) or four (3-D) rows of ``A``. Returns (positives, positives inside
    ``refb``).
    """
    npos = 0
    tp = 0
    if sign == 0.0:
        return npos, tp
    _, Yt, Xt = refb.shape
    smid = sign * mid
    for r in range(r0, r1):
        zt = r // Yt
        yt = r - zt * Yt
        z0 = iz0[zt]
        z1 = iz1[zt]
        y0 = iy0[yt]
        y1 = iy1[yt]
        c00 = sign * wz0[zt] * wy0[yt]
        c01 = sign * wz0[zt] * wy1[yt]
        if wz1[zt] == 0.0:
            for x in range(Xt):
                v = c00 * A[z0, y0, x] + c01 * A[z0, y1, x]
                p = 1 if v > smid else 0
                npos += p
                tp += p * refb[zt, yt, x]
        else:
            c10 = sign * wz1[zt] * wy0[yt]
            c11 = sign * wz1[zt] * wy1[yt]
            for x in range(Xt):
                v = c00 * A[z0, y0, x] + c01 * A[z0, y1, x] + c10 * A[z1, y0, x] + c11 * A[z1, y1, x]
                p = 1 if v > smid else 0
                npos += p
                tp += p * refb[zt, yt, x]
    return npos, tp


@njit(cache=True, fastmath=_FM)
def _count(a, refb, mid, sign, identity, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1):
    """Count positions with ``sign·(R a - mid) > 0`` and those also in ``refb``: (npos, tp).

    On an identity grid ``a`` (any float dtype) is compared in place; otherwise it is first
    interpolated along x (:func:`_interp_x`), so :func:`_count_rows` meets float64 only (one
    specialisation to compile, whatever the features' dtype).
    """
    Zt, Yt, Xt = refb.shape
    if sign == 0.0:
        return 0, 0
    if identity:
        npos = 0
        tp = 0
        smid = sign * mid
        for zt in range(Zt):
            for yt in range(Yt):
                r = a[zt, yt]
                rr = refb[zt, yt]
                for x in range(Xt):
                    p = 1 if sign * np.float64(r[x]) > smid else 0
                    npos += p
                    tp += p * rr[x]
        return npos, tp
    A = _interp_x(a, Xt, ix0, ix1, wx0, wx1)
    return _count_rows(A, refb, mid, sign, 0, Zt * Yt, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1)


@njit(cache=True, fastmath=_FM)
def _count_flat(z, ref, mid):
    """(positives, positives in ref, |ref|) of ``z > mid`` on an identity grid (flat)."""
    return _count_flat_range(z, ref, mid, 0, z.shape[0])


@njit(nogil=True, cache=True, fastmath=_FM)
def _count_flat_range(z, ref, mid, lo, hi):
    """:func:`_count_flat` over the positions [lo, hi)."""
    npos = 0
    tp = 0
    ny = 0
    for i in range(lo, hi):
        p = z[i] > mid
        y = ref[i] != 0
        npos += p
        tp += p & y
        ny += y
    return npos, tp, ny


@njit(cache=True, fastmath=_FM)
def _count_resized(A, refb, mid, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1):
    """Like :func:`_count_flat` for ``R z > mid``, ``A`` being z already interpolated along x:
    :func:`_count_resized_rows` over every target row."""
    Zt, Yt, _ = refb.shape
    return _count_resized_rows(A, refb, mid, 0, Zt * Yt, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1)


@njit(nogil=True, cache=True, fastmath=_FM)
def _count_resized_rows(A, refb, mid, r0, r1, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1):
    """:func:`_count_resized` over the target rows [r0, r1) (flattened (zt, yt)).

    Rows count in int32 lanes (twice as many per vector as int64), then add to int64 totals.
    """
    _, Yt, Xt = refb.shape
    npos = 0
    tp = 0
    ny = 0
    for r in range(r0, r1):
        zt = r // Yt
        yt = r - zt * Yt
        z0 = iz0[zt]
        z1 = iz1[zt]
        y0 = iy0[yt]
        y1 = iy1[yt]
        c00 = wz0[zt] * wy0[yt]
        c01 = wz0[zt] * wy1[yt]
        c10 = wz1[zt] * wy0[yt]
        c11 = wz1[zt] * wy1[yt]
        a0 = A[z0, y0]
        a1 = A[z0, y1]
        rr = refb[zt, yt]
        rn = np.int32(0)
        rt = np.int32(0)
        ry = np.int32(0)
        if c10 == 0.0 and c11 == 0.0:
            for x in range(Xt):
                p = np.int32(c00 * a0[x] + c01 * a1[x] > mid)
                y = np.int32(rr[x])
                rn += p
                rt += p & y
                ry += y
        else:
            a2 = A[z1, y0]
            a3 = A[z1, y1]
            for x in range(Xt):
                p = np.int32(c00 * a0[x] + c01 * a1[x] + c10 * a2[x] + c11 * a3[x] > mid)
                y = np.int32(rr[x])
                rn += p
                rt += p & y
                ry += y
        npos += rn
        tp += rt
        ny += ry
    return npos, tp, ny


@njit(cache=True, fastmath=_FM)
def _layer_counts(z, refb, mid, identity, Zs, Ys, Xs,
                  iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1):
    """(positives, positives in ref, |ref|) of ``R z > mid`` for a flat source-grid z."""
    if identity:
        return _count_flat(z, refb.reshape(refb.size), mid)
    A = _interp_x(z.reshape((Zs, Ys, Xs)), refb.shape[2], ix0, ix1, wx0, wx1)
    return _count_resized(A, refb, mid, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1)


@njit(cache=True, fastmath=_FM)
def _ref_count(ref):
    ny = 0
    for i in range(ref.shape[0]):
        ny += ref[i] != 0
    return ny


@njit(cache=True)
def dice_counts(status, npos, tp, ny, per, empty_one, score, status_out, tp_out, fp_out, fn_out):
    """Dice and confusion counts from the kernels' counts (flat arrays; ``status`` and ``ny``
    per sample, element i belonging to sample ``i // per``). Undefined prototypes count as an
    empty map; an empty map and reference give ``EMPTY_DICE`` (score NaN, or 1 with
    ``empty_one``)."""
    for i in range(npos.shape[0]):
        code = status[i // per]
        t = 0
        f = 0
        if code == _OK:
            t = tp[i]
            f = npos[i] - t
        n = ny[i // per] - t
        den = 2 * t + f + n
        s = np.nan
        if code == _OK:
            if den > 0:
                s = 2.0 * t / den
            else:
                code = _EMPTY_DICE
                if empty_one:
                    s = 1.0
        score[i] = s
        status_out[i] = code
        tp_out[i] = t
        fp_out[i] = f
        fn_out[i] = n
