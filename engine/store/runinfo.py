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
)
from engine.store.errors import StoreVersionError

__all__ = ["LAYER_FIELDS", "RunInfo", "make_run", "config_difference", "read_run",
           "run_of_file", "write_run_attrs", "parts_dir"]

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


def config_difference(path: Path, old: RunInfo, new: RunInfo) -> str | None:
    """One-line description of every setting that differs between two runs, or None."""
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    was, asks = [], []
    old_all = dict(old.config, layers=old.layers, classes=old.classes)
    new_all = dict(new.config, layers=new.layers, classes=new.classes)
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
    if not was:
        return None
    return (f"store {path} was made with {', '.join(was)}, this run asks {', '.join(asks)}; "
            f"choose another output ({option('store', 'PATH')}), or {option('overwrite')} to delete "
            "the finished work there and start over")


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


def run_of_file(path: Path) -> RunInfo:
    """The run description held by a part file or a finished store."""
    with open_h5(path, "r") as f:
        check_encoding(f, (PART_TYPE, STORE_TYPE))
        data = json.loads(attr_str(f, "run") or "{}")
    return RunInfo(data["config"], data["layers"], [int(c) for c in data["classes"]])


def write_run_attrs(f: h5py.File, run: RunInfo) -> None:
    """Write the root attributes ``config`` and ``run`` (JSON text, sorted keys)."""
    f.attrs["config"] = dumps(run.config, sort_keys=True)
    f.attrs["run"] = dumps(run.as_json(), sort_keys=True)
