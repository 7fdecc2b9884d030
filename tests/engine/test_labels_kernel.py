"""The mask label kernel (``engine._kernels.labels.present_values``) against its twin, NumPy's
``np.isin(np.arange(2**bits), values)``, and the same on 1 and 2 threads."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from engine._kernels.labels import present_values


def _twin(flat: np.ndarray) -> np.ndarray:
    return np.isin(np.arange(1 << (8 * flat.dtype.itemsize)), flat)


def _masks(dtype: type) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    top = np.iinfo(dtype).max
    runs = np.repeat(rng.integers(0, 40, 300), rng.integers(1, 30, 300))  # a label map's long runs
    edge = np.zeros(3000, dtype)
    edge[1000] = top  # alone at the first value of a chunk (chunk=1000), after a run of zeros
    edge[1999] = 5  # the last value of a chunk
    edge[2000] = 5  # the same value again at the next chunk's start: marked in each chunk
    return [rng.integers(0, top + 1, 5000).astype(dtype), runs.astype(dtype), edge,
            np.full(7, top, dtype), np.zeros(1, dtype), np.array([], dtype)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("chunk", [1, 999, 1000, 1 << 20])
def test_present_values_is_isin(dtype, chunk):
    for flat in _masks(dtype):
        got = present_values(flat, chunk=chunk)
        assert got.dtype == bool and got.shape == (1 << (8 * np.dtype(dtype).itemsize),)
        np.testing.assert_array_equal(got, _twin(flat))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_present_values_same_on_one_and_two_threads(dtype):
    flats = _masks(dtype)
    results = []
    old = numba.get_num_threads()
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            results.append([present_values(f, chunk=700) for f in flats])
    finally:
        numba.set_num_threads(old)
    for a, b in zip(results[0], results[-1]):
        np.testing.assert_array_equal(a, b)
