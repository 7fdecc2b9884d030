"""Estimates added to a finished store in place, crash-safely, without copying the file.

The estimation step adds two small elements, ``/estimates`` (a ``dict`` group) and
``/validation`` (``json``), to a store that may hold gigabytes of maps, so the file is
changed in place (``h5py.File(path, "r+")`` with the default format versions: no
superblock status flags that would need ``h5clear`` after a crash), in three steps:

1. **Stage.** The new ``estimates`` and ``validation`` are written into an *anonymous*
   group (``H5Gcreate_anon``: created in the file but linked from nowhere), then the
   file is flushed and fsync'ed. Nothing that existed is changed or freed, so HDF5 only
   appends; a process killed here leaves the store as it was (plus a few unreachable
   KiB at its end).
2. **Commit.** For each name, the previous object is hard-linked into the anonymous
   group (so it is not freed yet), its root link deleted, and the staged object linked
   at the root; then flush and fsync. Every object a link may point to is complete on
   disk before the link is, and reference counts on disk never fall below the links to
   them, whatever subset of this flush's writes reaches the file.
3. **Release.** The anonymous group is dropped when the file closes; the previous
   objects, now linked from nowhere, are freed then (no allocation follows, so their
   space is never reused while the file on disk might still point to it).

``/estimates`` and ``/validation`` carry the same random ``annotation`` token;
:func:`committed_annotation` (used by :meth:`engine.store.Store.validation`) returns
the validation only when its token matches the estimates', so a kill between the two
root updates shows the new estimates without validation, never with the previous
run's. ``/validation`` is always written (JSON ``null`` without statistics).

Every store finished by :func:`~engine.store.merge.assemble` (``StoreWriter.finalize``,
:func:`~engine.store.merge_parts`) already holds both names as *placeholders*
(:func:`write_placeholders`: an empty ``dict`` group and a JSON ``null``, each with the
attribute ``placeholder`` and no token), which :func:`committed_annotation` reports as
absent. So every annotation of such a store, its first included, replaces existing root
names and never adds one.

A replacement is crash-safe only because the root group's symbol-table nodes are
rewritten in place: the deleted name goes back into the node it came from. That holds
unless the name is the largest of a node other than the last (then its B-tree key
changes and the name moves to the next node, in separate writes). The placeholders are
therefore written last, ``validation`` (which sorts after every root name) before
``estimates``, and an annotation that must add the names (old-format store) links
``validation`` first too; :func:`write_placeholders` explains why this keeps both names
off such node ends, and ``tests/engine/store/test_annotate.py`` checks it in the file
for every set of root names a store can have.

What a SIGKILL can leave was measured by replaying every prefix of the writes the
annotation makes (``tests/engine/store/test_annotate.py``): replacing root names (the
placeholders or earlier estimates), every prefix opens with its scores intact and the
previous or the new estimates. Only a store finished *before* the placeholders existed
(no ``/estimates`` or ``/validation`` at its root, e.g. ``tests/data/store-v1.h5``) has
the names inserted into the root group's symbol table by its first annotation; HDF5
writes its B-tree node, symbol-table node and name heap as separate writes (in address
order) within one flush, and a kill between them leaves the root group unreadable
until the file is rewritten — a window of a few microseconds, once per such store
(``docs/store.md``).

The store's writer lock (:class:`~engine.store.atomic.StoreLock`) is held throughout,
so an annotation never collides with a :class:`~engine.store.StoreWriter` or a second
annotation; HDF5's own file lock makes readers wait
(:func:`~engine.store.atomic.open_h5`) while the file is open for writing.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from engine._json import dumps
from engine.store.atomic import StoreLock, open_h5
from engine.store.encoding import (
    STORE_TYPE,
    STR,
    attr_str,
    check_encoding,
    key_name,
    set_encoding,
    write_array,
)
from engine.store.errors import StoreWriteError, WriteContext

__all__ = ["annotate_estimates", "committed_annotation", "write_placeholders",
           "is_placeholder", "TOKEN", "PLACEHOLDER"]

#: Attribute holding the token shared by the ``/estimates`` and ``/validation`` written
#: together.
TOKEN = "annotation"
#: Attribute marking the ``/estimates`` and ``/validation`` a finished store is written
#: with before any annotation ("no estimates yet"); its value is an explanation for
#: people reading the file with plain ``h5py`` / ``h5dump``, only its presence counts.
PLACEHOLDER = "placeholder"
_PLACEHOLDER_NOTE = ("no estimates yet: written when the store was finished, replaced by "
                     "the first annotation (protoseg estimate)")
#: Root names an annotation replaces, in this order: where they must be added (a store
#: finished before the placeholders), ``estimates`` is then inserted last, as
#: :func:`write_placeholders` does, so that later replacements keep the root's nodes.
_TARGETS = ("validation", "estimates")


def annotate_estimates(path: str | os.PathLike[str], estimates: Mapping[str, Any], *,
                       validation: Mapping[str, Any] | None = None,
                       info: Mapping[str, Any] | None = None) -> Path:
    """Store label-free estimates (and validation statistics) in a finished store.

    The existing ``/estimates`` and ``/validation`` (the placeholders of a store not
    annotated yet included) are replaced as a whole. The file is changed in place, never
    copied (see the module notes for what a crash leaves).

    Parameters
    ----------
    path : str or Path
        A finished store (:meth:`~engine.store.StoreWriter.finalize`,
        :func:`~engine.store.merge_parts`).
    estimates : dict of str to array-like
        Name → array with one row per case, in store order (``store.cases``).
    validation : dict, optional
        Validation statistics, stored as JSON text in ``/validation`` (NaN → null;
        ``null`` when not given).
    info : dict, optional
        Stored as the JSON attribute ``info`` of ``/estimates``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileNotFoundError
        No store at ``path``.
    ValueError
        An estimate does not have one row per case.
    StoreExistsError
        Another process holds the store's writer lock (a run or another estimate).
    StoreWriteError
        The estimates could not be written (file and key named); the message says
        whether the store still holds the previous estimates or already the new ones.

    Examples
    --------
    >>> annotate_estimates("results.h5", {"paper": paper},
    ...                    validation={"spearman": 0.7})          # doctest: +SKIP
    >>> open_store("results.h5").estimates()["paper"]            # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"store {path} does not exist; score a dataset into it first")
    arrays = _check_estimates(estimates, _n_cases(path))
    lock = StoreLock(path)
    lock.acquire(advice="wait for that run or estimate to finish, then write the "
                        "estimates again")
    try:
        _annotate(path, arrays, validation, info)
    finally:
        lock.release(remove=True)
    return path


def committed_annotation(f: h5py.File) -> tuple[h5py.Group | None, h5py.Dataset | None]:
    """The ``estimates`` group and ``validation`` dataset a reader should see.

    Placeholders (:func:`write_placeholders`) count as absent. ``validation`` is None
    when absent or when its token differs from the estimates' (an annotation killed
    between its two root updates). Stores written before tokens existed have neither
    token and read as they are.
    """
    est = f.get("estimates")
    val = f.get("validation")
    if est is not None and is_placeholder(est):
        est = None
    if val is not None and is_placeholder(val):
        val = None
    if val is not None and attr_str(val, TOKEN) != (None if est is None
                                                    else attr_str(est, TOKEN)):
        val = None
    return est, val


def is_placeholder(obj: h5py.Group | h5py.Dataset) -> bool:
    """Whether ``obj`` is a placeholder written by :func:`write_placeholders`."""
    return PLACEHOLDER in obj.attrs


def write_placeholders(f: h5py.File) -> None:
    """Write the placeholder ``/estimates`` and ``/validation`` of a new store.

    An empty ``dict`` group and a JSON ``null`` ``json`` dataset, each with the attribute
    :data:`PLACEHOLDER` and no :data:`TOKEN`: readers report them as absent, and the
    first annotation replaces them like any earlier estimates (adding names to the root
    group in place is not crash-safe in HDF5; replacing them is, see the module notes).

    Called by :func:`~engine.store.merge.assemble` on the store's temporary file after
    every other root name, ``validation`` before ``estimates``: a replacement rewrites
    the root group's symbol-table nodes in place only if the name returns to the node it
    was deleted from, i.e. if it is not the largest name of a node other than the last
    (its B-tree key would change, and the name move to the next node). ``validation``
    sorts after every root name (it is in the last node); ``estimates``, inserted last,
    goes into a node that holds a larger name, or, when that node is full, into the left
    half of its split, ahead of the split point (at most ``baselines``, ``cases``,
    ``classes`` sort before it, fewer than the 4 names a split keeps on the left).
    ``tests/engine/store/test_annotate.py`` checks this on the file for every set of
    root names a store can have.
    """
    dset = f.create_dataset("validation", data=dumps(None), dtype=STR)
    set_encoding(dset, "json")
    dset.attrs[PLACEHOLDER] = _PLACEHOLDER_NOTE
    grp = f.create_group("estimates")
    set_encoding(grp, "dict")
    grp.attrs[PLACEHOLDER] = _PLACEHOLDER_NOTE


# --------------------------------------------------------------------------- steps

def _n_cases(path: Path) -> int:
    with open_h5(path, "r") as f:
        check_encoding(f, (STORE_TYPE,))
        return int(f["cases/id"].shape[0])


def _check_estimates(estimates: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    if not isinstance(estimates, Mapping):
        raise TypeError(f"estimates must be a dict name -> array, got "
                        f"{type(estimates).__name__}")
    arrays = {}
    for name, value in estimates.items():
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != n:
            raise ValueError(f"estimate {name!r} has shape {arr.shape}, expected {n} rows "
                             "(one per case, in store order)")
        arrays[str(name)] = arr
    return arrays


def _annotate(path: Path, arrays: Mapping[str, np.ndarray],
              validation: Mapping[str, Any] | None, info: Mapping[str, Any] | None) -> None:
    w = WriteContext(path, advice="the store still holds its previous estimates: free disk "
                                  "space and write the estimates again")
    with open_h5(path, "r+") as f:
        check_encoding(f, (STORE_TYPE,))
        with w.raising():
            staging = _stage(f, arrays, validation, info, uuid.uuid4().hex, w)
            w.key = "/"
            _sync(f)
        try:
            _commit(f, staging, w)
            w.key = "/"
            _sync(f)
            _release(staging)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, StoreWriteError):
                raise
            w.advice = ("the store holds its previous or its new estimates, readable either "
                        "way: write the estimates again")
            raise w.fail(exc) from exc


def _stage(f: h5py.File, arrays: Mapping[str, np.ndarray],
           validation: Mapping[str, Any] | None, info: Mapping[str, Any] | None,
           token: str, w: WriteContext) -> h5py.Group:
    """Write ``estimates`` and ``validation`` into a new anonymous group; return it."""
    w.key = "estimates"
    staging = h5py.Group(h5py.h5g.create(f.id, None))
    est = staging.create_group("estimates")
    set_encoding(est, "dict")
    est.attrs[TOKEN] = token
    if info is not None:
        est.attrs["info"] = dumps(info, sort_keys=True)
    for name, arr in arrays.items():
        w.key = f"estimates/{name}"
        write_array(est, key_name(name), arr)
    w.key = "validation"
    dset = staging.create_dataset("validation", data=dumps(validation, sort_keys=True),
                                  dtype=STR)
    set_encoding(dset, "json")
    dset.attrs[TOKEN] = token
    return staging


def _sync(f: h5py.File) -> None:
    """Flush HDF5's caches to the file and fsync it."""
    f.flush()
    try:
        fd = f.id.get_vfd_handle()
    except Exception:  # noqa: BLE001 - a driver without a file descriptor
        return
    if isinstance(fd, int) and fd >= 0:
        os.fsync(fd)


def _commit(f: h5py.File, staging: h5py.Group, w: WriteContext) -> None:
    """Link the staged objects at the root in place of the previous ones (kept alive)."""
    for key in _TARGETS:
        w.key = key
        if key in f:
            staging[f"previous-{key}"] = f[key]
            del f[key]
        f[key] = staging[key]


def _release(staging: h5py.Group) -> None:
    """Unlink everything from the anonymous group: the previous objects are freed."""
    for name in list(staging):
        del staging[name]
