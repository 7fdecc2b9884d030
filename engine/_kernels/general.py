"""General kernels for any strides and for channels-last features: prototypes, then a second
sweep for ``z = F·(P-N)``; unit level and maps. Parallel over samples."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from engine._kernels._common import (
    _EMPTY_BACKGROUND,
    _EMPTY_FOREGROUND,
    _EMPTY_MASK,
    _FM,
    _NONFINITE,
    _OK,
    _TILE,
)
from engine._kernels.adjoint import _guide_adjoint, _guide_identity
from engine._kernels.counting import _count, _interp_x

__all__: list[str] = []  # private module


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
    if identity:
        sm, sf, sb, _ = _guide_identity(gb, mb, has_mask, Wf, Wb)
    else:
        sm, sf, sb, _ = _guide_adjoint(gb, mb, has_mask, Zs, Ys, Xs,
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
