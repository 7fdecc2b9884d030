"""Unit-level counts: each channel alone, thresholded at the midpoint of its prototypes, on the
target grid (SPEC §2, unit level), for features in either layout.

Per (sample, channel) the decision is ``sign(P_c - N_c)·(R F_c - (P_c + N_c)/2) > 0``, counted
by :func:`engine._kernels.counting._count` (each source row interpolated along x once, then
two (2-D) or four (3-D) rows per target row).

Work items are (sample, block of channels), run over the threads by
:func:`engine._kernels._pool.parallel_for`; channels-last features are first transposed block
by block to a channel-first scratch (contiguous reads; one channel alone would be a stride-C
walk through the whole tensor). Counts are integers written per item: they do not depend on
the blocking or on the thread count.

Channels-last features on the target grid itself (an identity resize) take
:func:`unit_cl_identity_range` instead: each channel's decision becomes a closed interval of
feature values in the features' own dtype (:func:`unit_intervals`, exact: the same positions
as the float64 comparison), and runs of positions sharing their reference value are compared
as one flat, contiguous stretch of ``(position, channel)`` values against a repeating pattern
of bounds, so no transpose is needed and the loop vectorises over channels and positions.

Two faster countings were tried and measured slower on the deepbrain and U-Net shapes (see
``benchmarks/RESULTS.md``, "Unit level"): counting on the source grid (a block of target
positions whose 2-8 source corners all lie on one side of the threshold decided without
evaluating it) and int32 count lanes.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels._common import _FM
from engine._kernels._pool import parallel_for
from engine._kernels.counting import _count

__all__: list[str] = []  # private module


@njit(nogil=True, cache=True, fastmath=_FM)
def unit_range(lo, hi, F, ref, identity, channels_last, block,
               iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, P, N, valid, npos, tp):
    """Work items [lo, hi) = (sample, block of ``block`` channels): unit-level (npos, tp).

    ``F`` is (B, C, Zs, Ys, Xs) or, with ``channels_last``, (B, Zs, Ys, Xs, C).
    """
    B, C = P.shape
    if channels_last:
        Zs, Ys, Xs = F.shape[1], F.shape[2], F.shape[3]
    else:
        Zs, Ys, Xs = F.shape[2], F.shape[3], F.shape[4]
    nblk = (C + block - 1) // block
    blk = np.empty((block if channels_last else 0, Zs, Ys, Xs), dtype=F.dtype)
    for i in range(lo, hi):
        b = i // nblk
        c0 = (i - b * nblk) * block
        c1 = min(c0 + block, C)
        for c in range(c0, c1):
            npos[b, c] = 0
            tp[b, c] = 0
        if not valid[b]:
            continue
        if channels_last:
            # row by row, channel-major writes: the source row (Xs x C) stays in L1, and the
            # scratch planes are written sequentially (no cache-set conflicts)
            for z in range(Zs):
                for y in range(Ys):
                    for c in range(c0, c1):
                        for x in range(Xs):
                            blk[c - c0, z, y, x] = F[b, z, y, x, c]
        for c in range(c0, c1):
            d = P[b, c] - N[b, c]
            sign = 1.0 if d > 0.0 else (-1.0 if d < 0.0 else 0.0)  # 0: every position background
            mid = 0.5 * (P[b, c] + N[b, c])
            if channels_last:
                n, t = _count(blk[c - c0], ref[b], mid, sign, identity, iz0, iz1, wz0, wz1,
                              iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            else:
                n, t = _count(F[b, c], ref[b], mid, sign, identity, iz0, iz1, wz0, wz1,
                              iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            npos[b, c] = n
            tp[b, c] = t


_RUN = 256  # positions per flat stretch at most (the bound patterns hold _RUN * C values)
_ITEM = 32768  # positions per work item of unit_cl_identity_range (its int32 lanes never overflow)


def unit_intervals(P, N, valid, dtype):
    """Per (sample, channel), the closed interval ``[lo, hi]`` of ``dtype`` values whose
    unit-level decision is positive.

    The decision ``sign(P - N)·(f - mid) > 0`` with ``mid = (P + N)/2`` (float64, ``f``
    converted exactly) holds for ``f > mid`` when ``P > N`` and ``f < mid`` when ``P < N``.
    For values of a floating ``dtype`` that is ``f >= lo`` with ``lo`` the smallest ``dtype``
    value above ``mid`` (resp. ``f <= hi``, the largest below): the same positions, compared
    in the features' own precision. ``P == N`` and invalid samples get an empty interval
    (``lo = +inf > hi = -inf``); NaN features are never positive, as before.
    """
    dt = np.dtype(dtype)
    inf = np.array(np.inf, dtype=dt)
    with np.errstate(over="ignore", invalid="ignore"):
        mid = 0.5 * (P + N)
        near = mid.astype(dt)  # round to nearest (±inf beyond the dtype's range)
        above = np.where(near > mid, near, np.nextafter(near, inf))
        below = np.where(near < mid, near, np.nextafter(near, -inf))
    d = P - N
    pos = valid[:, None] & (d > 0.0)
    neg = valid[:, None] & (d < 0.0)
    lo = np.where(pos, above, np.where(neg, -inf, inf)).astype(dt)
    hi = np.where(neg, below, np.where(pos, inf, -inf)).astype(dt)
    return lo, hi


@njit(nogil=True, cache=True)
def unit_cl_identity_range(lo, hi, F, ref, lo_b, hi_b, cnt):
    """Work items [lo, hi) = (sample, block of ``_ITEM`` positions) of channels-last ``F``
    (B, S, C), C-contiguous, on the target grid: per channel, the positions whose value lies in
    ``[lo_b, hi_b]`` (:func:`unit_intervals`) and those of them inside ``ref`` (B, S), into
    ``cnt[b, block, 0|1, c]``.

    Positions are taken in runs that share their reference value (at most ``_RUN``): a run's
    values are one contiguous stretch of ``F``, compared element by element against the bounds
    repeated with period C, and counted into per-element int32 lanes folded to channels at the
    end of the item."""
    B, S, C = F.shape
    nt = cnt.shape[1]
    L = _RUN * C
    a = np.empty(L, dtype=F.dtype)
    z = np.empty(L, dtype=F.dtype)
    accn = np.empty(L, dtype=np.int32)
    acct = np.empty(L, dtype=np.int32)
    cur = -1
    for i in range(lo, hi):
        b = i // nt
        t = i - b * nt
        if b != cur:
            for j in range(L):
                a[j] = lo_b[b, j % C]
                z[j] = hi_b[b, j % C]
            cur = b
        accn[:] = 0
        acct[:] = 0
        s = t * _ITEM
        s1 = min(s + _ITEM, S)
        Fb = F[b].reshape(S * C)
        rb = ref[b]
        while s < s1:
            y = rb[s] != 0
            e = s + 1
            lim = min(s + _RUN, s1)
            while e < lim and (rb[e] != 0) == y:
                e += 1
            seg = Fb[s * C:e * C]
            if y:
                for j in range(seg.shape[0]):
                    v = seg[j]
                    p = np.int32((v >= a[j]) & (v <= z[j]))
                    accn[j] += p
                    acct[j] += p
            else:
                for j in range(seg.shape[0]):
                    v = seg[j]
                    accn[j] += np.int32((v >= a[j]) & (v <= z[j]))
            s = e
        out = cnt[b, t]
        for c in range(C):
            out[0, c] = 0
            out[1, c] = 0
        for j in range(L):
            c = j % C
            out[0, c] += accn[j]
            out[1, c] += acct[j]


def unit_counts(F, ref, identity, channels_last, block, weights, P, N, valid, npos, tp):
    """Unit-level (npos, tp) per (sample, channel) into ``npos``, ``tp`` (B, C) int64.

    ``weights`` are the per-axis ``(i0, i1, w0, w1)`` of z, y, x; ``valid`` (B,) marks the
    samples whose prototypes exist (the others get zero counts).
    """
    B, C = P.shape
    if identity and channels_last and F.flags.c_contiguous and F.dtype.kind == "f" and F.dtype.itemsize >= 4:
        S = F.shape[1] * F.shape[2] * F.shape[3]
        lo_b, hi_b = unit_intervals(P, N, valid, F.dtype)
        nt = (S + _ITEM - 1) // _ITEM
        cnt = np.empty((B, nt, 2, C), dtype=np.int64)
        parallel_for(unit_cl_identity_range, B * nt, F.reshape(B, S, C), ref.reshape(B, S), lo_b, hi_b, cnt,
                     chunks_per_thread=4)
        tot = cnt.sum(axis=1)
        npos[:] = tot[:, 0]
        tp[:] = tot[:, 1]
        return
    iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1 = weights
    nblk = (C + block - 1) // block
    parallel_for(unit_range, B * nblk, F, ref, identity, channels_last, block,
                 iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, P, N, valid, npos, tp,
                 chunks_per_thread=2)
