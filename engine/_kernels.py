"""Private Numba kernels behind :mod:`engine.scores` (SPEC §1-3). Pure functions, no I/O.

Conventions (the driver in :mod:`engine.scores` guarantees them; nothing is checked here):

- ``F`` features ``(B, C, Zs, Ys, Xs)`` or, with ``channels_last=True``, ``(B, Zs, Ys, Xs, C)``,
  float32 or float64, any strides (1-D and 2-D inputs are padded with unit axes). Channels-last
  arrays are indexed in their own order, so a contiguous one keeps contiguous inner loops
  (3-5x faster than a strided ``moveaxis`` view, measured).
- ``g`` guide and ``m`` tissue mask ``(B, Zt, Yt, Xt)`` on the reference (target) grid,
  float32 or float64 (``m`` is a ``(1, 1, 1, 1)`` dummy when ``has_mask`` is False);
  ``ref`` reference ``(B, Zt, Yt, Xt)`` uint8 in {0, 1}.
- Per axis linear weights ``(i0, i1, w0, w1)`` from :func:`engine.resize.linear_weights`
  (source length → target length); ``identity`` is True when the grids are equal.
- Outputs are preallocated by the caller; each ``prange`` worker writes only its own
  sample (or sample × channel) slice.

Arithmetic is float64. The fast-math flags are limited to ``reassoc`` and ``contract`` so that
sums vectorise while NaN and Inf keep their IEEE meaning: a non-finite feature anywhere makes
the unnormalised prototype sums non-finite (``0 * NaN`` stays NaN), which is how non-finite
samples are detected without a separate pass.

Upsample mode never materialises the upsampled features. With ``R`` the separable linear
resize: prototypes ``P = F · Rᵀ(g·m) / Σ g·m`` and ``N = F · Rᵀ((1-g)·m) / Σ (1-g)·m``;
the decision ``d⁺ - d⁻ = 2·R(F·(P-N)) - (‖P‖² - ‖N‖²) > 0`` needs only the upsampled scalar map
``z = F·(P-N)``; per unit the decision is ``sign(P_c - N_c)·(R F_c - (P_c + N_c)/2) > 0``.
Resizing is evaluated row by row: each source row is first interpolated along x (once), then
every target row combines two (2-D) or four (3-D) of those rows.
"""
from __future__ import annotations

import os

import numpy as np

from engine._numba_cache import ensure_cache_dir, prefer_passive_waiting

ensure_cache_dir(os.path.dirname(os.path.abspath(__file__)))
prefer_passive_waiting()

from numba import njit, prange  # noqa: E402  (after the cache folder is settled)

from engine.status import Status

__all__: list[str] = []  # private module

_FM = {"reassoc", "contract"}
_TILE = 2048  # positions per spatial tile in the channel loops (16 KiB of float64)

_OK = int(Status.OK)
_EMPTY_FOREGROUND = int(Status.EMPTY_FOREGROUND)
_EMPTY_BACKGROUND = int(Status.EMPTY_BACKGROUND)
_EMPTY_MASK = int(Status.EMPTY_MASK)
_NONFINITE = int(Status.NONFINITE)
_EMPTY_DICE = int(Status.EMPTY_DICE)


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
def _guide_adjoint(gb, mb, has_mask, identity, Zs, Ys, Xs,
                   iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Wf, Wb):
    """Wf = Rᵀ(g·m), Wb = Rᵀ((1-g)·m) on the source grid.

    Returns (Σm, Σg·m, Σ(1-g)·m, count of guide or mask values outside [0, 1] or NaN).
    """
    Zt, Yt, Xt = gb.shape
    sm = 0.0
    sf = 0.0
    sb = 0.0
    bad = 0
    if identity:
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


@njit(cache=True, fastmath=_FM)
def _feature_sums_rows(Fb, Wf, Wb, channels_last, r0, r1, pf, pb):
    """Add Σ F[c, s]·Wf[s] to pf[c] and Σ F[c, s]·Wb[s] to pb[c] over source rows [r0, r1).

    Rows are the flattened (z, y) index. Channels-first walks spatial tiles of ~2k positions
    so that the weight tiles stay in L1 while every channel streams through.
    """
    C = pf.shape[0]
    Z, Y, X = Wf.shape
    if channels_last:
        for r in range(r0, r1):
            z = r // Y
            y = r - z * Y
            for x in range(X):
                wf = Wf[z, y, x]
                wb = Wb[z, y, x]
                for c in range(C):
                    f = np.float64(Fb[z, y, x, c])
                    pf[c] += f * wf
                    pb[c] += f * wb
    else:
        # four channels per sweep: eight independent reductions share the weight loads
        # (2x faster than one channel at a time, measured)
        step = max(1, _TILE // X)
        C4 = C - C % 4
        for t0 in range(r0, r1, step):
            t1 = min(t0 + step, r1)
            for c in range(0, C4, 4):
                a0 = 0.0
                a1 = 0.0
                a2 = 0.0
                a3 = 0.0
                b0 = 0.0
                b1 = 0.0
                b2 = 0.0
                b3 = 0.0
                for r in range(t0, t1):
                    z = r // Y
                    y = r - z * Y
                    for x in range(X):
                        wf = Wf[z, y, x]
                        wb = Wb[z, y, x]
                        f0 = np.float64(Fb[c, z, y, x])
                        f1 = np.float64(Fb[c + 1, z, y, x])
                        f2 = np.float64(Fb[c + 2, z, y, x])
                        f3 = np.float64(Fb[c + 3, z, y, x])
                        a0 += f0 * wf
                        a1 += f1 * wf
                        a2 += f2 * wf
                        a3 += f3 * wf
                        b0 += f0 * wb
                        b1 += f1 * wb
                        b2 += f2 * wb
                        b3 += f3 * wb
                pf[c] += a0
                pf[c + 1] += a1
                pf[c + 2] += a2
                pf[c + 3] += a3
                pb[c] += b0
                pb[c + 1] += b1
                pb[c + 2] += b2
                pb[c + 3] += b3
            for c in range(C4, C):
                af = 0.0
                ab = 0.0
                for r in range(t0, t1):
                    z = r // Y
                    y = r - z * Y
                    for x in range(X):
                        f = np.float64(Fb[c, z, y, x])
                        af += f * Wf[z, y, x]
                        ab += f * Wb[z, y, x]
                pf[c] += af
                pb[c] += ab


@njit(cache=True, fastmath=_FM)
def _feature_sums(Fb, Wf, Wb, channels_last, pf, pb):
    """pf[c] = Σ_s F[c, s]·Wf[s], pb[c] = Σ_s F[c, s]·Wb[s] (float64)."""
    pf[:] = 0.0
    pb[:] = 0.0
    Z, Y, _ = Wf.shape
    _feature_sums_rows(Fb, Wf, Wb, channels_last, 0, Z * Y, pf, pb)


@njit(cache=True)
def _finalize(Pb, Nb, sm, sf, sb):
    """Status from the sums; divide the prototype sums (NaN when undefined)."""
    C = Pb.shape[0]
    total = 0.0
    for c in range(C):
        total += Pb[c] + Nb[c]
    if not np.isfinite(total):
        code = _NONFINITE
    elif sm == 0.0:
        code = _EMPTY_MASK
    elif sf == 0.0:
        code = _EMPTY_FOREGROUND
    elif sb == 0.0:
        code = _EMPTY_BACKGROUND
    else:
        code = _OK
    for c in range(C):
        if code == _OK:
            Pb[c] = Pb[c] / sf
            Nb[c] = Nb[c] / sb
        else:
            Pb[c] = np.nan
            Nb[c] = np.nan
    return code


@njit(cache=True, fastmath=_FM)
def _sample_prototypes(Fb, gb, mb, has_mask, identity, channels_last,
                       iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Pb, Nb):
    """Prototypes of one sample into Pb, Nb (NaN when undefined); returns the status code."""
    if channels_last:
        Zs, Ys, Xs, C = Fb.shape
    else:
        C, Zs, Ys, Xs = Fb.shape
    Wf = np.empty((Zs, Ys, Xs))
    Wb = np.empty((Zs, Ys, Xs))
    sm, sf, sb, _ = _guide_adjoint(gb, mb, has_mask, identity, Zs, Ys, Xs,
                                   iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Wf, Wb)
    _feature_sums(Fb, Wf, Wb, channels_last, Pb, Nb)
    return _finalize(Pb, Nb, sm, sf, sb)


@njit(cache=True, fastmath=_FM)
def _project_rows(Fb, D, channels_last, r0, r1, out):
    """out[s] = Σ_c F[c, s]·D[c] (float64) for the source rows [r0, r1) (flattened (z, y))."""
    C = D.shape[0]
    Z, Y, X = out.shape
    if channels_last:
        for r in range(r0, r1):
            z = r // Y
            y = r - z * Y
            for x in range(X):
                acc = 0.0
                for c in range(C):
                    acc += np.float64(Fb[z, y, x, c]) * D[c]
                out[z, y, x] = acc
    else:
        # spatial tiles: the output tile stays in L1 while the channels stream through
        step = max(1, _TILE // X)
        for t0 in range(r0, r1, step):
            t1 = min(t0 + step, r1)
            for r in range(t0, t1):
                z = r // Y
                y = r - z * Y
                for x in range(X):
                    out[z, y, x] = 0.0
            C4 = C - C % 4
            for c in range(0, C4, 4):  # four channels per sweep of the output tile
                d0 = D[c]
                d1 = D[c + 1]
                d2 = D[c + 2]
                d3 = D[c + 3]
                for r in range(t0, t1):
                    z = r // Y
                    y = r - z * Y
                    for x in range(X):
                        out[z, y, x] += (np.float64(Fb[c, z, y, x]) * d0 + np.float64(Fb[c + 1, z, y, x]) * d1
                                         + np.float64(Fb[c + 2, z, y, x]) * d2
                                         + np.float64(Fb[c + 3, z, y, x]) * d3)
            for c in range(C4, C):
                d = D[c]
                for r in range(t0, t1):
                    z = r // Y
                    y = r - z * Y
                    for x in range(X):
                        out[z, y, x] += np.float64(Fb[c, z, y, x]) * d


@njit(cache=True, fastmath=_FM)
def _project(Fb, D, channels_last, out):
    """out[s] = Σ_c F[c, s]·D[c] on the whole source grid (float64)."""
    Z, Y, _ = out.shape
    _project_rows(Fb, D, channels_last, 0, Z * Y, out)


# --------------------------------------------------------------------------- maps and counts
@njit(cache=True)
def _runs(i0, i1):
    """Start of each run of equal (i0, i1) pairs, plus the end: int64[n_runs + 1]."""
    n = len(i0)
    starts = np.empty(n + 1, dtype=np.int64)
    k = 0
    for x in range(n):
        if x == 0 or i0[x] != i0[x - 1] or i1[x] != i1[x - 1]:
            starts[k] = x
            k += 1
    starts[k] = n
    return starts[: k + 1]


@njit(cache=True, fastmath=_FM)
def _interp_x(a, Xt, ix0, ix1, wx0, wx1):
    """Interpolate every source row along x: (Zs, Ys, Xs) -> (Zs, Ys, Xt) float64.

    Each source row is copied to a contiguous float64 buffer with its forward differences,
    so every output is one gather: ``row[i0] + w1·(row[i1] - row[i0])`` (``i1`` is ``i0 + 1``
    or, at the last position, ``i0``, as :func:`engine.resize.linear_weights` guarantees).
    """
    Zs, Ys, Xs = a.shape
    out = np.empty((Zs, Ys, Xt))
    base = np.empty(Xs)
    diff = np.empty(Xs)
    for z in range(Zs):
        for y in range(Ys):
            for i in range(Xs):
                base[i] = np.float64(a[z, y, i])
            for i in range(Xs - 1):
                diff[i] = base[i + 1] - base[i]
            diff[Xs - 1] = 0.0
            for x in range(Xt):
                j = ix0[x]
                out[z, y, x] = base[j] + wx1[x] * diff[j]
    return out


@njit(cache=True, fastmath=_FM)
def _count_rows(A, refb, mid, sign, identity, r0, r1, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1):
    """Counts over target rows [r0, r1) (flattened (zt, yt)) of ``sign·(v - mid) > 0``.

    ``A`` is the source map itself when ``identity``, else the map already interpolated along
    x (:func:`_interp_x`); each target row combines two (2-D) or four (3-D) rows of ``A``.
    Returns (positives, positives inside ``refb``).
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
        if identity:
            for x in range(Xt):
                p = 1 if sign * np.float64(A[zt, yt, x]) > smid else 0
                npos += p
                tp += p * refb[zt, yt, x]
            continue
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
    """Count positions with ``sign·(R a - mid) > 0`` and those also in ``refb``: (npos, tp)."""
    Zt, Yt, Xt = refb.shape
    if sign == 0.0:
        return 0, 0
    if identity:
        return _count_rows(a, refb, mid, sign, identity, 0, Zt * Yt, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1)
    A = _interp_x(a, Xt, ix0, ix1, wx0, wx1)
    return _count_rows(A, refb, mid, sign, identity, 0, Zt * Yt, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1)


@njit(cache=True, fastmath=_FM)
def _write_maps(a, mid, identity, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                binb, probb):
    """binary = R a > mid, probability = sigmoid(2·(R a - mid)) on the target grid."""
    Zt, Yt, Xt = binb.shape
    if identity:
        for z in range(Zt):
            for y in range(Yt):
                for x in range(Xt):
                    v = a[z, y, x]
                    binb[z, y, x] = v > mid
                    probb[z, y, x] = 1.0 / (1.0 + np.exp(2.0 * mid - 2.0 * v))
        return
    A = _interp_x(a, Xt, ix0, ix1, wx0, wx1)
    for zt in range(Zt):
        z0 = iz0[zt]
        z1 = iz1[zt]
        for yt in range(Yt):
            y0 = iy0[yt]
            y1 = iy1[yt]
            c00 = wz0[zt] * wy0[yt]
            c01 = wz0[zt] * wy1[yt]
            c10 = wz1[zt] * wy0[yt]
            c11 = wz1[zt] * wy1[yt]
            for x in range(Xt):
                if c10 == 0.0 and c11 == 0.0:
                    v = c00 * A[z0, y0, x] + c01 * A[z0, y1, x]
                else:
                    v = c00 * A[z0, y0, x] + c01 * A[z0, y1, x] + c10 * A[z1, y0, x] + c11 * A[z1, y1, x]
                binb[zt, yt, x] = v > mid
                probb[zt, yt, x] = 1.0 / (1.0 + np.exp(2.0 * mid - 2.0 * v))


@njit(cache=True, fastmath=_FM)
def _layer_scalar(Fb, Pb, Nb, channels_last):
    """z = F·(P-N) on the source grid and the threshold (‖P‖² - ‖N‖²)/2."""
    if channels_last:
        Zs, Ys, Xs, C = Fb.shape
    else:
        C, Zs, Ys, Xs = Fb.shape
    D = np.empty(C)
    k = 0.0
    for c in range(C):
        D[c] = Pb[c] - Nb[c]
        k += D[c] * (Pb[c] + Nb[c])
    z = np.empty((Zs, Ys, Xs))
    _project(Fb, D, channels_last, z)
    return z, 0.5 * k


# --------------------------------------------------------------------------- fused path
# C-contiguous channels-first features seen as (B, C, S), S the flattened spatial size. Per
# sample the channels go in blocks small enough to stay in L2: a block's prototype sums are
# taken while it streams in from memory, then its share of z = F·(P-N) is added while it is
# still cached, so each feature byte leaves memory once (the whole layer-level sweep of
# benchmarks/kernels.py went from 3.3-5.5x to 1.8x the one-pass bandwidth floor). Blocks of
# four channels at least (fewer, e.g. two 256² planes, ran 2x slower: too few memory streams).
# Inner loops run over 0-based slices: a loop ``for s in range(t0, t1)`` indexing the full row
# is not vectorised by Numba (3x slower, measured).
_FLAT_TILE = 2048          # positions per tile (16 KiB of float64 weights per array)
_BLOCK_BYTES = 3 << 18     # features per channel block (768 KiB; L2 is 2 MiB per core here)

_MODE_GUIDE = 0            # identity grid, no mask: weights g and 1 - g read from the guide
_MODE_GUIDE_MASK = 1       # identity grid with mask: g·m and (1 - g)·m
_MODE_WEIGHTS = 2          # resized: precomputed Rᵀ(g·m), Rᵀ((1-g)·m) on the source grid


@njit(cache=True, fastmath=_FM)
def _sums4(Fb, c, t0, t1, mode, g, m, Wf, Wb):
    """Prototype sums of channels c..c+3 over positions [t0, t1): (Σf·wf)x4, (Σf·wb)x4.

    The three loops differ only in where the weights come from (guide, guide and mask, or
    precomputed arrays); they are written out so that each inner loop stays branch-free.
    """
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    b0 = 0.0
    b1 = 0.0
    b2 = 0.0
    b3 = 0.0
    n = t1 - t0
    r0 = Fb[c, t0:t1]
    r1 = Fb[c + 1, t0:t1]
    r2 = Fb[c + 2, t0:t1]
    r3 = Fb[c + 3, t0:t1]
    if mode == _MODE_GUIDE:
        gg = g[t0:t1]
        for i in range(n):
            u = np.float64(gg[i])
            v = 1.0 - u
            f0 = np.float64(r0[i])
            f1 = np.float64(r1[i])
            f2 = np.float64(r2[i])
            f3 = np.float64(r3[i])
            a0 += f0 * u
            a1 += f1 * u
            a2 += f2 * u
            a3 += f3 * u
            b0 += f0 * v
            b1 += f1 * v
            b2 += f2 * v
            b3 += f3 * v
    elif mode == _MODE_GUIDE_MASK:
        gg = g[t0:t1]
        mm = m[t0:t1]
        for i in range(n):
            gv = np.float64(gg[i])
            mv = np.float64(mm[i])
            u = gv * mv
            v = (1.0 - gv) * mv
            f0 = np.float64(r0[i])
            f1 = np.float64(r1[i])
            f2 = np.float64(r2[i])
            f3 = np.float64(r3[i])
            a0 += f0 * u
            a1 += f1 * u
            a2 += f2 * u
            a3 += f3 * u
            b0 += f0 * v
            b1 += f1 * v
            b2 += f2 * v
            b3 += f3 * v
    else:
        wf = Wf[t0:t1]
        wb = Wb[t0:t1]
        for i in range(n):
            u = wf[i]
            v = wb[i]
            f0 = np.float64(r0[i])
            f1 = np.float64(r1[i])
            f2 = np.float64(r2[i])
            f3 = np.float64(r3[i])
            a0 += f0 * u
            a1 += f1 * u
            a2 += f2 * u
            a3 += f3 * u
            b0 += f0 * v
            b1 += f1 * v
            b2 += f2 * v
            b3 += f3 * v
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(cache=True, fastmath=_FM)
def _sums1(Fb, c, t0, t1, mode, g, m, Wf, Wb):
    """Prototype sums of channel c over positions [t0, t1): (Σf·wf, Σf·wb)."""
    a = 0.0
    b = 0.0
    n = t1 - t0
    r = Fb[c, t0:t1]
    if mode == _MODE_GUIDE:
        gg = g[t0:t1]
        for i in range(n):
            u = np.float64(gg[i])
            f = np.float64(r[i])
            a += f * u
            b += f * (1.0 - u)
    elif mode == _MODE_GUIDE_MASK:
        gg = g[t0:t1]
        mm = m[t0:t1]
        for i in range(n):
            gv = np.float64(gg[i])
            mv = np.float64(mm[i])
            f = np.float64(r[i])
            a += f * (gv * mv)
            b += f * ((1.0 - gv) * mv)
    else:
        wf = Wf[t0:t1]
        wb = Wb[t0:t1]
        for i in range(n):
            f = np.float64(r[i])
            a += f * wf[i]
            b += f * wb[i]
    return a, b


@njit(cache=True, fastmath=_FM)
def _block_sums(Fb, c0, c1, mode, g, m, Wf, Wb, pf, pb):
    """pf[c], pb[c] = unnormalised prototype sums of channels [c0, c1) (tile by tile)."""
    S = Fb.shape[1]
    for c in range(c0, c1):
        pf[c] = 0.0
        pb[c] = 0.0
    cq = c1 - (c1 - c0) % 4
    for t0 in range(0, S, _FLAT_TILE):
        t1 = min(t0 + _FLAT_TILE, S)
        for c in range(c0, cq, 4):
            a0, a1, a2, a3, b0, b1, b2, b3 = _sums4(Fb, c, t0, t1, mode, g, m, Wf, Wb)
            pf[c] += a0
            pf[c + 1] += a1
            pf[c + 2] += a2
            pf[c + 3] += a3
            pb[c] += b0
            pb[c + 1] += b1
            pb[c + 2] += b2
            pb[c + 3] += b3
        for c in range(cq, c1):
            a, b = _sums1(Fb, c, t0, t1, mode, g, m, Wf, Wb)
            pf[c] += a
            pb[c] += b


@njit(cache=True, fastmath=_FM)
def _block_project(Fb, D, c0, c1, z):
    """z += Σ_{c in [c0, c1)} F[c]·D[c] (tile by tile: the z tile stays in L1)."""
    S = Fb.shape[1]
    cq = c1 - (c1 - c0) % 4
    for t0 in range(0, S, _FLAT_TILE):
        t1 = min(t0 + _FLAT_TILE, S)
        n = t1 - t0
        zt = z[t0:t1]
        for c in range(c0, cq, 4):
            r0 = Fb[c, t0:t1]
            r1 = Fb[c + 1, t0:t1]
            r2 = Fb[c + 2, t0:t1]
            r3 = Fb[c + 3, t0:t1]
            d0 = D[c]
            d1 = D[c + 1]
            d2 = D[c + 2]
            d3 = D[c + 3]
            for i in range(n):
                zt[i] += (np.float64(r0[i]) * d0 + np.float64(r1[i]) * d1
                          + np.float64(r2[i]) * d2 + np.float64(r3[i]) * d3)
        for c in range(cq, c1):
            r = Fb[c, t0:t1]
            d = D[c]
            for i in range(n):
                zt[i] += np.float64(r[i]) * d


@njit(cache=True, fastmath=_FM)
def _guide_sums(g, m, has_mask):
    """(Σm, Σg·m, Σ(1-g)·m, values outside [0, 1] or NaN) on an identity grid (flat g, m)."""
    sm = 0.0
    sf = 0.0
    sb = 0.0
    bad = 0
    n = g.shape[0]
    if has_mask:
        for i in range(n):
            gv = np.float64(g[i])
            mv = np.float64(m[i])
            sm += mv
            sf += gv * mv
            sb += (1.0 - gv) * mv
            bad += (gv < 0.0) | (gv > 1.0) | (gv != gv) | (mv < 0.0) | (mv > 1.0) | (mv != mv)
    else:
        for i in range(n):
            gv = np.float64(g[i])
            sf += gv
            sb += 1.0 - gv
            bad += (gv < 0.0) | (gv > 1.0) | (gv != gv)
        sm = float(n)
    return sm, sf, sb, bad


@njit(cache=True, fastmath=_FM)
def _flat_weights(gb, mb, has_mask, identity, Zs, Ys, Xs,
                  iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Wf3, Wb3):
    """Guide weights of one sample for :func:`_flat_channels`: (mode, sm, sf, sb, bad).

    On an identity grid the guide (and mask) are read directly and ``Wf3``/``Wb3`` are not
    touched; otherwise they receive Rᵀ(g·m) and Rᵀ((1-g)·m) on the (Zs, Ys, Xs) source grid.
    """
    if identity:
        sm, sf, sb, bad = _guide_sums(gb.reshape(gb.size), mb.reshape(mb.size), has_mask)
        return (_MODE_GUIDE_MASK if has_mask else _MODE_GUIDE), sm, sf, sb, bad
    sm, sf, sb, bad = _guide_adjoint(gb, mb, has_mask, identity, Zs, Ys, Xs,
                                     iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Wf3, Wb3)
    return _MODE_WEIGHTS, sm, sf, sb, bad


@njit(cache=True, fastmath=_FM)
def _flat_channels(Fb, c_lo, c_hi, mode, g, m, Wf, Wb, sf, sb, do_z, Pb, Nb, z):
    """Channels [c_lo, c_hi) of one (C, S) sample: prototype sums into Pb, Nb (unnormalised)
    and, with ``do_z``, their share of z = F·(P-N) added to ``z``, block by block.

    Returns their share of ‖P‖² - ‖N‖².
    """
    S = Fb.shape[1]
    nb = max(1, _BLOCK_BYTES // max(1, S * Fb.itemsize))
    if nb > 4:
        nb -= nb % 4
    elif c_hi - c_lo > 4:
        nb = 4
    if not do_z:
        nb = max(1, c_hi - c_lo)  # prototypes only: one sweep over the channels, tile by tile
    D = np.empty(Pb.shape[0])
    k = 0.0
    for c0 in range(c_lo, c_hi, nb):
        c1 = min(c0 + nb, c_hi)
        _block_sums(Fb, c0, c1, mode, g, m, Wf, Wb, Pb, Nb)
        if do_z:
            for c in range(c0, c1):
                p = Pb[c] / sf
                q = Nb[c] / sb
                D[c] = p - q
                k += D[c] * (p + q)
            _block_project(Fb, D, c0, c1, z)
    return k


@njit(cache=True, fastmath=_FM)
def _flat_sample(Fb, gb, mb, has_mask, identity, Zs, Ys, Xs,
                 iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, want_z, Pb, Nb, z):
    """Prototypes of one (C, S) sample into Pb, Nb and, with ``want_z``, z = F·(P-N) (flat).

    Returns (status code, threshold (‖P‖² - ‖N‖²)/2, whether z was computed, nonzero when a
    guide or mask value is outside [0, 1] or NaN: the driver validates them here rather than in
    a pass of its own).
    """
    C = Fb.shape[0]
    S = Zs * Ys * Xs
    Wf3 = np.empty((0, 0, 0) if identity else (Zs, Ys, Xs))
    Wb3 = np.empty((0, 0, 0) if identity else (Zs, Ys, Xs))
    mode, sm, sf, sb, bad = _flat_weights(gb, mb, has_mask, identity, Zs, Ys, Xs, iz0, iz1, wz0, wz1,
                                          iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Wf3, Wb3)
    do_z = want_z and sm != 0.0 and sf != 0.0 and sb != 0.0
    if do_z:
        z[:] = 0.0
    k = _flat_channels(Fb, 0, C, mode, gb.reshape(gb.size), mb.reshape(mb.size), Wf3.reshape(Wf3.size),
                       Wb3.reshape(Wb3.size), sf, sb, do_z, Pb, Nb, z)
    code = _finalize(Pb, Nb, sm, sf, sb)
    return code, 0.5 * k, do_z, bad


@njit(cache=True, fastmath=_FM)
def _count_flat(z, ref, mid):
    """(positives, positives in ref, |ref|) of ``z > mid`` on an identity grid (flat)."""
    npos = 0
    tp = 0
    ny = 0
    for i in range(z.shape[0]):
        p = z[i] > mid
        y = ref[i] != 0
        npos += p
        tp += p & y
        ny += y
    return npos, tp, ny


@njit(cache=True, fastmath=_FM)
def _count_resized(A, refb, mid, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1):
    """Like :func:`_count_flat` for ``R z > mid``, ``A`` being z already interpolated along x.

    Rows count in int32 lanes (twice as many per vector as int64), then add to int64 totals.
    """
    Zt, Yt, Xt = refb.shape
    npos = 0
    tp = 0
    ny = 0
    for zt in range(Zt):
        z0 = iz0[zt]
        z1 = iz1[zt]
        for yt in range(Yt):
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


@njit(parallel=True, cache=True, fastmath=_FM)
def layer_kernel_flat(F, g, m, has_mask, ref, do_counts, identity, Zs, Ys, Xs,
                      iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                      P, N, status, npos, tp, ny, bad):
    """:func:`layer_kernel` for C-contiguous channels-first features ``F`` (B, C, S).

    Also |ref| per sample (``ny``) and the count of guide/mask values outside [0, 1] (``bad``).
    """
    B = F.shape[0]
    for b in prange(B):
        mb = m[b] if has_mask else m[0]
        z = np.empty(Zs * Ys * Xs if do_counts else 0)
        code, mid, have_z, nbad = _flat_sample(F[b], g[b], mb, has_mask, identity, Zs, Ys, Xs,
                                         iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                                         do_counts, P[b], N[b], z)
        status[b] = code
        bad[b] = nbad
        npos[b] = 0
        tp[b] = 0
        refb = ref[b]
        if do_counts and code == _OK and have_z:
            n, t, y = _layer_counts(z, refb, mid, identity, Zs, Ys, Xs,
                                    iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            npos[b] = n
            tp[b] = t
            ny[b] = y
        else:
            ny[b] = _ref_count(refb.reshape(refb.size))


@njit(parallel=True, cache=True, fastmath=_FM)
def layer_kernel_split(F, g, m, has_mask, ref, do_counts, identity, Zs, Ys, Xs,
                       iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, T,
                       P, N, status, npos, tp, ny, bad):
    """:func:`layer_kernel_flat` with each sample's channels split into ``T`` parallel parts,
    for batches smaller than the thread count (one 3-D volume would use one thread).

    Each part accumulates its own share of z; the shares are added before counting.
    """
    B, C, S = F.shape
    Wf = np.empty((B, 0 if identity else S))
    Wb = np.empty((B, 0 if identity else S))
    modes = np.empty(B, dtype=np.int64)
    sums = np.empty((B, 3))
    for b in prange(B):
        mb = m[b] if has_mask else m[0]
        w3 = (0, 0, 0) if identity else (Zs, Ys, Xs)
        mode, sm, sf, sb, nbad = _flat_weights(g[b], mb, has_mask, identity, Zs, Ys, Xs, iz0, iz1, wz0, wz1,
                                               iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                                               Wf[b].reshape(w3), Wb[b].reshape(w3))
        modes[b] = mode
        sums[b, 0] = sm
        sums[b, 1] = sf
        sums[b, 2] = sb
        bad[b] = nbad
    zpart = np.zeros((B, T, S if do_counts else 0))
    kpart = np.zeros((B, T))
    for i in prange(B * T):
        b = i // T
        t = i % T
        c_lo = (C * t) // T
        c_hi = (C * (t + 1)) // T
        sm = sums[b, 0]
        sf = sums[b, 1]
        sb = sums[b, 2]
        do_z = do_counts and sm != 0.0 and sf != 0.0 and sb != 0.0
        mb = m[b] if has_mask else m[0]
        kpart[b, t] = _flat_channels(F[b], c_lo, c_hi, modes[b], g[b].reshape(g[b].size), mb.reshape(mb.size),
                                     Wf[b], Wb[b], sf, sb, do_z, P[b], N[b], zpart[b, t])
    for b in prange(B):
        sm = sums[b, 0]
        sf = sums[b, 1]
        sb = sums[b, 2]
        code = _finalize(P[b], N[b], sm, sf, sb)
        status[b] = code
        npos[b] = 0
        tp[b] = 0
        refb = ref[b]
        if do_counts and code == _OK:
            z = zpart[b, 0]
            k = kpart[b, 0]
            for t in range(1, T):
                zt = zpart[b, t]
                for s in range(S):
                    z[s] += zt[s]
                k += kpart[b, t]
            n, t_, y = _layer_counts(z, refb, 0.5 * k, identity, Zs, Ys, Xs,
                                     iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            npos[b] = n
            tp[b] = t_
            ny[b] = y
        else:
            ny[b] = _ref_count(refb.reshape(refb.size))


@njit(parallel=True, cache=True, fastmath=_FM)
def maps_kernel_flat(F, g, m, has_mask, identity, Zs, Ys, Xs,
                     iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                     P, N, status, binary, prob, bad):
    """:func:`maps_kernel` for C-contiguous channels-first features ``F`` (B, C, S); ``bad`` as
    in :func:`layer_kernel_flat`."""
    B = F.shape[0]
    for b in prange(B):
        mb = m[b] if has_mask else m[0]
        z = np.empty(Zs * Ys * Xs)
        code, mid, have_z, nbad = _flat_sample(F[b], g[b], mb, has_mask, identity, Zs, Ys, Xs,
                                         iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                                         True, P[b], N[b], z)
        status[b] = code
        bad[b] = nbad
        if code == _OK and have_z:
            _write_maps(z.reshape((Zs, Ys, Xs)), mid, identity, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                        ix0, ix1, wx0, wx1, binary[b], prob[b])
        else:
            binary[b, :, :, :] = False
            prob[b, :, :, :] = np.nan


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


# --------------------------------------------------------------------------- parallel drivers
@njit(parallel=True, cache=True, fastmath=_FM)
def layer_kernel(F, g, m, has_mask, ref, do_counts, identity, channels_last,
                 iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                 P, N, status, npos, tp):
    """Per sample: prototypes (always) and, with ``do_counts``, layer-level (npos, tp)."""
    B = F.shape[0]
    for b in prange(B):
        mb = m[b] if has_mask else m[0]
        code = _sample_prototypes(F[b], g[b], mb, has_mask, identity, channels_last,
                                  iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, P[b], N[b])
        status[b] = code
        npos[b] = 0
        tp[b] = 0
        if do_counts and code == _OK:
            z, mid = _layer_scalar(F[b], P[b], N[b], channels_last)
            n, t = _count(z, ref[b], mid, 1.0, identity,
                          iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            npos[b] = n
            tp[b] = t


_UNIT_BLOCK = 16  # channels-last: channels transposed together (one 64-byte line of float32)


@njit(parallel=True, cache=True, fastmath=_FM)
def unit_kernel(F, ref, identity, channels_last, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                P, N, valid, npos, tp):
    """Per (sample, channel): the channel alone thresholded at (P_c+N_c)/2 -> (npos, tp).

    Channels-last input is processed in blocks of channels: each block is first transposed to
    a small channel-first scratch (contiguous reads), because one channel alone would be a
    stride-C walk through the whole tensor.
    """
    B, C = P.shape
    nblk = (C + _UNIT_BLOCK - 1) // _UNIT_BLOCK if channels_last else C
    for i in prange(B * nblk):
        b = i // nblk
        j = i % nblk
        c0 = j * _UNIT_BLOCK if channels_last else j
        c1 = min(c0 + _UNIT_BLOCK, C) if channels_last else j + 1
        for c in range(c0, c1):
            npos[b, c] = 0
            tp[b, c] = 0
        if not valid[b]:
            continue
        if channels_last:
            Zs, Ys, Xs = F.shape[1], F.shape[2], F.shape[3]
            blk = np.empty((c1 - c0, Zs, Ys, Xs), dtype=F.dtype)
            # row by row, channel-major writes: the source row (Xs x C) stays in L1, and the
            # 2^k-strided scratch planes are written sequentially (no cache-set conflicts)
            for z in range(Zs):
                for y in range(Ys):
                    for c in range(c0, c1):
                        for x in range(Xs):
                            blk[c - c0, z, y, x] = F[b, z, y, x, c]
        for c in range(c0, c1):
            d = P[b, c] - N[b, c]
            sign = 1.0 if d > 0.0 else (-1.0 if d < 0.0 else 0.0)
            mid = 0.5 * (P[b, c] + N[b, c])
            if channels_last:
                n, t = _count(blk[c - c0], ref[b], mid, sign, identity,
                              iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            else:
                n, t = _count(F[b, c], ref[b], mid, sign, identity,
                              iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            npos[b, c] = n
            tp[b, c] = t


@njit(parallel=True, cache=True, fastmath=_FM)
def maps_kernel(F, g, m, has_mask, identity, channels_last,
                iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                P, N, status, binary, prob):
    """Per sample: prototypes, then the binary and probability maps on the target grid."""
    B = F.shape[0]
    for b in prange(B):
        mb = m[b] if has_mask else m[0]
        code = _sample_prototypes(F[b], g[b], mb, has_mask, identity, channels_last,
                                  iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, P[b], N[b])
        status[b] = code
        if code == _OK:
            z, mid = _layer_scalar(F[b], P[b], N[b], channels_last)
            _write_maps(z, mid, identity, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                        binary[b], prob[b])
        else:
            binary[b, :, :, :] = False
            prob[b, :, :, :] = np.nan
