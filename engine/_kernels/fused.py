"""Fused kernels for C-contiguous channels-first features seen as (B, C, S): each channel
block's prototype sums while it streams in, then its share of ``z`` while it is still in L2."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from engine._kernels._common import _FM, _OK
from engine._kernels._pool import parallel_for
from engine._kernels.adjoint import _guide_adjoint, guide_adjoint
from engine._kernels.counting import (_count_flat_range, _count_resized_rows, _interp_x_rows, _layer_counts,
                                      _ref_count)
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


# --------------------------------------------------------------------------- split path
# Fewer samples than threads (one 3-D volume): every stage of layer_kernel_flat runs over work
# items on every thread (engine._kernels._pool.parallel_for) instead of one sample per thread.
# Each stage computes every value with the code the one-thread path uses, and the items are
# fixed by the data, not by the thread count, so the bits are those of one thread.
_COUNT_ROWS = 256          # target rows per counting work item (a 128³ grid: 64 items)
_SUM_POSITIONS = 1 << 16   # positions per work item of the z reduction and the identity count


def layer_split(F, g, m, has_mask, ref, do_counts, identity, Zs, Ys, Xs,
                iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, T,
                P, N, status, npos, tp, ny, bad):
    """:func:`layer_kernel_flat` with each sample's channels split into ``T`` parts, for
    batches smaller than the thread count: a single 3-D volume uses every thread in each stage.

    1. Guide weights: on a resized grid :func:`engine._kernels.adjoint.guide_adjoint` (blocks
       of source z planes, the bits of ``_guide_adjoint``); on the identity grid the guide
       sums of each sample (one item per sample: a parallel float64 sum would change bits).
    2. The channel parts (:func:`_flat_channels` over ``T`` channel ranges), each with its own
       share of z and of ‖P‖² - ‖N‖².
    3. Status and threshold per sample; the shares of z added in part order, over blocks of
       positions.
    4. Decisions and counts over blocks of target rows (or positions on the identity grid),
       by the row kernels the serial :func:`engine._kernels.counting._layer_counts` runs
       over all rows; the integer counts of the blocks are then added.

    Also |ref| per sample (``ny``) and the count of guide/mask values outside [0, 1] (``bad``).
    """
    B, C, S = F.shape
    weights = (iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
    sums = np.empty((B, 3))
    modes = np.empty(B, dtype=np.int64)
    if identity:
        Wf = Wb = np.empty((B, 0))
        parallel_for(_identity_weights_range, B, g, m, has_mask, modes, sums, bad)
    else:
        Wf = np.empty((B, S))
        Wb = np.empty((B, S))
        guide_adjoint(g, m, has_mask, (Zs, Ys, Xs), weights, Wf.reshape((B, Zs, Ys, Xs)),
                      Wb.reshape((B, Zs, Ys, Xs)), sums, bad)
        modes[:] = _MODE_WEIGHTS
    zpart = np.zeros((B, T, S if do_counts else 0))
    kpart = np.zeros((B, T))
    parallel_for(_parts_range, B * T, F, g, m, has_mask, T, modes, Wf, Wb, sums, do_counts, P, N,
                 zpart, kpart)
    mids = np.empty(B)
    _finish_samples(P, N, sums, kpart, status, mids)
    ok = status == _OK
    npos[:] = 0
    tp[:] = 0
    if do_counts and ok.any():
        nz = -(-S // _SUM_POSITIONS)
        if T > 1:
            parallel_for(_zsum_range, B * nz, zpart, ok, nz)
        if identity:
            cnt = np.zeros((B, nz, 3), dtype=np.int64)
            parallel_for(_count_flat_items, B * nz, zpart, ref, mids, ok, nz, cnt)
        else:
            Zt, Yt, Xt = ref.shape[1:]
            nr = -(-(Zs * Ys) // _COUNT_ROWS)
            A = np.empty((B, Zs, Ys, Xt))
            parallel_for(_interp_items, B * nr, zpart, ok, Zs, Ys, Xs, nr, ix0, wx1, A)
            nc = -(-(Zt * Yt) // _COUNT_ROWS)
            cnt = np.zeros((B, nc, 3), dtype=np.int64)
            parallel_for(_count_row_items, B * nc, A, ref, mids, ok, nc, iz0, iz1, wz0, wz1, iy0, iy1, wy0,
                         wy1, cnt, chunks_per_thread=2)
        tot = cnt.sum(axis=1)
        npos[ok] = tot[ok, 0]
        tp[ok] = tot[ok, 1]
        ny[ok] = tot[ok, 2]
    for b in range(B):
        if not (do_counts and ok[b]):
            ny[b] = np.count_nonzero(ref[b])


@njit(nogil=True, cache=True, fastmath=_FM)
def _identity_weights_range(lo, hi, g, m, has_mask, modes, sums, bad):
    """Samples [lo, hi): the identity grid's guide sums (:func:`_flat_weights`'s first branch)."""
    for b in range(lo, hi):
        mb = m[b] if has_mask else m[0]
        sm, sf, sb, nbad = _guide_sums(g[b].reshape(g[b].size), mb.reshape(mb.size), has_mask)
        modes[b] = _MODE_GUIDE_MASK if has_mask else _MODE_GUIDE
        sums[b, 0] = sm
        sums[b, 1] = sf
        sums[b, 2] = sb
        bad[b] = nbad


@njit(nogil=True, cache=True, fastmath=_FM)
def _parts_range(lo, hi, F, g, m, has_mask, T, modes, Wf, Wb, sums, do_counts, P, N, zpart, kpart):
    """Work items [lo, hi) = (sample, channel part): :func:`_flat_channels` over the part's
    channels, its share of z into ``zpart[b, t]`` and of ‖P‖² - ‖N‖² into ``kpart[b, t]``."""
    C = F.shape[1]
    for i in range(lo, hi):
        b = i // T
        t = i - b * T
        c_lo = (C * t) // T
        c_hi = (C * (t + 1)) // T
        sm = sums[b, 0]
        sf = sums[b, 1]
        sb = sums[b, 2]
        do_z = do_counts and sm != 0.0 and sf != 0.0 and sb != 0.0
        mb = m[b] if has_mask else m[0]
        kpart[b, t] = _flat_channels(F[b], c_lo, c_hi, modes[b], g[b].reshape(g[b].size), mb.reshape(mb.size),
                                     Wf[b], Wb[b], sf, sb, do_z, P[b], N[b], zpart[b, t])


@njit(cache=True)
def _finish_samples(P, N, sums, kpart, status, mids):
    """Status of each sample from its sums (:func:`_finalize`, which also divides the
    prototype sums) and its threshold: half the parts' shares of ‖P‖² - ‖N‖², added in part
    order."""
    for b in range(P.shape[0]):
        status[b] = _finalize(P[b], N[b], sums[b, 0], sums[b, 1], sums[b, 2])
        k = kpart[b, 0]
        for t in range(1, kpart.shape[1]):
            k += kpart[b, t]
        mids[b] = 0.5 * k


@njit(nogil=True, cache=True)
def _zsum_range(lo, hi, zpart, ok, nz):
    """Work items [lo, hi) = (sample, block of positions): the parts' shares of z added into
    ``zpart[b, 0]`` in part order (each position: ((z₀ + z₁) + z₂)...)."""
    T = zpart.shape[1]
    S = zpart.shape[2]
    for i in range(lo, hi):
        b = i // nz
        c = i - b * nz
        if not ok[b]:
            continue
        s0 = (S * c) // nz
        s1 = (S * (c + 1)) // nz
        z = zpart[b, 0]
        for t in range(1, T):
            zt = zpart[b, t]
            for s in range(s0, s1):
                z[s] += zt[s]


@njit(nogil=True, cache=True, fastmath=_FM)
def _count_flat_items(lo, hi, zpart, ref, mids, ok, nz, cnt):
    """Work items [lo, hi) = (sample, block of positions) on the identity grid: the block's
    (positives, positives in ref, |ref|) into ``cnt[b, block]``."""
    S = zpart.shape[2]
    for i in range(lo, hi):
        b = i // nz
        c = i - b * nz
        if not ok[b]:
            continue
        refb = ref[b]
        n, t, y = _count_flat_range(zpart[b, 0], refb.reshape(refb.size), mids[b], (S * c) // nz,
                                    (S * (c + 1)) // nz)
        cnt[b, c, 0] = n
        cnt[b, c, 1] = t
        cnt[b, c, 2] = y


@njit(nogil=True, cache=True, fastmath=_FM)
def _interp_items(lo, hi, zpart, ok, Zs, Ys, Xs, nr, ix0, wx1, A):
    """Work items [lo, hi) = (sample, block of source rows): z interpolated along x into A."""
    rows = Zs * Ys
    for i in range(lo, hi):
        b = i // nr
        c = i - b * nr
        if not ok[b]:
            continue
        _interp_x_rows(zpart[b, 0].reshape((Zs, Ys, Xs)), A[b], (rows * c) // nr, (rows * (c + 1)) // nr,
                       ix0, wx1)


@njit(nogil=True, cache=True, fastmath=_FM)
def _count_row_items(lo, hi, A, ref, mids, ok, nc, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, cnt):
    """Work items [lo, hi) = (sample, block of target rows): the block's (positives, positives
    in ref, |ref|) of ``R z > mid`` into ``cnt[b, block]``."""
    rows = ref.shape[1] * ref.shape[2]
    for i in range(lo, hi):
        b = i // nc
        c = i - b * nc
        if not ok[b]:
            continue
        n, t, y = _count_resized_rows(A[b], ref[b], mids[b], (rows * c) // nc, (rows * (c + 1)) // nc,
                                      iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1)
        cnt[b, c, 0] = n
        cnt[b, c, 1] = t
        cnt[b, c, 2] = y


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
