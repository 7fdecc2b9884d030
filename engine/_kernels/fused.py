"""Fused kernels for C-contiguous channels-first features seen as (B, C, S): each channel
block's prototype sums while it streams in, then its share of ``z`` while it is still in L2."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from engine._kernels._common import _FM, _OK
from engine._kernels.adjoint import _guide_adjoint
from engine._kernels.counting import _layer_counts, _ref_count
from engine._kernels.general import _finalize, _write_maps

__all__: list[str] = []  # private module


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
    sm, sf, sb, bad = _guide_adjoint(gb, mb, has_mask, Zs, Ys, Xs,
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
