"""The store's encoding: versioned element types, names HDF5 can hold, array write and read.

Every group and dataset the store writes carries the attributes ``encoding-type`` and
``encoding-version``. Readers dispatch on them with :func:`check_encoding`, which refuses
a type or version this protoseg does not know with advice (upgrade, or rebuild). The
layout these types make up is documented in ``docs/store.md``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import h5py
import numpy as np
from h5py import h5a, h5s, h5t
from h5py._objects import phil

from engine.store.errors import StoreVersionError

__all__ = [
    "STORE_VERSION", "STORE_TYPE", "PART_TYPE", "RUN_TYPE", "KNOWN", "STR", "GZIP",
    "set_encoding", "set_str_attrs", "attr_str", "check_encoding", "key_name",
    "write_array", "string_values", "read_array", "require_group", "require_parent",
]

#: Encoding version of everything this package writes.
STORE_VERSION = "1"
#: encoding-type of a finished store's root, of a part file's root, of ``run.json``.
STORE_TYPE = "protoseg-store"
PART_TYPE = "protoseg-store-part"
RUN_TYPE = "protoseg-run"

#: encoding-type -> versions this reader understands.
KNOWN: dict[str, tuple[str, ...]] = {
    STORE_TYPE: ("1",),
    PART_TYPE: ("1",),
    RUN_TYPE: ("1",),
    "dict": ("1",),
    "array": ("1",),
    "string-array": ("1",),
    "table": ("1",),
    "map-collection": ("1",),
    "case-maps": ("1",),
    "layer-maps": ("1",),
    "json": ("1",),
}

STR = h5py.string_dtype("utf-8")
GZIP: dict[str, Any] = {"compression": "gzip", "compression_opts": 4}


#: Process id → (file type, memory type, scalar space) of a string attribute, made once per
#: process: what ``obj.attrs[name] = "text"`` makes, without h5py's per-call dtype guessing.
_STR_ATTR: dict[int, tuple[Any, Any, Any]] = {}


def _str_attr() -> tuple[Any, Any, Any]:
    pid = os.getpid()  # made again in a forked child: it never uses its parent's identifiers
    types = _STR_ATTR.get(pid)
    if types is None:
        _STR_ATTR.clear()
        types = _STR_ATTR[pid] = (h5t.py_create(STR, logical=True), h5t.py_create(STR),
                                  h5s.create(h5s.SCALAR))
    return types


#: Process id → the dataset creation property list h5py makes for a contiguous dataset
#: (``create_dataset(name, data=...)`` without chunks or filters), made once per process.
_RAW_DCPL: dict[int, Any] = {}


def _raw_dcpl() -> Any:
    pid = os.getpid()
    dcpl = _RAW_DCPL.get(pid)
    if dcpl is None:
        from h5py import h5p
        from h5py._hl import filters

        _RAW_DCPL.clear()
        dcpl = filters.fill_dcpl(h5p.create(h5p.DATASET_CREATE), (1,), np.dtype(np.float64), None, None,
                                 None, None, None, None, None, None, False)
        dcpl.set_obj_track_times(False)  # h5py's default track_times=False
        dcpl = _RAW_DCPL[pid] = dcpl
    return dcpl


def _create_raw(group: h5py.Group, key: str, data: np.ndarray, dtype: Any) -> h5py.Dataset:
    """``group.create_dataset(key, data=data[, dtype=STR])`` for an array of at least one axis,
    without chunks or filters: the same dataset (type, space, creation properties, values)
    made with h5py's low-level calls, about half the time (issue 15: a part file holds about
    30 such datasets; tests/engine/store/test_raw_arrays.py compares both)."""
    from h5py import h5d

    data = np.asarray(data, dtype=dtype, order="C")  # as h5py's array_for_new_object
    tid = h5t.py_create(dtype, logical=1)
    with phil:
        dsid = h5d.create(group.id, group._e(key), tid, h5s.create_simple(data.shape), dcpl=_raw_dcpl())
        dsid.write(h5s.ALL, h5s.ALL, data)
        return h5py.Dataset(dsid)


def set_str_attrs(obj: h5py.Group | h5py.Dataset, values: Iterable[tuple[str, str]], *,
                  new: bool = False) -> None:
    """Set scalar string attributes of ``obj``, replacing any of the same name.

    The attributes are those of ``obj.attrs[name] = value`` (variable-length UTF-8, scalar),
    written with h5py's low-level calls: the store writes two per dataset, and h5py's
    ``attrs`` spends most of their time guessing the type again each time. ``new=True``
    says that ``obj`` was just created (it has no attributes): nothing is looked up.
    """
    ftype, mtype, space = _str_attr()
    oid = (obj["/"] if isinstance(obj, h5py.File) else obj).id
    with phil:
        for name, value in values:
            key = name.encode("utf-8")
            if not new and h5a.exists(oid, key):
                h5a.delete(oid, key)
            attr = h5a.create(oid, key, ftype, space)
            try:
                attr.write(np.array(str(value), dtype=STR), mtype=mtype)
            finally:
                attr.close()


def set_encoding(obj: h5py.Group | h5py.Dataset, kind: str, *, new: bool = False) -> None:
    """Mark ``obj`` with ``encoding-type = kind`` and this package's encoding version
    (``new``: ``obj`` was just created, see :func:`set_str_attrs`)."""
    set_str_attrs(obj, (("encoding-type", kind), ("encoding-version", STORE_VERSION)), new=new)


def attr_str(obj: h5py.Group | h5py.Dataset, key: str) -> str | None:
    """A string attribute of ``obj`` (bytes decoded), or None when absent."""
    value = obj.attrs.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def check_encoding(obj: h5py.Group | h5py.Dataset, allowed: Iterable[str]) -> str:
    """Return the encoding type of ``obj`` after checking its type and version.

    Raises
    ------
    StoreVersionError
        No encoding attributes (not written by protoseg), a type not in ``allowed`` or
        unknown, or a version this protoseg cannot read; the message says what to do.
    """
    kind = attr_str(obj, "encoding-type")
    version = attr_str(obj, "encoding-version")
    where = f"{obj.file.filename}:{obj.name}"
    allowed = tuple(allowed)
    if kind is None or version is None:
        raise StoreVersionError(
            f"{where} has no encoding-type/encoding-version attributes; it was not "
            "written by protoseg (or is damaged): rerun the scoring to rebuild it")
    if kind not in KNOWN or kind not in allowed:
        raise StoreVersionError(
            f"{where} has encoding-type {kind!r}, expected one of {list(allowed)}; it was "
            "written by another (probably newer) protoseg: upgrade protoseg")
    if version not in KNOWN[kind]:
        newest = max(int(v) for v in KNOWN[kind])
        if version.isdigit() and int(version) > newest:
            raise StoreVersionError(
                f"{where} was written by a newer protoseg (store version {version}; this "
                f"protoseg reads up to {newest}); upgrade protoseg")
        raise StoreVersionError(
            f"{where} has store version {version!r}, which this protoseg cannot read "
            f"(it reads {list(KNOWN[kind])}); rerun the scoring to rebuild the store")
    return kind


def key_name(key: str) -> str:
    """HDF5-safe, reversible name for an arbitrary string (case ids, tensor names).

    ``urllib.parse.quote(key, safe="")`` (so ``/`` becomes ``%2F``), with a leading ``.``
    (and the names ``.``/``..``/empty) encoded as ``%2E``; ``unquote`` reverses it.
    """
    name = quote(key, safe="")
    return name.replace(".", "%2E") if name in {"", ".", ".."} or name.startswith(".") \
        else name


def string_values(data: np.ndarray) -> np.ndarray:
    """The strings :func:`write_array` stores for a string/object array: None as ``""``,
    anything else as ``str(v)`` (an object array of ``str``, same shape)."""
    return np.array(["" if v is None else str(v) for v in data.ravel()], dtype=object).reshape(data.shape)


def write_array(group: h5py.Group, key: str, data: np.ndarray, *,
                resizable: bool = False, compress: bool = True) -> h5py.Dataset:
    """Create one dataset (strings as variable-length UTF-8) with its encoding attrs.

    Parameters
    ----------
    group : h5py.Group
        The parent group.
    key : str
        The dataset's name (already HDF5-safe, see :func:`key_name`).
    data : ndarray
        Numbers (kept in their dtype) or strings (``None`` becomes ``""``).
    resizable : bool, default False
        Make the first (case) axis unlimited, chunked.
    compress : bool, default True
        gzip level 4 (with shuffle for numbers) in chunks; empty arrays are never compressed.
    """
    data = np.asarray(data)
    is_str = data.dtype.kind in "OUS"
    kwargs: dict[str, Any] = {}
    if compress and data.size > 0:
        kwargs.update(GZIP)
        kwargs["chunks"] = True
        if not is_str:
            kwargs["shuffle"] = True
    if resizable:
        kwargs["maxshape"] = (None,) + data.shape[1:]
        kwargs["chunks"] = True
    raw = not kwargs and data.ndim >= 1 and "/" not in key  # contiguous: low-level calls
    if is_str:
        values = string_values(data)
        dset = (_create_raw(group, key, values, STR) if raw else
                group.create_dataset(key, data=values, dtype=STR, **kwargs))
        set_encoding(dset, "string-array", new=True)
    else:
        dset = (_create_raw(group, key, np.ascontiguousarray(data), data.dtype) if raw else
                group.create_dataset(key, data=data, **kwargs))
        set_encoding(dset, "array", new=True)
    return dset


def read_array(dset: h5py.Dataset, sel: Any = ()) -> np.ndarray:
    """Read ``dset[sel]`` after checking its encoding (strings as an object array of str)."""
    kind = check_encoding(dset, ("array", "string-array"))
    if kind == "string-array":
        return np.asarray(dset.asstr()[sel], dtype=object)
    return np.asarray(dset[sel])


def require_group(parent: h5py.Group, key: str, kind: str) -> h5py.Group:
    """``parent[key]``, created with encoding type ``kind`` when absent."""
    if key in parent:
        return parent[key]
    grp = parent.create_group(key)
    set_encoding(grp, kind, new=True)
    return grp


def require_parent(root: h5py.Group, path: str,
                   cache: dict[str, h5py.Group] | None = None) -> tuple[h5py.Group, str]:
    """The group holding ``path`` (``"a/b/leaf"``; ``dict`` groups created as needed) and
    the leaf's name.

    ``cache``, a dict kept by the caller for one ``root`` while it writes many paths,
    remembers the groups already looked up (each lookup is an HDF5 call).
    """
    parent, _, leaf = path.rpartition("/")
    if cache is not None and parent in cache:
        return cache[parent], leaf
    grp = root
    for part in parent.split("/") if parent else []:
        grp = require_group(grp, part, "dict")
    if cache is not None:
        cache[parent] = grp
    return grp, leaf
