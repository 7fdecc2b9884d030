"""The HDF5 store: crash-safe, resumable, mergeable results of a scoring run.

One concern per module (imports flow downwards only):

- :mod:`~engine.store.reader` — :func:`open_store` → :class:`Store` (read-only).
- :mod:`~engine.store.writer` — :class:`StoreWriter`: one part file per batch, resume,
  finalize.
- :mod:`~engine.store.merge` — assembling parts into the store; :func:`merge_parts`.
- :mod:`~engine.store.annotate` — :func:`annotate_estimates`: estimates added in place,
  crash-safely.
- :mod:`~engine.store.batch` — :class:`BatchResult` / :class:`ScoreBlock`, the schema of
  what a scoring batch produced.
- :mod:`~engine.store.runinfo` — the run description compared on resume and merge.
- :mod:`~engine.store.atomic` — fsync, publish-by-rename, the writer lock.
- :mod:`~engine.store.encoding` — versioned element types, names, array I/O;
  :mod:`~engine.store.errors` — the error classes.

The file layout is documented in ``docs/store.md``.
"""
from __future__ import annotations

from engine.store.annotate import annotate_estimates
from engine.store.batch import BatchResult, ScoreBlock
from engine.store.encoding import STORE_VERSION
from engine.store.errors import (
    StoreConfigError,
    StoreExistsError,
    StoreVersionError,
    StoreWriteError,
)
from engine.store.merge import merge_parts
from engine.store.reader import Store, open_store
from engine.store.runinfo import parts_dir
from engine.store.writer import StoreWriter

__all__ = [
    "STORE_VERSION",
    "BatchResult",
    "ScoreBlock",
    "Store",
    "StoreWriter",
    "StoreConfigError",
    "StoreExistsError",
    "StoreVersionError",
    "StoreWriteError",
    "annotate_estimates",
    "merge_parts",
    "open_store",
    "parts_dir",
]
