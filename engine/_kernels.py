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


# --------------------------------------------------------------------------- prototypes
@njit(cache=True, fastmath=_FM)
def _guide_adjoint(gb, mb, has_mask, identity, Zs, Ys, Xs,
                   iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, Wf, Wb):
    """Wf = Rᵀ(g·m), Wb = Rᵀ((1-g)·m) on the source grid; returns (Σm, Σg·m, Σ(1-g)·m)."""
    Zt, Yt, Xt = gb.shape
    sm = 0.0
    sf = 0.0
    sb = 0.0
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
        return sm, sf, sb
    # one pass over the target grid: each target row goes, weighted, into the (up to four)
    # source (z, y) rows it reads from; then the x adjoint runs on the reduced grid
    tf = np.zeros((Zs, Ys, Xt))
    tb = np.zeros((Zs, Ys, Xt))
    rf = np.empty(Xt)
    rb = np.empty(Xt)
    for zt in range(Zt):
        za = iz0[zt]
        zb = iz1[zt]
        for yt in range(Yt):
            ya = iy0[yt]
            yb = iy1[yt]
            for x in range(Xt):
                gv = np.float64(gb[zt, yt, x])
                mv = np.float64(mb[zt, yt, x]) if has_mask else 1.0
                f = gv * mv
                k = (1.0 - gv) * mv
                rf[x] = f
                rb[x] = k
                sm += mv
                sf += f
                sb += k
            for corner in range(4):
                zz = za if corner < 2 else zb
                yy = ya if corner % 2 == 0 else yb
                c = (wz0[zt] if corner < 2 else wz1[zt]) * (wy0[yt] if corner % 2 == 0 else wy1[yt])
                if c != 0.0:
                    for x in range(Xt):
                        tf[zz, yy, x] += c * rf[x]
                        tb[zz, yy, x] += c * rb[x]
    starts = _runs(ix0, ix1)
    for z in range(Zs):
        for y in range(Ys):
            for x in range(Xs):
                Wf[z, y, x] = 0.0
                Wb[z, y, x] = 0.0
            for r in range(len(starts) - 1):
                s0 = starts[r]
                s1 = starts[r + 1]
                f0 = 0.0
                f1 = 0.0
                k0 = 0.0
                k1 = 0.0
                for x in range(s0, s1):
                    f0 += wx0[x] * tf[z, y, x]
                    f1 += wx1[x] * tf[z, y, x]
                    k0 += wx0[x] * tb[z, y, x]
                    k1 += wx1[x] * tb[z, y, x]
                Wf[z, y, ix0[s0]] += f0
                Wf[z, y, ix1[s0]] += f1
                Wb[z, y, ix0[s0]] += k0
                Wb[z, y, ix1[s0]] += k1
    return sm, sf, sb


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
    sm, sf, sb = _guide_adjoint(gb, mb, has_mask, identity, Zs, Ys, Xs,
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
