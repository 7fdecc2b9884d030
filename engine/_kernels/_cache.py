"""Numba's on-disk cache of the kernels, made stale by a change to *any* kernel source.

Numba stamps each cached function with a hash of the one file that defines it and loads its
machine code while that file is unchanged. But a kernel is compiled together with the code it
calls from other modules: the LLVM of :mod:`.simd`'s intrinsics inside
:mod:`.channels_last`, :mod:`.counting`'s row loops inside :mod:`.fused` and :mod:`.units`,
the status codes of :mod:`engine.status`. After a change to only such a module (a ``git pull``
in an editable install, an edit while developing) Numba went on loading the old code: scores
from the previous version, silently, until the cache was cleared (seen when a deliberate
error put in ``simd.py`` left ``layout.py``'s cached kernel unchanged).

:func:`install` puts locators in front of Numba's own for the files of this package: the same
cache folders and file names as Numba's (:class:`numba.core.caching.UserProvidedCacheLocator`,
``InTreeCacheLocator``, ``UserWideCacheLocator``), with a stamp that also holds one digest of
every kernel source (:func:`sources_digest`): any change there recompiles every kernel once.
Functions outside the package keep Numba's locators. On a Numba without these classes nothing is
installed and caching is Numba's own (``tests/engine/test_kernel_cache.py`` shows the stale
load without it).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

__all__ = ["install", "sources_digest"]

_HERE = Path(__file__).resolve().parent

#: Folders whose ``.py`` files are the kernels' sources (every file under them), and single
#: files compiled into them; a function is stamped when its file lies under one of the folders.
_TREES: list[Path] = [_HERE]
_FILES: list[Path] = [_HERE.parent / "status.py"]


@functools.lru_cache(maxsize=1)
def sources_digest() -> bytes:
    """SHA-256 over the path (relative to its folder) and bytes of every kernel source."""
    h = hashlib.sha256()
    for root in _TREES:
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for path in _FILES:
        if path.exists():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.digest()


def _ours(py_file: str) -> bool:
    try:
        path = Path(py_file).resolve()
    except (OSError, RuntimeError):
        return False
    return any(path.is_relative_to(root) for root in _TREES)


def _stamped(base: type) -> type:
    """``base`` (one of Numba's file-backed locators) for this package's files only, its
    stamp extended by :func:`sources_digest`."""

    class Locator(base):  # type: ignore[misc, valid-type]
        _protoseg = True

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if not _ours(py_file):
                return None  # Numba's own locators take it
            return super().from_function(py_func, py_file)

        def get_source_stamp(self) -> Any:
            return (super().get_source_stamp(), sources_digest())

    Locator.__name__ = Locator.__qualname__ = f"Kernel{base.__name__.lstrip('_')}"
    return Locator


def install() -> bool:
    """Put the stamped locators first in Numba's list (once per process). Returns whether
    they are in place; call it before any kernel module is imported (``cache=True`` picks a
    function's locator when the decorator runs)."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover - numba is a dependency
        return False
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = [getattr(caching, n, None) or getattr(caching, "_" + n, None) for n in names]
    if impl is None or not isinstance(getattr(impl, "_locator_classes", None), list) or None in bases:
        return False
    if any(getattr(c, "_protoseg", False) for c in impl._locator_classes):
        return True
    impl._locator_classes = [_stamped(b) for b in bases] + list(impl._locator_classes)
    return True
