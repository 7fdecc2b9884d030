"""The report's numeric tables: per-layer and per-unit summaries, input SA, correlations.

Every function here takes arrays (no store): :func:`layer_summary` is also what
``protoseg score`` and ``protoseg report`` print. :func:`write_table` writes a list of rows
as CSV and JSON; :func:`fmt` and :func:`value_text` are the one display formatting of a
table cell, used by both renderers.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine._json import dumps, jsonable, text
from engine.status import Status

__all__ = [
    "NAN_STATUSES",
    "correlation_label",
    "correlations",
    "field",
    "finite_stats",
    "fmt",
    "input_summary",
    "layer_labels",
    "layer_summary",
    "nanmean_rows",
    "plural",
    "text_column",
    "unit_summary",
    "value_text",
    "write_table",
]

#: The status codes of undefined scores, in the order of the ``nan_<STATUS>`` columns.
NAN_STATUSES = [s for s in Status if s != Status.OK]


# ----------------------------------------------------------------------------- cells
def fmt(value: Any, digits: int = 3) -> str:
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
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    return text(value)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and the noun in the right number: ``plural(1, "case")`` is ``"1 case"``,
    ``plural(2, "class", "classes")`` is ``"2 classes"``."""
    n = int(n)
    return f"{n} {word if n == 1 else (many or word + 's')}"


def value_text(value: Any) -> str:
    """A configuration/provenance value as display text (JSON for containers)."""
    value = jsonable(value, default=str)
    if isinstance(value, (dict, list, bool)):
        return dumps(value, separators=(", ", ": "))
    return "" if value is None else text(value)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(value) else "NaN"
    if isinstance(value, (int, np.integer, bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (list, tuple, dict)):
        return dumps(value)
    return text(value)


def write_table(rows: Sequence[Mapping[str, Any]], stem: Path) -> None:
    """Write ``rows`` (dicts, columns in order of first appearance) as CSV and JSON.

    Parameters
    ----------
    rows : sequence of mapping
        One dict per row; a row may lack a column (an empty CSV cell, absent in JSON).
    stem : Path
        Output path without suffix: ``stem.csv`` and ``stem.json`` are written.

    Notes
    -----
    CSV writes NaN as ``NaN`` and containers as JSON; JSON (a list of row objects, through
    :func:`engine._json.jsonable`) writes NaN as ``null``.
    """
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
    stem.with_suffix(".json").write_text(dumps(list(rows), indent=1), encoding="utf-8")


# ----------------------------------------------------------------------------- statistics
def finite_stats(values: np.ndarray) -> dict[str, float]:
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


def nanmean_rows(matrix: np.ndarray, axis: int) -> np.ndarray:
    """``nanmean`` without the all-NaN RuntimeWarning (all-NaN -> NaN)."""
    m = np.asarray(matrix, dtype=np.float64)
    ok = np.isfinite(m)
    count = ok.sum(axis=axis)
    total = np.where(ok, m, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Pearson r and Spearman rho over cases where both are finite (NaN with a reason).

    Parameters
    ----------
    x, y : ndarray, shape (n_cases,)
        The two variables (NaN = undefined; such cases are left out).

    Returns
    -------
    dict
        ``n`` (cases used), ``pearson_r``, ``spearman_rho`` (``scipy.stats``) and ``note``
        (why they are NaN: fewer than 3 cases, or a constant variable; else empty).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    out: dict[str, Any] = {"n": n, "pearson_r": float("nan"), "spearman_rho": float("nan"),
                           "note": ""}
    if n < 3:
        out["note"] = f"undefined: {plural(n, 'case')} with both values, need 3"
    elif np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        out["note"] = "undefined: one of the two is constant"
    else:
        # imported only here: scipy.stats takes longer to import than the rest of the report,
        # and a report of fewer than 3 cases (``protoseg demo``) never needs it
        from scipy import stats

        out["pearson_r"] = float(stats.pearsonr(x[ok], y[ok])[0])
        out["spearman_rho"] = float(stats.spearmanr(x[ok], y[ok])[0])
    return out


def correlation_label(c: Mapping[str, Any]) -> str:
    """A scatter panel's title from a :func:`correlations` result."""
    if c["note"]:
        return f"n = {c['n']}, r and ρ {c['note']}"
    return f"n = {c['n']}, r = {c['pearson_r']:.3f}, ρ = {c['spearman_rho']:.3f}"


# ----------------------------------------------------------------------------- layers
def field(table: np.ndarray, name: str, default: Any) -> np.ndarray:
    """Column ``name`` of a structured array, or ``default`` repeated when it has none."""
    if table.dtype.names and name in table.dtype.names:
        return table[name]
    return np.full(len(table), default, dtype=object)


def text_column(table: np.ndarray, name: str, default: str = "") -> list[str]:
    """Column ``name`` of a structured array as ``str`` (bytes decoded)."""
    return [text(v) for v in field(table, name, default)]


def layer_labels(layers: np.ndarray) -> list[str]:
    """One unique display label per row of the store's layer table.

    The framework layer name when recorded, else the tensor name; a framework layer that
    produced several tensors gets the tensor name in brackets.
    """
    names = text_column(layers, "name")
    fw = text_column(layers, "layer")
    labels = [f or n or f"layer {i}" for i, (n, f) in enumerate(zip(names, fw))]
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab in seen:
            labels[i] = f"{lab} [{names[i]}]"
        seen[lab] = i
    return labels


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

    Raises
    ------
    ValueError
        ``score`` is not 3-D or ``status`` has another shape.

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
    labels = layer_labels(layers)
    rows = []
    for k, cls in enumerate(classes):
        for j in range(score.shape[2]):
            s = score[:, k, j]
            st = status[:, k, j]
            undefined = ~np.isfinite(s)
            row: dict[str, Any] = {
                "class": int(cls),
                "layer_index": int(field(layers, "index", j)[j]),
                "name": text(field(layers, "name", "")[j]),
                "layer": labels[j],
                "op": text(field(layers, "op", "")[j]),
                "depth": jsonable(field(layers, "depth", j)[j]),
                "channels": jsonable(field(layers, "channels", -1)[j]),
            }
            row.update(finite_stats(s))
            row["n_used"] = int((~undefined).sum())
            row["n_nan"] = int(undefined.sum())
            for code in NAN_STATUSES:
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

    Raises
    ------
    ValueError
        ``unit_score`` is not 2-D.

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
    mean = nanmean_rows(u, axis=0)
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


def input_summary(input_score: np.ndarray, classes: Sequence[int]) -> list[dict[str, Any]]:
    """Per class and input (all channels, then each channel), the input SA over cases.

    Parameters
    ----------
    input_score : ndarray, shape (n_cases, n_classes, 1 + n_channels)
        ``store.input_scores()["score"]``: entry 0 of the last axis is the SA of all input
        channels together, then one entry per channel for multi-channel inputs.
    classes : sequence of int
        The scored classes, one per entry of axis 1.

    Returns
    -------
    list of dict
        ``class, input, mean, sd, median, q25, q75, n_used`` (as :func:`layer_summary`).
    """
    rows = []
    for k, c in enumerate(classes):
        for j in range(input_score.shape[2]):
            row: dict[str, Any] = {"class": c,
                                   "input": "all channels" if j == 0 else f"channel {j - 1}"}
            row.update(finite_stats(input_score[:, k, j]))
            row["n_used"] = int(np.isfinite(input_score[:, k, j]).sum())
            rows.append(row)
    return rows
