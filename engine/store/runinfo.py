"""The run description: the settings, layers and classes that every batch of a store shares.

It is written at the start of a run as ``<store>.parts/run.json`` and into every part and
store as the root attributes ``config`` and ``run``. Resuming, finalizing onto an
existing store and merging shards compare run descriptions with
:func:`config_difference`, which names every differing setting in one line.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from engine._json import dumps
from engine.errors import option
from engine.store.atomic import open_h5
from engine.store.encoding import (
    KNOWN,
    PART_TYPE,
    RUN_TYPE,
    STORE_TYPE,
    STORE_VERSION,
    attr_str,
    check_encoding,
    set_str_attrs,
)
from engine.store.errors import StoreVersionError

__all__ = ["LAYER_FIELDS", "RunInfo", "make_run", "config_difference", "dataset_difference",
           "read_run", "read_manifest",
           "run_of_file", "write_run_attrs", "run_attr_texts", "parts_dir"]

#: Columns of the ``/layers`` table (keys of each layer dict given to the writer).
LAYER_FIELDS = ("index", "name", "layer", "op", "channels", "depth", "shape")


def parts_dir(path: str | os.PathLike[str]) -> Path:
    """Return the folder holding the part files of the store at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _normalise(obj: Any) -> Any:
    """Round-trip through JSON so that tuples/lists and numpy scalars compare equal."""
    return json.loads(dumps(obj, sort_keys=True))


@dataclass(frozen=True)
class RunInfo:
    """What a run scores: settings that change numbers, layer dicts, class labels.

    All three are JSON-normalised (as :func:`make_run` returns them), so two runs with
    equal settings compare equal whatever Python types described them.
    """

    config: dict[str, Any]
    layers: list[dict[str, Any]]
    classes: list[int]

    def as_json(self) -> dict[str, Any]:
        """The ``run.json`` / ``run`` attribute content (with its encoding type)."""
        return {"encoding-type": RUN_TYPE, "encoding-version": STORE_VERSION,
                "config": self.config, "layers": self.layers, "classes": self.classes}

    @property
    def n_classes(self) -> int:
        """Length of the class axis of every score array."""
        return len(self.classes)


def make_run(config: Mapping[str, Any], layers: Iterable[Mapping[str, Any]],
             classes: Iterable[int]) -> RunInfo:
    """Check and normalise a run description.

    Raises
    ------
    TypeError
        ``config`` or a layer is not a dict, or holds values JSON cannot represent.
    ValueError
        A layer's ``index`` is not its position, or ``classes`` is empty.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of settings, got {type(config).__name__}")
    layer_list = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise TypeError(f"layers[{i}] must be a dict with keys {list(LAYER_FIELDS)}, "
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
    return RunInfo(_normalise(dict(config)), _normalise(layer_list), class_list)


def _ids_text(ids: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(c) for c in ids[:limit])
    return shown + (f", ... {len(ids) - limit} more" if len(ids) > limit else "")


def _same_path(recorded: str, resolved: str | None) -> bool:
    """Whether a path recorded by an older protoseg (as typed) names ``resolved``."""
    if resolved is None:
        return False
    try:
        return Path(os.path.abspath(Path(recorded).expanduser())).resolve() == Path(resolved)
    except (OSError, RuntimeError, ValueError):
        return False


def dataset_difference(old: Any, new: Any, *, old_manifest: Mapping[str, Any] | None = None,
                       new_manifest: Mapping[str, Any] | None = None,
                       old_ids: Iterable[str] | None = None) -> str | None:
    """What differs between the data of two runs, in a few words; None when it is the same.

    ``old``/``new`` are the configuration's ``"dataset"`` values: a manifest summary
    (``kind, cases, ids_sha256, fingerprint``, see :mod:`engine.run.manifest`) — equal
    fingerprints are the same data wherever it lies and however its path was spelled — or,
    in stores of older protoseg versions, the path as it was typed, which is the same data
    when it resolves to the manifest's ``path`` (or, for data passed as an object, its class
    name, which is all those versions recorded). The whole manifests (``dataset.json``) or
    the ids of a finished store let the answer name the cases added or removed and the
    files changed.
    """
    if old == new:
        return None
    new_path = (new_manifest or {}).get("path")
    if isinstance(old, str) and isinstance(new, Mapping):
        if _same_path(old, new_path) or (old and old == (new_manifest or {}).get("type")):
            return None  # the same path, or the same kind of in-memory object (all they recorded)
        return (f"data {old!r} (as an older protoseg recorded it; from here it is "
                f"{Path(os.path.abspath(old))}), this run reads {new_path or 'other data'}")
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return f"dataset={old!r}, this run reads {new!r}"
    if old.get("fingerprint") == new.get("fingerprint") and old.get("kind") == new.get("kind"):
        return None
    n_old, n_new = old.get("cases"), new.get("cases")
    if old.get("kind") != new.get("kind"):
        return (f"a {old.get('kind')} dataset of {n_old} cases, this run reads a "
                f"{new.get('kind')} dataset of {n_new} cases")
    was_ids = list((old_manifest or {}).get("ids") or []) or (
        list(old_ids) if old_ids is not None else [])
    now_ids = list((new_manifest or {}).get("ids") or [])
    if old.get("ids_sha256") != new.get("ids_sha256"):
        if not was_ids or not now_ids:
            return f"other cases ({n_old} before, {n_new} now)"
        was_set, now_set = set(was_ids), set(now_ids)
        added = [c for c in now_ids if c not in was_set]
        removed = [c for c in was_ids if c not in now_set]
        if not added and not removed:
            return f"the same {n_new} cases in another order"
        said = []
        if added:
            said.append(f"{len(added)} case(s) added ({_ids_text(added)})")
        if removed:
            said.append(f"{len(removed)} case(s) removed ({_ids_text(removed)})")
        return ", ".join(said)
    old_files = (old_manifest or {}).get("files")
    new_files = (new_manifest or {}).get("files")
    if old_files is None or new_files is None or len(old_files) != len(new_files):
        return f"the same {n_new} case ids, but their files changed"
    changed: list[str] = []
    total = 0
    for was, now in zip(old_files, new_files):
        was_map = {str(f[0]): tuple(f[1:]) for f in was}
        now_map = {str(f[0]): tuple(f[1:]) for f in now}
        total += len(now_map)
        changed += [name for name in sorted(set(was_map) | set(now_map))
                    if was_map.get(name) != now_map.get(name)]
    if not changed:
        return f"the same {n_new} case ids, but their files changed"
    return (f"the same {n_new} case ids, but {len(changed)} of {total} file(s) changed "
            f"({_ids_text(changed)})")


def config_difference(path: Path, old: RunInfo, new: RunInfo, *,
                      old_manifest: Mapping[str, Any] | None = None,
                      new_manifest: Mapping[str, Any] | None = None,
                      old_ids: Iterable[str] | None = None) -> str | None:
    """One-line description of every setting that differs between two runs, or None.

    The ``"dataset"`` setting is compared by :func:`dataset_difference` (by content, not
    by path; the manifests and ``old_ids`` only make its words more precise).
    """
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    was, asks = [], []
    old_all = dict(old.config, layers=old.layers, classes=old.classes)
    new_all = dict(new.config, layers=new.layers, classes=new.classes)
    data = dataset_difference(old_all.pop("dataset", None), new_all.pop("dataset", None),
                              old_manifest=old_manifest, new_manifest=new_manifest,
                              old_ids=old_ids)
    if data is not None and isinstance(old.config.get("dataset"), Mapping):
        old_all.pop("n_cases", None)  # the data's own words say how many cases
        new_all.pop("n_cases", None)
    for key in sorted(set(old_all) | set(new_all)):
        a, b = old_all.get(key, "<unset>"), new_all.get(key, "<unset>")
        if a == b:
            continue
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
    if not was and data is None:
        return None
    made = []
    if data is not None:
        made.append(f"from other data: {data}" if not was else f"from other data ({data})")
    if was:
        made.append(f"with {', '.join(was)}, this run asks {', '.join(asks)}")
    return (f"store {path} was made {' and '.join(made)}; choose another output "
            f"({option('store', 'PATH')}), or {option('overwrite')} to delete the finished work "
            "there and start over")


def read_run(path: Path) -> RunInfo:
    """Read a ``run.json``.

    Raises
    ------
    StoreVersionError
        Not a run description, or written by a newer protoseg.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise StoreVersionError(
            f"{path} is truncated or not JSON ({exc.msg} at line {exc.lineno}); the unfinished run "
            f"cannot be resumed: {option('overwrite')} deletes its finished batches and starts over, "
            f"or choose another output ({option('store', 'PATH')})") from None
    kind, version = data.get("encoding-type"), str(data.get("encoding-version"))
    if kind != RUN_TYPE:
        raise StoreVersionError(f"{path} has encoding-type {kind!r}, expected {RUN_TYPE!r}; "
                                "it is not a protoseg run description")
    if version not in KNOWN[RUN_TYPE]:
        raise StoreVersionError(f"{path} was written by a newer protoseg (store version "
                                f"{version}); upgrade protoseg")
    return RunInfo(data["config"], data["layers"], [int(c) for c in data["classes"]])


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The dataset manifest ``dataset.json`` of an unfinished run, or None.

    Only the wording of a refused resume uses it (which cases, which files), so a missing
    or damaged file is no error.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_of_file(path: Path) -> RunInfo:
    """The run description held by a part file or a finished store."""
    with open_h5(path, "r") as f:
        check_encoding(f, (PART_TYPE, STORE_TYPE))
        data = json.loads(attr_str(f, "run") or "{}")
    return RunInfo(data["config"], data["layers"], [int(c) for c in data["classes"]])


def run_attr_texts(run: RunInfo) -> tuple[tuple[str, str], ...]:
    """The root attributes :func:`write_run_attrs` writes: ``(name, JSON text)`` pairs."""
    return (("config", dumps(run.config, sort_keys=True)),
            ("run", dumps(run.as_json(), sort_keys=True)))


def write_run_attrs(f: h5py.File, run: RunInfo,
                    texts: tuple[tuple[str, str], ...] | None = None) -> None:
    """Write the root attributes ``config`` and ``run`` (JSON text, sorted keys).

    ``texts``: :func:`run_attr_texts` of ``run``, when the caller keeps them (a writer
    writes them into every part).
    """
    set_str_attrs(f, texts if texts is not None else run_attr_texts(run))
