"""engine._kernels._pool.parallel_for: every work item exactly once, whatever the threads."""
from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
from numba import njit

from engine._kernels._pool import parallel_for


@njit(nogil=True)
def _mark(lo, hi, out):
    for i in range(lo, hi):
        out[i] += i + 1


@pytest.mark.parametrize("n_items", [0, 1, 2, 7, 1000])
@pytest.mark.parametrize("chunks", [1, 4])
def test_every_item_runs_once_for_one_and_two_threads(n_items: int, chunks: int) -> None:
    before = numba.get_num_threads()
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            out = np.zeros(n_items, dtype=np.int64)
            parallel_for(_mark, n_items, out, chunks_per_thread=chunks)
            np.testing.assert_array_equal(out, np.arange(1, n_items + 1))
    finally:
        numba.set_num_threads(before)


def test_an_error_in_a_range_reaches_the_caller() -> None:
    seen = []

    def kernel(lo: int, hi: int) -> None:
        seen.append((lo, hi, threading.get_ident()))
        if lo > 0:
            raise ValueError("bad range")

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        if numba.get_num_threads() < 2:
            pytest.skip("one Numba thread: the ranges are not split")
        with pytest.raises(ValueError, match="bad range"):
            parallel_for(kernel, 10)
    finally:
        numba.set_num_threads(before)
    assert sorted((lo, hi) for lo, hi, _ in seen) == [(0, 5), (5, 10)]
