"""Assembly of part files into a finished store, and :func:`merge_parts` for shards.

The final store is written under a temporary name beside it and ``os.replace``d into
place: datasets are created once (chunked, gzip-compressed, resizable along cases) and
filled in case order (``cases/index``), the rows of many parts in one write per dataset, a
bounded number of cases and bytes at a time (:data:`_COPY_ROWS`, :data:`_COPY_BYTES`); each
source is opened once to be checked and read. Every store written here holds the
placeholder ``/estimates`` and ``/validation``
(:func:`~engine.store.annotate.write_placeholders`), so that annotating it only ever
replaces root names. Estimates of a source store are not carried over.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import h5py
import numpy as np
from h5py import h5d, h5o, h5s

from engine._json import dumps
from engine.store.annotate import write_placeholders
from engine.store.atomic import open_h5, publish
from engine.store.encoding import (
    GZIP,
    PART_TYPE,
    STORE_TYPE,
    STR,
    check_encoding,
    attr_str,
    read_array,
    require_group,
    require_parent,
    set_encoding,
    string_values,
    write_array,
)
from engine.store.errors import StoreConfigError, StoreExistsError, StoreVersionError, WriteContext
from engine.store.runinfo import (
    LAYER_FIELDS,
    RunInfo,
    config_difference,
    read_run,
    run_of_file,
    write_run_attrs,
)

__all__ = ["list_part_files", "read_part_ids", "collect_schema", "assemble", "merge_parts",
           "ShardWriter", "ShardInfo", "read_shard", "shard_path", "remove_temp_files",
           "SHARD_GLOB", "OPTIONAL_ROWS"]

#: Published shards of a distributed run in a ``<store>.parts`` folder.
SHARD_GLOB = "part-chunk-*.h5"

_COPY_ROWS = 4096  # cases copied at a time when assembling (bounds memory)
#: Bytes of source rows held at a time when assembling: the rows read while the sources are
#: checked, and those of one block of cases copied (bounds memory with wide unit scores).
_COPY_BYTES = 4 * 2**20
#: Sources copied at a time when assembling (each open file holds HDF5's caches: bounds memory).
_COPY_SOURCES = 4
#: Datasets that are not per-case arrays of the scores (never copied by row).
_NOT_ROWS = ("maps/", "layers/", "estimates/")
#: Per-case datasets that parts and stores of older protoseg versions lack, and the value
#: their rows get when such sources are assembled with newer ones (NaN affine, no codes).
OPTIONAL_ROWS: dict[str, Any] = {"cases/affine": np.nan, "cases/orientation": "",
                                 "cases/file_orientation": ""}


def list_part_files(folder: Path) -> list[Path]:
    """The published part files of a ``<store>.parts`` folder, in publication order."""
    return sorted(folder.glob("part-*.h5"))


def _part_ids(f: h5py.File) -> tuple[list[str], np.ndarray | None]:
    """Case ids (and dataset indices) of an open part or store; raises when damaged."""
    check_encoding(f, (PART_TYPE, STORE_TYPE))
    if f.attrs.get("complete", 1) != 1:
        raise ValueError("part is not marked complete")
    ids = [str(c) for c in read_array(f["cases/id"])]
    index = read_array(f["cases/index"]) if "cases/index" in f else None
    return ids, index


def read_part_ids(path: Path) -> tuple[list[str], np.ndarray | None]:
    """Case ids (and dataset indices) of a part or store; raises when damaged."""
    with open_h5(path, "r") as f:
        return _part_ids(f)


def _row_names(f: h5py.File) -> list[str]:
    """Paths of the per-case datasets of an open part or store (see :func:`collect_schema`),
    in name order; walked by HDF5 itself (h5py's ``visititems`` makes an object per node)."""
    names: list[str] = []

    def visit(name: bytes, info: Any) -> None:
        if info.type == h5o.TYPE_DATASET:
            path = name.decode("utf-8")
            if not path.startswith(_NOT_ROWS) and path not in ("classes", "validation", "cases/index"):
                names.append(path)
    h5o.visit(f.id, visit, info=True)
    return names


def _schema_of(f: h5py.File) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    schema: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
    for name in _row_names(f):
        dset = f[name]
        schema[name] = (dset.dtype, dset.shape[1:])
    return schema


def collect_schema(path: Path) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """Per-case datasets of a part or store: path → (dtype, shape after the case axis).

    ``cases/index``, the layer table, classes, maps, estimates and validation are left
    out.
    """
    with open_h5(path, "r") as f:
        return _schema_of(f)


def _scatter(dset: h5py.Dataset, dest: np.ndarray, data: np.ndarray) -> None:
    """Write rows ``data`` to rows ``dest`` of ``dset`` (a slice when contiguous)."""
    if len(dest) == 0:
        return
    perm = np.argsort(dest, kind="stable")
    dest_sorted = dest[perm]
    if dest_sorted[-1] - dest_sorted[0] == len(dest) - 1:
        dset[int(dest_sorted[0]):int(dest_sorted[-1]) + 1] = data[perm]
    else:
        dset[dest_sorted] = data[perm]


def _write_layers(f: h5py.File, run: RunInfo) -> None:
    """The ``/layers`` table and ``/classes``."""
    grp = f.create_group("layers")
    set_encoding(grp, "table")
    cols: dict[str, list[Any]] = {k: [] for k in LAYER_FIELDS}
    for entry in run.layers:
        cols["index"].append(int(entry["index"]))
        cols["name"].append(str(entry.get("name", "")))
        cols["layer"].append(str(entry.get("layer", "")))
        cols["op"].append(str(entry.get("op") or ""))
        cols["channels"].append(-1 if entry.get("channels") is None
                                else int(entry["channels"]))
        cols["depth"].append(-1 if entry.get("depth") is None else int(entry["depth"]))
        shape = entry.get("shape")
        cols["shape"].append("" if shape is None else dumps(shape, sort_keys=True))
    for key, values in cols.items():
        dtype = np.int64 if key in ("index", "channels", "depth") else object
        write_array(grp, key, np.array(values, dtype=dtype), compress=False)
    grp.attrs["extra"] = dumps(run.layers, sort_keys=True)
    classes = write_array(f, "classes", np.array(run.classes, dtype=np.int64),
                          compress=False)
    classes.attrs["description"] = "class labels scored one-vs-rest"


@dataclass
class _Source:
    """What :func:`assemble` learns of one source while checking it."""

    path: Path
    ids: list[str]
    index: np.ndarray | None
    schema: dict[str, tuple[np.dtype[Any], tuple[int, ...]]]
    has_maps: bool
    #: Every per-case array of the source, read while it was open (None: read it again
    #: when copying, the sources read so far being over :data:`_COPY_BYTES`).
    rows: dict[str, np.ndarray] | None


def _scan(path: Path, budget: int) -> tuple[_Source, int]:
    """Open ``path`` once: its ids, indices, per-case datasets, and their rows when their
    bytes fit ``budget``; returns the source and the bytes it holds."""
    with open_h5(path, "r") as f:
        ids, index = _part_ids(f)
        schema: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
        dsets = {}
        for name in _row_names(f):  # low-level: h5py's objects cost more than the reads
            dset = dsets[name] = h5d.open(f.id, name.encode("utf-8"))
            schema[name] = (dset.dtype, tuple(dset.shape[1:]))
        size = sum(_row_bytes(dtype, tail) for dtype, tail in schema.values()) * len(ids)
        rows = {name: _read_all(dset) for name, dset in dsets.items()} if size <= budget else None
        maps = f.get("maps")
        has_maps = isinstance(maps, h5py.Group) and len(maps) > 0
    return _Source(path, ids, index, schema, has_maps, rows), size if rows is not None else 0


def written_source(path: Path, arrays: Mapping[str, np.ndarray], *, has_maps: bool,
                   keep_rows: bool = True) -> _Source:
    """What :func:`_scan` learns of a part, built from the per-case ``arrays`` it was just
    written from (:meth:`engine.store.StoreWriter.write_batch`), without opening it again.

    ``arrays`` maps store paths to the arrays :func:`~engine.store.encoding.write_array`
    wrote (``cases/index`` and ``cases/id`` included). The schema's dtypes and the rows are
    those HDF5 gives back (strings as the variable-length UTF-8 dtype, rows of bytes), so that
    :func:`assemble` writes the same store from it as from the file
    (``tests/engine/store/test_written_source.py`` compares both). ``keep_rows=False`` leaves
    the rows to be read from the file when copying (see :data:`_COPY_BYTES`).
    """
    schema: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
    rows: dict[str, np.ndarray] = {}
    for name in sorted(arrays):
        if name == "cases/index" or name.startswith(_NOT_ROWS):
            continue
        arr = np.asarray(arrays[name])
        if arr.dtype.kind in "OUS":
            schema[name] = (STR, tuple(arr.shape[1:]))
            if keep_rows:
                # as write_array stores them, read back as bytes
                rows[name] = np.array([v.encode("utf-8") for v in string_values(arr).ravel()],
                                      dtype=object).reshape(arr.shape)
        else:
            schema[name] = (arr.dtype, tuple(arr.shape[1:]))
            if keep_rows:  # a copy: the caller may refill its arrays for the next batch
                rows[name] = arr.copy()
    ids = [str(v) for v in np.asarray(arrays["cases/id"]).ravel()]
    index = np.asarray(arrays["cases/index"]) if "cases/index" in arrays else None
    return _Source(Path(path), ids, index, schema, bool(has_maps), rows if keep_rows else None)


def source_bytes(src: _Source) -> int:
    """Bytes of the rows of ``src`` in memory, as :func:`_scan` counts them (0 when not held)."""
    if src.rows is None:
        return 0
    return sum(_row_bytes(dtype, tail) for dtype, tail in src.schema.values()) * len(src.ids)


def _read_all(dset: Any) -> np.ndarray:
    """The whole of a low-level dataset, as ``Dataset[()]`` reads it (strings as bytes)."""
    out = np.empty(dset.shape, dtype=dset.dtype)
    if out.size:
        dset.read(h5s.ALL, h5s.ALL, out)
    return out


def _row_bytes(dtype: np.dtype[Any], tail: tuple[int, ...]) -> int:
    """Bytes of one case's row of a dataset in memory (strings counted as 64)."""
    item = 64 if h5py.check_string_dtype(dtype) is not None else dtype.itemsize
    return item * math.prod(tail)


def _read_sources(sources: list[Path], expected_ids: Iterable[str] | None,
                  known: Mapping[Path, _Source] | None = None) -> list[_Source]:
    """Every source, opened once (or described by ``known``); refuse damage, overlaps and
    missing cases."""
    out: list[_Source] = []
    owner: dict[str, Path] = {}
    held = 0
    for src in sources:
        info = (known or {}).get(Path(src))
        if info is not None:  # just written by this process: nothing to open or check
            size = source_bytes(info)
            if size > _COPY_BYTES - held:
                info, size = dataclasses.replace(info, rows=None), 0
        else:
            try:
                info, size = _scan(src, _COPY_BYTES - held)
            except Exception as exc:  # noqa: BLE001 - damaged file: say which
                raise ValueError(f"cannot read part {src} ({exc}); rerun (resume) the run that "
                                 "made it, or leave it out explicitly") from None
        held += size
        for c in info.ids:
            if c in owner:
                raise ValueError(f"case {c!r} is in both {owner[c]} and {src}; each case "
                                 "must be in one part/shard only")
            owner[c] = src
        out.append(info)
    if expected_ids is not None:
        expected = {str(c) for c in expected_ids}
        missing = sorted(expected - set(owner))
        if missing:
            raise ValueError(f"{len(missing)} expected case(s) are in no part: {missing[:5]}; "
                             "run the missing shard(s) before merging")
    return out


def _common_schema(sources: list[_Source]) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """The per-case datasets every source holds; refuse sources that differ."""
    if not sources:
        return {"cases/id": (STR, ()), "cases/status": (STR, ()), "cases/group": (STR, ())}
    first = sources[0]
    schema = dict(first.schema)
    for src in sources[1:]:
        other = src.schema
        if set(other) - set(OPTIONAL_ROWS) != set(schema) - set(OPTIONAL_ROWS):
            diff = sorted(set(other) ^ set(schema))
            raise ValueError(f"part {src.path} holds other arrays than {first.path} "
                             f"(differing: {diff[:5]}); parts of one store must be alike")
        for key, (dtype, tail) in other.items():
            if key not in schema:  # an optional array the first source lacks
                schema[key] = (dtype, tail)
            elif tail != schema[key][1]:
                raise ValueError(f"part {src.path} has {key} with shape (n, *{tail}), but "
                                 f"{first.path} has (n, *{schema[key][1]})")
    return schema


def _blocks(sources: list[_Source], per_block: int) -> list[list[tuple[int, int, int]]]:
    """``(source, first row, end row)`` segments in source order, grouped so that each
    group holds at most ``per_block`` rows (a source may span groups) and at most
    :data:`_COPY_SOURCES` segments (the sources not held in memory are open while their group
    is copied: each open HDF5 file costs its caches)."""
    blocks: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    n = 0
    for si, src in enumerate(sources):
        b0 = 0
        while b0 < len(src.ids):
            take = min(len(src.ids) - b0, per_block - n)
            cur.append((si, b0, b0 + take))
            n += take
            b0 += take
            if n == per_block or len(cur) == _COPY_SOURCES:
                blocks.append(cur)
                cur, n = [], 0
    if cur:
        blocks.append(cur)
    return blocks


def _write_rows(dset: h5py.Dataset, dest: list[np.ndarray], pieces: list[np.ndarray]) -> None:
    """Write the rows ``pieces`` (one per segment) to rows ``dest`` of ``dset``: in one
    call when they share a dtype (the common case: every part of a run)."""
    if len(pieces) > 1 and len({p.dtype for p in pieces}) == 1:
        _scatter(dset, np.concatenate(dest), np.concatenate(pieces))
        return
    for d, p in zip(dest, pieces):
        _scatter(dset, d, p)


def assemble(sources: list[Path], run: RunInfo, out: Path, provenance: Mapping[str, Any],
             *, expected_ids: Iterable[str] | None = None,
             known: Mapping[Path, _Source] | None = None) -> Path:
    """Write the finished store ``out`` from part files / stores, in case order.

    Cases are ordered by ``cases/index`` when every source has it, else in the order of
    ``sources``. The file is written as ``.<out>.tmp-<pid>`` and published with
    ``os.replace``; on any error the temporary file is removed. The store gets the
    placeholder ``/estimates`` and ``/validation`` (read as absent), never the sources'
    estimates.

    Each source is opened once to be checked (its rows kept while they fit
    :data:`_COPY_BYTES`) and the rows of many sources are written together, one call per
    dataset per :data:`_COPY_ROWS` cases at most. A source in ``known`` (path →
    :func:`written_source`: parts the caller has just written) is not opened to be checked,
    and its rows are taken from memory while they fit the same budget.

    Raises
    ------
    ValueError
        A source cannot be read, sources overlap or differ, or expected cases are missing.
    StoreWriteError
        Writing failed (file and key named).
    """
    infos = _read_sources(sources, expected_ids, known)
    n_total = sum(len(s.ids) for s in infos)
    has_index = bool(infos) and all(s.index is not None for s in infos)
    if has_index and n_total:
        keys = np.concatenate([s.index for s in infos])  # type: ignore[misc]
    else:
        keys = np.arange(n_total)
    order = np.argsort(keys, kind="stable")
    rows = np.empty(n_total, dtype=np.int64)
    rows[order] = np.arange(n_total)
    starts = np.cumsum([0] + [len(s.ids) for s in infos])
    schema = _common_schema(infos)
    row_bytes = sum(_row_bytes(dtype, tail) for dtype, tail in schema.values()) + 8
    per_block = max(1, min(_COPY_ROWS, _COPY_BYTES // max(1, row_bytes)))

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = WriteContext(out)
    with w.raising(cleanup=tmp):
        with h5py.File(tmp, "w") as f:
            w.key = "/"
            set_encoding(f, STORE_TYPE)
            write_run_attrs(f, run)
            f.attrs["provenance"] = dumps(provenance, sort_keys=True)
            f.attrs["n_cases"] = n_total
            w.key = "layers"
            _write_layers(f, run)
            dsets: dict[str, h5py.Dataset] = {}
            groups: dict[str, h5py.Group] = {}
            for key, (dtype, tail) in sorted(schema.items()):
                w.key = key
                grp, leaf = require_parent(f, key, groups)
                is_str = h5py.check_string_dtype(dtype) is not None
                kwargs: dict[str, Any] = dict(GZIP)
                if not is_str:
                    kwargs["shuffle"] = True
                dset = grp.create_dataset(
                    leaf, shape=(n_total,) + tail, maxshape=(None,) + tail,
                    dtype=STR if is_str else dtype, chunks=True, **kwargs)
                set_encoding(dset, "string-array" if is_str else "array")
                dsets[key] = dset
            w.key = "cases/index"
            dsets["cases/index"] = write_array(
                require_group(f, "cases", "dict"), "index", np.zeros(n_total, np.int64),
                resizable=True)
            maps = require_group(f, "maps", "map-collection")
            for block in _blocks(infos, per_block):
                opened: dict[int, h5py.File] = {}
                try:
                    for si, _, _ in block:
                        if infos[si].rows is None and si not in opened:
                            opened[si] = open_h5(infos[si].path, "r")
                    dest = [rows[starts[si] + b0:starts[si] + b1] for si, b0, b1 in block]
                    for key in sorted(schema):
                        w.key = key
                        pieces = []
                        for si, b0, b1 in block:
                            src = infos[si]
                            if key not in src.schema:  # an older protoseg's source: the filler
                                pieces.append(np.full(
                                    (b1 - b0,) + schema[key][1], OPTIONAL_ROWS[key],
                                    dtype=object if isinstance(OPTIONAL_ROWS[key], str) else schema[key][0]))
                            elif src.rows is not None:
                                pieces.append(src.rows[key][b0:b1])
                            else:
                                pieces.append(opened[si][key][b0:b1])
                        _write_rows(dsets[key], dest, pieces)
                    w.key = "cases/index"
                    _write_rows(dsets["cases/index"], dest,
                                [d if not has_index else infos[si].index[b0:b1]  # type: ignore[index]
                                 for d, (si, b0, b1) in zip(dest, block)])
                    for si, _, b1 in block:
                        src = infos[si]
                        if b1 != len(src.ids) or not src.has_maps:
                            continue  # maps are copied once, after the source's last rows
                        s = opened.get(si) or opened.setdefault(si, open_h5(src.path, "r"))
                        for name in s["maps"]:
                            w.key = f"maps/{name}"
                            if name in maps:
                                raise ValueError(f"maps of case {unquote(name)!r} appear "
                                                 "twice")
                            s.copy(s["maps"][name], maps, name=name)
                finally:
                    for s in opened.values():
                        s.close()
            w.key = "estimates"
            write_placeholders(f)  # last: see write_placeholders
        publish(tmp, out)
    return out


def merge_parts(sources: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                provenance: Mapping[str, Any] | None = None,
                expected_ids: Iterable[str] | None = None, overwrite: bool = False) -> Path:
    """Merge shards (part folders, part files or finished stores) into one store.

    Parameters
    ----------
    sources : iterable of str or Path
        ``<store>.parts`` folders (with their ``run.json``), single part files, or
        finished store files, e.g. one per worker.
    out : str or Path
        The merged store to write (temp file, then ``os.replace``).
    provenance : dict, optional
        Stored as the merged store's provenance; default lists the sources.
    expected_ids : iterable of str, optional
        When given, refuse if any of these case ids is in no shard.
    overwrite : bool, default False
        Replace ``out`` when it exists.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    ValueError
        Shards overlap (a case id in two shards), a part is unreadable, or expected cases
        are missing: nothing is filled in silently.
    StoreConfigError
        Shards were made with different settings (the message names them).

    Examples
    --------
    >>> merge_parts(["w0.h5.parts", "w1.h5.parts"], "all.h5")   # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreExistsError(f"{out} exists; pass overwrite=True or choose another output")
    files: list[Path] = []
    runs: list[tuple[Path, RunInfo]] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            if not (src / "run.json").exists():
                raise FileNotFoundError(f"{src} has no run.json; expected a <store>.parts "
                                        "folder written by StoreWriter")
            runs.append((src, read_run(src / "run.json")))
            files.extend(list_part_files(src))
        elif src.is_file():
            try:
                runs.append((src, run_of_file(src)))
            except StoreVersionError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"cannot read shard {src} ({exc}); rerun the worker that "
                                 "made it") from None
            files.append(src)
        else:
            raise FileNotFoundError(f"shard {src} does not exist; pass <store>.parts folders "
                                    "or part/store files")
    if not runs:
        raise ValueError("merge_parts got no sources; pass at least one shard")
    first_path, first = runs[0]
    for path, run in runs[1:]:
        diff = config_difference(first_path, first, run)
        if diff:
            raise StoreConfigError(diff.replace("this run asks", f"shard {path} has"))
    prov = dict(provenance) if provenance is not None else {
        "merged_from": [os.fspath(p) for p, _ in runs],
        "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return assemble(files, first, out, prov, expected_ids=expected_ids)


# ---------------------------------------------------------------- shards (distributed runs)
def shard_path(parts: str | os.PathLike[str], start: int, stop: int) -> Path:
    """The shard of the chunk ``[start, stop)`` (dataset positions) in a parts folder."""
    return Path(parts) / f"part-chunk-{int(start):09d}-{int(stop):09d}.h5"


def remove_temp_files(parts: str | os.PathLike[str]) -> int:
    """Remove the temporary files (``.*.tmp-*``) a killed writer left in a parts folder.

    Returns the number removed. Only call it while no writer of this store is running (a
    scheduler that lost a worker has rescheduled its task, whose new attempt writes under
    another name).
    """
    n = 0
    folder = Path(parts)
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


@dataclass(frozen=True)
class ShardInfo:
    """What a published shard says about itself (:func:`read_shard`).

    Attributes
    ----------
    path : Path
    complete : bool
        The ``complete`` flag (written last, with the fingerprint).
    fingerprint : str
        Digest of the run description, the protoseg version and the chunk (``""`` when
        missing).
    chunk : dict
        The chunk's description as written (``start``, ``stop``, ``protoseg_version``,
        ``ids_sha256``...).
    run : RunInfo or None
        The run description held by the shard.
    ids : list of str
        Its case ids.
    """

    path: Path
    complete: bool
    fingerprint: str
    chunk: dict[str, Any]
    run: RunInfo | None
    ids: list[str]


def read_shard(path: str | os.PathLike[str]) -> ShardInfo:
    """Read a shard's flag, fingerprint, chunk description, run description and ids.

    Raises
    ------
    OSError, ValueError, KeyError
        The file is not a readable part (damaged, or not HDF5).
    """
    path = Path(path)
    with open_h5(path, "r") as f:
        check_encoding(f, (PART_TYPE,))
        complete = int(f.attrs.get("complete", 0)) == 1
        fingerprint = attr_str(f, "fingerprint") or ""
        chunk = json.loads(attr_str(f, "chunk") or "{}")
        run_text = attr_str(f, "run")
        run = None
        if run_text:
            data = json.loads(run_text)
            run = RunInfo(data["config"], data["layers"], [int(c) for c in data["classes"]])
        ids = [str(c) for c in read_array(f["cases/id"])] if "cases/id" in f else []
    return ShardInfo(path, complete, fingerprint, chunk, run, ids)


class ShardWriter:
    """Write one chunk of cases as a part file, batch by batch, and publish it.

    The file is written as ``.<name>.tmp-<tag>`` beside ``final``: per-case datasets are
    created by the first batch (resizable along cases) and extended by the next ones, maps
    are added per case. :meth:`finish` writes the chunk description, the ``fingerprint``
    and ``complete = 1`` last and closes the file; :meth:`publish` fsyncs it and
    moves it onto ``final`` with ``os.replace``. Leaving the ``with`` block without publishing
    removes the temporary file (a killed process leaves it behind; see
    :func:`remove_temp_files`).

    Parameters
    ----------
    final : Path
        The shard's published name (:func:`shard_path`).
    run : RunInfo
        The run description (root attributes ``config`` and ``run``, as in every part).
    tag : str
        Makes the temporary name unique to this writer (host, pid...).

    Notes
    -----
    The per-case arrays are those of :class:`~engine.store.StoreWriter`'s parts (the same
    conversion of a :class:`~engine.store.BatchResult`), written uncompressed: the final
    store is compressed when it is assembled.
    """

    def __init__(self, final: str | os.PathLike[str], run: RunInfo, *, tag: str) -> None:
        self.final = Path(final)
        self.run = run
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{tag}")
        self._file: h5py.File | None = None
        self._n = 0
        self._finished = False
        self._published = False
        self._w = WriteContext(self.final)

    def __enter__(self) -> ShardWriter:
        with self._w.raising(cleanup=self.tmp):
            self._file = h5py.File(self.tmp, "w")
            set_encoding(self._file, PART_TYPE)
            self._file.attrs["complete"] = 0
            write_run_attrs(self._file, self.run)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._published:
            self.tmp.unlink(missing_ok=True)

    @property
    def n_cases(self) -> int:
        """Cases written so far."""
        return self._n

    def add(self, result: Any) -> None:
        """Append one :class:`~engine.store.BatchResult` (validated against the run).

        Raises
        ------
        ValueError
            The batch holds other arrays than the earlier batches of this shard.
        StoreWriteError
            Writing failed (file and key named).
        """
        from engine.store.writer import _arrays, _write_maps  # writer imports this module

        if self._file is None or self._finished:
            raise ValueError(f"shard {self.final} is not open for writing; use it as "
                             "`with ShardWriter(...) as w:` and add batches before finish()")
        result.validate(classes=self.run.classes, layers=self.run.layers)
        arrays = _arrays(result)
        f, w = self._file, self._w
        with w.raising(cleanup=None):
            if self._n and set(arrays) != set(_datasets(f)):
                diff = sorted(set(arrays) ^ set(_datasets(f)))
                raise ValueError(f"batch does not match the earlier batches of shard "
                                 f"{self.final} (differing arrays: {diff[:5]}); every batch "
                                 "of a store holds the same arrays")
            m = len(result.case_ids)
            for key in sorted(arrays):
                w.key = key
                arr = arrays[key]
                if not self._n:
                    grp, leaf = require_parent(f, key)
                    write_array(grp, leaf, arr, resizable=True, compress=False)
                    continue
                dset = f[key]
                if dset.shape[1:] != arr.shape[1:]:
                    raise ValueError(f"batch has {key} with shape (n, *{arr.shape[1:]}), but "
                                     f"shard {self.final} has (n, *{dset.shape[1:]})")
                dset.resize(self._n + m, axis=0)
                dset[self._n:] = arr
            if result.maps:
                _write_maps(f, result.maps, w, result.grids)
        self._n += m

    def finish(self, fingerprint: str, chunk: Mapping[str, Any]) -> None:
        """Write the chunk description, the fingerprint and ``complete = 1`` (last); close."""
        if self._file is None:
            raise ValueError(f"shard {self.final} is not open")
        with self._w.raising(cleanup=None):
            self._w.key = "/"
            self._file.attrs["chunk"] = dumps(dict(chunk), sort_keys=True)
            self._file.attrs["fingerprint"] = str(fingerprint)
            self._file.attrs["complete"] = 1
            self._file.close()
            self._file = None
        self._finished = True

    def publish(self) -> Path:
        """fsync the finished file and ``os.replace`` it onto its final name."""
        if not self._finished:
            raise ValueError(f"shard {self.final} is not finished; call finish() first")
        with self._w.raising(cleanup=None):
            publish(self.tmp, self.final)
        self._published = True
        return self.final


def _datasets(f: h5py.File) -> list[str]:
    """Per-case dataset paths of an open part (what :func:`_arrays` would write)."""
    names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and not name.startswith(_NOT_ROWS):
            names.append(name)
    f.visititems(visit)
    return names
