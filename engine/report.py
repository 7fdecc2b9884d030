"""Reports: one self-contained HTML (or Markdown) file with the paper's figures (issue 6).

:func:`write_report` reads a protoseg store (:func:`engine.store.open_store`) and writes::

    out_dir/
      report.html | report.md       the report (HTML: every figure embedded as a PNG data URI)
      figures/<name>.png, .svg      every figure, both formats
      tables/<name>.csv, .json      layer_summary, unit_summary, input_summary, cases, run,
                                    correlations, validation (each when recorded)

See ``docs/report.md`` for every figure, table column and definition.

The report reads only what it draws: per-layer score arrays (small: cases x classes x
layers), each layer's unit scores one layer at a time, and the maps of at most a few
chosen cases, lazily. It states how many cases it summarised.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import difflib
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine import _figures
from engine.status import Status, describe

__all__ = ["write_report", "layer_summary", "unit_summary", "DEFAULT_MAP_CASES"]

#: Maps are drawn for at most this many cases unless ``max_cases`` says otherwise.
DEFAULT_MAP_CASES = 4
#: Rows of a map figure (layers); more layers are subsampled evenly over depth.
MAX_MAP_LAYERS = 8
#: Classes whose maps are drawn (multi-class stores).
MAX_MAP_CLASSES = 3
#: Case rows shown in the HTML/Markdown table (the CSV/JSON tables hold every case).
MAX_CASE_ROWS = 40

_NAN_STATUSES = [s for s in Status if s != Status.OK]


# ----------------------------------------------------------------------------- helpers
def _text(value: Any) -> str:
    """A store value (bytes, numpy scalar, None) as ``str``."""
    if value is None:
        return ""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _num(value: Any) -> float | int | None:
    """A JSON-safe number: NaN/Inf become ``None``; numpy scalars become Python ones."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    v = float(value)
    return v if math.isfinite(v) else None


def _json_safe(obj: Any) -> Any:
    """Recursively convert numpy containers/scalars to JSON-safe Python (NaN -> None)."""
    if isinstance(obj, Mapping):
        return {_text(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        if obj.dtype.names:
            return [{n: _json_safe(row[n]) for n in obj.dtype.names} for row in obj]
        return _json_safe(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bytes, np.bytes_, np.str_)):
        return _text(obj)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (float, int, np.floating, np.integer)):
        return _num(obj)
    return obj


def _fmt(value: Any, digits: int = 3) -> str:
    """Human display of a table cell (NaN/None -> an en dash)."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}" if math.isfinite(value) else "–"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return _text(value)


def _finite_stats(values: np.ndarray) -> dict[str, float]:
    """mean, sd (ddof=1), median, q25, q75 over the finite entries (NaN when too few)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    out = dict.fromkeys(("mean", "sd", "median", "q25", "q75"), float("nan"))
    if v.size:
        out["mean"] = float(v.mean())
        out["median"] = float(np.median(v))
        out["q25"], out["q75"] = (float(q) for q in np.percentile(v, [25, 75]))
    if v.size > 1:
        out["sd"] = float(v.std(ddof=1))
    return out


def _nanmean_rows(matrix: np.ndarray, axis: int) -> np.ndarray:
    """``nanmean`` without the all-NaN RuntimeWarning (all-NaN -> NaN)."""
    m = np.asarray(matrix, dtype=np.float64)
    ok = np.isfinite(m)
    count = ok.sum(axis=axis)
    total = np.where(ok, m, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _correlations(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Pearson r and Spearman rho over cases where both are finite (NaN with a reason)."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    out: dict[str, Any] = {"n": n, "pearson_r": float("nan"), "spearman_rho": float("nan"),
                           "note": ""}
    if n < 3:
        out["note"] = f"undefined: {n} case(s) with both values, need 3"
    elif np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        out["note"] = "undefined: one of the two is constant"
    else:
        out["pearson_r"] = float(stats.pearsonr(x[ok], y[ok])[0])
        out["spearman_rho"] = float(stats.spearmanr(x[ok], y[ok])[0])
    return out


def _corr_label(c: Mapping[str, Any]) -> str:
    if c["note"]:
        return f"n = {c['n']}, r and ρ {c['note']}"
    return f"n = {c['n']}, r = {c['pearson_r']:.3f}, ρ = {c['spearman_rho']:.3f}"


def _write_table(rows: Sequence[Mapping[str, Any]], stem: Path) -> None:
    """Write ``rows`` (dicts with the same keys) as ``stem.csv`` and ``stem.json``."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    with stem.with_suffix(".csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])
    stem.with_suffix(".json").write_text(
        json.dumps(_json_safe(list(rows)), indent=1, allow_nan=False), encoding="utf-8")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(value) else "NaN"
    if isinstance(value, (int, np.integer, bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_json_safe(value))
    return _text(value)


def _slug(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    return keep.strip("_")[:60] or "x"


# ----------------------------------------------------------------------------- store access
def _open(store_or_path: Any) -> Any:
    if isinstance(store_or_path, (str, Path)):
        path = Path(store_or_path)
        if not path.exists():
            raise FileNotFoundError(
                f"store {str(path)!r} does not exist; pass the .h5 file written by "
                "`protoseg score` (or a Store from engine.open_store)")
        from engine.store import open_store

        return open_store(path)
    needed = ("config", "cases", "layers", "classes", "layer_scores")
    missing = [a for a in needed if not hasattr(store_or_path, a)]
    if missing:
        raise TypeError(
            f"write_report got a {type(store_or_path).__name__} without {missing}; expected "
            "a store path (str or Path) or a Store from engine.open_store")
    return store_or_path


def _optional(store: Any, name: str, *args: Any) -> Any:
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


def _field(table: np.ndarray, name: str, default: Any) -> np.ndarray:
    if table.dtype.names and name in table.dtype.names:
        return table[name]
    return np.full(len(table), default, dtype=object)


def _layer_labels(layers: np.ndarray) -> list[str]:
    names = [_text(v) for v in _field(layers, "name", "")]
    fw = [_text(v) for v in _field(layers, "layer", "")]
    labels = [f or n or f"layer {i}" for i, (n, f) in enumerate(zip(names, fw))]
    # keep labels unique (a framework layer may produce several tensors)
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab in seen:
            labels[i] = f"{lab} [{names[i]}]"
        seen[lab] = i
    return labels


# ----------------------------------------------------------------------------- tables
def layer_summary(
    score: np.ndarray,
    status: np.ndarray,
    layers: np.ndarray,
    classes: Sequence[int],
) -> list[dict[str, Any]]:
    """Per class and layer, the distribution of the layer-level SA over cases.

    Parameters
    ----------
    score : ndarray, shape (n_cases, n_classes, n_layers)
        Layer-level SA (NaN = undefined).
    status : ndarray, shape (n_cases, n_classes, n_layers)
        :class:`~engine.status.Status` codes of the same shape.
    layers : structured ndarray
        The store's layer table (``index, name, layer, op, channels, depth``).
    classes : sequence of int
        The scored classes, one per entry of axis 1.

    Returns
    -------
    list of dict
        One row per (class, layer): ``class, layer_index, name, layer, op, depth, channels,
        mean, sd, median, q25, q75, n_used, n_nan`` and ``nan_<STATUS>`` counts.

    Notes
    -----
    Statistics use the finite scores only; ``sd`` is the sample standard deviation
    (``ddof=1``, NaN with fewer than two cases); quartiles use linear interpolation
    (``numpy.percentile``). ``n_nan`` splits by the status code of the undefined scores.

    Examples
    --------
    >>> import numpy as np
    >>> layers = np.array([(0, "t0", "conv1", "Conv", 4, 1)], dtype=[("index", "i8"),
    ...     ("name", "O"), ("layer", "O"), ("op", "O"), ("channels", "i8"), ("depth", "i8")])
    >>> rows = layer_summary(np.array([[[0.5]], [[np.nan]]]), np.array([[[0]], [[4]]]),
    ...                      layers, [1])
    >>> rows[0]["mean"], rows[0]["n_used"], rows[0]["nan_EMPTY_DICE"]
    (0.5, 1, 1)
    """
    score = np.asarray(score, dtype=np.float64)
    status = np.asarray(status)
    if score.ndim != 3 or score.shape != status.shape:
        raise ValueError(
            f"layer scores have shape {score.shape} and statuses {status.shape}; expected "
            "equal shapes (n_cases, n_classes, n_layers); read them with store.layer_scores()")
    labels = _layer_labels(layers)
    rows = []
    for k, cls in enumerate(classes):
        for j in range(score.shape[2]):
            s = score[:, k, j]
            st = status[:, k, j]
            undefined = ~np.isfinite(s)
            row: dict[str, Any] = {
                "class": int(cls),
                "layer_index": int(_field(layers, "index", j)[j]),
                "name": _text(_field(layers, "name", "")[j]),
                "layer": labels[j],
                "op": _text(_field(layers, "op", "")[j]),
                "depth": _num(_field(layers, "depth", j)[j]),
                "channels": _num(_field(layers, "channels", -1)[j]),
            }
            row.update(_finite_stats(s))
            row["n_used"] = int((~undefined).sum())
            row["n_nan"] = int(undefined.sum())
            for code in _NAN_STATUSES:
                row[f"nan_{code.name}"] = int(np.count_nonzero(undefined & (st == code)))
            rows.append(row)
    return rows


def unit_summary(
    unit_score: np.ndarray,
    *,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Summary of one layer's unit-level SA for one class.

    Parameters
    ----------
    unit_score : ndarray, shape (n_cases, C)
        Unit-level SA of every case and unit (NaN = undefined).
    threshold : float
        A unit counts as *above* when its mean SA over cases is strictly greater.

    Returns
    -------
    dict
        ``unit_mean`` (C,) mean SA per unit over the cases where it is defined, ``units``
        (C), ``n_defined`` (units defined in at least one case), ``n_above``,
        ``fraction_above`` (``n_above / units``), ``best_unit``, ``best_unit_sa``,
        ``mean_unit_sa`` (mean of ``unit_mean`` over defined units).

    Examples
    --------
    >>> import numpy as np
    >>> s = unit_summary(np.array([[0.9, 0.1, np.nan], [0.7, 0.3, np.nan]]), threshold=0.5)
    >>> s["n_above"], s["units"], s["best_unit"]
    (1, 3, 0)
    """
    u = np.asarray(unit_score, dtype=np.float64)
    if u.ndim != 2:
        raise ValueError(f"unit scores have shape {u.shape}; expected (n_cases, C)")
    mean = _nanmean_rows(u, axis=0)
    defined = np.isfinite(mean)
    n_above = int(np.count_nonzero(mean[defined] > threshold))
    best = int(np.nanargmax(mean)) if defined.any() else -1
    return {
        "unit_mean": mean,
        "units": int(u.shape[1]),
        "n_defined": int(defined.sum()),
        "n_above": n_above,
        "fraction_above": n_above / u.shape[1] if u.shape[1] else float("nan"),
        "best_unit": best,
        "best_unit_sa": float(mean[best]) if best >= 0 else float("nan"),
        "mean_unit_sa": float(mean[defined].mean()) if defined.any() else float("nan"),
    }


# ----------------------------------------------------------------------------- estimates
def _per_case_arrays(obj: Any, n_cases: int) -> dict[str, np.ndarray]:
    """Pull per-case numeric arrays out of ``store.estimates()`` / ``store.baselines()``."""
    out: dict[str, np.ndarray] = {}
    if not isinstance(obj, Mapping):
        return out
    for key, val in obj.items():
        if _text(key) == "info":  # store.estimates() puts the estimators' details here
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
            out[_text(key)] = arr.reshape(n_cases, -1)
    return out


def _validation_rows(val: Any) -> list[dict[str, Any]]:
    """Flatten ``store.validation()`` (dict per estimator, records, or structured array).

    The output of :func:`engine.validation.validate` is flattened by its own
    ``validation_rows`` (one row per estimator and scope); anything else generically.
    """
    if val is None:
        return []
    if isinstance(val, Mapping) and val:
        try:
            from engine.validation import validation_rows

            rows = [dict(r) for r in validation_rows(val)]
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
        except (ImportError, KeyError, TypeError, IndexError, AttributeError):
            pass
    if isinstance(val, np.ndarray) and val.dtype.names:
        return [{n: _json_safe(r[n]) for n in val.dtype.names} for r in val]
    if isinstance(val, (list, tuple)):
        return [dict(_flatten(r)) if isinstance(r, Mapping) else {"value": r} for r in val]
    if isinstance(val, Mapping):
        rows = []
        for name, item in val.items():
            if isinstance(item, Mapping):
                row = {"estimator": _text(name)}
                row.update(_flatten(item))
                rows.append(row)
            elif isinstance(item, (list, tuple)) and item and isinstance(item[0], Mapping):
                for r in item:
                    row = {"estimator": _text(name)}
                    row.update(_flatten(r))
                    rows.append(row)
            else:
                rows.append({"estimator": _text(name), "value": _json_safe(item)})
        return rows
    return [{"value": _json_safe(val)}]


def _merge_intervals(row: Mapping[str, Any]) -> dict[str, Any]:
    """For display: ``x, x_lo, x_hi`` (or ``x.r``/``x.value`` + ``x.ci``) -> ``"x [lo, hi]"``."""
    out: dict[str, Any] = {}
    keys = list(row)
    for key in keys:
        val = row[key]
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
    if _num(lo) is None and _num(hi) is None:  # no interval (too few cases): the point alone
        return _fmt(point)
    return f"{_fmt(point)} [{_fmt(lo)}, {_fmt(hi)}]"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{_text(k)}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, np.ndarray) and v.size > 8:
            out[key] = f"array{v.shape}"
        else:
            out[key] = _json_safe(v)
    return out


# ----------------------------------------------------------------------------- maps
def _squeeze_class(arr: Any, n_classes: int, k: int) -> np.ndarray | None:
    """A map stored as (*spatial) or (n_classes, *spatial) -> class ``k``'s (*spatial)."""
    if arr is None:
        return None
    a = np.asarray(arr)
    if a.ndim >= 2 and a.shape[0] == n_classes and (n_classes > 1 or a.ndim in (3, 4)):
        return a[k]
    return a


def _case_maps(
    maps: Mapping[str, Any],
    layer_labels: Mapping[str, str],
    depth_of: Mapping[str, float],
    n_classes: int,
    k: int,
    cls: int,
    best_units: Mapping[str, str],
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, list[Any], str]:
    """One case's maps (``store.maps(case_id)``) as figure panels for class index ``k``."""
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
    keys = [_text(key) for key in maps if not _text(key).startswith("_")]
    if n_classes > 1:
        # multi-class stores key each layer's maps as "<tensor>[class <c>]"
        suffix = f"[class {cls}]"
        keys = [key for key in keys if key.endswith(suffix)]
    base = {key: (key[: -len(f"[class {cls}]")] if n_classes > 1 else key) for key in keys}
    # unit maps, when recorded, are keyed "<tensor>#unit<u>" and drawn after their layer
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
    panels = []
    for key in keys:
        entry = maps[key]
        name = base[key]
        label = layer_labels.get(name, name)
        panels.append(_figures.MapPanel(
            label=label,
            binary=_squeeze_class(entry.get("binary"), n_classes, k),
            probability=_squeeze_class(entry.get("probability"), n_classes, k),
            note=best_units.get(name, ""),
        ))
        for unit, ukey in sorted(unit_keys.get(name, []))[:3]:
            panels.append(_figures.MapPanel(
                label=f"{label} unit {unit}",
                binary=_squeeze_class(maps[ukey].get("binary"), n_classes, k),
                probability=_squeeze_class(maps[ukey].get("probability"), n_classes, k),
            ))
    return image, ref, pred, panels, note


# ----------------------------------------------------------------------------- main
def write_report(
    store_or_path: Any,
    out_dir: str | Path,
    *,
    format: str = "html",
    cases: Iterable[str] | None = None,
    unit_threshold: float = 0.5,
    max_cases: int | None = None,
    estimates: Any = None,
) -> Path:
    """Write the protoseg report of a store: figures, tables and one HTML or Markdown file.

    Parameters
    ----------
    store_or_path : str, Path or Store
        The store written by ``protoseg score`` (path) or an opened :class:`engine.store.Store`.
    out_dir : str or Path
        Folder to write into (created; existing report files are replaced).
    format : {"html", "md"}
        ``"html"``: ``report.html``, one self-contained file (figures embedded as PNG data
        URIs, no network, no JavaScript). ``"md"``: ``report.md``, a Markdown summary with
        tables and relative links to ``figures/*.png``.
    cases : iterable of str, optional
        Case ids whose segmentation-ability maps are drawn (each must have maps in the
        store). Default: the first cases with maps.
    unit_threshold : float
        Units whose mean SA over cases is above this value are counted per layer.
    max_cases : int, optional
        At most this many cases get map figures (default :data:`DEFAULT_MAP_CASES` when
        ``cases`` is not given, otherwise all given cases). Statistics always use every case.
    estimates : str, Path or Store, optional
        A second store holding the label-free estimates and their validation (the store
        written by ``protoseg estimate``). Its ``estimates()`` and ``validation()`` are
        shown instead of the main store's; estimates are matched to cases by id (NaN for
        cases it lacks).

    Returns
    -------
    Path
        The report file (``out_dir/report.html`` or ``out_dir/report.md``).

    Raises
    ------
    FileNotFoundError
        The store path does not exist.
    TypeError
        ``store_or_path`` is neither a path nor a Store.
    ValueError
        Bad ``format``, ``unit_threshold`` or ``max_cases``; a requested case has no maps.
    KeyError
        A requested case id is not in the store (the message lists the closest ids).

    Notes
    -----
    Figures: SA against layer depth (mean and interquartile band per class), unit SA per
    layer (sorted bars, or a histogram above 96 units), maps for the chosen cases (3-D:
    the slice with the most reference foreground on each axis), the quality estimate(s)
    and the input SA against the output's Dice with Pearson r and Spearman ρ (when the
    store holds ground-truth Dice). Tables are written as CSV and JSON (NaN is ``NaN`` in
    CSV, ``null`` in JSON).

    Examples
    --------
    >>> from engine.report import write_report
    >>> write_report("run.h5", "run-report")          # doctest: +SKIP
    PosixPath('run-report/report.html')
    """
    if format not in ("html", "md"):
        raise ValueError(f"format={format!r}; expected 'html' or 'md'")
    try:
        unit_threshold = float(unit_threshold)
    except (TypeError, ValueError):
        raise TypeError(
            f"unit_threshold={unit_threshold!r}; expected a number in [0, 1]") from None
    if not 0.0 <= unit_threshold <= 1.0:
        raise ValueError(f"unit_threshold={unit_threshold}; expected a number in [0, 1]")
    if max_cases is not None and (not isinstance(max_cases, (int, np.integer))
                                  or isinstance(max_cases, bool) or max_cases < 0):
        raise ValueError(f"max_cases={max_cases!r}; expected a non-negative int or None")
    store = _open(store_or_path)
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    est_store = None if estimates is None else _open(estimates)
    builder = _ReportBuilder(store, out, unit_threshold=unit_threshold, est_store=est_store)
    builder.collect(cases=None if cases is None else [str(c) for c in cases],
                    max_cases=max_cases)
    if format == "html":
        path = out / "report.html"
        path.write_text(builder.html(), encoding="utf-8")
    else:
        path = out / "report.md"
        path.write_text(builder.markdown(), encoding="utf-8")
    return path


class _ReportBuilder:
    """Collects tables and figures once, then renders HTML or Markdown."""

    def __init__(self, store: Any, out: Path, *, unit_threshold: float,
                 est_store: Any = None) -> None:
        self.store = store
        self.est_store = est_store
        self.out = out
        self.threshold = unit_threshold
        self.sections: list[dict[str, Any]] = []  # {id, title, blocks}
        self.figures: dict[str, bytes] = {}

    # -- building blocks: ("p", text) | ("table", caption, rows, columns) | ("fig", name, caption)
    def _figure(self, fig: Any, name: str) -> str:
        stem, i = name, 1
        while name in self.figures:  # two case ids may share a file-name slug
            i += 1
            name = f"{stem}-{i}"
        self.figures[name] = _figures.save_figure(fig, self.out / "figures" / name)
        return name

    def collect(self, *, cases: list[str] | None, max_cases: int | None) -> None:
        st = self.store
        self.config = dict(getattr(st, "config", None) or {})
        self.provenance = dict(getattr(st, "provenance", None) or {})
        self.cases = np.asarray(st.cases)
        self.ids = [_text(v) for v in _field(self.cases, "id", "")]
        self.n_cases = len(self.ids)
        self.layers = np.asarray(st.layers)
        self.labels = _layer_labels(self.layers)
        self.classes = [int(c) for c in st.classes]
        self.n_classes = len(self.classes)
        shape = (self.n_cases, self.n_classes, len(self.layers))
        ls = _optional(st, "layer_scores")  # None: no case was scored (empty store)
        if ls is None or "score" not in ls:
            ls = {"score": np.full(shape, np.nan),
                  "status": np.full(shape, int(Status.NOT_COMPUTED), np.uint8)}
        self.score = np.asarray(ls["score"], dtype=np.float64).reshape(shape)
        self.status = np.asarray(ls["status"]).reshape(shape)
        self.depth = np.asarray(_field(self.layers, "depth", 0), dtype=np.float64)
        if not np.all(np.isfinite(self.depth)):
            self.depth = np.arange(len(self.layers), dtype=np.float64)
        # drawing order: by depth, ties (parallel branches) by layer index
        self.order = np.lexsort((np.arange(len(self.layers)), self.depth))

        dice_all = _optional(self.store, "output_dice")
        if dice_all is None:
            dice_all = np.asarray(_field(self.cases, "output_dice", np.nan), dtype=np.float64
                                  ).reshape(-1, 1)
        self.dice = np.asarray(dice_all, dtype=np.float64).reshape(self.n_cases, -1) \
            if np.size(dice_all) else np.full((self.n_cases, self.n_classes), np.nan)

        self._run_section()
        self._depth_section()
        self._unit_section(cases, max_cases)
        self._maps_section()
        self._quality_section()
        self._validation_section()
        self._cases_section()

    # -- sections -----------------------------------------------------------------
    def _section(self, sid: str, title: str) -> list[Any]:
        blocks: list[Any] = []
        self.sections.append({"id": sid, "title": title, "blocks": blocks})
        return blocks

    def _run_section(self) -> None:
        b = self._section("run", "Run")
        prov, cfg = self.provenance, self.config
        statuses = [_text(s) for s in _field(self.cases, "status", "ok")]
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s] = counts.get(s, 0) + 1
        timings = {k: v for k, v in prov.items()
                   if any(t in k.lower() for t in ("time", "second", "duration", "started",
                                                    "finished", "elapsed"))}
        model = prov.get("model") or prov.get("model_path") or cfg.get("model") or "not recorded"
        summary = [
            ("model", model),
            ("model sha256", prov.get("model_sha256") or prov.get("sha256") or "not recorded"),
            ("protoseg version", prov.get("protoseg_version") or prov.get("version")
             or "not recorded"),
            ("provider", prov.get("provider") or "not recorded"),
            ("optimisation", prov.get("optimization") or prov.get("optimisation")
             or "not recorded"),
            ("store version", _text(getattr(self.store, "version", "")) or "not recorded"),
            ("cases", f"{self.n_cases} (summarised {self.n_cases} cases)"),
            ("classes", ", ".join(str(c) for c in self.classes)),
            ("hidden tensors scored", str(len(self.layers))),
            ("unit level", "recorded" if getattr(self.store, "has_units", False)
             else "not recorded"),
        ]
        b.append(("p", f"Summarised {self.n_cases} cases, {len(self.layers)} hidden tensors, "
                       f"{self.n_classes} class(es)."))
        self.run_rows = [{"key": k, "value": _json_safe(v)} for k, v in summary]
        b.append(("table", "Summary", [{"key": r["key"], "value": _kv(r["value"])}
                                       for r in self.run_rows], ["key", "value"]))
        status_rows = [{"case status": k, "cases": v} for k, v in sorted(counts.items())]
        b.append(("table", "Case statuses", status_rows, ["case status", "cases"]))
        b.append(("table", "Configuration (settings that change the numbers)",
                  [{"setting": k, "value": _kv(v)} for k, v in cfg.items()]
                  or [{"setting": "not recorded", "value": ""}], ["setting", "value"]))
        b.append(("table", "Timings", [{"item": k, "value": _kv(v)}
                                       for k, v in timings.items()]
                  or [{"item": "not recorded", "value": ""}], ["item", "value"]))
        b.append(("table", "Provenance", [{"item": k, "value": _kv(v)}
                                          for k, v in prov.items()]
                  or [{"item": "not recorded", "value": ""}], ["item", "value"]))
        _write_table(self.run_rows + [{"key": f"config.{k}", "value": _json_safe(v)}
                                      for k, v in cfg.items()]
                     + [{"key": f"provenance.{k}", "value": _json_safe(v)}
                        for k, v in prov.items()]
                     + [{"key": f"case_status.{k}", "value": v} for k, v in counts.items()],
                     self.out / "tables" / "run")

    def _caption_settings(self) -> str:
        cfg = self.config
        return (f"guide = {cfg.get('guide', 'not recorded')}, "
                f"reference = {cfg.get('reference', 'not recorded')}, "
                f"resize = {cfg.get('resize', 'not recorded')}")

    def _depth_section(self) -> None:
        b = self._section("depth", "SA against layer depth")
        rows = layer_summary(self.score, self.status, self.layers, self.classes)
        self.layer_rows = rows
        _write_table(rows, self.out / "tables" / "layer_summary")
        inp = _optional(self.store, "input_scores")
        self.input_score = None
        input_series = []
        if inp is not None and "score" in inp and np.size(inp["score"]):
            self.input_score = np.asarray(inp["score"], dtype=np.float64)
            input_series = [(f"class {c}", self.input_score[:, k, 0])
                            for k, c in enumerate(self.classes)]
        if len(self.layers) == 0 or self.n_cases == 0:
            b.append(("p", "Layer-level SA: not recorded (no layers or no cases)."))
            return
        for k, c in enumerate(self.classes[:4]):
            ranked = [r for r in rows if r["class"] == c and np.isfinite(r["mean"])]
            if ranked:
                hi = max(ranked, key=lambda r: r["mean"])
                lo = min(ranked, key=lambda r: r["mean"])
                b.append(("p", f"Class {c}: highest mean SA {hi['mean']:.3f} at {hi['layer']} "
                               f"(depth {_fmt(hi['depth'])}); lowest {lo['mean']:.3f} at "
                               f"{lo['layer']} (depth {_fmt(lo['depth'])})."))
        o = self.order
        series = [(f"class {c}", self.score[:, k, o]) for k, c in enumerate(self.classes)]
        fig = _figures.fig_sa_depth(np.arange(len(o), dtype=np.float64),
                                    [self.labels[j] for j in o], series,
                                    input_series=input_series, title="Layer-level SA by depth")
        b.append(("fig", self._figure(fig, "sa_depth"),
                  f"Layer-level SA against depth (layers ordered by their depth in the graph): "
                  f"mean over cases (line) and interquartile range (band), per class; {self._caption_settings()}. "
                  f"Undefined scores (NaN) are left out; see n_nan in the table. "
                  f"{self.n_cases} cases."))
        cols = ["class", "layer", "depth", "channels", "mean", "sd", "median", "q25", "q75",
                "n_used", "n_nan"]
        nan_cols = [f"nan_{s.name}" for s in _NAN_STATUSES
                    if any(r[f"nan_{s.name}"] for r in rows)]
        b.append(("table", "Layer summary (tables/layer_summary.csv)", rows, cols + nan_cols))
        if nan_cols:
            b.append(("p", "Undefined scores by cause: " + "; ".join(
                f"{s.name}: {describe(s)}" for s in _NAN_STATUSES if f"nan_{s.name}" in nan_cols)
                + "."))
        if self.input_score is not None:
            irows = []
            for k, c in enumerate(self.classes):
                for j in range(self.input_score.shape[2]):
                    row = {"class": c, "input": "all channels" if j == 0 else f"channel {j - 1}"}
                    row.update(_finite_stats(self.input_score[:, k, j]))
                    row["n_used"] = int(np.isfinite(self.input_score[:, k, j]).sum())
                    irows.append(row)
            _write_table(irows, self.out / "tables" / "input_summary")
            b.append(("table", "Input SA (tables/input_summary.csv)", irows,
                      ["class", "input", "mean", "sd", "median", "q25", "q75", "n_used"]))
        else:
            b.append(("p", "Input SA: not recorded."))

    def _unit_section(self, cases: list[str] | None, max_cases: int | None) -> None:
        b = self._section("units", "Unit SA per layer")
        # choose the map cases now (their best units are read with the unit scores)
        map_ids = [_text(v) for v in (_optional(self.store, "map_case_ids") or [])]
        if cases is not None:
            for c in cases:
                if c not in self.ids:
                    close = difflib.get_close_matches(c, self.ids, n=5)
                    raise KeyError(f"case {c!r} is not in the store; closest ids: {close}"
                                   if close else f"case {c!r} is not in the store "
                                   f"({self.n_cases} cases, e.g. {self.ids[:5]})")
                if c not in map_ids:
                    raise ValueError(
                        f"case {c!r} has no maps in the store; cases with maps: {map_ids[:10]}"
                        "; score again with save_maps including it")
            chosen = cases if max_cases is None else cases[:max_cases]
        else:
            chosen = map_ids[: DEFAULT_MAP_CASES if max_cases is None else max_cases]
        self.map_ids_all = map_ids
        self.map_cases = chosen
        idx_of = {c: i for i, c in enumerate(self.ids)}
        self.best_units: dict[str, dict[int, dict[str, str]]] = {c: {} for c in chosen}
        self.unit_rows: list[dict[str, Any]] = []
        if not getattr(self.store, "has_units", False):
            b.append(("p", "Unit-level SA: not recorded (score with level='unit' or 'both')."))
            return
        panels: dict[int, list[tuple[str, np.ndarray]]] = {k: [] for k in range(self.n_classes)}
        names = [_text(v) for v in _field(self.layers, "name", "")]
        indices = [int(v) for v in _field(self.layers, "index", 0)]
        for j in self.order:
            name, index = names[j], indices[j]
            us = _optional(self.store, "unit_scores", index)
            if us is None:
                continue
            u = np.asarray(us["score"], dtype=np.float64)  # (n_cases, n_classes, C)
            for k, cls in enumerate(self.classes):
                s = unit_summary(u[:, k, :], threshold=self.threshold)
                panels[k].append((self.labels[j], s["unit_mean"]))
                self.unit_rows.append({
                    "class": cls, "layer_index": index, "name": name, "layer": self.labels[j],
                    "depth": _num(self.depth[j]), "units": s["units"],
                    "n_defined": s["n_defined"], "threshold": self.threshold,
                    "n_above": s["n_above"], "fraction_above": s["fraction_above"],
                    "mean_unit_sa": s["mean_unit_sa"], "best_unit": s["best_unit"],
                    "best_unit_sa": s["best_unit_sa"]})
                for c in chosen:
                    row = u[idx_of[c], k, :]
                    ok = np.flatnonzero(np.isfinite(row))
                    top = ok[np.argsort(-row[ok], kind="stable")][:3]
                    if top.size:
                        self.best_units[c].setdefault(k, {})[name] = "best units: " + ", ".join(
                            f"{t} ({row[t]:.2f})" for t in top)
        if not self.unit_rows:
            b.append(("p", "Unit-level SA: not recorded for any layer."))
            return
        _write_table(self.unit_rows, self.out / "tables" / "unit_summary")
        for k, cls in enumerate(self.classes[:4]):
            fig = _figures.fig_units(panels[k], self.threshold,
                                     title=f"Unit SA per layer, class {cls} "
                                           f"(mean over {self.n_cases} cases)")
            b.append(("fig", self._figure(fig, f"unit_sa_class{cls}"),
                      f"Class {cls}: each unit's SA (mean over cases where defined), sorted; "
                      f"green bars are above the threshold {self.threshold:g}. Layers with "
                      f"more than 96 units are drawn as histograms. {self._caption_settings()}."))
        if self.n_classes > 4:
            b.append(("p", f"Unit figures drawn for the first 4 of {self.n_classes} classes; "
                           "the table covers all."))
        b.append(("table", f"Units above {self.threshold:g} (tables/unit_summary.csv)",
                  self.unit_rows, ["class", "layer", "units", "n_defined", "n_above",
                                   "fraction_above", "mean_unit_sa", "best_unit",
                                   "best_unit_sa"]))

    def _maps_section(self) -> None:
        b = self._section("maps", "Segmentation-ability maps")
        if not self.map_ids_all:
            b.append(("p", "Maps: not recorded (score with save_maps to keep maps of chosen "
                           "cases)."))
            return
        b.append(("p", f"Maps drawn for {len(self.map_cases)} of {len(self.map_ids_all)} "
                       f"cases with maps (read one case at a time). Red: binary map; "
                       f"colour scale: probability 0 (black) to 1 (yellow); yellow/cyan "
                       f"outline: the reference. {self._caption_settings()}."))
        names = [_text(v) for v in _field(self.layers, "name", "")]
        fw = [_text(v) for v in _field(self.layers, "layer", "")]
        label_of = {}
        depth_of = {}
        for j, (n, f) in enumerate(zip(names, fw)):
            for key in (n, f):
                if key:
                    label_of.setdefault(key, self.labels[j])
                    depth_of.setdefault(key, float(self.depth[j]))
        idx_of = {c: i for i, c in enumerate(self.ids)}
        n_drawn = min(self.n_classes, MAX_MAP_CLASSES)
        if self.n_classes > n_drawn:
            b.append(("p", f"Maps drawn for the first {n_drawn} of {self.n_classes} classes."))
        for c in self.map_cases:
            maps = self.store.maps(c)  # this case only, read once for every class
            for k in range(n_drawn):
                cls = self.classes[k]
                image, ref, pred, panels, note = _case_maps(
                    maps, label_of, depth_of, self.n_classes, k, cls,
                    self.best_units.get(c, {}).get(k, {}))
                dice = self.dice[idx_of[c], k] if k < self.dice.shape[1] else np.nan
                title = f"case {c}" + (f", class {cls}" if self.n_classes > 1 else "") + (
                    f" (output Dice {float(dice):.3f})" if np.isfinite(float(dice)) else "")
                fig = _figures.fig_maps(image, ref, pred, panels, title=title)
                caption = (f"Case {c}, class {cls}: input, prediction and each layer's binary "
                           "and probability maps.")
                if note:
                    caption += f" {note}."
                if ref is not None and ref.ndim == 3:
                    caption += " 3-D: on each axis, the slice with the most reference foreground."
                name = f"maps_{_slug(c)}" + (f"_class{cls}" if self.n_classes > 1 else "")
                b.append(("fig", self._figure(fig, name), caption))

    def _quality_section(self) -> None:
        b = self._section("quality", "Quality estimate and input SA against output Dice")
        self.mean_layer_sa = _nanmean_rows(self.score, axis=2)  # (n_cases, n_classes)
        self.estimates, self.estimate_extras = self._read_estimates()
        self.baseline_values = _per_case_arrays(_optional(self.store, "baselines"),
                                                self.n_cases)
        self.corr_rows: list[dict[str, Any]] = []
        has_dice = bool(np.isfinite(self.dice).any())
        if not has_dice:
            b.append(("p", "Output Dice: not recorded (no ground truth), so estimates cannot be "
                           "compared with the output's quality here."))
            return
        d0 = self.dice[:, 0]
        n_dice = int(np.isfinite(d0).sum())
        draw = n_dice >= 3
        if not draw:
            b.append(("p", f"Scatter plots need at least 3 cases with ground truth; this store "
                           f"has {n_dice}. The values are in the table below."))
        panels = []
        if self.estimates:
            sources = [(f"estimate: {n}", a[:, 0]) for n, a in self.estimates.items()]
        else:
            sources = [("mean layer-level SA (all layers)", self.mean_layer_sa[:, 0])]
        for label, x in sources:
            c = _correlations(x, d0)
            self.corr_rows.append({"x": label, "y": "output Dice", **c})
            panels.append((x, d0, label, "output Dice", _corr_label(c)))
        if self.input_score is not None:
            x = self.input_score[:, 0, 0]
            c = _correlations(x, d0)
            self.corr_rows.append({"x": "input SA", "y": "output Dice", **c})
            panels.append((x, d0, "input SA", "output Dice", _corr_label(c)))
        src = ("the recorded estimates" if self.estimates else
               "the mean layer-level SA over all layers (no estimates recorded)")
        if draw:
            fig = _figures.fig_scatter(panels, title=f"Against the output's Dice, class "
                                                     f"{self.classes[0]}")
            b.append(("fig", self._figure(fig, "sa_vs_dice"),
                      f"Each point is a case: {src} and the input SA against the output's "
                      f"Dice (ground truth). r: Pearson; ρ: Spearman; cases with either value "
                      f"undefined are left out."))
        if not self.estimates:
            b.append(("p", "Quality estimates: not recorded (run `protoseg estimate`)."))
        if self.input_score is None:
            b.append(("p", "Input SA: not recorded."))
        if self.baseline_values:
            panels = []
            for name, a in self.baseline_values.items():
                c = _correlations(a[:, 0], d0)
                self.corr_rows.append({"x": f"baseline: {name}", "y": "output Dice", **c})
                panels.append((a[:, 0], d0, f"baseline: {name}", "output Dice",
                               _corr_label(c)))
            if draw:
                fig = _figures.fig_scatter(panels, title="Baselines against the output's Dice")
                b.append(("fig", self._figure(fig, "baselines_vs_dice"),
                          "Trivial baselines against the output's Dice: an estimate is useful "
                          "only where it beats them."))
        b.append(("table", "Correlations with the output's Dice", self.corr_rows,
                  ["x", "y", "n", "pearson_r", "spearman_rho", "note"]))
        _write_table(self.corr_rows, self.out / "tables" / "correlations")

    def _read_estimates(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-case estimates to draw, and other per-case values (flags...) for the table.

        Read from the estimate store (matched by case id) when given, else the main store.
        The estimators are those named in ``estimates()["info"]["estimators"]`` when
        recorded, else every floating-point array; integer/bool arrays are never drawn.
        """
        src = self.est_store if self.est_store is not None else self.store
        raw_obj = _optional(src, "estimates")
        if not isinstance(raw_obj, Mapping):
            return {}, {}
        other_ids = [_text(v) for v in _field(np.asarray(src.cases), "id", "")]
        raw = _per_case_arrays(raw_obj, len(other_ids))
        info = raw_obj.get("info")
        named = info.get("estimators") if isinstance(info, Mapping) else None
        if named:
            drawn = [n for n in (_text(x) for x in named) if n in raw]
        else:
            drawn = [n for n in raw if np.asarray(raw_obj[n]).dtype.kind == "f"]
        if src is not self.store:
            pos = {c: i for i, c in enumerate(other_ids)}
            take = np.array([pos.get(c, -1) for c in self.ids], dtype=np.intp)
            hit = take >= 0
            for name, arr in list(raw.items()):
                a = np.full((self.n_cases, arr.shape[1]), np.nan)
                a[hit] = arr[take[hit]]
                raw[name] = a
        return ({n: raw[n] for n in drawn},
                {n: a for n, a in raw.items() if n not in drawn})

    def _validation_section(self) -> None:
        b = self._section("validation", "Validation")
        rows = _validation_rows(_optional(self.est_store or self.store, "validation"))
        self.validation_rows = rows
        if not rows:
            b.append(("p", "Validation: not recorded (run `protoseg estimate` on a store with "
                           "ground truth)."))
            return
        _write_table(rows, self.out / "tables" / "validation")
        shown = [_merge_intervals(r) for r in rows]
        cols: list[str] = []
        for r in shown:
            cols += [k for k in r if k not in cols]
        b.append(("table", "Validation of each estimate and baseline against the output's "
                           "Dice, with 95 % bootstrap intervals (tables/validation.csv)",
                  shown, cols))

    def _cases_section(self) -> None:
        b = self._section("cases", "Cases")
        rows = []
        groups = [_text(v) for v in _field(self.cases, "group", "")]
        statuses = [_text(v) for v in _field(self.cases, "status", "ok")]
        defined = np.isfinite(self.score).sum(axis=2)
        multi = self.n_classes > 1
        for i, cid in enumerate(self.ids):
            row: dict[str, Any] = {"id": cid, "status": statuses[i], "group": groups[i]}
            for k, cls in enumerate(self.classes):
                sfx = f"_class{cls}" if multi else ""
                row[f"output_dice{sfx}"] = self.dice[i, k] if k < self.dice.shape[1] else None
                row[f"mean_layer_sa{sfx}"] = self.mean_layer_sa[i, k]
                row[f"layers_defined{sfx}"] = int(defined[i, k])
                if self.input_score is not None:
                    row[f"input_sa{sfx}"] = self.input_score[i, k, 0]
                for name, a in self.estimates.items():
                    row[f"estimate_{name}{sfx}"] = a[i, k] if k < a.shape[1] else a[i, 0]
                for name, a in self.baseline_values.items():
                    row[f"baseline_{name}{sfx}"] = a[i, k] if k < a.shape[1] else a[i, 0]
                for name, a in self.estimate_extras.items():
                    row[f"{name}{sfx}"] = a[i, k] if k < a.shape[1] else a[i, 0]
            rows.append(row)
        _write_table(rows, self.out / "tables" / "cases")
        key = "mean_layer_sa_class%d" % self.classes[0] if multi else "mean_layer_sa"
        order = sorted(range(len(rows)), key=lambda i: (not np.isfinite(rows[i][key]),
                                                        rows[i][key]))
        shown = [rows[i] for i in order[:MAX_CASE_ROWS]]
        cols = list(rows[0]) if rows else ["id"]
        b.append(("p", f"{len(rows)} cases in tables/cases.csv; the {len(shown)} with the "
                       f"lowest mean layer-level SA are listed."))
        b.append(("table", "Cases, lowest mean layer-level SA first", shown, cols))

    # -- rendering ------------------------------------------------------------------
    def html(self) -> str:
        e = html.escape
        title = f"protoseg report — {self.run_rows[0]['value']}"
        parts = [
            "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(_text(title))}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
            f"<header><h1>protoseg report</h1><p class=\"sub\">{e(_text(self.run_rows[0]['value']))}"
            f" · summarised {self.n_cases} cases · {len(self.layers)} hidden tensors · "
            f"{e(self._caption_settings())}</p>",
            "<nav>" + " ".join(f'<a href="#{s["id"]}">{e(s["title"])}</a>'
                               for s in self.sections) + "</nav></header>", "<main>",
        ]
        for sec in self.sections:
            parts.append(f'<section id="{sec["id"]}"><h2>{e(sec["title"])}</h2>')
            blocks = sec["blocks"]
            i = 0
            while i < len(blocks):
                j = i
                while j < len(blocks) and blocks[j][0] == "table":
                    j += 1
                if j - i > 1:  # consecutive small tables sit side by side
                    parts.append('<div class="row">')
                    parts += [self._html_block(blk) for blk in blocks[i:j]]
                    parts.append("</div>")
                    i = j
                else:
                    parts.append(self._html_block(blocks[i]))
                    i += 1
            parts.append("</section>")
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        parts += ["</main>", f"<footer>Written by protoseg on {e(now)}. Figures and tables: "
                  "figures/ and tables/ beside this file.</footer>", "</body>", "</html>"]
        return "\n".join(parts) + "\n"

    def _html_block(self, block: tuple[Any, ...]) -> str:
        e = html.escape
        kind = block[0]
        if kind == "p":
            return f"<p>{e(block[1])}</p>"
        if kind == "fig":
            name, caption = block[1], block[2]
            data = base64.b64encode(self.figures[name]).decode("ascii")
            links = (f' <a href="figures/{e(name)}.png">PNG</a> · '
                     f'<a href="figures/{e(name)}.svg">SVG</a>')
            return (f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                    f"<figcaption>{e(caption)}{links}</figcaption></figure>")
        _, caption, rows, cols = block
        head = "".join(f"<th>{e(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(_td(r.get(c)) for c in cols) + "</tr>" for r in rows)
        return (f'<div class="tbl"><table><caption>{e(caption)}</caption><thead><tr>{head}'
                f"</tr></thead><tbody>{body}</tbody></table></div>")

    def markdown(self) -> str:
        lines = ["# protoseg report", "",
                 f"Model: {_md(self.run_rows[0]['value'])} · summarised {self.n_cases} cases · "
                 f"{len(self.layers)} hidden tensors · {_md(self._caption_settings())}", ""]
        for sec in self.sections:
            lines += [f"## {sec['title']}", ""]
            for block in sec["blocks"]:
                kind = block[0]
                if kind == "p":
                    lines += [_md(block[1]), ""]
                elif kind == "fig":
                    lines += [f"![{block[1]}](figures/{block[1]}.png)", "",
                              f"*{_md(block[2])}* ([SVG](figures/{block[1]}.svg))", ""]
                else:
                    _, caption, rows, cols = block
                    lines += [f"**{_md(caption)}**", "",
                              "| " + " | ".join(_md(c) for c in cols) + " |",
                              "|" + "---|" * len(cols)]
                    lines += ["| " + " | ".join(_md(_short(_fmt(r.get(c)))) for c in cols)
                              + " |" for r in rows]
                    lines.append("")
        return "\n".join(lines)


def _td(value: Any) -> str:
    """One HTML table cell: numbers right-aligned, text left-aligned and wrapped."""
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))
    cls = ' class="n"' if numeric or value is None else ""
    return f"<td{cls}>{html.escape(_fmt(value))}</td>"


def _kv(value: Any) -> str:
    """A configuration/provenance value as display text (JSON for containers)."""
    value = _json_safe(value)
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value, separators=(", ", ": "))
    return _text(value)


def _short(text: str, limit: int = 160) -> str:
    """Markdown cells stay short (full values are in tables/*.csv)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md(text: Any) -> str:
    """Escape a cell for a Markdown table."""
    return _text(text).replace("|", "\\|").replace("\n", " ")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#222;
background:#fafafa;line-height:1.45}
header{background:#24323f;color:#fff;padding:1em 2em}header h1{margin:0;font-size:1.6em}
.sub{margin:.3em 0;color:#cfd8dc;font-size:.95em}
nav a{color:#9fd3ff;margin-right:1.2em;text-decoration:none;font-size:.9em}
main{max-width:1200px;margin:0 auto;padding:0 1.5em 2em}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:1.2em 0;
padding:.4em 1.4em 1em}
h2{border-bottom:2px solid #24323f;padding-bottom:.2em;font-size:1.25em}
figure{margin:1em 0;text-align:center}figure img{max-width:100%;height:auto;
border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em;text-align:left}
.tbl{overflow-x:auto;margin:.8em 0;max-width:100%}
.row{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}
table{border-collapse:collapse;font-size:.82em}caption{text-align:left;font-weight:600;white-space:nowrap;
padding:.3em 0}
th,td{border:1px solid #ddd;padding:.2em .55em;text-align:left;vertical-align:top}
td{max-width:46em;overflow-wrap:break-word}td.n{text-align:right;white-space:nowrap}
th{background:#eef2f5;white-space:nowrap}
tbody tr:nth-child(even){background:#f7f9fa}
footer{color:#777;font-size:.8em;text-align:center;padding:1em}
""".replace("\n", "")
