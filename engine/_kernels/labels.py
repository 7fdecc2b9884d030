"""Which values an unsigned mask holds: the label check of every batch that has masks
(:func:`engine.run.batch._labels_in`).

Private and pure. Each work item marks the values met in its own fixed chunk of the mask in
its own row of a table (one row per chunk, one column per value the dtype can hold); the rows
are then OR-ed. Presence is a yes/no per value, so the result does not depend on the thread
count or on the order the chunks run in. Every value is stored unconditionally: on Colin27's
126-label mask that was 2.2x faster than storing only where the value changes (a branch per
voxel) and 1.5x faster than four interleaved tables (measured, 1.7 ms for the 7.1 M voxels on
2 threads).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels._pool import parallel_for

__all__: list[str] = []  # private module

#: Mask values per work item.
CHUNK = 1 << 18


@njit(nogil=True, cache=True)
def _seen_range(lo, hi, flat, seen, chunk):  # pragma: no cover - compiled
    """Work items [lo, hi) = chunks of ``chunk`` values of ``flat``: ``seen[i, v] = 1`` for every
    value ``v`` in chunk ``i``."""
    n = flat.size
    for i in range(lo, hi):
        row = seen[i]
        s0 = i * chunk
        s1 = min(n, s0 + chunk)
        for s in range(s0, s1):
            row[flat[s]] = 1


def present_values(flat: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """``present[v]``: whether the 1-D C-contiguous uint8 or uint16 array ``flat`` holds ``v``
    (bool, one entry per value of the dtype), as ``np.isin(np.arange(2**bits), flat)``;
    ``chunk`` values per work item."""
    n_items = max(1, -(-flat.size // chunk))
    seen = np.zeros((n_items, 1 << (8 * flat.dtype.itemsize)), dtype=np.uint8)
    parallel_for(_seen_range, n_items, flat, seen, int(chunk))
    return np.logical_or.reduce(seen, axis=0)  # bool
