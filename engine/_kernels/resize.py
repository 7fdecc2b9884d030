"""The materialising linear resize behind :func:`engine.resize.resize_linear` (SPEC §3).

One output row at a time: the two (or, with a resized z axis, four) input rows it reads are
combined along z, then along y, then the row is interpolated along x, each step in float64
with exactly the operations of the axis-by-axis NumPy version (``a·w0 + b·w1``, no fused
multiply-add, identity axes copied), so the result is bit-identical to it. Rows are
independent, so the work is split over output rows and does not depend on the thread count
(blocks of rows are the work items of a serial ``nogil`` kernel run over the threads by
:func:`engine._kernels._pool.parallel_for`: Numba's ``parallel=True`` cost more compile time).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels._pool import parallel_for

__all__: list[str] = []  # private module

_ROWS = 16  # output rows per parallel work item (one scratch allocation each)


@njit(cache=True)
def _z_row(x, l, zo, y, idz, iz0, iz1, wz0, wz1, buf):
    """Row ``y`` of the input, resized along z for output plane ``zo``, into ``buf`` (float64)."""
    X = buf.shape[0]
    if idz:
        a = x[l, zo, y]
        for i in range(X):
            buf[i] = np.float64(a[i])
    else:
        a = x[l, iz0[zo], y]
        b = x[l, iz1[zo], y]
        u = wz0[zo]
        v = wz1[zo]
        for i in range(X):
            buf[i] = np.float64(a[i]) * u + np.float64(b[i]) * v


def resize_linear_rows(x, out, idz, iz0, iz1, wz0, wz1, idy, iy0, iy1, wy0, wy1,
                       idx, ix0, ix1, wx0, wx1):
    """out[l] = R x[l] for x (L, Z, Y, X) and out (L, Zo, Yo, Xo), axis by axis z, y, x.

    ``id*`` marks an axis whose size does not change (copied, never interpolated: a weight of
    0 times Inf would otherwise give NaN); the other axes take the weights of
    :func:`engine.resize.linear_weights`.
    """
    L, Zo, Yo, _ = out.shape
    nblk = (L * Zo * Yo + _ROWS - 1) // _ROWS
    parallel_for(_rows_range, nblk, x, out, idz, iz0, iz1, wz0, wz1, idy, iy0, iy1, wy0, wy1,
                 idx, ix0, ix1, wx0, wx1, chunks_per_thread=2)


@njit(nogil=True, cache=True)
def _rows_range(lo, hi, x, out, idz, iz0, iz1, wz0, wz1, idy, iy0, iy1, wy0, wy1,
                idx, ix0, ix1, wx0, wx1):
    """Blocks [lo, hi) of ``_ROWS`` output rows of :func:`resize_linear_rows`."""
    L, _, _, X = x.shape
    _, Zo, Yo, Xo = out.shape
    n = L * Zo * Yo
    ra = np.empty(X)
    rb = np.empty(X)
    row = np.empty(X)
    for k in range(lo, hi):
        for r in range(k * _ROWS, min((k + 1) * _ROWS, n)):
            l = r // (Zo * Yo)
            q = r - l * (Zo * Yo)
            zo = q // Yo
            yo = q - zo * Yo
            if idy:
                _z_row(x, l, zo, yo, idz, iz0, iz1, wz0, wz1, row)
            else:
                _z_row(x, l, zo, iy0[yo], idz, iz0, iz1, wz0, wz1, ra)
                _z_row(x, l, zo, iy1[yo], idz, iz0, iz1, wz0, wz1, rb)
                u = wy0[yo]
                v = wy1[yo]
                for i in range(X):
                    row[i] = ra[i] * u + rb[i] * v
            o = out[l, zo, yo]
            if idx:
                for i in range(Xo):
                    o[i] = row[i]
            else:
                for i in range(Xo):
                    o[i] = row[ix0[i]] * wx0[i] + row[ix1[i]] * wx1[i]
