"""What a report reads from a store, and the shaping of what it reads.

A store is a :class:`engine.store.Store` or any object with the same members (the report
duck-types it: ``config, cases, layers, classes, layer_scores`` are required, the rest
optional). :func:`read_report_data` reads the small arrays once; unit scores and maps stay
lazy, one layer or one case at a time. Estimates and validation results come in several
layouts; :func:`per_case_arrays` and :func:`validation_rows` flatten them to rows, and
:func:`case_maps` turns one case's maps into figure panels.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine._json import jsonable, text
from engine.report.figures import MapPanel
from engine.report.tables import field, fmt, layer_labels, text_column
from engine.status import Status
from engine.store import open_store

__all__ = [
    "MAX_MAP_LAYERS",
    "CaseMaps",
    "ReportData",
    "added_value",
    "case_maps",
    "coverage_summary",
    "drawn_map_keys",
    "failure_rows",
    "merge_intervals",
    "optional",
    "per_case_arrays",
    "read_estimates",
    "read_report_data",
    "resolve_store",
    "validation_rows",
]

#: Rows of a map figure (layers); more layers are subsampled evenly over depth.
MAX_MAP_LAYERS = 8


# ----------------------------------------------------------------------------- store access
def resolve_store(store_or_path: Any, *, caller: str = "write_report") -> Any:
    """An opened store from a path, or the given store after checking its members.

    ``caller`` names the public function in the error message.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    TypeError
        Neither a path nor an object with a store's members.
    """
    if isinstance(store_or_path, (str, Path)):
        path = Path(store_or_path)
        if not path.exists():
            raise FileNotFoundError(
                f"store {str(path)!r} does not exist; pass the .h5 file written by "
                "`protoseg score` (or a Store from engine.open_store)")
        return open_store(path)
    needed = ("config", "cases", "layers", "classes", "layer_scores")
    missing = [a for a in needed if not hasattr(store_or_path, a)]
    if missing:
        raise TypeError(
            f"{caller} got a {type(store_or_path).__name__} without {missing}; expected "
            "a store path (str or Path) or a Store from engine.open_store")
    return store_or_path


def optional(store: Any, name: str, *args: Any) -> Any:
    """Call/read an optional reader member; ``None`` when absent or not recorded."""
    member = getattr(store, name, None)
    if member is None:
        return None
    if callable(member):
        try:
            return member(*args)
        except (KeyError, LookupError, FileNotFoundError):
            return None
    return member


@dataclass(frozen=True)
class ReportData:
    """Everything a report draws from its store(s), but the unit scores and maps.

    ``score``/``status`` are (n_cases, n_classes, n_layers); ``dice`` (n_cases, n_classes)
    or (n_cases, 1); ``input_score`` (n_cases, n_classes, 1 + channels) or None; ``order``
    is the drawing order of the layers (by depth, ties by index). ``estimates`` are the
    per-case arrays to draw, ``estimate_extras`` the other per-case arrays (flags, Dice
    lower bounds...), both (n_cases, k) and aligned with ``ids``; ``estimate_info`` is
    ``estimates()["info"]`` (``{}`` when not recorded).
    """

    store: Any
    config: dict[str, Any]
    provenance: dict[str, Any]
    cases: np.ndarray
    ids: list[str]
    layers: np.ndarray
    labels: list[str]
    classes: list[int]
    score: np.ndarray
    status: np.ndarray
    depth: np.ndarray
    order: np.ndarray
    dice: np.ndarray
    input_score: np.ndarray | None
    baselines: dict[str, np.ndarray]
    estimates: dict[str, np.ndarray]
    estimate_extras: dict[str, np.ndarray]
    estimate_info: dict[str, Any]
    validation: Any
    map_ids: list[str]
    has_units: bool

    @property
    def n_cases(self) -> int:
        return len(self.ids)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def version(self) -> str:
        value = getattr(self.store, "version", None)
        return "" if value is None else text(value)

    def unit_scores(self, index: int) -> np.ndarray | None:
        """Unit-level SA of one layer, (n_cases, n_classes, C), or None when not recorded."""
        us = optional(self.store, "unit_scores", index)
        return None if us is None else np.asarray(us["score"], dtype=np.float64)

    def maps(self, case_id: str) -> Mapping[str, Any]:
        """One case's maps: each entry read from the store when first looked up
        (:class:`CaseMaps`) where the store can list them (``map_keys``), else all read now."""
        if callable(getattr(self.store, "map_keys", None)):
            return CaseMaps(self.store, case_id)
        return self.store.maps(case_id)

    def layer_keys(self) -> tuple[dict[str, str], dict[str, float]]:
        """Display label and depth of each layer, keyed by tensor and by layer name."""
        names = text_column(self.layers, "name")
        fw = text_column(self.layers, "layer")
        label_of: dict[str, str] = {}
        depth_of: dict[str, float] = {}
        for j, (n, f) in enumerate(zip(names, fw)):
            for key in (n, f):
                if key:
                    label_of.setdefault(key, self.labels[j])
                    depth_of.setdefault(key, float(self.depth[j]))
        return label_of, depth_of


class CaseMaps(Mapping[str, Any]):
    """One case's saved maps (``store.maps(case_id)``'s keys, in its order), each entry read
    from the store the first time it is looked up, then kept.

    A map figure draws at most :data:`MAX_MAP_LAYERS` layers (with their unit maps) of a
    case, so the maps of the other layers are never read: in ``protoseg demo`` 35 of its 63
    entries (8 of 15 layers), about half of the 1.6 s its report spent reading maps.

    Raises
    ------
    KeyError
        No maps saved for ``case_id`` (from the store), or an unknown key.
    """

    def __init__(self, store: Any, case_id: str) -> None:
        self._store = store
        self._case = case_id
        self._keys = list(store.map_keys(case_id))
        self._known = set(self._keys)
        self._read: dict[str, Any] = {}

    def load(self, keys: Collection[str]) -> None:
        """Read the entries ``keys`` not read yet, in one pass over the store."""
        todo = [key for key in keys if key in self._known and key not in self._read]
        if todo:
            self._read.update(self._store.maps(self._case, names=set(todo)))

    def __getitem__(self, key: str) -> Any:
        if key not in self._read:
            if key not in self._known:
                raise KeyError(key)
            self._read.update(self._store.maps(self._case, names=(key,)))
        return self._read[key]

    def __iter__(self) -> Any:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._known


def read_report_data(store: Any, est_store: Any = None) -> ReportData:
    """Read what a report draws from ``store`` (and the estimates from ``est_store``).

    Parameters
    ----------
    store : Store
        An opened store (see :func:`resolve_store`).
    est_store : Store, optional
        A second store whose ``estimates()`` and ``validation()`` replace ``store``'s;
        its estimates are matched to ``store``'s cases by id (NaN where it lacks one).

    Returns
    -------
    ReportData
    """
    cases = np.asarray(store.cases)
    ids = text_column(cases, "id")
    layers = np.asarray(store.layers)
    classes = [int(c) for c in store.classes]
    shape = (len(ids), len(classes), len(layers))
    ls = optional(store, "layer_scores")  # None: no case was scored (empty store)
    if ls is None or "score" not in ls:
        ls = {"score": np.full(shape, np.nan),
              "status": np.full(shape, int(Status.NOT_COMPUTED), np.uint8)}
    depth = np.asarray(field(layers, "depth", 0), dtype=np.float64)
    if not np.all(np.isfinite(depth)):
        depth = np.arange(len(layers), dtype=np.float64)
    dice = optional(store, "output_dice")
    if dice is None:
        dice = np.asarray(field(cases, "output_dice", np.nan), dtype=np.float64).reshape(-1, 1)
    dice = (np.asarray(dice, dtype=np.float64).reshape(len(ids), -1) if np.size(dice)
            else np.full((len(ids), len(classes)), np.nan))
    inp = optional(store, "input_scores")
    has_input = inp is not None and "score" in inp and np.size(inp["score"])
    source = est_store if est_store is not None else store
    raw = optional(source, "estimates")
    estimates, extras = read_estimates(source, ids, align=source is not store, raw=raw)
    info = raw.get("info") if isinstance(raw, Mapping) else None
    return ReportData(
        store=store,
        config=dict(getattr(store, "config", None) or {}),
        provenance=dict(getattr(store, "provenance", None) or {}),
        cases=cases, ids=ids, layers=layers, labels=layer_labels(layers), classes=classes,
        score=np.asarray(ls["score"], dtype=np.float64).reshape(shape),
        status=np.asarray(ls["status"]).reshape(shape),
        depth=depth,
        # drawing order: by depth, ties (parallel branches) by layer index
        order=np.lexsort((np.arange(len(layers)), depth)),
        dice=dice,
        input_score=np.asarray(inp["score"], dtype=np.float64) if has_input else None,
        baselines=per_case_arrays(optional(store, "baselines"), len(ids)),
        estimates=estimates, estimate_extras=extras,
        estimate_info=dict(info) if isinstance(info, Mapping) else {},
        validation=optional(source, "validation"),
        map_ids=[text(v) for v in (optional(store, "map_case_ids") or [])],
        has_units=bool(getattr(store, "has_units", False)),
    )


# ----------------------------------------------------------------------------- estimates
def per_case_arrays(obj: Any, n_cases: int) -> dict[str, np.ndarray]:
    """Per-case numeric arrays, (n_cases, k), out of ``store.estimates()`` / ``baselines()``.

    Entries that are not numeric, or not one value (row) per case, are left out, as is
    ``estimates()["info"]`` (the estimators' details).
    """
    out: dict[str, np.ndarray] = {}
    if not isinstance(obj, Mapping):
        return out
    for key, val in obj.items():
        if text(key) == "info":
            continue
        if isinstance(val, Mapping):
            for inner in ("values", "estimate", "estimates", "score"):
                if inner in val:
                    val = val[inner]
                    break
            else:
                continue
        try:
            arr = np.asarray(val, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if arr.ndim >= 1 and arr.shape[0] == n_cases:
            out[text(key)] = arr.reshape(n_cases, -1)
    return out


def read_estimates(
    source: Any, ids: list[str], *, align: bool, raw: Any = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-case estimates to draw, and other per-case values (flags...) for the table.

    The estimators are those named in ``estimates()["info"]["estimators"]`` when recorded,
    else every floating-point array; integer/bool arrays are never drawn. With ``align``,
    ``source`` is another store: its rows are matched to ``ids`` (NaN where it lacks a case).
    ``raw`` is ``source.estimates()`` when already read.
    """
    raw_obj = optional(source, "estimates") if raw is None else raw
    if not isinstance(raw_obj, Mapping):
        return {}, {}
    other_ids = text_column(np.asarray(source.cases), "id")
    raw = per_case_arrays(raw_obj, len(other_ids))
    info = raw_obj.get("info")
    named = info.get("estimators") if isinstance(info, Mapping) else None
    if named:
        drawn = [n for n in (text(x) for x in named) if n in raw]
    else:
        drawn = [n for n in raw if np.asarray(raw_obj[n]).dtype.kind == "f"]
    if align:
        pos = {c: i for i, c in enumerate(other_ids)}
        take = np.array([pos.get(c, -1) for c in ids], dtype=np.intp)
        hit = take >= 0
        for name, arr in list(raw.items()):
            a = np.full((len(ids), arr.shape[1]), np.nan)
            a[hit] = arr[take[hit]]
            raw[name] = a
    return ({n: raw[n] for n in drawn},
            {n: a for n, a in raw.items() if n not in drawn})


# ----------------------------------------------------------------------------- validation
def validation_rows(val: Any) -> list[dict[str, Any]]:
    """Flatten ``store.validation()`` (dict per estimator, records, or structured array).

    The output of :func:`engine.quality.validate` is flattened by its own
    :func:`engine.quality.validation_rows` (one row per estimator and scope), with the
    orientation and the reasons of undefined statistics added to the ``all`` rows; anything
    else generically.
    """
    if val is None:
        return []
    if isinstance(val, Mapping) and val:
        try:
            return _validate_result_rows(val)
        except (ImportError, KeyError, TypeError, IndexError, AttributeError):
            pass
    if isinstance(val, np.ndarray) and val.dtype.names:
        return jsonable(val)
    if isinstance(val, (list, tuple)):
        return [_flatten(r) if isinstance(r, Mapping) else {"value": r} for r in val]
    if isinstance(val, Mapping):
        rows = []
        for name, item in val.items():
            if isinstance(item, Mapping):
                rows.append({"estimator": text(name), **_flatten(item)})
            elif isinstance(item, (list, tuple)) and item and isinstance(item[0], Mapping):
                rows += [{"estimator": text(name), **_flatten(r)} for r in item]
            else:
                rows.append({"estimator": text(name), "value": jsonable(item)})
        return rows
    return [{"value": jsonable(val)}]


def _validate_result_rows(val: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of an :func:`engine.quality.validate` result (raises on other layouts)."""
    # engine.quality imports Numba (0.3 s); only reports with a validation result need it
    from engine.quality.validation import validation_rows as estimator_rows

    rows = [dict(r) for r in estimator_rows(val)]
    for row in rows:
        res = val.get(row.get("estimator"))
        if row.get("scope") != "all" or not isinstance(res, Mapping):
            continue
        row["orientation"] = res.get("orientation")
        why = [f"{stat}: {res[stat]['reason']}" for stat in
               ("pearson", "spearman", "partial_spearman", "auroc")
               if isinstance(res.get(stat), Mapping) and res[stat].get("reason")]
        row["note"] = "; ".join(why)
    return rows


def failure_rows(val: Any) -> list[dict[str, Any]]:
    """The failure-detection benchmark of each estimator, one row each (tables/failure.csv).

    Reads ``validation[name]["failure"]`` (:func:`engine.quality.failure_benchmark`, stored
    by ``protoseg estimate`` when the cases have ground truth): ``estimator, orientation,
    n, aurc, aurc_lo, aurc_hi, e_aurc, e_aurc_lo, e_aurc_hi, oracle_aurc, random_aurc``,
    then per Dice threshold ``t`` ``auroc_<t>`` (flagging ``Dice < t``) with
    ``auroc_<t>_lo``, ``auroc_<t>_hi`` and ``n_bad_<t>``, and a ``note`` with the reason of
    each undefined AUROC. Estimators without it are left out; ``[]`` when none has it.
    """
    if not isinstance(val, Mapping):
        return []
    rows = []
    for name, res in val.items():
        fail = res.get("failure") if isinstance(res, Mapping) else None
        if not isinstance(fail, Mapping) or not isinstance(fail.get("aurc"), Mapping):
            continue
        row: dict[str, Any] = {"estimator": text(name), "orientation": fail.get("orientation"),
                               "n": fail.get("n")}
        for key in ("aurc", "e_aurc"):
            entry = fail.get(key) or {}
            lo, hi = (list(entry.get("ci") or []) + [None, None])[:2]
            row.update({key: entry.get("value"), f"{key}_lo": lo, f"{key}_hi": hi})
        row["oracle_aurc"] = fail.get("oracle_aurc")
        row["random_aurc"] = fail.get("random_aurc")
        why = []
        for t, a in (fail.get("auroc") or {}).items():
            lo, hi = (list(a.get("ci") or []) + [None, None])[:2]
            row.update({f"auroc_{t}": a.get("value"), f"auroc_{t}_lo": lo,
                        f"auroc_{t}_hi": hi, f"n_bad_{t}": a.get("n_bad")})
            if a.get("reason"):
                why.append(f"AUROC at {t}: {a['reason']}")
        row["note"] = "; ".join(why)
        rows.append(jsonable(row))
    return rows


def _verdict(ci: Any) -> str:
    """The sentence of :func:`engine.quality.sa_added_value` for an AURC-difference interval.

    ``protoseg estimate`` stores the comparison (``compare_aurc``) in the calibration
    without the sentence; the rule is the same: the whole interval below 0, above 0, or
    across it.
    """
    lo, hi = (float("nan") if v is None else float(v) for v in (list(ci or []) + [None, None])[:2])
    if math.isfinite(hi) and hi < 0:
        return ("SA adds information beyond the baselines (the whole interval of the AURC "
                "difference is below 0)")
    if math.isfinite(lo) and lo > 0:
        return ("SA makes the baselines worse here (the whole interval of the AURC "
                "difference is above 0)")
    return ("no evidence that SA adds information beyond the baselines (the interval of the "
            "AURC difference contains 0)")


def added_value(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """Whether SA adds to the baselines, from the calibration ``protoseg estimate`` recorded.

    Reads ``info["calibration"]["combined"]["cv"]["sa_added_value"]``: the out-of-fold
    AURC of the combined estimator (SA + baselines, ``aurc_a``) against the same model on
    the baselines alone (``aurc_b``), their ``difference`` with its paired bootstrap
    ``ci`` and ``p_not_better``. Returns those, ``verdict`` (a sentence) and both models'
    out-of-fold Spearman ρ, or None when the calibration has no combined estimator.
    """
    cal = info.get("calibration")
    combined = cal.get("combined") if isinstance(cal, Mapping) else None
    cv = combined.get("cv") if isinstance(combined, Mapping) else None
    sav = cv.get("sa_added_value") if isinstance(cv, Mapping) else None
    if not isinstance(sav, Mapping) or "difference" not in sav:
        return None
    return {**jsonable(dict(sav)), "verdict": sav.get("verdict") or _verdict(sav.get("ci")),
            "spearman_oof_combined": jsonable(cv.get("spearman_oof"))}


def coverage_summary(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Dice lower bound's coverage check, from ``estimates()["info"]``, or None.

    ``nominal`` (the ``--coverage`` asked for), ``rank_by`` (the estimator bounded),
    ``method`` (``"normalized"`` or ``"constant"``; ``"constant"`` for stores annotated
    before the normalised method existed), ``method_note``, ``n``, ``covered``, ``coverage``
    (the cases of this store whose Dice is at least their bound; None without ground truth),
    ``note``, and when the calibration records the conformity scores of that estimator and
    method, ``n_calibration`` and ``expected`` — the central 95 % range of the coverage given
    that many calibration cases (:func:`engine.quality.conformal.coverage_interval`).
    """
    nominal = info.get("coverage")
    if nominal is None:
        return None
    check = info.get("coverage_check")
    check = dict(check) if isinstance(check, Mapping) else {}
    out: dict[str, Any] = {"nominal": float(nominal), "rank_by": info.get("rank_by"),
                           "n": check.get("n"), "covered": check.get("covered"),
                           "coverage": check.get("coverage"), "note": check.get("note") or ""}
    bound = info.get("bound")
    bound = dict(bound) if isinstance(bound, Mapping) else {}
    out["method"] = str(bound.get("method") or "constant")
    out["method_note"] = str(bound.get("note") or "")
    cal = info.get("calibration")
    conformal = cal.get("conformal") if isinstance(cal, Mapping) else None
    entry = conformal.get(out["rank_by"]) if isinstance(conformal, Mapping) else None
    if out["method"] == "normalized" and isinstance(entry, Mapping):
        entry = entry.get("normalized")
    if isinstance(entry, Mapping) and entry.get("n"):
        from engine.quality.conformal import coverage_interval

        out["n_calibration"] = int(entry["n"])
        out["expected"] = list(coverage_interval(int(entry["n"]), float(nominal)))
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{text(k)}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, np.ndarray) and v.size > 8:
            out[key] = f"array{v.shape}"
        else:
            out[key] = jsonable(v)
    return out


def merge_intervals(row: Mapping[str, Any]) -> dict[str, Any]:
    """For display: ``x, x_lo, x_hi`` (or ``x.r``/``x.value`` + ``x.ci``) -> ``"x [lo, hi]"``."""
    out: dict[str, Any] = {}
    for key, val in row.items():
        if key.endswith(("_lo", "_hi")) and key[:-3] in row:
            continue
        stem, _, leaf = key.rpartition(".")
        if leaf in ("r", "value") and isinstance(row.get(f"{stem}.ci"), (list, tuple)):
            continue  # shown with its interval at the ``.ci`` key
        if f"{key}_lo" in row and f"{key}_hi" in row:
            val = _interval(val, row[f"{key}_lo"], row[f"{key}_hi"])
        elif key.endswith(".ci") and isinstance(val, (list, tuple)) and len(val) == 2:
            stem = key[:-3]
            point = next((f"{stem}.{p}" for p in ("r", "value") if f"{stem}.{p}" in row), None)
            if point is not None:
                out[point] = _interval(row[point], val[0], val[1])
                continue
        out[key] = val
    return out


def _interval(point: Any, lo: Any, hi: Any) -> str:
    if jsonable(lo) is None and jsonable(hi) is None:  # no interval (too few cases)
        return fmt(point)
    return f"{fmt(point)} [{fmt(lo)}, {fmt(hi)}]"


# ----------------------------------------------------------------------------- maps
def _squeeze_class(arr: Any, n_classes: int, k: int) -> np.ndarray | None:
    """A map stored as (*spatial) or (n_classes, *spatial) -> class ``k``'s (*spatial)."""
    if arr is None:
        return None
    a = np.asarray(arr)
    if a.ndim >= 2 and a.shape[0] == n_classes and (n_classes > 1 or a.ndim in (3, 4)):
        return a[k]
    return a


def _case_images(
    maps: Mapping[str, Any], n_classes: int, k: int,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The case-wide maps (input, reference, prediction) of class index ``k``."""
    # layer maps are (*spatial); the case-wide ones may carry a leading class axis
    spatial = next((np.ndim(v["binary"]) for v in maps.values()
                    if isinstance(v, Mapping) and v.get("binary") is not None), None)

    def per_class(arr: Any) -> np.ndarray | None:
        if arr is None:
            return None
        a = np.asarray(arr)
        if spatial is not None:
            return a[k] if a.ndim == spatial + 1 else a
        return _squeeze_class(a, n_classes, k)

    ref = per_class(maps.get("_reference"))
    pred = per_class(maps.get("_prediction"))
    image = maps.get("_image")
    if spatial is None:
        spatial = ref.ndim if ref is not None else (pred.ndim if pred is not None else None)
    if image is not None:
        image = np.asarray(image, dtype=np.float32)
        if spatial is not None and image.ndim == spatial + 1:
            image = image[0] if image.shape[0] != 3 or spatial != 2 else image.mean(axis=0)
    return image, ref, pred


def _drawn_layers(
    maps: Mapping[str, Any], depth_of: Mapping[str, float], n_classes: int, cls: int,
) -> tuple[list[str], dict[str, str], dict[str, list[tuple[int, str]]], str]:
    """The layer entries a map figure of class ``cls`` draws (by depth, at most
    :data:`MAX_MAP_LAYERS`), each key's tensor name, each tensor's unit entries, and the note."""
    keys = [text(key) for key in maps if not text(key).startswith("_")]
    if n_classes > 1:
        suffix = f"[class {cls}]"
        keys = [key for key in keys if key.endswith(suffix)]
    base = {key: (key[: -len(f"[class {cls}]")] if n_classes > 1 else key) for key in keys}
    unit_keys: dict[str, list[tuple[int, str]]] = {}
    for key in list(keys):
        parent, sep, unit = base[key].rpartition("#unit")
        if sep and unit.isdigit():
            unit_keys.setdefault(parent, []).append((int(unit), key))
            keys.remove(key)
    keys.sort(key=lambda key: depth_of.get(base[key], math.inf))
    note = ""
    if len(keys) > MAX_MAP_LAYERS:
        pick = np.unique(np.linspace(0, len(keys) - 1, MAX_MAP_LAYERS).round().astype(int))
        note = f"{len(pick)} of {len(keys)} layers with maps shown, evenly spread over depth"
        keys = [keys[i] for i in pick]
    return keys, base, unit_keys, note


def drawn_map_keys(
    maps: Mapping[str, Any], depth_of: Mapping[str, float], n_classes: int,
    classes: Sequence[int],
) -> set[str]:
    """Every entry of ``maps`` that :func:`case_maps` reads for the given classes: the case-wide
    maps, the first layer entry (its rank tells the spatial axes), and each drawn layer with
    up to 3 of its unit maps. Only the keys are used (a :class:`CaseMaps` reads nothing)."""
    first = next((key for key in maps if not text(key).startswith("_")), None)
    need = {key for key in maps if text(key).startswith("_")} | ({first} if first is not None else set())
    for cls in classes:
        keys, base, unit_keys, _ = _drawn_layers(maps, depth_of, n_classes, cls)
        for key in keys:
            need.add(key)
            need.update(ukey for _, ukey in sorted(unit_keys.get(base[key], []))[:3])
    return need


def case_maps(
    maps: Mapping[str, Any],
    label_of: Mapping[str, str],
    depth_of: Mapping[str, float],
    n_classes: int,
    k: int,
    cls: int,
    best_units: Mapping[str, str],
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, list[MapPanel], str]:
    """One case's maps (``store.maps(case_id)``) as figure panels for class index ``k``.

    Parameters
    ----------
    maps : mapping
        ``store.maps(case_id)``: ``"_image"``, ``"_reference"``, ``"_prediction"`` and one
        ``{"binary", "probability"}`` entry per layer (``"<tensor>[class <c>]"`` in
        multi-class stores; unit maps keyed ``"<tensor>#unit<u>"``).
    label_of, depth_of : mapping
        Display label and depth of each tensor (layers are drawn by depth).
    n_classes, k, cls : int
        Number of classes, the class index drawn and its class value.
    best_units : mapping
        Per tensor, a note shown under its column (its best units for this case).

    Returns
    -------
    image, reference, prediction : ndarray or None
        The case-wide maps of class ``k``.
    panels : list of MapPanel
        One per layer (at most :data:`MAX_MAP_LAYERS`, evenly spread over depth), each
        followed by up to 3 of its unit maps.
    note : str
        Says how many layers were left out (empty when none).
    """
    image, ref, pred = _case_images(maps, n_classes, k)
    keys, base, unit_keys, note = _drawn_layers(maps, depth_of, n_classes, cls)

    def panel(key: str, label: str, note: str = "") -> MapPanel:
        return MapPanel(label=label,
                        binary=_squeeze_class(maps[key].get("binary"), n_classes, k),
                        probability=_squeeze_class(maps[key].get("probability"), n_classes, k),
                        note=note)

    panels = []
    for key in keys:
        name = base[key]
        label = label_of.get(name, name)
        panels.append(panel(key, label, best_units.get(name, "")))
        panels += [panel(ukey, f"{label} unit {unit}")
                   for unit, ukey in sorted(unit_keys.get(name, []))[:3]]
    return image, ref, pred, panels, note
