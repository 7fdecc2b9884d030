"""Numba kernel for the label-free baselines (engine.quality.baselines): one pass.

Private and pure: sums per (sample, class) over space, split into chunks so that a single
large volume still uses every thread; the caller reduces the chunks and divides. The chunks are
work items of a serial ``nogil`` kernel run over the threads by
:func:`engine._kernels._pool.parallel_for` (with ``parallel=True`` it cost 3x the compile time).

The sums are taken in blocks of ``_BLOCK`` positions by two loops without branches, which
LLVM vectorises (``error_model="numpy"`` keeps the division inside the logarithm free of a
zero check): every sum but the entropy, selected rather than skipped term by term, then the
entropy, whose two logarithms a position are :func:`engine._kernels.vmath.log`. The second
loop is skipped for a block whose probabilities are all 0 or 1 (84 % of deepbrain's voxels,
none of an untrained U-Net's). Numba's ``np.log`` is one scalar C library call: about 12 ns a
position where the entropy is defined. ``python -m benchmarks.volume --baselines <older
baseline.py>`` on two threads (``benchmarks/RESULTS.md``, "Issue 15, eighth session"): a batch
of the deep U-Net's 8×256² probabilities 3.3 → 2.1 ms, a 128³ one with no value at 0 or 1
17.8 → 8.1 ms, deepbrain's real 128³ probability unchanged (5.0 / 5.1 ms: the old loop
skipped its saturated voxels too).
The sums within a chunk are reassociated (``fastmath``): a chunk's order is fixed by the
compiled code, never by the thread count, and the float sums agree with the definition to
about 1e-14 (the counts are exact).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels._common import _FM
from engine._kernels._pool import parallel_for
from engine._kernels.vmath import log

#: Columns of the partial sums: mask count, Σ b, Σ uncertain, Σ entropy (bits), Σ p, Σ p·b,
#: then the counts of finite values outside [-tol, 1 + tol] and of non-finite values (for
#: validation by the caller).
N_SUMS = 8
CHUNK = 1 << 16
_BLOCK = 32  # positions per block of the entropy's skip test


def baseline_sums(flat, weight, threshold, tol, out):
    """flat (B, K, S) float; weight (B, S) uint8 (all ones when no mask); out (B, K, n_chunks, 8)."""
    B, K, _ = flat.shape
    parallel_for(_sums_range, B * K * out.shape[2], flat, weight, threshold, tol, out)


@njit(nogil=True, cache=True, fastmath=_FM, error_model="numpy")
def _sums_range(lo, hi, flat, weight, threshold, tol, out):  # pragma: no cover - compiled
    """Work items [lo, hi) = (sample, class, chunk of ``CHUNK`` positions) of :func:`baseline_sums`."""
    B, K, S = flat.shape
    n_chunks = out.shape[2]
    for job in range(lo, hi):
        c = job % n_chunks
        bk = job // n_chunks
        k = bk % K
        b = bk // K
        s0 = c * CHUNK
        s1 = min(S, s0 + CHUNK)
        sums = _chunk_sums(flat[b, k, s0:s1], weight[b, s0:s1], threshold, tol)
        for i in range(N_SUMS):
            out[b, k, c, i] = sums[i]


@njit(inline="always", fastmath=_FM)
def _used_p(v, weight):  # pragma: no cover - compiled
    """The probability a position adds to the sums: ``v`` clipped to [0, 1], or 0 where it is
    not finite or the weight is 0."""
    x = np.float64(v)
    p = 0.0 if x < 0.0 else (1.0 if x > 1.0 else x)
    return p if np.isfinite(x) & (weight != 0) else 0.0


@njit(nogil=True, cache=True, fastmath=_FM, error_model="numpy")
def _chunk_sums(row, wrow, threshold, tol):  # pragma: no cover - compiled
    """The ``N_SUMS`` sums of one chunk: probabilities ``row``, weights ``wrow`` (1-D)."""
    inv_ln2 = 1.0 / np.log(2.0)
    top = 1.0 + tol
    n = 0.0
    sb = 0.0
    su = 0.0
    se = 0.0
    sp = 0.0
    spb = 0.0
    outside = 0.0
    bad = 0.0
    S = row.shape[0]
    for s0 in range(0, S, _BLOCK):
        s1 = min(s0 + _BLOCK, S)
        # a block whose probabilities are all 0 or 1 (most of a confident network's output:
        # 84 % of deepbrain's voxels) adds no entropy: its logarithms are skipped
        some = 0.0
        for s in range(s0, s1):
            x = np.float64(row[s])
            fin = np.isfinite(x)
            bad += 0.0 if fin else 1.0
            outside += 1.0 if (x < -tol) | (x > top) else 0.0  # NaN compares false
            w = 1.0 if fin & (wrow[s] != 0) else 0.0
            p = _used_p(row[s], wrow[s])
            pred = 1.0 if p > threshold else 0.0
            n += w
            sb += w * pred
            su += w if (p > 0.1) & (p < 0.9) else 0.0
            sp += p
            spb += p * pred
            some += 1.0 if (p > 0.0) & (p < 1.0) else 0.0
        if some == 0.0:
            continue
        for s in range(s0, s1):
            p = _used_p(row[s], wrow[s])
            inside = (p > 0.0) & (p < 1.0)  # 0 < p < 1: the entropy's terms are defined
            q = p if inside else 0.5
            e = (q * log(q) + (1.0 - q) * log(1.0 - q)) * inv_ln2
            se -= e if inside else 0.0
    return n, sb, su, se, sp, spb, outside, bad
