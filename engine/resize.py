"""Resize weights and helpers: linear (half-pixel centres), nearest and area average (SPEC §3).

Every resize the engine performs is separable: one small 1-D rule per spatial axis.

- :func:`linear_weights` is ``torch.nn.functional.interpolate(mode="linear|bilinear|trilinear",
  align_corners=False, antialias=False)`` with an explicit output size (scale = in / out), and
  equally ONNX ``Resize(mode="linear", coordinate_transformation_mode="half_pixel")``: output
  position ``j`` reads the input at ``max((j + 0.5) * in / out - 0.5, 0)``, interpolating
  between the two neighbouring input positions and clamping at the last one. Any ratio, up or
  down (no antialiasing when going down).
- :func:`linear_matrix` is the same rule as a dense ``(n_out, n_in)`` matrix ``R``; the engine
  uses its transpose (the adjoint) to move guide weights from the reference grid to a feature
  grid without ever materialising upsampled features.
- :func:`area_matrix` is the exact fractional-overlap area average used by
  ``resize="downsample"``.
- :func:`resize_linear`, :func:`resize_nearest` and :func:`resize_area` apply these rules to the
  last axes of an array (materialising; used for images, masks and by tests).

All weights are float64 and cached per ``(n_in, n_out)``; the returned arrays are read-only.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "linear_weights",
    "linear_matrix",
    "linear_column_sums",
    "area_matrix",
    "nearest_indices",
    "resize_linear",
    "resize_nearest",
    "resize_area",
    "adjoint_linear",
]


def _check_sizes(n_in: int, n_out: int) -> tuple[int, int]:
    n_in, n_out = int(n_in), int(n_out)
    if n_in < 1 or n_out < 1:
        raise ValueError(
            f"resize sizes must be positive; received n_in={n_in}, n_out={n_out}: "
            "pass axis lengths of at least 1"
        )
    return n_in, n_out


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


@lru_cache(maxsize=512)
def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-output-position linear interpolation weights along one axis.

    Parameters
    ----------
    n_in, n_out : int
        Input and output lengths of the axis (any positive values, up or down).

    Returns
    -------
    i0, i1 : numpy.ndarray of int64, shape (n_out,)
        The two input positions each output position reads.
    w0, w1 : numpy.ndarray of float64, shape (n_out,)
        Their weights (``w0 + w1 == 1``). Output ``j`` is ``w0[j]*x[i0[j]] + w1[j]*x[i1[j]]``.

    Raises
    ------
    ValueError
        If a size is smaller than 1.

    Notes
    -----
    ``src = max((j + 0.5) * n_in / n_out - 0.5, 0)``, ``i0 = min(floor(src), n_in - 1)``,
    ``i1 = min(i0 + 1, n_in - 1)``, ``w1 = clip(src - i0, 0, 1)``, ``w0 = 1 - w1``; equal
    sizes give the identity (``i1 == i0``, ``w1 == 0``) exactly as torch does. Computed in
    float64 (torch computes float32 inputs' weights in float32: differences ~1e-7).

    Examples
    --------
    >>> i0, i1, w0, w1 = linear_weights(2, 4)
    >>> i0.tolist(), i1.tolist(), w1.tolist()
    ([0, 0, 0, 1], [1, 1, 1, 1], [0.0, 0.25, 0.75, 0.25])
    """
    n_in, n_out = _check_sizes(n_in, n_out)
    j = np.arange(n_out, dtype=np.float64)
    if n_in == n_out:
        i0 = np.arange(n_out, dtype=np.int64)
        return _readonly(i0, i0.copy(), np.ones(n_out), np.zeros(n_out))  # type: ignore[return-value]
    src = np.maximum((j + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0, 0.0, 1.0)
    w0 = 1.0 - w1
    return _readonly(i0, i1, w0, w1)  # type: ignore[return-value]


@lru_cache(maxsize=512)
def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The linear resize of one axis as a dense ``(n_out, n_in)`` float64 matrix ``R``.

    Parameters
    ----------
    n_in, n_out : int
        Input and output lengths.

    Returns
    -------
    numpy.ndarray
        ``R`` with ``resize(x) = R @ x``; each row sums to 1. ``R.T`` is the adjoint.

    Examples
    --------
    >>> linear_matrix(2, 4).sum(axis=1).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    i0, i1, w0, w1 = linear_weights(n_in, n_out)
    r = np.zeros((n_out, n_in))
    rows = np.arange(len(i0))
    np.add.at(r, (rows, i0), w0)
    np.add.at(r, (rows, i1), w1)
    return _readonly(r)[0]


@lru_cache(maxsize=512)
def linear_column_sums(n_in: int, n_out: int) -> np.ndarray:
    """Column sums of :func:`linear_matrix`: the adjoint applied to a vector of ones.

    Examples
    --------
    >>> round(float(linear_column_sums(3, 7).sum()), 9)
    7.0
    """
    return _readonly(np.ascontiguousarray(linear_matrix(n_in, n_out).sum(axis=0)))[0]


@lru_cache(maxsize=512)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Exact fractional-overlap area average of one axis as a dense ``(n_out, n_in)`` matrix.

    Parameters
    ----------
    n_in, n_out : int
        Input and output lengths (any ratio).

    Returns
    -------
    numpy.ndarray
        ``A[j, i]`` = length of the overlap of input cell ``[i, i+1)`` with output cell
        ``[j·n_in/n_out, (j+1)·n_in/n_out)``, divided by the output cell's length; rows sum to 1.

    Notes
    -----
    Computed in integer units (input cells of length ``n_out``, output cells of length
    ``n_in``), so the weights are exact rationals rounded once.

    Examples
    --------
    >>> area_matrix(3, 2).tolist()
    [[0.6666666666666666, 0.3333333333333333, 0.0], [0.0, 0.3333333333333333, 0.6666666666666666]]
    """
    n_in, n_out = _check_sizes(n_in, n_out)
    i = np.arange(n_in)[None, :]
    j = np.arange(n_out)[:, None]
    lo = np.maximum(i * n_out, j * n_in)
    hi = np.minimum((i + 1) * n_out, (j + 1) * n_in)
    return _readonly(np.maximum(hi - lo, 0) / n_in)[0]


@lru_cache(maxsize=512)
def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position for torch ``mode="nearest"``.

    Notes
    -----
    ``src = min(floor(j * float32(n_in / n_out)), n_in - 1)`` evaluated in float32 as torch
    does on CPU (identity for equal sizes, ``j // 2`` for exact doubling).

    Examples
    --------
    >>> nearest_indices(3, 5).tolist()
    [0, 0, 1, 1, 2]
    """
    n_in, n_out = _check_sizes(n_in, n_out)
    j = np.arange(n_out, dtype=np.int64)
    if n_out == n_in:
        idx = j
    elif n_out == 2 * n_in:
        idx = j >> 1
    else:
        scale = np.float32(n_in) / np.float32(n_out)
        idx = np.floor(j.astype(np.float32) * scale).astype(np.int64)
        idx = np.minimum(idx, n_in - 1)
    return _readonly(idx)[0]


def _target_shape(array: np.ndarray, shape: tuple[int, ...] | list[int], name: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints; received {shape!r}") from None
    if len(shape) == 0 or len(shape) > array.ndim:
        raise ValueError(
            f"{name}: shape {shape} must name 1..{array.ndim} trailing axes of an array of shape "
            f"{array.shape}; pass the target sizes of the last spatial axes"
        )
    if min(shape) < 1 or 0 in array.shape:
        raise ValueError(
            f"{name}: cannot resize an array of shape {array.shape} to {shape}; sizes must be >= 1"
        )
    return shape


def resize_linear(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linearly resize the last ``len(shape)`` axes of ``array`` (materialising).

    Parameters
    ----------
    array : numpy.ndarray
        Any array; integer and bool inputs are resized as float64.
    shape : tuple of int
        Target sizes of the trailing axes.

    Returns
    -------
    numpy.ndarray
        Float array (float32 stays float32, otherwise float64) of shape
        ``array.shape[:-len(shape)] + shape``; identical to
        ``torch.nn.functional.interpolate(..., mode="(bi|tri)linear", align_corners=False)``
        up to float rounding.

    Raises
    ------
    ValueError
        If ``shape`` has more axes than ``array`` or a size below 1.

    Notes
    -----
    Separable: the axes are resized one after the other (first to last), each output value
    being ``w0·x[i0] + w1·x[i1]`` with the weights of :func:`linear_weights`, in float64
    whatever the input (float32 results are rounded once at the end); axes whose size does not
    change are copied. A parallel Numba kernel (``engine._kernels.resize``) evaluates this row by
    row without intermediate arrays, bit-identical to the axis-by-axis NumPy version it
    replaced (tests/engine/test_resize.py): Colin27 181×217×181 to 128³ in float32 took
    0.17-0.61 s that way and takes about 0.025 s now (benchmarks/RESULTS.md).
    ``scipy.ndimage.zoom(x, order=1, grid_mode=True, mode="nearest")`` gives the same values
    up to rounding but took 0.34 s on that volume, so it is not used.

    Examples
    --------
    >>> resize_linear(np.array([0.0, 1.0]), (4,)).tolist()
    [0.0, 0.25, 0.75, 1.0]
    """
    # imported here: engine.resize stays importable without loading Numba (model cards)
    from engine._kernels.resize import resize_linear_rows

    array = np.asarray(array)
    shape = _target_shape(array, shape, "resize_linear")
    out_dtype = np.float32 if array.dtype == np.float32 else np.float64
    src = np.ascontiguousarray(array, dtype=out_dtype)  # one kernel layout per dtype
    nd = len(shape)
    lead = array.shape[: array.ndim - nd]
    src3 = (1,) * (3 - nd) + tuple(array.shape[array.ndim - nd:])
    dst3 = (1,) * (3 - nd) + tuple(shape)
    x = src.reshape((-1,) + src3)
    out = np.empty((x.shape[0],) + dst3, dtype=out_dtype)
    args: list[Any] = []
    for n_in, n_out in zip(src3, dst3):
        args.append(n_in == n_out)
        args.extend(linear_weights(n_in, n_out))
    resize_linear_rows(x, out, *args)
    return out.reshape(lead + tuple(shape))


def resize_nearest(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of the last ``len(shape)`` axes (torch ``mode="nearest"``).

    Parameters
    ----------
    mask : numpy.ndarray
        Any array (labels, masks); the dtype is kept.
    shape : tuple of int
        Target sizes of the trailing axes.

    Returns
    -------
    numpy.ndarray
        ``mask`` sampled at ``src = floor(dst * in / out)`` per axis (see :func:`nearest_indices`).

    Examples
    --------
    >>> resize_nearest(np.array([[1, 2], [3, 4]]), (3, 3)).tolist()
    [[1, 1, 2], [1, 1, 2], [3, 3, 4]]
    """
    mask = np.asarray(mask)
    shape = _target_shape(mask, shape, "resize_nearest")
    out = mask
    first = mask.ndim - len(shape)
    for k, n_out in enumerate(shape):
        axis = first + k
        if out.shape[axis] != n_out:
            out = np.take(out, nearest_indices(out.shape[axis], n_out), axis=axis)
    return out


def _apply_matrices(array: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
    """Apply one (n_out, n_in) matrix per trailing axis."""
    out = array
    first = array.ndim - len(mats)
    for k, mat in enumerate(mats):
        axis = first + k
        out = np.moveaxis(np.tensordot(out, mat, axes=([axis], [1])), -1, axis)
    return out


def resize_area(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Exact area-average resize of the last ``len(shape)`` axes (float64).

    Examples
    --------
    >>> resize_area(np.array([1.0, 0.0, 0.0]), (2,)).round(4).tolist()
    [0.6667, 0.0]
    """
    array = np.asarray(array)
    shape = _target_shape(array, shape, "resize_area")
    first = array.ndim - len(shape)
    mats = [area_matrix(array.shape[first + k], n) for k, n in enumerate(shape)]
    return np.ascontiguousarray(_apply_matrices(array.astype(np.float64, copy=False), mats))


def adjoint_linear(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Apply the adjoint ``Rᵀ`` of :func:`resize_linear` to the last axes (float64).

    ``array`` lives on the resized grid; the result lives on the grid of sizes ``shape``, with
    ``sum(adjoint_linear(w, s) * x) == sum(w * resize_linear(x, w.shape))`` for every ``x``.

    Examples
    --------
    >>> adjoint_linear(np.ones(4), (2,)).tolist()
    [2.0, 2.0]
    """
    array = np.asarray(array)
    shape = _target_shape(array, shape, "adjoint_linear")
    first = array.ndim - len(shape)
    mats = [linear_matrix(n, array.shape[first + k]).T for k, n in enumerate(shape)]
    return np.ascontiguousarray(_apply_matrices(array.astype(np.float64, copy=False), mats))
