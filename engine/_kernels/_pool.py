"""Run a serial ``nogil`` kernel over fixed ranges of work items on a few threads.

The channels-last and unit kernels are serial Numba functions of a work range ``[lo, hi)``
compiled with ``nogil=True``; :func:`parallel_for` runs them over a fixed split of the items,
the calling thread taking part. This replaces Numba's ``parallel=True`` (parfor) for them:
compiling a parfor kernel cost 1.5-2.3x the serial function (each ``prange`` loop is outlined,
typed and optimised again as a gufunc; measured on the demo's kernels, see
``benchmarks/RESULTS.md``, "Cold start, unit level and channels-last re-measured"), and a
cold ``protoseg demo`` spent most of its compile time there.

Results never depend on the thread count: the items are fixed by the caller, each item is
computed by the same code whichever thread runs it, and each writes only its own outputs.
The number of threads is Numba's (``numba.get_num_threads()``, so ``NUMBA_NUM_THREADS`` and
``numba.set_num_threads`` apply as before).
"""
from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["parallel_for", "threads"]

_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_POOL_SIZE = 0


def threads() -> int:
    """Threads a kernel call may use: Numba's current setting."""
    import numba

    return max(1, int(numba.get_num_threads()))


def _pool(n: int) -> ThreadPoolExecutor:
    """The process's worker pool with at least ``n`` threads (made again after a fork)."""
    global _POOL, _POOL_PID, _POOL_SIZE
    with _LOCK:
        if _POOL is None or _POOL_PID != os.getpid() or _POOL_SIZE < n:
            old = _POOL if _POOL_PID == os.getpid() else None
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="protoseg-kernel")
            _POOL_PID, _POOL_SIZE = os.getpid(), n
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


def parallel_for(kernel: Callable[..., Any], n_items: int, *args: Any, chunks_per_thread: int = 1) -> None:
    """Call ``kernel(lo, hi, *args)`` over ranges covering ``[0, n_items)``, in parallel.

    Parameters
    ----------
    kernel : callable
        A Numba function compiled with ``nogil=True`` (it releases the GIL, so the calls run
        at once); it must write only the outputs of items ``lo..hi-1``.
    n_items : int
        Number of work items.
    *args
        Passed to every call after ``lo, hi``.
    chunks_per_thread : int, keyword-only
        Ranges per thread (more gives the pool room to balance unequal items).

    Notes
    -----
    The ranges are ``n_items`` split as evenly as possible; the calling thread and up to
    ``threads() - 1`` pool threads take them in order until none is left. With one thread, or
    one item, the kernel runs once on the calling thread.
    """
    if n_items <= 0:
        return
    t = threads()
    n = min(n_items, t * max(1, chunks_per_thread))
    if t == 1 or n == 1:
        kernel(0, n_items, *args)
        return
    bounds = [(n_items * k) // n for k in range(n + 1)]
    ticket = itertools.count()  # next() on it is atomic under the GIL: each range runs once

    def run() -> None:
        for k in iter(ticket.__next__, None):
            if k >= n:
                return
            kernel(bounds[k], bounds[k + 1], *args)

    pool = _pool(t - 1)
    futures = [pool.submit(run) for _ in range(min(t, n) - 1)]
    try:
        run()
    finally:
        for f in futures:
            f.result()
