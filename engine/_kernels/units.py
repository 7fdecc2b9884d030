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


def unit_counts(F, ref, identity, channels_last, block, weights, P, N, valid, npos, tp):
    """Unit-level (npos, tp) per (sample, channel) into ``npos``, ``tp`` (B, C) int64.

    ``weights`` are the per-axis ``(i0, i1, w0, w1)`` of z, y, x; ``valid`` (B,) marks the
    samples whose prototypes exist (the others get zero counts).
    """
    iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1 = weights
    B, C = P.shape
    nblk = (C + block - 1) // block
    parallel_for(unit_range, B * nblk, F, ref, identity, channels_last, block,
                 iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, P, N, valid, npos, tp,
                 chunks_per_thread=2)
