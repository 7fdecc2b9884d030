"""Reading a finished store: :func:`open_store` → :class:`Store` (read-only).

Tables come back as NumPy structured arrays (pandas DataFrames with ``pandas=True`` when
pandas is installed), scores as dicts of arrays per layer / unit / input, and per-case
maps lazily, one case at a time. Every element read is checked with
:func:`~engine.store.encoding.check_encoding` first.
"""
from __future__ import annotations

import difflib
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import h5py
import numpy as np

from engine.store.annotate import annotate_estimates, committed_annotation
from engine.store.atomic import open_h5
from engine.store.batch import SCORE_FIELDS, CaseGrid
from engine.store.encoding import STORE_TYPE, attr_str, check_encoding, read_array
from engine.store.runinfo import LAYER_FIELDS, parts_dir

__all__ = ["Store", "open_store"]


class Store:
    """Read a finished store (use :func:`open_store`).

    The file is opened only while a method reads from it, so a store can be read while
    another process writes a different one, and no handle is left open. Nothing here
    writes, except :meth:`write_estimates`, a shortcut for
    :func:`engine.store.annotate_estimates`.

    Attributes
    ----------
    path : Path
    version : str
        The store's encoding version.
    config, provenance : dict
    classes : list of int
    layer_info : list of dict
        The layer dicts given to :class:`~engine.store.StoreWriter` (all keys, e.g.
        ``layout``).
    layers : numpy structured array
        ``index, name, layer, op, channels, depth, shape`` (shape as JSON text).
    cases : numpy structured array
        ``id, status, group, output_dice`` (first class), ``predicted_fraction`` (the
        ``predicted_fraction`` baseline when stored, else NaN), ``index`` (position of the
        case in the dataset).
    has_units : bool
        Whether unit-level scores were stored.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            hint = (f"; an unfinished run is in {parts_dir(self.path)}: resume it to finish"
                    if parts_dir(self.path).exists() else "")
            raise FileNotFoundError(f"store {self.path} does not exist{hint}")
        try:
            f = open_h5(self.path, "r")
        except BlockingIOError:
            raise
        except OSError as exc:
            raise ValueError(f"{self.path} is not a readable HDF5 store ({exc}); rerun the "
                             "scoring to rebuild it") from None
        with f:
            check_encoding(f, (STORE_TYPE,))
            self.version = attr_str(f, "encoding-version") or ""
            self.config: dict[str, Any] = json.loads(attr_str(f, "config") or "{}")
            self.provenance: dict[str, Any] = json.loads(attr_str(f, "provenance") or "{}")
            self.classes: list[int] = [int(c) for c in read_array(f["classes"])]
            run = json.loads(attr_str(f, "run") or "{}")
            self.layer_info: list[dict[str, Any]] = run.get("layers", [])
            self.layers = self._read_layers(f)
            self.cases = self._read_cases(f)
            self.has_units = "unit_scores" in f and len(f["unit_scores"]) > 0
            self._map_names: dict[str, str] = {}
            if "maps" in f:
                check_encoding(f["maps"], ("map-collection",))
                for name, grp in f["maps"].items():
                    self._map_names[attr_str(grp, "case_id") or unquote(name)] = name

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, cases={len(self.cases)}, "
                f"layers={len(self.layers)}, classes={self.classes})")

    # ---------------------------------------------------------------- metadata
    @staticmethod
    def _read_layers(f: h5py.File) -> np.ndarray:
        grp = f["layers"]
        check_encoding(grp, ("table",))
        cols = {k: read_array(grp[k]) for k in LAYER_FIELDS}
        n = len(cols["index"])
        width = {k: max([1] + [len(str(v)) for v in cols[k]])
                 for k in ("name", "layer", "op", "shape")}
        dtype = [("index", np.int64), ("name", f"U{width['name']}"),
                 ("layer", f"U{width['layer']}"), ("op", f"U{width['op']}"),
                 ("channels", np.int64), ("depth", np.int64), ("shape", f"U{width['shape']}")]
        table = np.zeros(n, dtype=dtype)
        for k in LAYER_FIELDS:
            table[k] = cols[k]
        return table

    @staticmethod
    def _read_cases(f: h5py.File) -> np.ndarray:
        grp = f["cases"]
        check_encoding(grp, ("dict",))
        ids = read_array(grp["id"])
        n = len(ids)
        status = read_array(grp["status"]) if "status" in grp else np.array(["ok"] * n)
        group = read_array(grp["group"]) if "group" in grp else np.array([""] * n)
        index = read_array(grp["index"]) if "index" in grp else np.arange(n)
        dice = (read_array(f["output_dice"])[:, 0] if "output_dice" in f and n
                else np.full(n, np.nan))
        frac = np.full(n, np.nan)
        if "baselines" in f and "predicted_fraction" in f["baselines"] and n:
            frac = read_array(f["baselines/predicted_fraction"])[:, 0]
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
        return open_h5(self.path, "r")

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
            check_encoding(grp, ("dict",))
            out = {name: read_array(grp[name]) for name in grp if name in SCORE_FIELDS}
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
        for field in SCORE_FIELDS:
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

    def label_free_scores(self, cls: int | None = None) -> dict[str, np.ndarray]:
        """Label-free layer SA (prediction as guide and reference) of the cases that had no
        mask in a run scored against the ground truth; NOT_COMPUTED for the others.

        (n_cases, n_classes, n_layers) arrays like :meth:`layer_scores`. KeyError when the
        run did not score against the ground truth with the prediction as guide.
        """
        return self._score_group("label_free_scores", cls)

    def output_dice(self) -> np.ndarray:
        """Dice of the prediction against ground truth, (n_cases, n_classes); NaN without."""
        with self._open() as f:
            if "output_dice" not in f:
                return np.full((len(self.cases), len(self.classes)), np.nan)
            return read_array(f["output_dice"])

    def baselines(self) -> dict[str, np.ndarray]:
        """Trivial quality baselines, name → (n_cases, n_classes)."""
        with self._open() as f:
            if "baselines" not in f:
                return {}
            return {unquote(k): read_array(v) for k, v in f["baselines"].items()}

    # ---------------------------------------------------------------- grids
    def case_grids(self) -> dict[str, np.ndarray]:
        """Where every case's voxels lay in space, as the model saw them.

        Returns
        -------
        dict of str to ndarray
            ``affine``: float64 (n_cases, 4, 4), voxel indices of the arrays scored → RAS+
            millimetres (nibabel's convention), after any reorientation; all NaN for a case
            whose image had no affine (PNG, JPEG, TIFF, ``.npy``, HDF5/NPZ arrays, NRRD
            without an anatomical space) or that could not be read. ``orientation``: the
            axis codes the case was scored in (``"RAS"`` after reorienting to RAS), and
            ``file_orientation``: its image file's; ``""`` without an affine. Rows in the
            order of :attr:`cases`. A store written before protoseg recorded them gives NaN
            and ``""`` throughout.
        """
        n = len(self.cases)
        out = {"affine": np.full((n, 4, 4), np.nan),
               "orientation": np.full(n, "", dtype=object),
               "file_orientation": np.full(n, "", dtype=object)}
        with self._open() as f:
            for key in out:
                if f"cases/{key}" in f and n:
                    out[key] = read_array(f[f"cases/{key}"])
        return out

    def case_affine(self, case_id: str) -> np.ndarray | None:
        """The (4, 4) affine of one case (see :meth:`case_grids`), or None where not known.

        Raises
        ------
        KeyError
            ``case_id`` is not in the store (the closest ids are named).
        """
        hits = np.flatnonzero(self.cases["id"] == str(case_id))
        if not hits.size:
            close = difflib.get_close_matches(str(case_id), list(self.cases["id"]), n=5)
            raise KeyError(f"case {case_id!r} is not in store {self.path}; closest: "
                           f"{close or list(self.cases['id'][:5])}")
        with self._open() as f:
            if "cases/affine" not in f:
                return None
            affine = np.asarray(read_array(f["cases/affine"], np.s_[int(hits[0])]), dtype=np.float64)
        return affine if np.isfinite(affine).all() else None

    # ---------------------------------------------------------------- maps
    @property
    def map_case_ids(self) -> list[str]:
        """Ids of the cases whose maps were saved."""
        return list(self._map_names)

    def maps(self, case_id: str, names: Collection[str] | None = None) -> dict[str, Any]:
        """Maps of one case: {layer name: {"binary": bool, "probability": float},
        "_image": ..., "_prediction": ..., "_reference": ...}, read now (one case only;
        only the entries in ``names`` when given: see :meth:`map_keys`)."""
        if case_id not in self._map_names:
            close = difflib.get_close_matches(str(case_id), self.map_case_ids, n=5)
            raise KeyError(f"no maps saved for case {case_id!r}; cases with maps: "
                           f"{close or self.map_case_ids[:5]}")
        out: dict[str, Any] = {}
        with self._open() as f:
            grp = f["maps"][self._map_names[case_id]]
            check_encoding(grp, ("case-maps",))
            for name, obj in grp.items():
                key = attr_str(obj, "name") or unquote(name)
                if names is not None and key not in names:
                    continue
                if isinstance(obj, h5py.Group):
                    check_encoding(obj, ("layer-maps",))
                    entry = {}
                    for field, dset in obj.items():
                        fname = attr_str(dset, "name") or unquote(field)
                        arr = read_array(dset)
                        entry[fname] = arr.astype(bool) if fname == "binary" else arr
                    out[key] = entry
                else:
                    out[key] = read_array(obj)
        return out

    def map_keys(self, case_id: str) -> list[str]:
        """The keys :meth:`maps` returns for one case, in its order, without reading any map."""
        if case_id not in self._map_names:
            self.maps(case_id)  # the KeyError naming the cases with maps
        with self._open() as f:
            grp = f["maps"][self._map_names[case_id]]
            check_encoding(grp, ("case-maps",))
            return [attr_str(obj, "name") or unquote(name) for name, obj in grp.items()]

    def map_grid(self, case_id: str) -> CaseGrid | None:
        """Where the voxels of a case with saved maps lie (:class:`~engine.store.batch.CaseGrid`:
        affine, spatial shape before resizing, orientation, file format).

        The grid saved with the maps; else, when the case's affine is stored per case
        (:meth:`case_grids`), a grid built from it on the shape of the saved input map
        (``shape`` of ``_image``, ``format`` unknown); else None (stores written before
        protoseg recorded either).
        """
        if case_id not in self._map_names:
            self.maps(case_id)  # the KeyError naming the cases with maps
        with self._open() as f:
            grp = f["maps"][self._map_names[case_id]]
            text = attr_str(grp, "grid")
            shape = None
            if text is None:
                for name, obj in grp.items():
                    if (attr_str(obj, "name") or unquote(name)) == "_image" and isinstance(obj, h5py.Dataset):
                        shape = tuple(int(d) for d in obj.shape)
        if text is not None:
            return CaseGrid.from_json(text)
        affine = self.case_affine(case_id)
        if affine is None or shape is None:
            return None
        row = int(np.flatnonzero(self.cases["id"] == str(case_id))[0])
        grids = self.case_grids()
        return CaseGrid(affine, shape, str(grids["orientation"][row]),
                        str(grids["file_orientation"][row]), "")

    # ---------------------------------------------------------------- estimates
    def estimates(self) -> dict[str, Any] | None:
        """Label-free estimates (name → one value per case, plus ``info``), or None.

        Written by :func:`engine.store.annotate_estimates`; None for a store not
        annotated yet (no ``/estimates``, or the placeholder a store is finished with).
        An annotation that was interrupted before it completed is never returned (the
        previous one is).
        """
        with self._open() as f:
            grp, _ = committed_annotation(f)
            if grp is None:
                return None
            check_encoding(grp, ("dict",))
            out: dict[str, Any] = {unquote(k): read_array(v) for k, v in grp.items()}
            info = attr_str(grp, "info")
            if info:
                out["info"] = json.loads(info)
            return out

    def validation(self) -> dict[str, Any] | None:
        """Validation statistics stored with the estimates, or None (none recorded, not
        annotated yet, or not from the same annotation as the estimates)."""
        with self._open() as f:
            _, dset = committed_annotation(f)
            if dset is None:
                return None
            check_encoding(dset, ("json",))
            return json.loads(dset.asstr()[()])

    def write_estimates(self, estimates: Mapping[str, Any], *,
                        validation: Mapping[str, Any] | None = None,
                        info: Mapping[str, Any] | None = None) -> None:
        """Store estimates and validation statistics in place: see
        :func:`engine.store.annotate_estimates` (same parameters and errors)."""
        annotate_estimates(self.path, estimates, validation=validation, info=info)


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
