"""Overlapped stages of a scoring run: cases read ahead in one thread, parts written in another.

:func:`~engine.run.loop.run_plan` scores batch *k* in the calling thread while
:class:`ReadAhead` reads the cases of batch *k + 1* and :class:`WriteBehind` publishes the
part file of batch *k - 1*. onnxruntime, Numba, zlib and HDF5's file I/O spend most of their
time without the GIL, so the three threads really overlap; the Python glue of each takes
turns.

Both stages are bounded by semaphores, not by queue sizes: a stage takes a slot *before*
it starts on a batch and gives it back only when the batch has left it (read ahead: taken
by the loop; write behind: published), so with ``depth=1`` at most two batches of cases
(the one being scored and the one read ahead) and two batch results (the one being scored
and the one being written) are alive at once, and memory stays bounded by the batch.

Errors keep their place in the sequence: a read error is raised by the loop when it asks
for that batch (after the batches before it were scored), and a write error is raised at
the next hand-over (:meth:`WriteBehind.submit`, :meth:`WriteBehind.check`) or by
:meth:`WriteBehind.drain`; nothing is written after a failed write. The same exception
object is raised in the calling thread, so its type, message and attributes are those of the
sequential run. :func:`overlap_enabled` reads ``PROTOSEG_OVERLAP`` (``0`` runs every stage
inline in the calling thread, exactly as before the stages existed: for debugging and for
the A/B of ``benchmarks/pipeline.py``).

The threads run in a copy of the caller's :mod:`contextvars` context, so that messages built
there name options the way the caller spells them (:func:`engine.errors.option`).

A :class:`Gate` times the background work (issue 15): the reads and writes are mostly Python
and HDF5 calls that hold the GIL, and started as soon as a batch is handed over they fell
on the calling thread's own Python work (preprocessing the next batch, 6x slower in the
pipeline benchmark). With a gate, each background item waits until the calling thread runs
code that releases the GIL (:func:`native_section`, around onnxruntime's run) or waits on
the stage itself, at most :data:`GATE_WAIT` seconds; what is done, and in which order, is
unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["OVERLAP_ENV", "overlap_enabled", "ReadAhead", "WriteBehind", "Gate", "GATE_WAIT",
           "native_section", "gated"]

#: Environment variable: ``0`` (or ``false``, ``no``, ``off``) runs the stages sequentially.
OVERLAP_ENV = "PROTOSEG_OVERLAP"

#: Seconds between checks of a stop flag while a thread or the caller waits (a wait is
#: never longer than this after a stop or a Ctrl-C).
_POLL = 0.05

#: Seconds a background item waits, at most, for the calling thread to open the gate.
GATE_WAIT = 0.25

T = TypeVar("T")


class Gate:
    """When the background stages may work: while the calling thread is in code that
    releases the GIL, or waits on a stage (it is then not working itself).

    Examples
    --------
    >>> gate = Gate()
    >>> gate.is_open
    False
    >>> with gate.opened():
    ...     gate.is_open, gate.wait(10.0)
    (True, True)
    >>> gate.wait(0.01)  # nobody opened it: gives up after the time given
    False
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = 0

    @property
    def is_open(self) -> bool:
        """Whether some caller holds the gate open now."""
        return self._open > 0

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """Hold the gate open for the ``with`` block (nested holds add up)."""
        with self._cond:
            self._open += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._open -= 1

    def wait(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Wait until the gate is open (True), ``stop`` is set or ``timeout`` s passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._open <= 0:
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return False
                self._cond.wait(min(left, _POLL))
        return True


def _held_open(gate: Gate | None) -> contextlib.AbstractContextManager[None]:
    """``gate.opened()``, or nothing to hold without a gate (sequential runs)."""
    return gate.opened() if gate is not None else contextlib.nullcontext()


#: The gate of the run the calling thread scores (set by :func:`gated`), read by
#: :func:`native_section`.
_GATE: contextvars.ContextVar[Gate | None] = contextvars.ContextVar("protoseg_gate", default=None)


@contextlib.contextmanager
def gated(gate: Gate | None) -> Iterator[None]:
    """Make ``gate`` the one :func:`native_section` opens in this context, for the block."""
    token = _GATE.set(gate)
    try:
        yield
    finally:
        _GATE.reset(token)


@contextlib.contextmanager
def native_section() -> Iterator[None]:
    """Mark a call that releases the GIL for long (a model run): the background stages of the
    run being scored may work meanwhile. Does nothing outside a gated run.

    Examples
    --------
    >>> gate = Gate()
    >>> with gated(gate), native_section():
    ...     gate.is_open
    True
    >>> with native_section():  # no run: nothing to open
    ...     gate.is_open
    False
    """
    gate = _GATE.get()
    if gate is None:
        yield
        return
    with gate.opened():
        yield


def overlap_enabled() -> bool:
    """Whether runs overlap reading, scoring and writing (``PROTOSEG_OVERLAP``, default on).

    Examples
    --------
    >>> import os
    >>> os.environ["PROTOSEG_OVERLAP"] = "0"
    >>> overlap_enabled()
    False
    >>> del os.environ["PROTOSEG_OVERLAP"]
    >>> overlap_enabled()
    True
    """
    return os.environ.get(OVERLAP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _acquire(sem: threading.Semaphore, stop: threading.Event | None = None) -> bool:
    """Take a slot, waking every :data:`_POLL` s (so that Ctrl-C and ``stop`` are seen)."""
    while not sem.acquire(timeout=_POLL):
        if stop is not None and stop.is_set():
            return False
    return True


def _start(target: Callable[[], None], name: str) -> threading.Thread:
    ctx = contextvars.copy_context()  # option() spelling, and any other context of the caller
    thread = threading.Thread(target=ctx.run, args=(target,), name=name, daemon=True)
    thread.start()
    return thread


def _join(thread: threading.Thread | None) -> None:
    while thread is not None and thread.is_alive():
        thread.join(_POLL)


class ReadAhead:
    """Batches of cases, read ``depth`` batches ahead of the caller in a background thread.

    Parameters
    ----------
    read : callable
        ``read(indices) -> cases``: reads one batch (called in the reading thread).
    batches : sequence of sequence of int
        The dataset indices of each batch, in order.
    depth : int
        Batches read ahead of the one the caller holds (1: the next one).
    threaded : bool
        ``False`` reads each batch in the caller's thread when it is asked for.

    Yields
    ------
    (indices, cases)
        In the order of ``batches``. An exception raised by ``read`` is raised by the
        iteration in the caller's thread, at that batch's turn; nothing after it is read.

    Examples
    --------
    >>> with ReadAhead(lambda idx: [i * 10 for i in idx], [[0, 1], [2]]) as batches:
    ...     list(batches)
    [([0, 1], [0, 10]), ([2], [20])]
    """

    def __init__(self, read: Callable[[Sequence[int]], list[Any]], batches: Sequence[Sequence[int]], *,
                 depth: int = 1, threaded: bool = True, name: str = "protoseg-read",
                 gate: Gate | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth!r}; expected at least 1 batch read ahead")
        self._read = read
        self._gate = gate
        self._batches = [list(b) for b in batches]
        self._threaded = threaded
        self._next = 0
        self._stop = threading.Event()
        self._slots = threading.Semaphore(depth)
        self._queue: queue.Queue[tuple[str, list[int], Any]] = queue.Queue()
        self._thread = _start(self._work, name) if threaded and self._batches else None

    def _work(self) -> None:
        for idx in self._batches:
            if not _acquire(self._slots, self._stop) or self._stop.is_set():
                return
            if self._gate is not None:  # read while the caller runs the model (or waits here)
                self._gate.wait(GATE_WAIT, self._stop)
                if self._stop.is_set():
                    return
            try:
                cases = self._read(idx)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                self._queue.put(("error", idx, exc))
                return
            self._queue.put(("ok", idx, cases))
            del cases  # the queue holds the only reference: the caller frees it

    def __iter__(self) -> Iterator[tuple[list[int], list[Any]]]:
        return self

    def __next__(self) -> tuple[list[int], list[Any]]:
        if self._next >= len(self._batches) or self._stop.is_set():
            raise StopIteration
        if not self._threaded:
            idx = self._batches[self._next]
            self._next += 1
            return idx, self._read(idx)
        try:
            kind, idx, value = self._queue.get_nowait()
        except queue.Empty:
            with _held_open(self._gate):
                kind, idx, value = self._wait()
        self._slots.release()  # the caller holds this batch now: the next one may be read
        self._next += 1
        if kind == "error":
            self._stop.set()
            raise value
        return idx, value

    def _wait(self) -> tuple[str, list[int], Any]:
        while True:
            try:
                return self._queue.get(timeout=_POLL)
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the reading thread stopped without a result") from None

    def close(self) -> None:
        """Stop reading (the batch being read is finished, then dropped) and join the thread."""
        self._stop.set()
        _join(self._thread)
        while not self._queue.empty():  # drop what was read ahead
            self._queue.get_nowait()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class WriteBehind(Generic[T]):
    """Items written one by one, in order, in a background thread, behind the caller.

    Parameters
    ----------
    write : callable
        ``write(item)``: publishes one item (called in the writing thread).
    depth : int
        Items handed over and not yet written, at most (1: the caller waits at its next
        hand-over until the previous item is written).
    threaded : bool
        ``False`` writes each item in :meth:`submit`, in the caller's thread.

    Notes
    -----
    After a failed write nothing more is written: the items handed over later are dropped
    and the failure is raised by the next :meth:`submit`, :meth:`check` or :meth:`drain`.

    Examples
    --------
    >>> out = []
    >>> with WriteBehind(out.append) as w:
    ...     for item in "abc":
    ...         w.submit(item, n=1)
    ...     w.drain()
    >>> out, w.written
    (['a', 'b', 'c'], 3)
    """

    def __init__(self, write: Callable[[T], Any], *, depth: int = 1, threaded: bool = True,
                 name: str = "protoseg-write", gate: Gate | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth!r}; expected at least 1 item written behind")
        self._write = write
        self._gate = gate
        self._threaded = threaded
        self._slots = threading.Semaphore(depth)
        self._queue: queue.Queue[tuple[T, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._pending = 0
        self._cond = threading.Condition()
        #: How many units (``n`` of :meth:`submit`: cases) were written so far.
        self.written = 0
        self._thread = _start(self._work, name) if threaded else None

    def _work(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            item, n = entry
            del entry
            try:
                if self._error is None:
                    if self._gate is not None:  # write while the caller runs the model (or waits)
                        self._gate.wait(GATE_WAIT)
                    self._write(item)
                    self.written += n
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                self._error = exc
            finally:
                del item
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()
                self._slots.release()

    @property
    def error(self) -> BaseException | None:
        """The exception of the failed write, if one failed."""
        return self._error

    def check(self) -> None:
        """Raise the exception of a failed write, if one failed."""
        if self._error is not None:
            raise self._error

    def submit(self, item: T, *, n: int = 1) -> None:
        """Hand ``item`` over for writing (it counts ``n`` in :attr:`written` once written).

        Waits while ``depth`` items are still unwritten; raises a failed write's exception.
        """
        self.check()
        if not self._threaded:
            try:
                self._write(item)
            except BaseException as exc:
                self._error = exc
                raise
            self.written += n
            return
        if not self._slots.acquire(blocking=False):
            with _held_open(self._gate):
                _acquire(self._slots)
        self.check()  # the write waited for may have failed
        with self._cond:
            self._pending += 1
        self._queue.put((item, n))

    def drain(self) -> None:
        """Wait until every item handed over is written; raise a failed write's exception."""
        with _held_open(self._gate):
            with self._cond:
                while self._pending:
                    self._cond.wait(_POLL)
        self.check()

    def close(self) -> None:
        """Finish the items handed over (at most ``depth``), stop and join the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
        with _held_open(self._gate):
            _join(self._thread)

    def __enter__(self) -> WriteBehind[T]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
