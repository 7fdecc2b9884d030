"""The store's errors, and the small tracker that lets a write error name its file and key."""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["StoreConfigError", "StoreExistsError", "StoreVersionError", "StoreWriteError",
           "WriteContext"]


class StoreConfigError(ValueError):
    """A store exists with other settings than this run asks for."""


class StoreExistsError(FileExistsError):
    """A store (or an unfinished run) exists and neither resume nor overwrite was asked."""


class StoreVersionError(ValueError):
    """A store element has an encoding this version of protoseg cannot read."""


class StoreWriteError(OSError):
    """Writing a store file failed; the message names the file and the key.

    ``errno`` is the cause's (``ENOSPC``, ``EROFS``...); ``str()`` is the message alone.
    """

    def __str__(self) -> str:
        return self.strerror if isinstance(self.strerror, str) and self.strerror else super().__str__()


class WriteContext:
    """Track the file and key being written so that an error can name them.

    Parameters
    ----------
    filename : Path
        The file being written (the part, the store, or the store being annotated).
    advice : str
        What the user can do, ending the one-line message of :meth:`fail`.

    Attributes
    ----------
    key : str
        The group or dataset being written now (``"/"`` for the root's attributes).
    """

    def __init__(self, filename: Path, *,
                 advice: str = "the parts already published are kept: free disk space "
                               "and resume") -> None:
        self.filename = filename
        self.advice = advice
        self.key = "/"

    def fail(self, exc: BaseException) -> StoreWriteError:
        """Return the :class:`StoreWriteError` for ``exc`` (errno kept, EIO when none)."""
        code = getattr(exc, "errno", None) or errno.EIO
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if getattr(exc, "errno", None) and len(str(reason)) > 80:
            # HDF5's own text (times, buffers, offsets) says less than the errno
            reason = os.strerror(code)
        return StoreWriteError(
            code, f"cannot write key {self.key!r} to {self.filename}: {reason}; {self.advice}")

    def wrap(self, exc: BaseException) -> BaseException:
        """The exception to raise for ``exc``: I/O failures become :class:`StoreWriteError`,
        anything else (a validation error, KeyboardInterrupt) is returned unchanged."""
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, StoreWriteError):
            return self.fail(exc)
        return exc

    @contextmanager
    def raising(self, *, cleanup: Path | None = None) -> Iterator[None]:
        """Within the block, I/O failures are raised as :class:`StoreWriteError` (file and
        key named, see :meth:`wrap`); ``cleanup``, a temporary file, is removed on any failure."""
        try:
            yield
        except BaseException as exc:
            if cleanup is not None:
                cleanup.unlink(missing_ok=True)
            err = self.wrap(exc)
            if err is exc:
                raise
            raise err from exc
