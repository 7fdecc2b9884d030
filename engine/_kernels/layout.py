"""Reversed-axes copies: a volume stored with its axes in reverse order (as NIfTI and NRRD files
hold voxels, the first axis fastest) copied to C order, with the cast ``np.ascontiguousarray``
makes (:func:`engine.datasets._c_order`).

Seen from memory, such a volume ``(A, B, C)`` is a C-contiguous ``(C, B, A)`` array ``m``, and
the copy is ``out[a, b, c] = m[c, b, a]``: for each ``b`` a transpose of a ``C × A`` plane. NumPy
copies it one element at a time, reading across rows (about 1.3 ns an element for Colin27's
181×217×181 voxels, 9 ms for the uint8 → float32 image and as long for its uint8 mask in the
reading thread); Numba's loops were slower still (LLVM does not turn a tile of scalar moves into
shuffles). :func:`engine._kernels.simd.transpose8` loads eight rows of eight values, casts them,
transposes them in registers (24 shuffles) and stores eight rows: each element is read and
written once, in vectors. The rows and columns beyond the last whole block of eight are copied
by the scalar loop. The casts are those of NumPy's ``astype`` for the values a volume holds
(``uitofp``/``sitofp``/``fpext``/``fptrunc`` round to nearest as NumPy's C casts do; integer
labels already checked to fit are truncated or extended), so the result is equal to
``np.ascontiguousarray(a, dtype=...)`` element for element (``tests/engine/test_layout.py``).

Serial on purpose: it runs in the reading thread, beside onnxruntime, and must not take its
cores.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels.simd import transpose8

__all__: list[str] = []  # private module

#: Source dtypes with a vector path (others, and strided sources, keep NumPy's copy).
SOURCES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64)

#: Destination dtypes with a vector path: float32 images, uint8 and uint16 labels.
TARGETS = (np.float32, np.uint8, np.uint16)


def supported(src: np.dtype, dst: np.dtype) -> bool:
    """Whether :func:`reverse_copy` has a vector path from ``src`` to ``dst``: images to float32
    from any of :data:`SOURCES`; labels (uint8/uint16) from integers only (a float mask's cast
    is NumPy's)."""
    src, dst = np.dtype(src), np.dtype(dst)
    if src not in [np.dtype(s) for s in SOURCES] or dst not in [np.dtype(t) for t in TARGETS]:
        return False
    return dst == np.float32 or src.kind in "iu"


@njit(nogil=True, cache=True)
def reverse_copy(m, out):  # pragma: no cover - compiled
    """``out[a, b, c] = m[c, b, a]`` for C-contiguous ``m`` (C, B, A) and ``out`` (A, B, C),
    cast to ``out``'s dtype (Numba's assignment casts as NumPy does): blocks of 8×8 through
    :func:`transpose8`, the rest one by one."""
    C, B, A = m.shape
    C8 = C - C % 8
    A8 = A - A % 8
    for b in range(B):
        for c0 in range(0, C8, 8):
            for a0 in range(0, A8, 8):
                transpose8(m, out, c0, b, a0)
            for a in range(A8, A):
                for j in range(8):
                    out[a, b, c0 + j] = m[c0 + j, b, a]
        for c in range(C8, C):
            for a in range(A):
                out[a, b, c] = m[c, b, a]
