"""The HDF5 store: crash-safe, resumable, mergeable results of a scoring run.

Writing (:class:`StoreWriter`): every finished batch is published as its own small
HDF5 *part* file in ``<store>.parts/`` (written under a temporary name in the same
folder, flushed, closed, fsync'ed and ``os.replace``d into place), so a run killed at
any moment (SIGKILL included) leaves only complete parts behind. The run description
(settings that change numbers, the scored layers and classes) is
``<store>.parts/run.json``, written the same way at start. Resuming reads it, refuses
when the settings differ (naming every differing key) and skips the cases already
published. :meth:`StoreWriter.finalize` copies the parts, in case order, into
``<store>`` (a temporary file ``os.replace``d into place) and removes the parts.
Shards written by several workers merge with :func:`merge_parts`.

Reading (:func:`open_store` → :class:`Store`): tables as NumPy structured arrays
(pandas DataFrames with ``pandas=True`` when pandas is installed), score arrays per
layer / unit / input, and per-case maps read lazily, one case at a time.

Every group and dataset carries the attributes ``encoding-type`` and
``encoding-version``; the reader dispatches on them and refuses unknown or newer
versions with advice. The layout is documented in ``docs/store.md``.
"""
from __future__ import annotations

import difflib
import errno
import json
import os
import re
import shutil
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import h5py
import numpy as np

__all__ = [
    "STORE_VERSION",
    "Store",
    "StoreWriter",
    "StoreConfigError",
    "StoreExistsError",
    "StoreVersionError",
    "StoreWriteError",
    "merge_parts",
    "open_store",
    "parts_dir",
]

#: Encoding version of everything this module writes.
STORE_VERSION = "1"
_STORE_TYPE = "protoseg-store"
_PART_TYPE = "protoseg-store-part"
_RUN_TYPE = "protoseg-run"

#: encoding-type -> versions this reader understands.
_KNOWN: dict[str, tuple[str, ...]] = {
    _STORE_TYPE: ("1",),
    _PART_TYPE: ("1",),
    _RUN_TYPE: ("1",),
    "dict": ("1",),
    "array": ("1",),
    "string-array": ("1",),
    "table": ("1",),
    "map-collection": ("1",),
    "case-maps": ("1",),
    "layer-maps": ("1",),
    "json": ("1",),
}

_SCORE_FIELDS = {"score": np.float64, "status": np.uint8, "tp": np.int64, "fp": np.int64,
                 "fn": np.int64}
_STR = h5py.string_dtype("utf-8")
_GZIP = {"compression": "gzip", "compression_opts": 4}
_LAYER_FIELDS = ("index", "name", "layer", "op", "channels", "depth", "shape")


# --------------------------------------------------------------------------- errors

class StoreConfigError(ValueError):
    """A store exists with other settings than this run asks for."""


class StoreExistsError(FileExistsError):
    """A store (or an unfinished run) exists and neither resume nor overwrite was asked."""


class StoreVersionError(ValueError):
    """A store element has an encoding this version of protoseg cannot read."""


class StoreWriteError(OSError):
    """Writing a store file failed; the message names the file and the key."""


# --------------------------------------------------------------------------- helpers

def parts_dir(path: str | os.PathLike[str]) -> Path:
    """Return the folder holding the part files of the store at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot store {type(obj).__name__} value {obj!r} as JSON; "
                    "pass numbers, strings, lists or dicts")


def _normalise(obj: Any) -> Any:
    """Round-trip through JSON so that tuples/lists and numpy scalars compare equal."""
    return json.loads(json.dumps(obj, default=_jsonable, sort_keys=True))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_jsonable, sort_keys=True)


def _set_encoding(obj: h5py.Group | h5py.Dataset, kind: str) -> None:
    obj.attrs["encoding-type"] = kind
    obj.attrs["encoding-version"] = STORE_VERSION


def _attr_str(obj: h5py.Group | h5py.Dataset, key: str) -> str | None:
    value = obj.attrs.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _check_encoding(obj: h5py.Group | h5py.Dataset, allowed: Iterable[str]) -> str:
    """Return the encoding type of ``obj`` after checking its type and version."""
    kind = _attr_str(obj, "encoding-type")
    version = _attr_str(obj, "encoding-version")
    where = f"{obj.file.filename}:{obj.name}"
    allowed = tuple(allowed)
    if kind is None or version is None:
        raise StoreVersionError(
            f"{where} has no encoding-type/encoding-version attributes; it was not "
            "written by protoseg (or is damaged): rerun the scoring to rebuild it")
    if kind not in _KNOWN or kind not in allowed:
        raise StoreVersionError(
            f"{where} has encoding-type {kind!r}, expected one of {list(allowed)}; it was "
            "written by another (probably newer) protoseg: upgrade protoseg")
    if version not in _KNOWN[kind]:
        newest = max(int(v) for v in _KNOWN[kind])
        if version.isdigit() and int(version) > newest:
            raise StoreVersionError(
                f"{where} was written by a newer protoseg (store version {version}; this "
                f"protoseg reads up to {newest}); upgrade protoseg")
        raise StoreVersionError(
            f"{where} has store version {version!r}, which this protoseg cannot read "
            f"(it reads {list(_KNOWN[kind])}); rerun the scoring to rebuild the store")
    return kind


def _key_name(key: str) -> str:
    """HDF5-safe, reversible name for an arbitrary string (case ids, tensor names)."""
    name = quote(key, safe="")
    return name.replace(".", "%2E") if name in {"", ".", ".."} or name.startswith(".") \
        else name


def _fsync_path(path: Path) -> None:
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


def _publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, ``os.replace`` it onto ``final`` and fsync the folder."""
    _fsync_path(tmp)
    os.replace(tmp, final)
    _fsync_path(final.parent)


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, default=_jsonable, sort_keys=True, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; "
                              "free disk space or choose another output") from exc


class _Writing:
    """Track the file and key being written so that errors can name them."""

    def __init__(self, filename: Path) -> None:
        self.filename = filename
        self.key = "/"

    def fail(self, exc: BaseException) -> StoreWriteError:
        code = getattr(exc, "errno", None) or errno.EIO
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return StoreWriteError(
            code, f"cannot write key {self.key!r} to {self.filename}: {reason}; the parts "
            "already published are kept: free disk space and resume")


def _write_array(group: h5py.Group, key: str, data: np.ndarray, *,
                 resizable: bool = False, compress: bool = True) -> h5py.Dataset:
    """Create one dataset (strings as variable-length UTF-8) with its encoding attrs."""
    data = np.asarray(data)
    is_str = data.dtype.kind in "OUS"
    kwargs: dict[str, Any] = {}
    if compress and data.size > 0:
        kwargs.update(_GZIP)
        kwargs["chunks"] = True
        if not is_str:
            kwargs["shuffle"] = True
    if resizable:
        kwargs["maxshape"] = (None,) + data.shape[1:]
        kwargs["chunks"] = True
    if is_str:
        values = np.array(["" if v is None else str(v) for v in data.ravel()],
                          dtype=object).reshape(data.shape)
        dset = group.create_dataset(key, data=values, dtype=_STR, **kwargs)
        _set_encoding(dset, "string-array")
    else:
        dset = group.create_dataset(key, data=data, **kwargs)
        _set_encoding(dset, "array")
    return dset


def _read_array(dset: h5py.Dataset, sel: Any = ()) -> np.ndarray:
    kind = _check_encoding(dset, ("array", "string-array"))
    if kind == "string-array":
        return np.asarray(dset.asstr()[sel], dtype=object)
    return np.asarray(dset[sel])


def _require_group(parent: h5py.Group, key: str, kind: str) -> h5py.Group:
    if key in parent:
        return parent[key]
    grp = parent.create_group(key)
    _set_encoding(grp, kind)
    return grp


# --------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class _RunInfo:
    config: dict[str, Any]
    layers: list[dict[str, Any]]
    classes: list[int]

    def as_json(self) -> dict[str, Any]:
        return {"encoding-type": _RUN_TYPE, "encoding-version": STORE_VERSION,
                "config": self.config, "layers": self.layers, "classes": self.classes}


def _make_run(config: Mapping[str, Any], layers: Iterable[Mapping[str, Any]],
              classes: Iterable[int]) -> _RunInfo:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of settings, got {type(config).__name__}")
    layer_list = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise TypeError(f"layers[{i}] must be a dict with keys {list(_LAYER_FIELDS)}, "
                            f"got {type(layer).__name__}")
        entry = dict(layer)
        entry.setdefault("index", i)
        if int(entry["index"]) != i:
            raise ValueError(f"layers[{i}] has index {entry['index']}, expected {i}; "
                             "list layers in index order")
        entry.setdefault("name", str(i))
        entry.setdefault("layer", entry["name"])
        layer_list.append(entry)
    class_list = [int(c) for c in classes]
    if not class_list:
        raise ValueError("classes is empty; pass the scored class labels, e.g. [1]")
    return _RunInfo(_normalise(dict(config)), _normalise(layer_list), class_list)


def _config_difference(path: Path, old: _RunInfo, new: _RunInfo) -> str | None:
    """One-line description of every setting that differs, or None."""
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    was, asks = [], []
    old_all = dict(old.config, layers=old.layers, classes=old.classes)
    new_all = dict(new.config, layers=new.layers, classes=new.classes)
    for key in sorted(set(old_all) | set(new_all)):
        a, b = old_all.get(key, "<unset>"), new_all.get(key, "<unset>")
        if a != b:
            if key == "layers":
                a, b = f"<{len(old.layers)} layers>", f"<{len(new.layers)} layers>"
                if len(old.layers) == len(new.layers):
                    first = next(i for i, (x, y) in enumerate(zip(old.layers, new.layers))
                                 if x != y)
                    a = f"<layer {first}: {old.layers[first].get('name')}>"
                    b = f"<layer {first}: {new.layers[first].get('name')}>"
                was.append(f"layers={a}")
                asks.append(f"layers={b}")
            else:
                was.append(f"{key}={short(a)}")
                asks.append(f"{key}={short(b)}")
    if not was:
        return None
    return (f"store {path} was made with {', '.join(was)}, this run asks {', '.join(asks)}; "
            "use overwrite=True (--overwrite) or another output (-o)")


_BATCH_KEYS = ("case_ids", "case_status", "case_group", "case_index", "layer_score",
               "layer_status", "layer_tp", "layer_fp", "layer_fn", "input_score",
               "input_status", "input_tp", "input_fp", "input_fn", "output_dice",
               "baselines", "maps", "unit", "unit/<layer>/<field>")


def _flatten_batch(batch: Mapping[str, Any], run: _RunInfo
                   ) -> tuple[list[str], dict[str, np.ndarray], dict[str, Any]]:
    """Validate a batch dict; return (case ids, {store path: array}, maps)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict, got {type(batch).__name__}")
    if "case_ids" not in batch:
        raise ValueError("batch has no 'case_ids'; every batch lists the ids of its cases")
    ids = [str(c) for c in np.asarray(batch["case_ids"], dtype=object).ravel()]
    nb = len(ids)
    if len(set(ids)) != nb:
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise ValueError(f"batch lists case ids more than once: {dup[:5]}; each case once")
    n_cls, n_layers = len(run.classes), len(run.layers)
    out: dict[str, np.ndarray] = {"cases/id": np.array(ids, dtype=object)}

    def put(path: str, value: Any, dtype: Any, tail: tuple[int, ...] | None,
            what: str) -> None:
        arr = np.asarray(value)
        if arr.dtype.kind in "OUS" and dtype is not object:
            raise TypeError(f"batch[{what!r}] holds {arr.dtype} values, expected numbers")
        if dtype is not object and np.dtype(dtype).kind in "iu" and arr.dtype.kind == "f":
            info = np.iinfo(dtype)
            if arr.size and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()
                                 and arr.min() >= info.min and arr.max() <= info.max):
                raise ValueError(f"batch[{what!r}] holds non-integer, NaN or out-of-range "
                                 f"values, expected integers for {np.dtype(dtype)}; fill "
                                 "undefined counts with 0 and say why in the status")
        arr = arr.astype(dtype, copy=False) if dtype is not object else np.array(
            ["" if v is None else str(v) for v in arr.ravel()], dtype=object
        ).reshape(arr.shape)
        if arr.ndim == 0 or arr.shape[0] != nb:
            raise ValueError(f"batch[{what!r}] has shape {arr.shape}, expected {nb} cases "
                             "along the first axis (one row per case id)")
        if tail is not None and arr.shape[1:] != tail:
            raise ValueError(f"batch[{what!r}] has shape {arr.shape}, expected "
                             f"{(nb,) + tail} (cases, classes, ...); check the layers and "
                             "classes given to StoreWriter")
        out[path] = arr

    units: dict[int, dict[str, Any]] = {}
    for key, value in batch.items():
        if key in ("case_ids", "maps"):
            continue
        if key == "case_status":
            put("cases/status", value, object, (), key)
        elif key == "case_group":
            put("cases/group", value, object, (), key)
        elif key == "case_index":
            put("cases/index", value, np.int64, (), key)
        elif key.startswith("layer_") and key[6:] in _SCORE_FIELDS:
            put(f"layer_scores/{key[6:]}", value, _SCORE_FIELDS[key[6:]],
                (n_cls, n_layers), key)
        elif key.startswith("input_") and key[6:] in _SCORE_FIELDS:
            put(f"input_scores/{key[6:]}", value, _SCORE_FIELDS[key[6:]], None, key)
        elif key == "output_dice":
            put("output_dice", value, np.float64, (n_cls,), key)
        elif key == "baselines":
            if not isinstance(value, Mapping):
                raise TypeError("batch['baselines'] must be a dict name -> (cases, classes)")
            for name, arr in value.items():
                put(f"baselines/{_key_name(str(name))}", arr, np.float64, (n_cls,),
                    f"baselines/{name}")
        elif key == "unit":
            if not isinstance(value, Mapping):
                raise TypeError("batch['unit'] must be a dict layer index -> {score, ...}")
            for li, fields in value.items():
                units.setdefault(int(li), {}).update(fields)
        elif key.startswith("unit/") and key.count("/") == 2 and key.split("/")[1].isdigit():
            _, li, field = key.split("/")
            units.setdefault(int(li), {})[field] = value
        else:
            close = difflib.get_close_matches(key, _BATCH_KEYS, n=3)
            raise ValueError(f"batch has unknown key {key!r}; valid keys are "
                             f"{list(_BATCH_KEYS)}" + (f" (did you mean {close}?)"
                                                       if close else ""))
    for li, fields in sorted(units.items()):
        if not 0 <= li < n_layers:
            raise ValueError(f"batch has unit scores for layer index {li}, but the store "
                             f"has layers 0..{n_layers - 1}")
        channels = run.layers[li].get("channels")
        for field, value in fields.items():
            if field not in _SCORE_FIELDS:
                raise ValueError(f"batch has unknown unit field {field!r} for layer {li}; "
                                 f"expected {list(_SCORE_FIELDS)}")
            tail = (n_cls, int(channels)) if channels is not None else None
            put(f"unit_scores/{li}/{field}", value, _SCORE_FIELDS[field], tail,
                f"unit/{li}/{field}")
    # input scores: all fields share one shape (cases, classes, 1 + channels)
    shapes = {out[k].shape for k in out if k.startswith("input_scores/")}
    if len(shapes) > 1 or any(len(s) != 3 or s[1] != n_cls for s in shapes):
        raise ValueError(f"batch input_* arrays have shapes {sorted(shapes)}, expected one "
                         f"shape ({nb}, {n_cls}, n_inputs)")
    out.setdefault("cases/status", np.array(["ok"] * nb, dtype=object))
    out.setdefault("cases/group", np.array([""] * nb, dtype=object))
    maps = batch.get("maps") or {}
    if not isinstance(maps, Mapping):
        raise TypeError("batch['maps'] must be a dict case_id -> {layer: {binary, "
                        "probability}}")
    unknown = [c for c in maps if str(c) not in set(ids)]
    if unknown:
        raise ValueError(f"batch['maps'] has case ids not in this batch: {unknown[:5]}; "
                         "maps belong to the batch of their case")
    return ids, out, dict(maps)


def _write_maps(root: h5py.Group, maps: Mapping[str, Any], w: _Writing) -> None:
    coll = _require_group(root, "maps", "map-collection")
    for case_id, entries in maps.items():
        w.key = f"maps/{case_id}"
        grp = coll.create_group(_key_name(str(case_id)))
        _set_encoding(grp, "case-maps")
        grp.attrs["case_id"] = str(case_id)
        if not isinstance(entries, Mapping):
            raise TypeError(f"batch['maps'][{case_id!r}] must be a dict, got "
                            f"{type(entries).__name__}")
        for name, value in entries.items():
            w.key = f"maps/{case_id}/{name}"
            if isinstance(value, Mapping):
                sub = grp.create_group(_key_name(str(name)))
                _set_encoding(sub, "layer-maps")
                sub.attrs["name"] = str(name)
                for field, arr in value.items():
                    arr = np.asarray(arr)
                    if field == "binary":
                        arr = arr.astype(np.uint8)
                    elif arr.dtype.kind == "f" and arr.dtype not in (np.float16, np.float32):
                        arr = arr.astype(np.float32)
                    w.key = f"maps/{case_id}/{name}/{field}"
                    dset = _write_array(sub, _key_name(str(field)), arr)
                    dset.attrs["name"] = str(field)
            else:
                dset = _write_array(grp, _key_name(str(name)), np.asarray(value))
                dset.attrs["name"] = str(name)


def _write_run_attrs(f: h5py.File, run: _RunInfo) -> None:
    f.attrs["config"] = _dumps(run.config)
    f.attrs["run"] = _dumps(run.as_json())


def _write_layers(f: h5py.File, run: _RunInfo) -> None:
    grp = f.create_group("layers")
    _set_encoding(grp, "table")
    cols: dict[str, list[Any]] = {k: [] for k in _LAYER_FIELDS}
    for entry in run.layers:
        cols["index"].append(int(entry["index"]))
        cols["name"].append(str(entry.get("name", "")))
        cols["layer"].append(str(entry.get("layer", "")))
        cols["op"].append(str(entry.get("op") or ""))
        cols["channels"].append(-1 if entry.get("channels") is None
                                else int(entry["channels"]))
        cols["depth"].append(-1 if entry.get("depth") is None else int(entry["depth"]))
        shape = entry.get("shape")
        cols["shape"].append("" if shape is None else _dumps(shape))
    for key, values in cols.items():
        dtype = np.int64 if key in ("index", "channels", "depth") else object
        _write_array(grp, key, np.array(values, dtype=dtype), compress=False)
    grp.attrs["extra"] = _dumps(run.layers)
    classes = _write_array(f, "classes", np.array(run.classes, dtype=np.int64),
                           compress=False)
    classes.attrs["description"] = "class labels scored one-vs-rest"


# --------------------------------------------------------------------------- parts

def _list_part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.h5"))


def _read_part_ids(path: Path) -> tuple[list[str], np.ndarray | None]:
    """Case ids (and dataset indices) of a part or store; raises when damaged."""
    with h5py.File(path, "r") as f:
        _check_encoding(f, (_PART_TYPE, _STORE_TYPE))
        if f.attrs.get("complete", 1) != 1:
            raise ValueError("part is not marked complete")
        ids = [str(c) for c in _read_array(f["cases/id"])]
        index = _read_array(f["cases/index"]) if "cases/index" in f else None
        return ids, index


def _read_run(path: Path) -> _RunInfo:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    kind, version = data.get("encoding-type"), str(data.get("encoding-version"))
    if kind != _RUN_TYPE:
        raise StoreVersionError(f"{path} has encoding-type {kind!r}, expected {_RUN_TYPE!r}; "
                                "it is not a protoseg run description")
    if version not in _KNOWN[_RUN_TYPE]:
        raise StoreVersionError(f"{path} was written by a newer protoseg (store version "
                                f"{version}); upgrade protoseg")
    return _RunInfo(data["config"], data["layers"], [int(c) for c in data["classes"]])


def _run_of_file(path: Path) -> _RunInfo:
    with h5py.File(path, "r") as f:
        _check_encoding(f, (_PART_TYPE, _STORE_TYPE))
        data = json.loads(_attr_str(f, "run") or "{}")
    return _RunInfo(data["config"], data["layers"], [int(c) for c in data["classes"]])


# --------------------------------------------------------------------------- assembly

def _collect_schema(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    schema: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and not name.startswith("maps/") \
                    and not name.startswith("layers/") and name != "classes" \
                    and not name.startswith("estimates/") and name != "validation" \
                    and name != "cases/index":
                schema[name] = (obj.dtype, obj.shape[1:])
        f.visititems(visit)
    return schema


try:
    import fcntl as _fcntl  # noqa: F401
    _HAS_FLOCK = True
except ImportError:  # pragma: no cover
    _HAS_FLOCK = False

#: Writers of this process by store path: a new writer on the same store closes the old
#: one (whose writes are then refused) instead of failing on its own lock.
_WRITERS: dict[str, weakref.ref[StoreWriter]] = {}

_COPY_ROWS = 4096  # cases copied at a time when assembling (bounds memory)


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


def _assemble(sources: list[Path], run: _RunInfo, out: Path, provenance: Mapping[str, Any],
              *, expected_ids: Iterable[str] | None = None) -> Path:
    """Write the final store ``out`` from part files / stores, in case order."""
    ids_per_source: list[list[str]] = []
    index_per_source: list[np.ndarray | None] = []
    owner: dict[str, Path] = {}
    for src in sources:
        try:
            ids, index = _read_part_ids(src)
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
    # global order: by dataset index when every source has it, else publication order
    n_total = sum(len(i) for i in ids_per_source)
    has_index = bool(sources) and all(ix is not None for ix in index_per_source)
    if has_index and n_total:
        keys = np.concatenate([ix for ix in index_per_source])  # type: ignore[misc]
    else:
        keys = np.arange(n_total)
    order = np.argsort(keys, kind="stable")
    rows = np.empty(n_total, dtype=np.int64)
    rows[order] = np.arange(n_total)
    schema = _collect_schema(sources[0]) if sources else {
        "cases/id": (_STR, ()), "cases/status": (_STR, ()), "cases/group": (_STR, ())}
    for src in sources[1:]:
        other = _collect_schema(src)
        if set(other) != set(schema):
            diff = sorted(set(other) ^ set(schema))
            raise ValueError(f"part {src} holds other arrays than {sources[0]} "
                             f"(differing: {diff[:5]}); parts of one store must be alike")
        for key, (dtype, tail) in other.items():
            if tail != schema[key][1]:
                raise ValueError(f"part {src} has {key} with shape (n, *{tail}), but "
                                 f"{sources[0]} has (n, *{schema[key][1]})")

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = _Writing(out)
    try:
        with h5py.File(tmp, "w") as f:
            w.key = "/"
            _set_encoding(f, _STORE_TYPE)
            _write_run_attrs(f, run)
            f.attrs["provenance"] = _dumps(provenance)
            f.attrs["n_cases"] = n_total
            w.key = "layers"
            _write_layers(f, run)
            dsets: dict[str, h5py.Dataset] = {}
            for key, (dtype, tail) in sorted(schema.items()):
                w.key = key
                parent, _, leaf = key.rpartition("/")
                grp = f
                for part in parent.split("/") if parent else []:
                    grp = _require_group(grp, part, "dict")
                is_str = h5py.check_string_dtype(dtype) is not None
                kwargs: dict[str, Any] = dict(_GZIP)
                if not is_str:
                    kwargs["shuffle"] = True
                dset = grp.create_dataset(
                    leaf, shape=(n_total,) + tail, maxshape=(None,) + tail,
                    dtype=_STR if is_str else dtype, chunks=True, **kwargs)
                _set_encoding(dset, "string-array" if is_str else "array")
                dsets[key] = dset
            w.key = "cases/index"
            dsets["cases/index"] = _write_array(
                _require_group(f, "cases", "dict"), "index", np.zeros(n_total, np.int64),
                resizable=True)
            fill_index = not has_index
            maps = _require_group(f, "maps", "map-collection")
            start = 0
            for src, ids in zip(sources, ids_per_source):
                dest = rows[start:start + len(ids)]
                start += len(ids)
                with h5py.File(src, "r") as s:
                    for b0 in range(0, len(ids), _COPY_ROWS):
                        b1 = min(b0 + _COPY_ROWS, len(ids))
                        for key in sorted(schema):
                            w.key = key
                            _scatter(dsets[key], dest[b0:b1], s[key][b0:b1])
                        w.key = "cases/index"
                        index = (dest[b0:b1] if fill_index
                                 else _read_array(s["cases/index"], np.s_[b0:b1]))
                        _scatter(dsets["cases/index"], dest[b0:b1], index)
                    if "maps" in s:
                        for name in s["maps"]:
                            w.key = f"maps/{name}"
                            if name in maps:
                                raise ValueError(f"maps of case {unquote(name)!r} appear "
                                                 "twice")
                            s.copy(s["maps"][name], maps, name=name)
        _publish(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, StoreWriteError):
            raise w.fail(exc) from exc
        raise
    return out


# --------------------------------------------------------------------------- writer

class StoreWriter:
    """Write a store batch by batch, crash-safe and resumable.

    Parameters
    ----------
    path : str or Path
        The final store file (e.g. ``results.h5``). Parts go to ``<path>.parts/``.
    config : dict
        Every setting that changes numbers (guide, reference, resize, threshold, layers
        selection, level, model sha256...). Compared on resume. JSON-serialisable.
    layers : list of dict
        One dict per scored tensor, in index order, with keys ``index, name, layer, op,
        channels, depth, shape`` (``channels`` is the unit count of unit scores).
    classes : list of int
        The class labels scored one-vs-rest (``n_classes`` axis of every score array).
    resume : bool, default False
        Continue an unfinished (or extend a finished) run with the same settings.
    overwrite : bool, default False
        Delete an existing store and unfinished run at ``path`` and start over.

    Raises
    ------
    StoreExistsError
        A store or unfinished run exists and neither ``resume`` nor ``overwrite`` is set.
    StoreConfigError
        ``resume=True`` on a store made with other settings (the message names each
        differing key); pass ``overwrite=True`` or another path.
    StoreVersionError
        The existing store or run was written by a newer protoseg.

    Notes
    -----
    A part is published with ``os.replace`` after it is fully written and fsync'ed, so
    after any crash each part file is either complete or absent. On resume, part files
    that cannot be read are discarded (with a warning) and their cases are reported as
    not done, so the caller scores them again. Batches need not arrive in case order:
    give ``case_index`` (the case's position in the dataset) and :meth:`finalize`
    writes cases in that order; without it, in publication order.

    Examples
    --------
    >>> w = StoreWriter("out.h5", config={"resize": "upsample"},
    ...                 layers=[{"name": "conv1", "channels": 8}],
    ...                 classes=[1])                                  # doctest: +SKIP
    >>> for batch in batches:                                         # doctest: +SKIP
    ...     w.write_batch({"case_ids": batch.ids, "layer_score": ...})
    >>> w.finalize({"protoseg": "0.1.0"})                             # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], *, config: Mapping[str, Any],
                 layers: list[Mapping[str, Any]], classes: list[int], resume: bool = False,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        self.parts = parts_dir(self.path)
        self.run = _make_run(config, layers, classes)
        self._done: dict[str, Path] = {}
        self._store_ids: set[str] = set()
        self._next = 0
        self._closed = False
        self._schema: dict[str, tuple[int, ...]] | None = None
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"folder {self.path.parent} of store {self.path} does not "
                                    "exist; create it or choose another output")
        self._lock_fd: int | None = None
        self._lock()
        try:
            self._open(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        """Hold an exclusive lock on ``.<store>.lock`` (released by the OS on any exit).

        Another process writing the same store is refused. In this process, a writer
        left alive (e.g. held by a traceback) is closed and replaced.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        key = str(self.path.resolve())
        previous = _WRITERS.get(key)
        if previous is not None and previous() is not None:
            previous().close()  # type: ignore[union-attr]  # same process: take over
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreExistsError(
                f"another writer holds store {self.path} (lock {lock}); wait for it to "
                "finish, close() the other StoreWriter, or choose another output") from None
        self._lock_fd = fd
        _WRITERS[key] = weakref.ref(self)

    def close(self) -> None:
        """Release the store's lock without finalizing (parts stay; resume later)."""
        self._release(remove=False)

    def _release(self, *, remove: bool) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            if remove:
                self.path.with_name(f".{self.path.name}.lock").unlink(missing_ok=True)
            os.close(fd)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _open(self, resume: bool, overwrite: bool) -> None:
        self._cleanup_temps()
        has_store, has_parts = self.path.exists(), self.parts.exists()
        if overwrite:
            if has_parts:
                shutil.rmtree(self.parts)
            if has_store:
                self.path.unlink()
            has_store = has_parts = False
        if (has_store or has_parts) and not resume:
            what = "a store" if has_store else "an unfinished run"
            raise StoreExistsError(
                f"{what} exists at {self.path if has_store else self.parts}; pass "
                "resume=True (--resume) to continue it, overwrite=True (--overwrite) to "
                "start over, or choose another output (-o)")
        if has_store:
            try:
                old = _run_of_file(self.path)
                self._store_ids = set(_read_part_ids(self.path)[0])
            except StoreVersionError:
                raise
            except Exception as exc:  # noqa: BLE001 - not a readable store
                raise StoreExistsError(
                    f"{self.path} exists but is not a readable protoseg store "
                    f"({type(exc).__name__}: {exc}); pass overwrite=True (--overwrite) or "
                    "choose another output (-o)") from None
            diff = _config_difference(self.path, old, self.run)
            if diff:
                raise StoreConfigError(diff)
        if has_parts and (self.parts / "run.json").exists():
            old = _read_run(self.parts / "run.json")
            diff = _config_difference(self.path, old, self.run)
            if diff:
                raise StoreConfigError(diff)
            self._scan_parts()
        else:
            self.parts.mkdir(exist_ok=True)
            _write_json_atomic(self.parts / "run.json", self.run.as_json())

    # ---------------------------------------------------------------- state
    def _cleanup_temps(self) -> None:
        for tmp in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            tmp.unlink(missing_ok=True)
        if self.parts.is_dir():
            for tmp in self.parts.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    def _scan_parts(self) -> None:
        for part in _list_part_files(self.parts):
            match = re.match(r"part-(\d+)", part.name)
            seq = int(match.group(1)) if match else 0
            self._next = max(self._next, seq + 1)
            try:
                ids, _ = _read_part_ids(part)
            except Exception as exc:  # noqa: BLE001 - any damage: discard, redo cases
                warnings.warn(f"discarding damaged part {part} ({type(exc).__name__}: {exc}); "
                              "its cases will be scored again", stacklevel=3)
                part.unlink(missing_ok=True)
                continue
            if self._store_ids and set(ids) <= self._store_ids:
                part.unlink(missing_ok=True)  # already copied into the store
                continue
            clash = [c for c in ids if c in self._done or c in self._store_ids]
            if clash:
                raise ValueError(f"part {part} repeats case(s) {clash[:5]} already in "
                                 f"{self._done.get(clash[0], self.path)}; remove one of them "
                                 "or start over with overwrite=True")
            for c in ids:
                self._done[c] = part
            if self._schema is None:
                self._schema = {k: v[1] for k, v in _collect_schema(part).items()}

    def done_ids(self) -> set[str]:
        """Return the ids of the cases already published (in parts or the final store)."""
        return set(self._done) | self._store_ids

    # ---------------------------------------------------------------- writing
    def write_batch(self, batch: Mapping[str, Any]) -> Path:
        """Publish one batch as a part file; return the part's path.

        Parameters
        ----------
        batch : dict
            Arrays along the batch axis (``nb`` cases): ``case_ids`` (required),
            ``case_status``, ``case_group``, ``case_index`` (position in the dataset,
            optional), ``layer_score|status|tp|fp|fn`` (nb, n_classes, n_layers),
            ``unit/<layer_index>/score|status|tp|fp|fn`` (nb, n_classes, channels),
            ``input_score|status|tp|fp|fn`` (nb, n_classes, n_inputs), ``output_dice``
            (nb, n_classes), ``baselines`` (name → (nb, n_classes)) and ``maps``
            (case id → {layer name: {"binary", "probability"}, "_image", ...}).

        Raises
        ------
        ValueError, TypeError
            A key, shape or dtype does not fit the store, or a case id was written before.
        StoreWriteError
            The part could not be written (e.g. disk full); the message names the file and
            the key. Parts published before are kept; nothing half-written remains.
        """
        if self._closed or self._lock_fd is None and _HAS_FLOCK:
            raise ValueError(f"StoreWriter for {self.path} is finalized or closed; open a new "
                             "StoreWriter with resume=True to add cases")
        ids, arrays, maps = _flatten_batch(batch, self.run)
        schema = {k: v.shape[1:] for k, v in arrays.items() if k != "cases/index"}
        if self._schema is not None and schema != self._schema:
            extra = sorted(set(schema) - set(self._schema))
            lacking = sorted(set(self._schema) - set(schema))
            shapes = sorted(k for k in set(schema) & set(self._schema)
                            if schema[k] != self._schema[k])
            raise ValueError(
                f"batch does not match the earlier batches of {self.path}: new arrays "
                f"{extra[:5]}, missing arrays {lacking[:5]}, other shapes {shapes[:5]}; every "
                "batch of a store holds the same arrays")
        again = [c for c in ids if c in self._done or c in self._store_ids]
        if again:
            raise ValueError(f"case(s) {again[:5]} are already in store {self.path}; skip "
                             "the ids in done_ids() when resuming")
        final = self.parts / f"part-{self._next:06d}.h5"
        tmp = self.parts / f".{final.name}.tmp-{os.getpid()}"
        w = _Writing(final)
        try:
            with h5py.File(tmp, "w") as f:
                _set_encoding(f, _PART_TYPE)
                f.attrs["complete"] = 0
                _write_run_attrs(f, self.run)
                for key in sorted(arrays):
                    w.key = key
                    parent, _, leaf = key.rpartition("/")
                    grp = f
                    for part in parent.split("/") if parent else []:
                        grp = _require_group(grp, part, "dict")
                    # parts are short-lived and finalize compresses the store: small
                    # per-batch score arrays are written raw (gzip cost ~10 % of inference
                    # time at unit level in the pipeline benchmark)
                    _write_array(grp, leaf, arrays[key], compress=False)
                if maps:
                    _write_maps(f, maps, w)
                w.key = "/"
                f.attrs["complete"] = 1
            _publish(tmp, final)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc,
                                                                          StoreWriteError):
                raise w.fail(exc) from exc
            raise
        self._next += 1
        self._schema = schema
        for c in ids:
            self._done[c] = final
        return final

    def finalize(self, provenance: Mapping[str, Any]) -> Path:
        """Copy all parts (in case order) into the final store; remove the parts.

        Parameters
        ----------
        provenance : dict
            Model sha256, protoseg version, provider, optimisation level, start and end
            times... Stored as JSON; not compared on resume.

        Returns
        -------
        Path
            The store file.

        Notes
        -----
        When a finished store already exists (resume of a finished run), its cases are
        copied first and the new parts added; with no new parts the store is left as is.
        """
        if self._closed:
            return self.path
        if self._lock_fd is None and _HAS_FLOCK:
            raise ValueError(f"StoreWriter for {self.path} was closed; open a new StoreWriter "
                             "with resume=True to finalize")
        parts = _list_part_files(self.parts) if self.parts.is_dir() else []
        if self.path.exists() and not parts:
            self._closed = True
            shutil.rmtree(self.parts, ignore_errors=True)
            self._release(remove=True)
            return self.path
        sources = ([self.path] if self.path.exists() else []) + parts
        prov = dict(provenance)
        _assemble(sources, self.run, self.path, prov)
        for part in parts:
            part.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        self._closed = True
        self._release(remove=True)
        return self.path


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
    runs: list[tuple[Path, _RunInfo]] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            if not (src / "run.json").exists():
                raise FileNotFoundError(f"{src} has no run.json; expected a <store>.parts "
                                        "folder written by StoreWriter")
            runs.append((src, _read_run(src / "run.json")))
            files.extend(_list_part_files(src))
        elif src.is_file():
            try:
                runs.append((src, _run_of_file(src)))
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
        diff = _config_difference(first_path, first, run)
        if diff:
            raise StoreConfigError(diff.replace("this run asks", f"shard {path} has"))
    prov = dict(provenance) if provenance is not None else {
        "merged_from": [os.fspath(p) for p, _ in runs],
        "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return _assemble(files, first, out, prov, expected_ids=expected_ids)


# --------------------------------------------------------------------------- reader

class Store:
    """Read a finished store (use :func:`open_store`).

    The file is opened only while a method reads from it, so a store can be read while
    another process writes a different one, and no handle is left open.

    Attributes
    ----------
    path : Path
    version : str
        The store's encoding version.
    config, provenance : dict
    classes : list of int
    layer_info : list of dict
        The layer dicts given to :class:`StoreWriter` (all keys, e.g. ``layout``).
    layers : numpy structured array
        ``index, name, layer, op, channels, depth, shape`` (shape as JSON text).
    cases : numpy structured array
        ``id, status, group, output_dice`` (first class), ``predicted_fraction`` (the
        ``predicted_fraction`` baseline when stored, else NaN), ``index`` (position of the
        case in the dataset).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            hint = (f"; an unfinished run is in {parts_dir(self.path)}: resume it to finish"
                    if parts_dir(self.path).exists() else "")
            raise FileNotFoundError(f"store {self.path} does not exist{hint}")
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise ValueError(f"{self.path} is not a readable HDF5 store ({exc}); rerun the "
                             "scoring to rebuild it") from None
        with f:
            kind = _check_encoding(f, (_STORE_TYPE,))
            del kind
            self.version = _attr_str(f, "encoding-version") or ""
            self.config: dict[str, Any] = json.loads(_attr_str(f, "config") or "{}")
            self.provenance: dict[str, Any] = json.loads(_attr_str(f, "provenance") or "{}")
            self.classes: list[int] = [int(c) for c in _read_array(f["classes"])]
            run = json.loads(_attr_str(f, "run") or "{}")
            self.layer_info: list[dict[str, Any]] = run.get("layers", [])
            self.layers = self._read_layers(f)
            self.cases = self._read_cases(f)
            self.has_units = "unit_scores" in f and len(f["unit_scores"]) > 0
            self._map_names: dict[str, str] = {}
            if "maps" in f:
                _check_encoding(f["maps"], ("map-collection",))
                for name, grp in f["maps"].items():
                    self._map_names[_attr_str(grp, "case_id") or unquote(name)] = name

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, cases={len(self.cases)}, "
                f"layers={len(self.layers)}, classes={self.classes})")

    # ---------------------------------------------------------------- metadata
    @staticmethod
    def _read_layers(f: h5py.File) -> np.ndarray:
        grp = f["layers"]
        _check_encoding(grp, ("table",))
        cols = {k: _read_array(grp[k]) for k in _LAYER_FIELDS}
        n = len(cols["index"])
        width = {k: max([1] + [len(str(v)) for v in cols[k]])
                 for k in ("name", "layer", "op", "shape")}
        dtype = [("index", np.int64), ("name", f"U{width['name']}"),
                 ("layer", f"U{width['layer']}"), ("op", f"U{width['op']}"),
                 ("channels", np.int64), ("depth", np.int64), ("shape", f"U{width['shape']}")]
        table = np.zeros(n, dtype=dtype)
        for k in _LAYER_FIELDS:
            table[k] = cols[k]
        return table

    def _read_cases(self, f: h5py.File) -> np.ndarray:
        grp = f["cases"]
        _check_encoding(grp, ("dict",))
        ids = _read_array(grp["id"])
        n = len(ids)
        status = _read_array(grp["status"]) if "status" in grp else np.array(["ok"] * n)
        group = _read_array(grp["group"]) if "group" in grp else np.array([""] * n)
        index = _read_array(grp["index"]) if "index" in grp else np.arange(n)
        dice = (_read_array(f["output_dice"])[:, 0] if "output_dice" in f and n
                else np.full(n, np.nan))
        frac = np.full(n, np.nan)
        if "baselines" in f and "predicted_fraction" in f["baselines"] and n:
            frac = _read_array(f["baselines/predicted_fraction"])[:, 0]
        width = {k: max([1] + [len(str(v)) for v in col])
                 for k, col in (("id", ids), ("status", status), ("group", group))}
        table = np.zeros(n, dtype=[("id", f"U{width['id']}"),
                                   ("status", f"U{width['status']}"),
                                   ("group", f"U{width['group']}"),
                                   ("output_dice", np.float64),
                                   ("predicted_fraction", np.float64),
                                   ("index", np.int64)])
        table["id"], table["status"], table["group"] = ids, status, group
        table["output_dice"], table["predicted_fraction"], table["index"] = dice, frac, index
        return table

    def _open(self) -> h5py.File:
        return h5py.File(self.path, "r")

    def _class_index(self, cls: int | None) -> int | None:
        if cls is None:
            return None
        if int(cls) not in self.classes:
            raise KeyError(f"class {cls!r} is not in this store; classes are {self.classes}")
        return self.classes.index(int(cls))

    def _score_group(self, key: str, cls: int | None = None) -> dict[str, np.ndarray]:
        ci = self._class_index(cls)
        with self._open() as f:
            if key not in f:
                raise KeyError(f"store {self.path} has no {key!r}; it was not computed in "
                               "this run")
            grp = f[key]
            _check_encoding(grp, ("dict",))
            out = {name: _read_array(grp[name]) for name in grp if name in _SCORE_FIELDS}
        if ci is not None:
            out = {k: v[:, ci] for k, v in out.items()}
        return out

    # ---------------------------------------------------------------- scores
    def layer_scores(self, cls: int | None = None) -> dict[str, np.ndarray]:
        """Layer-level SA: ``score, status, tp, fp, fn``.

        Parameters
        ----------
        cls : int, optional
            A class label; arrays become (n_cases, n_layers) for that class.

        Returns
        -------
        dict of str to ndarray
            (n_cases, n_classes, n_layers) each (``score`` float64, ``status`` uint8,
            ``tp/fp/fn`` int64).
        """
        return self._score_group("layer_scores", cls)

    def layer_table(self, *, pandas: bool = False) -> Any:
        """Long-form layer scores: one row per (case, class, layer).

        Columns ``case, group, case_status, class, layer_index, name, layer, score,
        status, tp, fp, fn``. A NumPy structured array, or a pandas DataFrame with
        ``pandas=True`` (raises ImportError when pandas is not installed).
        """
        s = self.layer_scores()
        n, k, L = s["score"].shape if s else (len(self.cases), len(self.classes), 0)
        ci, ki, li = np.meshgrid(np.arange(n), np.arange(k), np.arange(L), indexing="ij")
        ci, ki, li = ci.ravel(), ki.ravel(), li.ravel()
        cw = self.cases.dtype
        dtype = [("case", cw["id"]), ("group", cw["group"]), ("case_status", cw["status"]),
                 ("class", np.int64), ("layer_index", np.int64),
                 ("name", self.layers.dtype["name"]), ("layer", self.layers.dtype["layer"]),
                 ("score", np.float64), ("status", np.uint8), ("tp", np.int64),
                 ("fp", np.int64), ("fn", np.int64)]
        t = np.zeros(ci.size, dtype=dtype)
        t["case"], t["group"] = self.cases["id"][ci], self.cases["group"][ci]
        t["case_status"] = self.cases["status"][ci]
        t["class"] = np.asarray(self.classes, dtype=np.int64)[ki]
        t["layer_index"] = li
        t["name"], t["layer"] = self.layers["name"][li], self.layers["layer"][li]
        for field in _SCORE_FIELDS:
            if field in s:
                t[field] = s[field][ci, ki, li]
        return _maybe_pandas(t, pandas)

    def _layer_index(self, layer: int | str) -> int:
        if isinstance(layer, (int, np.integer)):
            if not 0 <= int(layer) < len(self.layers):
                raise KeyError(f"layer index {layer} out of range 0..{len(self.layers) - 1}")
            return int(layer)
        for col in ("name", "layer"):
            hits = np.flatnonzero(self.layers[col] == layer)
            if hits.size:
                return int(hits[0])
        names = list(self.layers["name"]) + list(self.layers["layer"])
        close = difflib.get_close_matches(str(layer), names, n=5)
        raise KeyError(f"layer {layer!r} is not in this store; closest: {close or names[:5]}")

    def unit_scores(self, layer: int | str, cls: int | None = None) -> dict[str, np.ndarray]:
        """Unit-level SA of one layer (index, tensor name or layer name).

        Returns ``score, status, tp, fp, fn`` of shape (n_cases, n_classes, channels)
        ((n_cases, channels) with ``cls``). Raises KeyError when units were not scored.
        """
        li = self._layer_index(layer)
        if not self.has_units:
            raise KeyError(f"store {self.path} has no unit scores; score with level='unit' "
                           "or 'both'")
        return self._score_group(f"unit_scores/{li}", cls)

    def input_scores(self, cls: int | None = None) -> dict[str, np.ndarray]:
        """Input SA (SPEC §5): (n_cases, n_classes, n_inputs) arrays."""
        return self._score_group("input_scores", cls)

    def output_dice(self) -> np.ndarray:
        """Dice of the prediction against ground truth, (n_cases, n_classes); NaN without."""
        with self._open() as f:
            if "output_dice" not in f:
                return np.full((len(self.cases), len(self.classes)), np.nan)
            return _read_array(f["output_dice"])

    def baselines(self) -> dict[str, np.ndarray]:
        """Trivial quality baselines, name → (n_cases, n_classes)."""
        with self._open() as f:
            if "baselines" not in f:
                return {}
            return {unquote(k): _read_array(v) for k, v in f["baselines"].items()}

    # ---------------------------------------------------------------- maps
    @property
    def map_case_ids(self) -> list[str]:
        """Ids of the cases whose maps were saved."""
        return list(self._map_names)

    def maps(self, case_id: str) -> dict[str, Any]:
        """Maps of one case: {layer name: {"binary": bool, "probability": float},
        "_image": ..., "_prediction": ..., "_reference": ...}, read now (one case only)."""
        if case_id not in self._map_names:
            close = difflib.get_close_matches(str(case_id), self.map_case_ids, n=5)
            raise KeyError(f"no maps saved for case {case_id!r}; cases with maps: "
                           f"{close or self.map_case_ids[:5]}")
        out: dict[str, Any] = {}
        with self._open() as f:
            grp = f["maps"][self._map_names[case_id]]
            _check_encoding(grp, ("case-maps",))
            for name, obj in grp.items():
                key = _attr_str(obj, "name") or unquote(name)
                if isinstance(obj, h5py.Group):
                    _check_encoding(obj, ("layer-maps",))
                    entry = {}
                    for field, dset in obj.items():
                        fname = _attr_str(dset, "name") or unquote(field)
                        arr = _read_array(dset)
                        entry[fname] = arr.astype(bool) if fname == "binary" else arr
                    out[key] = entry
                else:
                    out[key] = _read_array(obj)
        return out

    # ---------------------------------------------------------------- estimates
    def estimates(self) -> dict[str, Any] | None:
        """Label-free estimates written by :meth:`write_estimates`, or None."""
        with self._open() as f:
            if "estimates" not in f:
                return None
            grp = f["estimates"]
            _check_encoding(grp, ("dict",))
            out: dict[str, Any] = {unquote(k): _read_array(v) for k, v in grp.items()}
            info = _attr_str(grp, "info")
            if info:
                out["info"] = json.loads(info)
            return out

    def validation(self) -> dict[str, Any] | None:
        """Validation statistics written by :meth:`write_estimates`, or None."""
        with self._open() as f:
            if "validation" not in f:
                return None
            dset = f["validation"]
            _check_encoding(dset, ("json",))
            return json.loads(dset.asstr()[()])

    def write_estimates(self, estimates: Mapping[str, Any], *,
                        validation: Mapping[str, Any] | None = None,
                        info: Mapping[str, Any] | None = None) -> None:
        """Store estimates (name → array with n_cases rows) and validation statistics.

        The store is copied, updated and ``os.replace``d, so a crash leaves the old store
        intact. Existing estimates and validation are replaced.

        Raises
        ------
        ValueError
            An estimate does not have one row per case.
        StoreWriteError
            The update could not be written (file and key named).
        """
        n = len(self.cases)
        arrays = {}
        for name, value in estimates.items():
            arr = np.asarray(value)
            if arr.ndim == 0 or arr.shape[0] != n:
                raise ValueError(f"estimate {name!r} has shape {arr.shape}, expected {n} rows "
                                 "(one per case, in store order)")
            arrays[str(name)] = arr
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        w = _Writing(self.path)
        try:
            shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "r+") as f:
                for key in ("estimates", "validation"):
                    if key in f:
                        del f[key]
                w.key = "estimates"
                grp = _require_group(f, "estimates", "dict")
                if info is not None:
                    grp.attrs["info"] = _dumps(info)
                for name, arr in arrays.items():
                    w.key = f"estimates/{name}"
                    _write_array(grp, _key_name(name), arr)
                if validation is not None:
                    w.key = "validation"
                    dset = f.create_dataset("validation", data=_dumps(validation),
                                            dtype=_STR)
                    _set_encoding(dset, "json")
            _publish(tmp, self.path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, (OSError, RuntimeError)):
                raise w.fail(exc) from exc
            raise


def _maybe_pandas(table: np.ndarray, pandas: bool) -> Any:
    if not pandas:
        return table
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("pandas=True needs pandas; install it (pip install pandas) or "
                          "use the NumPy structured array (pandas=False)") from None
    return pd.DataFrame.from_records(table)


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open a finished store for reading.

    Parameters
    ----------
    path : str or Path
        The store file written by :meth:`StoreWriter.finalize` or :func:`merge_parts`.

    Returns
    -------
    Store

    Raises
    ------
    FileNotFoundError
        No store at ``path`` (the message says when an unfinished run is there).
    StoreVersionError
        Written by a newer protoseg, or not a protoseg store.

    Examples
    --------
    >>> store = open_store("results.h5")          # doctest: +SKIP
    >>> store.layer_scores()["score"].shape       # doctest: +SKIP
    (20, 1, 9)
    """
    return Store(path)
