"""File-level safety: fsync, publish-by-rename, atomic JSON, the store's writer lock.

A file is *published* by writing it under a temporary name in the same folder, fsync'ing
it, ``os.replace``-ing it onto its final name and fsync'ing the folder
(:func:`publish`): after a crash the final name holds the old file or the new one, never
a mix. :class:`StoreLock` is the one writer lock of a store (``.<store>.lock`` beside
it), taken by :class:`~engine.store.StoreWriter` and by
:func:`~engine.store.annotate_estimates`.
"""
from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py

from engine._json import dumps
from engine.store.errors import StoreExistsError, StoreWriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["fsync_path", "publish", "write_json_atomic", "lock_path", "StoreLock",
           "open_h5", "HDF5_LOCK_WAIT"]

#: Seconds :func:`open_h5` waits for another process's HDF5 file lock (an annotation
#: being written, a reader) before giving up.
HDF5_LOCK_WAIT = 30.0


def fsync_path(path: Path) -> None:
    """fsync a file or folder by path; errors (e.g. folders on some systems) are ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, ``os.replace`` it onto ``final`` and fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Publish ``data`` as JSON text (sorted keys) at ``path``.

    Raises
    ------
    StoreWriteError
        The file could not be written (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(dumps(data, sort_keys=True, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; "
                              "free disk space or choose another output") from exc


def lock_path(store: Path) -> Path:
    """The lock file of the store at ``store``: ``.<name>.lock`` in the same folder."""
    return store.with_name(f".{store.name}.lock")


class StoreLock:
    """An exclusive, non-blocking ``flock`` on the store's lock file.

    The OS releases it when the process dies (SIGKILL included), so a crash never leaves
    a store locked. On systems without ``fcntl`` the lock is only recorded, not taken.

    Parameters
    ----------
    store : Path
        The store file (the lock is :func:`lock_path` of it).
    """

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = lock_path(store)
        self._fd: int | None = None
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._held

    def acquire(self, *, advice: str) -> None:
        """Take the lock, or raise at once.

        Parameters
        ----------
        advice : str
            What to do when another process holds it (ends the error message).

        Raises
        ------
        StoreExistsError
            Another process (or another lock object of this one) holds the lock.

        Notes
        -----
        A holder that finishes removes the lock file while it still holds it. A process
        that opened the old file before and locks it afterwards would hold a lock on a
        removed file, so the lock is only kept when the path still names the locked
        file; otherwise it is taken again on the new one.
        """
        if self._held:
            return
        if fcntl is None:  # pragma: no cover
            self._held = True
            return
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # a read-only or full folder: nothing can be written there
                raise StoreWriteError(
                    exc.errno or errno.EIO,
                    f"cannot write in folder {self.path.parent} for store {self.store} "
                    f"({exc.strerror or exc}); choose an output in a writable folder, or make this "
                    "one writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise StoreExistsError(f"another writer holds store {self.store}: it is in use "
                                       f"until that run ends (lock {self.path}); {advice}") from None
            try:
                st, now = os.fstat(fd), os.stat(self.path)
                same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                self._fd, self._held = fd, True
                return
            os.close(fd)  # the previous holder removed that file: lock the new one
        raise StoreExistsError(f"cannot lock store {self.store}: {self.path} keeps being "
                               f"replaced; {advice}")

    def release(self, *, remove: bool = False) -> None:
        """Release the lock; with ``remove`` delete the lock file first (while held)."""
        fd, self._fd = self._fd, None
        if remove and self._held:
            self.path.unlink(missing_ok=True)
        self._held = False
        if fd is not None:
            os.close(fd)


def open_h5(path: Path, mode: str, *, wait: float = HDF5_LOCK_WAIT) -> h5py.File:
    """``h5py.File(path, mode)``, waiting up to ``wait`` seconds while another process has
    the file open in a conflicting mode (HDF5's own file lock: a store being annotated
    cannot be read for that moment, and the reverse).

    Raises
    ------
    BlockingIOError
        The file stayed locked; the message names it.
    """
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        try:
            return h5py.File(path, mode)
        except BlockingIOError as exc:
            if time.monotonic() >= deadline:
                raise BlockingIOError(
                    exc.errno or errno.EAGAIN,
                    f"{path} stayed open in another process for {wait:.0f} s (HDF5 file "
                    "lock); wait for that process (e.g. an estimate writing into it) to "
                    "finish") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
