"""Numba kernel for the label-free baselines (engine.quality.baselines): one pass.

Private and pure: sums per (sample, class) over space, split into chunks so that a single
large volume still uses every thread; the caller reduces the chunks and divides. The chunks are
work items of a serial ``nogil`` kernel run over the threads by
:func:`engine._kernels._pool.parallel_for` (with ``parallel=True`` it cost 3x the compile time).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels._pool import parallel_for

#: Columns of the partial sums: mask count, Σ b, Σ uncertain, Σ entropy (bits), Σ p, Σ p·b,
#: then min p, max p and the count of non-finite values (for validation by the caller).
N_SUMS = 9
CHUNK = 1 << 16


def baseline_sums(flat, weight, threshold, out):
    """flat (B, K, S) float; weight (B, S) uint8 (all ones when no mask); out (B, K, n_chunks, 9)."""
    B, K, _ = flat.shape
    parallel_for(_sums_range, B * K * out.shape[2], flat, weight, threshold, out)


@njit(nogil=True, cache=True)
def _sums_range(lo, hi, flat, weight, threshold, out):  # pragma: no cover - compiled
    """Work items [lo, hi) = (sample, class, chunk of ``CHUNK`` positions) of :func:`baseline_sums`."""
    B, K, S = flat.shape
    n_chunks = out.shape[2]
    inv_ln2 = 1.0 / np.log(2.0)
    for job in range(lo, hi):
        c = job % n_chunks
        bk = job // n_chunks
        k = bk % K
        b = bk // K
        n = 0.0
        sb = 0.0
        su = 0.0
        se = 0.0
        sp = 0.0
        spb = 0.0
        lo = np.inf
        hi = -np.inf
        bad = 0.0
        for s in range(c * CHUNK, min(S, (c + 1) * CHUNK)):
            p = np.float64(flat[b, k, s])
            if not np.isfinite(p):
                bad += 1.0
                continue
            if p < lo:
                lo = p
            if p > hi:
                hi = p
            if weight[b, s] == 0:
                continue
            if p < 0.0:
                p = 0.0
            elif p > 1.0:
                p = 1.0
            n += 1.0
            pred = 1.0 if p > threshold else 0.0
            sb += pred
            if 0.1 < p < 0.9:
                su += 1.0
            if 0.0 < p < 1.0:
                se -= (p * np.log(p) + (1.0 - p) * np.log(1.0 - p)) * inv_ln2
            sp += p
            spb += p * pred
        out[b, k, c, 0] = n
        out[b, k, c, 1] = sb
        out[b, k, c, 2] = su
        out[b, k, c, 3] = se
        out[b, k, c, 4] = sp
        out[b, k, c, 5] = spb
        out[b, k, c, 6] = lo
        out[b, k, c, 7] = hi
        out[b, k, c, 8] = bad
