"""Kernels for C-contiguous channels-last features seen as (B, S, C): each position's channel
vector is read contiguously, and one sample's positions are split into fixed tiles that run in
parallel, so a single 3-D volume uses every core.

Results do not depend on the thread count: the work is cut into tiles of a fixed size
(``_CL_TILE`` positions, or ``_ROWS`` target rows), each tile is computed by the same code
whichever thread runs it, the per-tile prototype sums are added in tile order after the
parallel loop, and counts are integers.

Three kernels, reused by every path that meets them (fewer kernels, shorter cold compile):

- :func:`prototypes_kernel`: guide weights, prototypes, status, threshold and, on request,
  the source-grid scalar map ``z = F·(P-N)``;
- :func:`decide_kernel`: from ``z``, the decisions ``R z > mid`` on the target grid: counts
  against the reference and/or the binary and probability maps.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from engine._kernels._common import _FM, _OK
from engine._kernels.fused import _MODE_GUIDE, _MODE_GUIDE_MASK, _flat_weights
from engine._kernels.general import _finalize

__all__: list[str] = []  # private module

_CL_TILE = 1024  # positions per parallel work item (fixed: the reduction order never changes)


_ROWS = 8  # target rows per parallel work item in decide_kernel


@njit(cache=True, fastmath=_FM)
def _tile_weights(mode, g, m, Wf, Wb, t0, t1, wf, wb):
    """Foreground and background weights of positions [t0, t1) into wf, wb (float64)."""
    n = t1 - t0
    if mode == _MODE_GUIDE:
        gg = g[t0:t1]
        for i in range(n):
            u = np.float64(gg[i])
            wf[i] = u
            wb[i] = 1.0 - u
    elif mode == _MODE_GUIDE_MASK:
        gg = g[t0:t1]
        mm = m[t0:t1]
        for i in range(n):
            gv = np.float64(gg[i])
            mv = np.float64(mm[i])
            wf[i] = gv * mv
            wb[i] = (1.0 - gv) * mv
    else:
        af = Wf[t0:t1]
        ab = Wb[t0:t1]
        for i in range(n):
            wf[i] = af[i]
            wb[i] = ab[i]


@njit(cache=True, fastmath=_FM)
def _tile_sums(Fb, t0, t1, wf, wb, a, b):
    """a[c] = Σ F[s, c]·wf[s], b[c] = Σ F[s, c]·wb[s] over positions s in [t0, t1)."""
    C = a.shape[0]
    for c in range(C):
        a[c] = 0.0
        b[c] = 0.0
    for i in range(t1 - t0):
        u = wf[i]
        v = wb[i]
        r = Fb[t0 + i]
        for c in range(C):
            f = np.float64(r[c])
            a[c] += f * u
            b[c] += f * v


@njit(cache=True, fastmath=_FM)
def _tile_project(Fb, D, t0, t1, z):
    """z[s] = Σ_c F[s, c]·D[c] for s in [t0, t1) (float64)."""
    C = D.shape[0]
    for s in range(t0, t1):
        r = Fb[s]
        acc = 0.0
        for c in range(C):
            acc += np.float64(r[c]) * D[c]
        z[s] = acc


@njit(parallel=True, cache=True, fastmath=_FM)
def prototypes_kernel(F, g, m, has_mask, identity, Zs, Ys, Xs,
                      iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                      want_z, P, N, status, mid, bad, z):
    """Per sample of channels-last ``F`` (B, S, C): prototypes into P, N (NaN when undefined),
    ``status``, the threshold ``mid = (‖P‖² - ‖N‖²)/2``, the count of guide/mask values
    outside [0, 1] (``bad``) and, with ``want_z``, ``z[b] = F[b]·(P-N)`` (B, S) for the samples
    whose status is OK.
    """
    B, S, C = F.shape
    nt = (S + _CL_TILE - 1) // _CL_TILE
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
    part = np.empty((B, nt, 2, C))
    for i in prange(B * nt):
        b = i // nt
        t0 = (i - b * nt) * _CL_TILE
        t1 = min(t0 + _CL_TILE, S)
        mb = m[b] if has_mask else m[0]
        wf = np.empty(t1 - t0)
        wb = np.empty(t1 - t0)
        _tile_weights(modes[b], g[b].reshape(g[b].size), mb.reshape(mb.size), Wf[b], Wb[b], t0, t1, wf, wb)
        _tile_sums(F[b], t0, t1, wf, wb, part[b, i - b * nt, 0], part[b, i - b * nt, 1])
    D = np.zeros((B, C))
    for b in range(B):  # tile order: the same sums whatever the threads
        Pb = P[b]
        Nb = N[b]
        for c in range(C):
            Pb[c] = 0.0
            Nb[c] = 0.0
        for t in range(nt):
            for c in range(C):
                Pb[c] += part[b, t, 0, c]
                Nb[c] += part[b, t, 1, c]
        code = _finalize(Pb, Nb, sums[b, 0], sums[b, 1], sums[b, 2])
        status[b] = code
        k = 0.0
        if code == _OK:
            for c in range(C):
                D[b, c] = Pb[c] - Nb[c]
                k += D[b, c] * (Pb[c] + Nb[c])
        mid[b] = 0.5 * k
    if want_z:
        for i in prange(B * nt):
            b = i // nt
            if status[b] != _OK:
                continue
            t0 = (i - b * nt) * _CL_TILE
            _tile_project(F[b], D[b], t0, min(t0 + _CL_TILE, S), z[b])


@njit(cache=True, fastmath=_FM)
def _interp_row(a, Xt, ix0, wx1, base, diff, out):
    """One source row interpolated along x (as :func:`engine._kernels.counting._interp_x`)."""
    Xs = a.shape[0]
    for i in range(Xs):
        base[i] = a[i]
    for i in range(Xs - 1):
        diff[i] = base[i + 1] - base[i]
    diff[Xs - 1] = 0.0
    for x in range(Xt):
        j = ix0[x]
        out[x] = base[j] + wx1[x] * diff[j]


@njit(parallel=True, cache=True, fastmath=_FM)
def decide_kernel(z, mid, status, ref, do_counts, do_maps, identity, Zs, Ys, Xs, Zt, Yt, Xt,
                  iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                  npos, tp, ny, binary, prob):
    """Decisions ``R z[b] > mid[b]`` on the (Zt, Yt, Xt) target grid.

    With ``do_counts``: positives, positives in ``ref`` and ``|ref|`` per sample (a sample whose
    status is not OK has no positives). With ``do_maps``: ``binary`` and ``prob`` =
    sigmoid(2·(R z - mid)) (False and NaN for such samples). ``z`` is (B, Zs·Ys·Xs) float64;
    ``ref`` (B, Zt, Yt, Xt) uint8 is read only with ``do_counts``, the maps only written with
    ``do_maps`` (the others may be empty dummies).
    Parallel over the source rows (x interpolation), then over blocks of target rows.
    """
    B = z.shape[0]
    nsr = Zs * Ys
    A = np.empty((B, 0 if identity else nsr, Xt))
    if not identity:
        for i in prange(B * nsr):
            b = i // nsr
            if status[b] != _OK:
                continue
            r = i - b * nsr
            base = np.empty(Xs)
            diff = np.empty(Xs)
            _interp_row(z[b, r * Xs:(r + 1) * Xs], Xt, ix0, wx1, base, diff, A[b, r])
    rows = Zt * Yt
    nch = (rows + _ROWS - 1) // _ROWS
    cnt = np.zeros((B, nch, 3), dtype=np.int64)
    for i in prange(B * nch):
        b = i // nch
        ch = i - b * nch
        ok = status[b] == _OK
        m = mid[b]
        zb = z[b]
        n_p = 0
        n_t = 0
        n_y = 0
        for r in range(ch * _ROWS, min((ch + 1) * _ROWS, rows)):
            zt = r // Yt
            yt = r - zt * Yt
            rr = ref[b, zt, yt] if do_counts else ref[0, 0, 0]
            if do_counts:
                for x in range(Xt):
                    n_y += rr[x] != 0
            if not ok:
                if do_maps:
                    for x in range(Xt):
                        binary[b, zt, yt, x] = False
                        prob[b, zt, yt, x] = np.nan
                continue
            if identity:
                a0 = zb[r * Xt:(r + 1) * Xt]
                for x in range(Xt):
                    v = a0[x]
                    if do_counts and v > m:
                        n_p += 1
                        n_t += rr[x] != 0
                    if do_maps:
                        binary[b, zt, yt, x] = v > m
                        prob[b, zt, yt, x] = 1.0 / (1.0 + np.exp(2.0 * m - 2.0 * v))
                continue
            z0 = iz0[zt]
            z1 = iz1[zt]
            y0 = iy0[yt]
            y1 = iy1[yt]
            c00 = wz0[zt] * wy0[yt]
            c01 = wz0[zt] * wy1[yt]
            c10 = wz1[zt] * wy0[yt]
            c11 = wz1[zt] * wy1[yt]
            two = c10 == 0.0 and c11 == 0.0
            a0 = A[b, z0 * Ys + y0]
            a1 = A[b, z0 * Ys + y1]
            a2 = A[b, z1 * Ys + y0]
            a3 = A[b, z1 * Ys + y1]
            for x in range(Xt):
                if two:
                    v = c00 * a0[x] + c01 * a1[x]
                else:
                    v = c00 * a0[x] + c01 * a1[x] + c10 * a2[x] + c11 * a3[x]
                if do_counts and v > m:
                    n_p += 1
                    n_t += rr[x] != 0
                if do_maps:
                    binary[b, zt, yt, x] = v > m
                    prob[b, zt, yt, x] = 1.0 / (1.0 + np.exp(2.0 * m - 2.0 * v))
        cnt[b, ch, 0] = n_p
        cnt[b, ch, 1] = n_t
        cnt[b, ch, 2] = n_y
    if do_counts:
        for b in range(B):
            s0 = 0
            s1 = 0
            s2 = 0
            for ch in range(nch):
                s0 += cnt[b, ch, 0]
                s1 += cnt[b, ch, 1]
                s2 += cnt[b, ch, 2]
            npos[b] = s0
            tp[b] = s1
            ny[b] = s2
