"""Assembly of part files into a finished store, and :func:`merge_parts` for shards.

The final store is written under a temporary name beside it and ``os.replace``d into
place: datasets are created once (chunked, gzip-compressed, resizable along cases) and
filled part by part, a bounded number of cases at a time, in case order
(``cases/index``). Every store written here holds the placeholder ``/estimates`` and
``/validation`` (:func:`~engine.store.annotate.write_placeholders`), so that annotating
it only ever replaces root names. Estimates of a source store are not carried over.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import h5py
import numpy as np

from engine._json import dumps
from engine.store.annotate import write_placeholders
from engine.store.atomic import open_h5, publish
from engine.store.encoding import (
    GZIP,
    PART_TYPE,
    STORE_TYPE,
    STR,
    check_encoding,
    read_array,
    require_group,
    require_parent,
    set_encoding,
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

__all__ = ["list_part_files", "read_part_ids", "collect_schema", "assemble", "merge_parts"]

_COPY_ROWS = 4096  # cases copied at a time when assembling (bounds memory)
#: Datasets that are not per-case arrays of the scores (never copied by row).
_NOT_ROWS = ("maps/", "layers/", "estimates/")


def list_part_files(folder: Path) -> list[Path]:
    """The published part files of a ``<store>.parts`` folder, in publication order."""
    return sorted(folder.glob("part-*.h5"))


def read_part_ids(path: Path) -> tuple[list[str], np.ndarray | None]:
    """Case ids (and dataset indices) of a part or store; raises when damaged."""
    with open_h5(path, "r") as f:
        check_encoding(f, (PART_TYPE, STORE_TYPE))
        if f.attrs.get("complete", 1) != 1:
            raise ValueError("part is not marked complete")
        ids = [str(c) for c in read_array(f["cases/id"])]
        index = read_array(f["cases/index"]) if "cases/index" in f else None
        return ids, index


def collect_schema(path: Path) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """Per-case datasets of a part or store: path → (dtype, shape after the case axis).

    ``cases/index``, the layer table, classes, maps, estimates and validation are left
    out.
    """
    schema: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
    with open_h5(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and not name.startswith(_NOT_ROWS) \
                    and name not in ("classes", "validation", "cases/index"):
                schema[name] = (obj.dtype, obj.shape[1:])
        f.visititems(visit)
    return schema


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


def _read_sources(sources: list[Path], expected_ids: Iterable[str] | None
                  ) -> tuple[list[list[str]], list[np.ndarray | None]]:
    """Every source's case ids and indices; refuse damage, overlaps and missing cases."""
    ids_per_source: list[list[str]] = []
    index_per_source: list[np.ndarray | None] = []
    owner: dict[str, Path] = {}
    for src in sources:
        try:
            ids, index = read_part_ids(src)
        except Exception as exc:  # noqa: BLE001 - damaged file: say which
            raise ValueError(f"cannot read part {src} ({exc}); rerun (resume) the run that "
                             "made it, or leave it out explicitly") from None
        for c in ids:
            if c in owner:
                raise ValueError(f"case {c!r} is in both {owner[c]} and {src}; each case "
                                 "must be in one part/shard only")
            owner[c] = src
        ids_per_source.append(ids)
        index_per_source.append(index)
    if expected_ids is not None:
        expected = {str(c) for c in expected_ids}
        missing = sorted(expected - set(owner))
        if missing:
            raise ValueError(f"{len(missing)} expected case(s) are in no part: {missing[:5]}; "
                             "run the missing shard(s) before merging")
    return ids_per_source, index_per_source


def _common_schema(sources: list[Path]) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """The per-case datasets every source holds; refuse sources that differ."""
    if not sources:
        return {"cases/id": (STR, ()), "cases/status": (STR, ()), "cases/group": (STR, ())}
    schema = collect_schema(sources[0])
    for src in sources[1:]:
        other = collect_schema(src)
        if set(other) != set(schema):
            diff = sorted(set(other) ^ set(schema))
            raise ValueError(f"part {src} holds other arrays than {sources[0]} "
                             f"(differing: {diff[:5]}); parts of one store must be alike")
        for key, (_, tail) in other.items():
            if tail != schema[key][1]:
                raise ValueError(f"part {src} has {key} with shape (n, *{tail}), but "
                                 f"{sources[0]} has (n, *{schema[key][1]})")
    return schema


def assemble(sources: list[Path], run: RunInfo, out: Path, provenance: Mapping[str, Any],
             *, expected_ids: Iterable[str] | None = None) -> Path:
    """Write the finished store ``out`` from part files / stores, in case order.

    Cases are ordered by ``cases/index`` when every source has it, else in the order of
    ``sources``. The file is written as ``.<out>.tmp-<pid>`` and published with
    ``os.replace``; on any error the temporary file is removed. The store gets the
    placeholder ``/estimates`` and ``/validation`` (read as absent), never the sources'
    estimates.

    Raises
    ------
    ValueError
        A source cannot be read, sources overlap or differ, or expected cases are missing.
    StoreWriteError
        Writing failed (file and key named).
    """
    ids_per_source, index_per_source = _read_sources(sources, expected_ids)
    n_total = sum(len(i) for i in ids_per_source)
    has_index = bool(sources) and all(ix is not None for ix in index_per_source)
    if has_index and n_total:
        keys = np.concatenate([ix for ix in index_per_source])  # type: ignore[misc]
    else:
        keys = np.arange(n_total)
    order = np.argsort(keys, kind="stable")
    rows = np.empty(n_total, dtype=np.int64)
    rows[order] = np.arange(n_total)
    schema = _common_schema(sources)

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
            for key, (dtype, tail) in sorted(schema.items()):
                w.key = key
                grp, leaf = require_parent(f, key)
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
            start = 0
            for src, ids in zip(sources, ids_per_source):
                dest = rows[start:start + len(ids)]
                start += len(ids)
                with open_h5(src, "r") as s:
                    for b0 in range(0, len(ids), _COPY_ROWS):
                        b1 = min(b0 + _COPY_ROWS, len(ids))
                        for key in sorted(schema):
                            w.key = key
                            _scatter(dsets[key], dest[b0:b1], s[key][b0:b1])
                        w.key = "cases/index"
                        index = (dest[b0:b1] if not has_index
                                 else read_array(s["cases/index"], np.s_[b0:b1]))
                        _scatter(dsets["cases/index"], dest[b0:b1], index)
                    if "maps" in s:
                        for name in s["maps"]:
                            w.key = f"maps/{name}"
                            if name in maps:
                                raise ValueError(f"maps of case {unquote(name)!r} appear "
                                                 "twice")
                            s.copy(s["maps"][name], maps, name=name)
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
