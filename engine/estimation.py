"""Label-free quality estimates from SA scores (SPEC §4) and their trivial baselines.

Everything here is a pure function over arrays, so it works on the arrays an
:class:`engine.store.Store` returns (``layer_scores()``, ``unit_scores(layer)``, ``layers``)
as well as on arrays built by hand.

Estimators (each recorded by name):

- ``paper`` — mean unit-level SA over every unit of the last ``last_k`` (2) hidden layers
  before the output, ordered by depth (guide = reference = the prediction);
- ``all-layers`` — mean layer-level SA over every scored hidden layer;
- ``calibrated`` — the layer(s) and level chosen by :func:`calibrate` on labelled data.

Undefined scores (NaN, any status other than OK — e.g. ``EMPTY_DICE`` when the map and the
reference are both empty) are left out of every mean, never counted as 1; a case where nothing
is defined gets NaN and a reason.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import numpy as np

from engine.status import Status

__all__ = [
    "ESTIMATORS",
    "BASELINE_NAMES",
    "HIGHER_IS_BETTER",
    "Calibration",
    "baselines",
    "estimate_quality",
    "candidate_estimates",
    "default_candidates",
    "calibrate",
    "group_folds",
    "flag_cases",
    "rank_cases",
]

ESTIMATORS = ("paper", "all-layers", "calibrated")
BASELINE_NAMES = ("predicted_fraction", "soft_dice", "uncertain_fraction", "mean_entropy")
#: Orientation of each score: True when a higher value should mean a better output.
HIGHER_IS_BETTER: dict[str, bool] = {
    "paper": True,
    "all-layers": True,
    "calibrated": True,
    "predicted_fraction": True,
    "soft_dice": True,
    "uncertain_fraction": False,
    "mean_entropy": False,
}
CALIBRATION_ENCODING = ("protoseg-calibration", "1")
#: Rounding tolerated on probabilities (float32 resizing can overshoot [0, 1] by an ulp or two).
_PROB_TOL = 1e-5


# --------------------------------------------------------------------------- baselines


def baselines(
    probability: np.ndarray,
    *,
    threshold: float = 0.5,
    mask: np.ndarray | None = None,
    class_axis: bool = False,
) -> dict[str, np.ndarray]:
    """Trivial label-free quality baselines per case (and class).

    Parameters
    ----------
    probability : ndarray
        Foreground probabilities in [0, 1] of one class, shape ``(B, *spatial)`` (the
        pipeline calls this per class), or ``(B, n_classes, *spatial)`` with
        ``class_axis=True``.
    threshold : float, optional
        The prediction is ``probability > threshold`` (strict, as ties go to background in
        SPEC §1).
    mask : ndarray, optional
        Tissue mask ``(B, *spatial)`` or ``(*spatial)``; positions outside are ignored.
    class_axis : bool, optional
        Whether axis 1 of ``probability`` is the class axis (default False).

    Returns
    -------
    dict of str to ndarray
        ``predicted_fraction``, ``soft_dice``, ``uncertain_fraction``, ``mean_entropy``, each
        float64 of shape ``(B,)`` (``(B, n_classes)`` with ``class_axis=True``). NaN where the
        mask is empty; ``soft_dice`` is NaN when the probability and the prediction are both
        zero everywhere (0/0).

    Raises
    ------
    ValueError
        On a probability outside [0, 1] or non-finite, a bad threshold, or a mask that does
        not match the spatial shape.

    Notes
    -----
    With ``b = p > threshold`` and means over the masked positions:
    predicted fraction ``mean(b)``; soft Dice ``2 Σ p·b / (Σ p + Σ b)``; uncertain fraction
    ``mean(0.1 < p < 0.9)``; mean binary entropy in bits
    ``mean(-p log2 p - (1-p) log2 (1-p))`` (0 at p ∈ {0, 1}, 1 at p = 0.5).

    Examples
    --------
    >>> p = np.array([[0.0, 1.0, 0.5, 0.95]])
    >>> round(float(baselines(p)["predicted_fraction"][0]), 3)
    0.5
    """
    p = np.asarray(probability)
    if not np.issubdtype(p.dtype, np.floating) and not np.issubdtype(p.dtype, np.integer):
        raise TypeError(f"probability has dtype {p.dtype}; expected a float array of probabilities in [0, 1]")
    min_ndim = 3 if class_axis else 2
    if p.ndim < min_ndim:
        raise ValueError(
            f"probability has shape {p.shape}; expected (B, *spatial) with at least one spatial axis "
            "((B, n_classes, *spatial) with class_axis=True)"
        )
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold={threshold!r}; expected a number strictly between 0 and 1")
    from engine._kernels.baseline import CHUNK, N_SUMS, baseline_sums

    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float64)
    if not class_axis:
        p = p[:, None]
    batch, n_cls = p.shape[:2]
    spatial = p.shape[2:]
    flat = np.ascontiguousarray(p.reshape(batch, n_cls, -1))
    if mask is None:
        w = np.ones((batch, flat.shape[-1]), dtype=np.uint8)
    else:
        m = np.asarray(mask)
        if m.shape == spatial:
            m = np.broadcast_to(m, (batch, *spatial))
        if m.shape != (batch, *spatial):
            raise ValueError(f"mask has shape {m.shape}; expected {spatial} or {(batch, *spatial)} to match probability")
        w = np.ascontiguousarray((m.reshape(batch, -1) != 0).astype(np.uint8))
    n_chunks = max(1, -(-flat.shape[-1] // CHUNK))
    part = np.empty((batch, n_cls, n_chunks, N_SUMS))
    baseline_sums(flat, w, float(threshold), part)
    lo = float(part[..., 6].min(initial=np.inf))
    hi = float(part[..., 7].max(initial=-np.inf))
    if part[..., 8].sum() > 0 or lo < -_PROB_TOL or hi > 1.0 + _PROB_TOL:
        raise ValueError(
            f"probability holds values outside [0, 1] or NaN/Inf (range {lo:g} to {hi:g}); pass foreground "
            "probabilities (apply the sigmoid/softmax first)"
        )
    sums = part[..., :6].sum(axis=2)  # (B, K, 6)
    n, sb, su, se, sp, spb = (sums[..., i] for i in range(6))
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = sb / n
        uncertain = su / n
        entropy = se / n
        den = sp + sb
        soft = np.where(den > 0, 2.0 * spb / np.where(den > 0, den, 1.0), np.nan)
    empty = np.broadcast_to(n == 0, predicted.shape)
    out = {
        "predicted_fraction": predicted,
        "soft_dice": np.where(empty, np.nan, soft),
        "uncertain_fraction": uncertain,
        "mean_entropy": entropy,
    }
    if not class_axis:
        out = {k: v[:, 0] for k, v in out.items()}
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Layer:
    name: str
    depth: int
    index: int
    label: str


def _layers(layers: Any) -> list[_Layer]:
    """Normalise a store ``layers`` table, a list of dicts, or a list of names."""
    if isinstance(layers, np.ndarray) and layers.dtype.names:
        names = layers.dtype.names
        rows = [{k: layers[k][i] for k in names} for i in range(len(layers))]
    elif isinstance(layers, (list, tuple)):
        rows = [r if isinstance(r, Mapping) else {"name": r} for r in layers]
    else:
        raise TypeError(
            f"layers is a {type(layers).__name__}; expected the store's layers table (structured array with "
            "'name' and 'depth'), a list of dicts, or a list of layer names"
        )
    out = []
    for i, r in enumerate(rows):
        if "name" not in r:
            raise ValueError(f"layers[{i}] has no 'name' (got keys {sorted(r)}); every layer needs a name")
        name = r["name"].decode() if isinstance(r["name"], bytes) else str(r["name"])
        label = r.get("layer", name)
        label = label.decode() if isinstance(label, bytes) else str(label)
        out.append(_Layer(name, int(r.get("depth", i)), int(r.get("index", i)), label or name))
    if len({lay.name for lay in out}) != len(out):
        raise ValueError("layers holds duplicate names; each scored tensor must have a unique name")
    return out


def _score_array(scores: Any, what: str, class_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(score (n_cases, k), status or None)`` from an array or a dict with score/status."""
    status = None
    if isinstance(scores, Mapping):
        if "score" not in scores:
            raise ValueError(f"{what} is a dict without 'score' (keys {sorted(scores)}); pass the store's dict or an array")
        status = scores.get("status")
        scores = scores["score"]
    s = np.asarray(scores, dtype=np.float64)
    st = None if status is None else np.asarray(status)
    if s.ndim == 3:
        if not -s.shape[1] <= class_index < s.shape[1]:
            raise ValueError(f"class_index={class_index} but {what} has {s.shape[1]} classes; pick 0..{s.shape[1] - 1}")
        s = s[:, class_index]
        st = None if st is None else st[:, class_index]
    if s.ndim != 2:
        raise ValueError(f"{what} has shape {s.shape}; expected (n_cases, n) or (n_cases, n_classes, n)")
    if st is not None and st.shape != s.shape:
        raise ValueError(f"{what} status has shape {st.shape} but score has {s.shape}; they must match")
    if st is not None:  # a score counts only when its status is OK
        s = np.where(st == Status.OK, s, np.nan)
    return s, st


def _unit_lookup(unit_scores: Any, layer: _Layer) -> Any:
    if unit_scores is None:
        return None
    if callable(unit_scores) and not isinstance(unit_scores, Mapping):
        return unit_scores(layer.index)
    for key in (layer.index, layer.name, str(layer.index)):
        if key in unit_scores:
            return unit_scores[key]
    return None


@dataclass
class _Table:
    """Per-case, per-layer aggregates every estimator and candidate is built from."""

    layers: list[_Layer]
    layer_score: np.ndarray  # (n, L) NaN where undefined
    layer_status: np.ndarray | None
    unit_sum: np.ndarray  # (n, L) sum of defined unit scores
    unit_count: np.ndarray  # (n, L) number of defined units
    unit_total: np.ndarray  # (L,) units per layer (0 when unit level absent)
    unit_reasons: list[Counter]  # per case: status names of undefined units (all layers)
    unit_reason_by_layer: dict[int, list[Counter]]

    @property
    def n_cases(self) -> int:
        return self.layer_score.shape[0]

    def order(self) -> list[int]:
        """Layer positions sorted by depth (stable)."""
        return sorted(range(len(self.layers)), key=lambda i: (self.layers[i].depth, i))


def _table(layer_scores: Any, unit_scores: Any, layers: Any, class_index: int) -> _Table:
    lay = _layers(layers)
    s, st = _score_array(layer_scores, "layer_scores", class_index)
    if s.shape[1] != len(lay):
        raise ValueError(f"layer_scores has {s.shape[1]} layers but layers lists {len(lay)}; pass matching arrays")
    n, L = s.shape
    usum = np.zeros((n, L))
    ucount = np.zeros((n, L), dtype=np.int64)
    utotal = np.zeros(L, dtype=np.int64)
    by_layer: dict[int, list[Counter]] = {}
    for j, layer in enumerate(lay):
        u = _unit_lookup(unit_scores, layer)
        if u is None:
            continue
        us, ust = _score_array(u, f"unit_scores[{layer.name!r}]", class_index)
        if us.shape[0] != n:
            raise ValueError(f"unit_scores[{layer.name!r}] has {us.shape[0]} cases but layer_scores has {n}")
        ok = np.isfinite(us)
        usum[:, j] = np.where(ok, us, 0.0).sum(axis=1)
        ucount[:, j] = ok.sum(axis=1)
        utotal[j] = us.shape[1]
        reasons = []
        for i in range(n):
            bad = ~ok[i]
            if not bad.any():
                reasons.append(Counter())
            elif ust is None:
                reasons.append(Counter({"NaN": int(bad.sum())}))
            else:
                codes, counts = np.unique(ust[i][bad], return_counts=True)
                reasons.append(Counter({_status_name(c): int(k) for c, k in zip(codes, counts)}))
        by_layer[j] = reasons
    per_case = [sum((by_layer[j][i] for j in by_layer), Counter()) for i in range(n)]
    return _Table(lay, s, st, usum, ucount, utotal, per_case, by_layer)


def _status_name(code: Any) -> str:
    try:
        return Status(int(code)).name
    except ValueError:
        return f"STATUS_{int(code)}"


def _layer_reasons(table: _Table, cols: Sequence[int], i: int) -> Counter:
    if table.layer_status is None:
        return Counter({"NaN": int(np.isnan(table.layer_score[i, list(cols)]).sum())})
    st = table.layer_status[i, list(cols)]
    bad = st != Status.OK
    return Counter(_status_name(c) for c in st[bad])


# --------------------------------------------------------------------------- estimators


def _mean_layer(table: _Table, cols: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    vals = table.layer_score[:, list(cols)]
    used = np.isfinite(vals).sum(axis=1)
    with np.errstate(invalid="ignore"):
        est = np.where(used > 0, np.nansum(vals, axis=1) / np.maximum(used, 1), np.nan)
    return est, used


def _mean_units(table: _Table, cols: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    cols = list(cols)
    s = table.unit_sum[:, cols].sum(axis=1)
    c = table.unit_count[:, cols].sum(axis=1)
    return np.where(c > 0, s / np.maximum(c, 1), np.nan), c


def _spec_columns(table: _Table, spec: Mapping[str, Any]) -> list[int]:
    names = [lay.name for lay in table.layers]
    cols = []
    for name in spec["layers"]:
        if name not in names:
            close = get_close_matches(name, names, n=3)
            hint = f"closest: {', '.join(close)}" if close else f"available: {', '.join(names[:8])}{'...' if len(names) > 8 else ''}"
            raise KeyError(
                f"layer {name!r} used by this estimator is not among the scored layers ({hint}); "
                "score the same layers as the calibration data, or recalibrate"
            )
        cols.append(names.index(name))
    return cols


def _evaluate_spec(table: _Table, spec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    cols = _spec_columns(table, spec)
    if spec["level"] == "unit":
        missing = [table.layers[j].name for j in cols if table.unit_total[j] == 0]
        if missing:
            raise ValueError(
                f"unit-level scores are missing for layer(s) {', '.join(missing)}; "
                "score with level='unit' or level='both' to use this estimator"
            )
        est, used = _mean_units(table, cols)
    elif spec["level"] == "layer":
        est, used = _mean_layer(table, cols)
    else:
        raise ValueError(f"estimator level {spec['level']!r}; expected 'layer' or 'unit'")
    return est, used, cols


def _paper_spec(table: _Table, last_k: int, exclude: Sequence[str] = ()) -> dict[str, Any]:
    order = [j for j in table.order() if table.layers[j].name not in set(exclude)]
    if last_k < 1:
        raise ValueError(f"last_k={last_k}; expected a positive number of layers")
    if len(order) < last_k:
        raise ValueError(f"the paper estimator needs {last_k} hidden layers but {len(order)} are scored")
    chosen = order[-last_k:]
    return {"name": "paper", "level": "unit", "layers": [table.layers[j].name for j in chosen]}


def estimate_quality(
    layer_scores: Any,
    unit_scores: Any,
    layers: Any,
    *,
    estimator: str = "paper",
    calibration: Calibration | str | Path | None = None,
    last_k: int = 2,
    exclude: Sequence[str] = (),
    class_index: int = 0,
    return_details: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Label-free quality estimate (mean SA) per case.

    Parameters
    ----------
    layer_scores : ndarray or dict
        Layer-level SA against the prediction, ``(n_cases, [n_classes,] n_layers)``, or the
        store's dict with ``score`` and ``status`` (a score counts only when its status is OK).
    unit_scores : mapping, callable or None
        Unit-level SA per layer: a mapping from layer index or name to an array
        ``(n_cases, [n_classes,] C)`` or a dict with ``score``/``status``, or a callable
        ``f(layer_index)`` such as ``store.unit_scores``. Needed by ``paper``.
    layers : structured array or list
        The store's ``layers`` table (fields ``name``, ``depth``, optionally ``index``,
        ``layer``), a list of dicts with those keys, or a list of names in depth order.
    estimator : {"paper", "all-layers", "calibrated"}
        Which estimator (SPEC §4).
    calibration : Calibration, str or Path, optional
        Required by ``calibrated``: a :class:`Calibration` or a JSON file written by
        :meth:`Calibration.save`.
    last_k : int, optional
        ``paper``: how many of the deepest layers (by ``depth``) to use.
    exclude : sequence of str, optional
        ``paper`` and ``all-layers``: layer names that are not hidden layers and must not be
        used (e.g. the logits tensor, or any tensor on the output path, when it was scored).
    class_index : int, optional
        Which class (position along the class axis) when the scores carry one.
    return_details : bool, optional
        Also return a details dict.

    Returns
    -------
    estimate : ndarray
        float64 ``(n_cases,)``; NaN where no score was defined.
    details : dict, only with ``return_details=True``
        ``estimator``, ``level``, ``layers`` (names used), ``n_used`` (defined scores per
        case), ``n_undefined`` (per case), ``reason`` (per case: ``""`` or why it is NaN).

    Raises
    ------
    ValueError
        Unknown estimator, missing unit scores for ``paper``, missing calibration, shapes
        that do not match.
    KeyError
        A calibration naming layers that were not scored.

    Notes
    -----
    ``paper``: ``mean_{u ∈ units of the last two layers} SA_u`` with every defined unit
    weighted equally. ``all-layers``: ``mean_l SA_l`` over defined layers. Undefined scores
    (status not OK, or NaN) are left out; never counted as 1.

    Examples
    --------
    >>> est = estimate_quality(np.array([[0.9, 0.7], [np.nan, 0.2]]), None, ["a", "b"],
    ...                        estimator="all-layers")
    >>> est.round(2).tolist()
    [0.8, 0.2]
    """
    if estimator not in ESTIMATORS:
        close = get_close_matches(str(estimator), ESTIMATORS, n=1)
        raise ValueError(
            f"estimator={estimator!r}; expected one of {', '.join(ESTIMATORS)}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    if estimator == "calibrated":
        if calibration is None:
            raise ValueError("estimator='calibrated' needs calibration=...; run calibrate() on labelled data first")
        if not isinstance(calibration, Calibration):
            calibration = Calibration.load(calibration)
        table = _table(layer_scores, unit_scores, layers, class_index)
        calibration.check_layers([lay.name for lay in table.layers])
        spec = dict(calibration.choice)
    else:
        table = _table(layer_scores, unit_scores, layers, class_index)
        if estimator == "paper":
            spec = _paper_spec(table, last_k, exclude)
        else:
            kept = [lay.name for lay in table.layers if lay.name not in set(exclude)]
            if not kept:
                raise ValueError(f"exclude={list(exclude)!r} leaves no layer for 'all-layers'; exclude fewer layers")
            spec = {"name": "all-layers", "level": "layer", "layers": kept}
    est, used, cols = _evaluate_spec(table, spec)
    if not return_details:
        return est
    n = table.n_cases
    if spec["level"] == "unit":
        total = int(table.unit_total[cols].sum())
        undefined = total - used
        reasons_c = [sum((table.unit_reason_by_layer[j][i] for j in cols), Counter()) for i in range(n)]
        unit_word = "units"
    else:
        total = len(cols)
        undefined = total - used
        reasons_c = [_layer_reasons(table, cols, i) for i in range(n)]
        unit_word = "layers"
    reason = []
    for i in range(n):
        if np.isfinite(est[i]):
            reason.append("")
        else:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons_c[i].items())) or "no scores"
            reason.append(f"no defined score: all {total} {unit_word} undefined ({why})")
    details = {
        "estimator": estimator,
        "spec": spec,
        "level": spec["level"],
        "layers": list(spec["layers"]),
        "n_total": total,
        "n_used": np.asarray(used, dtype=np.int64),
        "n_undefined": np.asarray(undefined, dtype=np.int64),
        "reason": np.asarray(reason, dtype=object),
    }
    return est, details


# --------------------------------------------------------------------------- calibration


def default_candidates(layers: Any, *, has_units: Sequence[bool] | None = None, last_k: int = 2) -> list[dict[str, Any]]:
    """The candidate estimators :func:`calibrate` chooses from.

    Each single layer at layer level (``layer:<name>``) and at unit level
    (``units:<name>``, when unit scores exist), the mean over all layers (``all-layers``),
    the paper recipe (``paper``) and every contiguous depth window of 2 to L-1 layers at
    layer level (``window:<first>..<last>``).

    Parameters
    ----------
    layers : structured array or list
        As in :func:`estimate_quality`.
    has_units : sequence of bool, optional
        Per layer, whether unit-level scores exist (unit candidates only for those).
    last_k : int, optional
        Layers of the ``paper`` candidate.

    Returns
    -------
    list of dict
        Specs with ``name``, ``level`` (``"layer"`` or ``"unit"``) and ``layers`` (names).

    Examples
    --------
    >>> [c["name"] for c in default_candidates(["a", "b"])]
    ['layer:a', 'layer:b', 'all-layers']
    """
    lay = _layers(layers)
    order = sorted(range(len(lay)), key=lambda i: (lay[i].depth, i))
    has_units = [False] * len(lay) if has_units is None else list(has_units)
    names = [lay[i].name for i in order]
    cands: list[dict[str, Any]] = []
    for j in order:
        cands.append({"name": f"layer:{lay[j].name}", "level": "layer", "layers": [lay[j].name]})
        if has_units[j]:
            cands.append({"name": f"units:{lay[j].name}", "level": "unit", "layers": [lay[j].name]})
    cands.append({"name": "all-layers", "level": "layer", "layers": names})
    deep = [j for j in order]
    if len(deep) >= last_k and all(has_units[j] for j in deep[-last_k:]):
        cands.append({"name": "paper", "level": "unit", "layers": [lay[j].name for j in deep[-last_k:]]})
    for width in range(2, len(names)):
        for start in range(0, len(names) - width + 1):
            win = names[start : start + width]
            cands.append({"name": f"window:{win[0]}..{win[-1]}", "level": "layer", "layers": win})
    return cands


def candidate_estimates(
    layer_scores: Any, unit_scores: Any, layers: Any, candidates: Sequence[Mapping[str, Any]], *, class_index: int = 0
) -> np.ndarray:
    """Evaluate candidate specs on scores.

    Parameters
    ----------
    layer_scores, unit_scores, layers
        As in :func:`estimate_quality`.
    candidates : sequence of dict
        Specs as returned by :func:`default_candidates` (or ``Calibration.choice``).
    class_index : int, optional

    Returns
    -------
    ndarray
        float64 ``(n_candidates, n_cases)``; NaN where a case has no defined score.

    Raises
    ------
    KeyError
        A spec names a layer that was not scored.
    ValueError
        A unit-level spec without unit scores.
    """
    table = _table(layer_scores, unit_scores, layers, class_index)
    return np.stack([_evaluate_spec(table, c)[0] for c in candidates]) if candidates else np.zeros((0, table.n_cases))


def _metric(x: np.ndarray, y: np.ndarray, metric: str) -> float:
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    if metric == "spearman":
        return float(stats.spearmanr(x[ok], y[ok])[0])
    return float(stats.pearsonr(x[ok], y[ok])[0])


def group_folds(n_cases: int, folds: int, *, groups: Sequence[Any] | None = None, seed: int = 0) -> np.ndarray:
    """Assign each case to a fold (int array ``(n_cases,)``).

    With ``groups``, whole groups go to one fold (largest groups first, each to the fold
    with the fewest cases so far; ties by a seeded shuffle), as scikit-learn's
    ``GroupKFold``; the number of folds is capped at the number of groups. Without groups,
    a seeded random permutation is cut into ``folds`` near-equal parts.

    Parameters
    ----------
    n_cases : int
    folds : int
        At least 2.
    groups : sequence, optional
        One label per case.
    seed : int, optional

    Returns
    -------
    ndarray of int64
        Fold index per case, ``0 .. k-1``.

    Raises
    ------
    ValueError
        Fewer than 2 folds, a single group, fewer cases than folds, or mismatched lengths.

    Examples
    --------
    >>> group_folds(4, 2, groups=["a", "a", "b", "b"]).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    True
    """
    if folds < 2:
        raise ValueError(f"folds={folds}; cross-validation needs at least 2 folds")
    rng = np.random.default_rng(seed)
    if groups is None:
        if n_cases < folds:
            raise ValueError(f"{n_cases} labelled cases cannot be split into {folds} folds; use fewer folds")
        out = np.empty(n_cases, dtype=np.int64)
        out[rng.permutation(n_cases)] = np.arange(n_cases) % folds
        return out
    g = np.asarray([str(x) for x in groups], dtype=object)
    if len(g) != n_cases:
        raise ValueError(f"groups has {len(g)} entries but there are {n_cases} cases; give one group per case")
    uniq, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    if len(uniq) < 2:
        raise ValueError(
            f"groups holds a single group ({uniq[0]!r}); cross-validation over groups needs at least 2 — "
            "pass groups=None to fold over cases"
        )
    k = min(folds, len(uniq))
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    load = np.zeros(k, dtype=np.int64)
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    for gi in order:
        f = int(np.argmin(load))
        fold_of_group[gi] = f
        load[f] += counts[gi]
    return fold_of_group[inverse]


@dataclass
class Calibration:
    """A calibrated estimator: which layers and level, and how well it ranked true Dice.

    ``choice`` is the spec applied to new data (``name``, ``level``, ``layers``);
    ``cv_metric`` is the pooled out-of-fold rank correlation (the honest figure);
    ``in_sample_metric`` is the final choice's correlation on all labelled data (optimistic);
    ``cv_fold_mean`` is the mean of the per-fold held-out correlations (each fold on its own,
    so that offsets between folds — e.g. subjects — do not enter; NaN folds ignored).
    """

    choice: dict[str, Any]
    metric: str
    cv_metric: float
    in_sample_metric: float
    layer_names: list[str]
    n_cases: int
    n_groups: int | None
    folds: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    class_index: int = 0
    seed: int = 0
    oof_estimate: list[float] = field(default_factory=list)
    cv_fold_mean: float = float("nan")

    def check_layers(self, names: Sequence[str]) -> None:
        """Raise when the chosen layers are not among ``names`` (another model or layer set)."""
        missing = [n for n in self.choice["layers"] if n not in set(names)]
        if missing:
            raise ValueError(
                f"calibration was made for layers {', '.join(self.choice['layers'])} but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not among the scored layers "
                f"({len(names)} scored); use a calibration made for this model, or score those layers"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["encoding-type"], d["encoding-version"] = CALIBRATION_ENCODING
        return d

    def to_json(self) -> str:
        """Serialise to a JSON string (NaN written as ``null``)."""
        return json.dumps(_nan_to_none(self.to_dict()), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Parse :meth:`to_json` output; refuses unknown encodings with advice."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration is not valid JSON ({exc}); pass a file written by protoseg calibrate") from None
        if not isinstance(d, dict) or d.get("encoding-type") != CALIBRATION_ENCODING[0]:
            raise ValueError("not a protoseg calibration (encoding-type missing); pass a file written by Calibration.save")
        if d.get("encoding-version") != CALIBRATION_ENCODING[1]:
            raise ValueError(
                f"calibration encoding version {d.get('encoding-version')!r} is not supported (expected "
                f"{CALIBRATION_ENCODING[1]!r}); upgrade protoseg or recalibrate"
            )
        d.pop("encoding-type")
        d.pop("encoding-version")
        for key in ("cv_metric", "in_sample_metric", "cv_fold_mean"):
            d[key] = float("nan") if d.get(key) is None else float(d[key])
        d["oof_estimate"] = [float("nan") if v is None else v for v in d.get("oof_estimate", [])]
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        """Write the calibration as JSON to ``path``."""
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist; write one with calibrate(...).save(path)")
        return cls.from_json(path.read_text())


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _nan_to_none(obj.tolist())
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return obj


def _select(values: np.ndarray, target: np.ndarray, rows: np.ndarray, metric: str, min_coverage: float) -> tuple[int, np.ndarray]:
    """Index of the best candidate on ``rows`` and every candidate's metric there."""
    scores = np.full(values.shape[0], np.nan)
    for c in range(values.shape[0]):
        x = values[c, rows]
        if np.isfinite(x).mean() < min_coverage:
            continue
        scores[c] = _metric(x, target[rows], metric)
    if not np.isfinite(scores).any():
        raise ValueError(
            "no candidate estimator has a defined correlation on the training cases (too few cases with "
            "defined scores, or constant Dice); label more cases or use fewer folds"
        )
    return int(np.nanargmax(scores)), scores


def calibrate(
    layer_scores: Any,
    unit_scores: Any,
    layers: Any,
    true_dice: np.ndarray,
    *,
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    candidates: Sequence[Mapping[str, Any]] | None = None,
    metric: str = "spearman",
    seed: int = 0,
    last_k: int = 2,
    min_coverage: float = 0.9,
    class_index: int = 0,
    exclude: Sequence[str] = (),
) -> Calibration:
    """Choose the layer(s) and level whose mean SA best ranks true Dice, by cross-validation.

    Parameters
    ----------
    layer_scores, unit_scores, layers
        As in :func:`estimate_quality` (SA against the prediction, on labelled cases).
    true_dice : ndarray
        ``(n_cases,)`` Dice of the output against ground truth; NaN cases are ignored.
    groups : sequence, optional
        One group (subject, site) per case; folds then hold whole groups.
    folds : int, optional
        Number of folds (capped at the number of groups).
    candidates : sequence of dict, optional
        Candidate specs (``name``, ``level`` ∈ {layer, unit}, ``layers``); default
        :func:`default_candidates`.
    metric : {"spearman", "pearson"}
        What is maximised (signed: a candidate that ranks Dice backwards never wins).
    seed : int, optional
        Fold assignment seed.
    min_coverage : float, optional
        A candidate defined on fewer than this fraction of the training cases is skipped.
    class_index : int, optional
        Which class when the scores carry a class axis.
    exclude : sequence of str, optional
        Layer names left out of the default candidates (e.g. tensors on the output path).

    Returns
    -------
    Calibration
        ``choice`` = the candidate selected on all labelled data; ``cv_metric`` = the
        correlation of the pooled out-of-fold estimates (each fold scored by the candidate
        selected on the other folds) with true Dice; ``cv_fold_mean`` = the mean held-out
        correlation per fold; ``folds`` = per fold the selected candidate, its training and
        held-out metric and the held-out case indices.

    Raises
    ------
    ValueError
        Unknown metric, fewer than 2 folds/groups, mismatched lengths, or no usable candidate.

    Notes
    -----
    Selection on each fold uses only that fold's training part; the held-out part is
    scored after the choice is made. The in-sample figure is reported separately and is
    optimistic by construction.
    """
    if metric not in ("spearman", "pearson"):
        raise ValueError(f"metric={metric!r}; expected 'spearman' or 'pearson'")
    table = _table(layer_scores, unit_scores, layers, class_index)
    y = np.asarray(true_dice, dtype=np.float64).reshape(-1)
    if y.shape[0] != table.n_cases:
        raise ValueError(f"true_dice has {y.shape[0]} values but the scores hold {table.n_cases} cases")
    if candidates is None:
        usable = [j for j, lay in enumerate(table.layers) if lay.name not in set(exclude)]
        if not usable:
            raise ValueError(f"exclude={list(exclude)!r} leaves no layer to calibrate on; exclude fewer layers")
        candidates = default_candidates(
            [{"name": table.layers[j].name, "depth": table.layers[j].depth, "index": table.layers[j].index} for j in usable],
            has_units=[bool(table.unit_total[j]) for j in usable],
            last_k=last_k,
        )
    candidates = [dict(c) for c in candidates]
    for c in candidates:
        for key in ("name", "level", "layers"):
            if key not in c:
                raise ValueError(f"candidate {c!r} has no {key!r}; each candidate needs name, level and layers")
    values = np.stack([_evaluate_spec(table, c)[0] for c in candidates])
    labelled = np.flatnonzero(np.isfinite(y))
    if labelled.size < 6:
        raise ValueError(f"only {labelled.size} cases have a finite true Dice; calibration needs at least 6")
    g = None if groups is None else np.asarray([str(v) for v in groups], dtype=object)
    if g is not None and len(g) != table.n_cases:
        raise ValueError(f"groups has {len(g)} entries but there are {table.n_cases} cases; give one group per case")
    fold = group_folds(labelled.size, folds, groups=None if g is None else g[labelled], seed=seed)
    oof = np.full(table.n_cases, np.nan)
    fold_info = []
    times = Counter()
    for f in np.unique(fold):
        test = labelled[fold == f]
        train = labelled[fold != f]
        best, _ = _select(values, y, train, metric, min_coverage)
        oof[test] = values[best, test]
        times[best] += 1
        fold_info.append(
            {
                "fold": int(f),
                "selected": candidates[best]["name"],
                "train_metric": _metric(values[best, train], y[train], metric),
                "test_metric": _metric(values[best, test], y[test], metric),
                "n_train": int(train.size),
                "n_test": int(test.size),
                "test_cases": test.tolist(),
                "test_groups": sorted(set(g[test].tolist())) if g is not None else None,
            }
        )
    best, all_scores = _select(values, y, labelled, metric, min_coverage)
    cand_table = [
        {"name": c["name"], "level": c["level"], "n_layers": len(c["layers"]), "in_sample": float(all_scores[i]),
         "times_selected": int(times[i])}
        for i, c in enumerate(candidates)
    ]
    return Calibration(
        choice={"name": candidates[best]["name"], "level": candidates[best]["level"], "layers": list(candidates[best]["layers"])},
        metric=metric,
        cv_metric=_metric(oof[labelled], y[labelled], metric),
        in_sample_metric=float(all_scores[best]),
        layer_names=[lay.name for lay in table.layers],
        n_cases=int(labelled.size),
        n_groups=None if g is None else int(len(set(g[labelled].tolist()))),
        folds=fold_info,
        candidates=cand_table,
        class_index=class_index,
        seed=seed,
        oof_estimate=oof.tolist(),
        cv_fold_mean=_nanmean([f["test_metric"] for f in fold_info]),
    )


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


# --------------------------------------------------------------------------- flagging


def rank_cases(estimates: np.ndarray) -> np.ndarray:
    """Case indices, least supported first: NaN estimates first, then ascending (stable).

    Parameters
    ----------
    estimates : ndarray
        ``(n_cases,)``; higher = better supported.

    Returns
    -------
    ndarray of int
        A permutation of ``range(n_cases)``.

    Examples
    --------
    >>> rank_cases(np.array([0.5, np.nan, 0.1])).tolist()
    [1, 2, 0]
    """
    e = np.asarray(estimates, dtype=np.float64).reshape(-1)
    key = np.where(np.isnan(e), -np.inf, e)
    nan_first = np.lexsort((np.arange(e.size), key, ~np.isnan(e)))
    return nan_first


def flag_cases(
    estimates: np.ndarray,
    *,
    threshold: float | None = None,
    lowest: int | None = None,
    fraction: float | None = None,
    return_reasons: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Flag the least-supported cases by exactly one rule.

    Parameters
    ----------
    estimates : ndarray
        ``(n_cases,)`` quality estimates (higher = better supported).
    threshold : float, optional
        Flag cases with estimate ``< threshold``.
    lowest : int, optional
        Flag the ``lowest`` least-supported cases.
    fraction : float, optional
        Flag the ``ceil(fraction · n)`` least-supported cases, ``0 < fraction <= 1``.
    return_reasons : bool, optional
        Also return a per-case reason string (``""`` when not flagged).

    Returns
    -------
    flags : ndarray of bool
        NaN estimates are always flagged (first, reason "estimate undefined"); they count
        towards ``lowest``/``fraction``.
    reasons : ndarray of str, only with ``return_reasons=True``

    Raises
    ------
    ValueError
        When not exactly one rule is given, or a rule's value is out of range.

    Examples
    --------
    >>> flag_cases(np.array([0.9, np.nan, 0.2, 0.5]), lowest=2).tolist()
    [False, True, True, False]
    """
    given = {k: v for k, v in (("threshold", threshold), ("lowest", lowest), ("fraction", fraction)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            f"got {len(given)} flagging rules ({', '.join(given) or 'none'}); give exactly one of threshold=, lowest=, fraction="
        )
    e = np.asarray(estimates, dtype=np.float64).reshape(-1)
    n = e.size
    undefined = np.isnan(e)
    flags = undefined.copy()
    reasons = np.where(undefined, "estimate undefined", "").astype(object)
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold={threshold!r}; expected a finite number")
        low = ~undefined & (e < threshold)
        flags |= low
        reasons[low] = f"estimate < {threshold:g}"
    else:
        if lowest is not None:
            if int(lowest) != lowest or lowest < 0:
                raise ValueError(f"lowest={lowest!r}; expected a non-negative whole number of cases")
            k = int(lowest)
        else:
            if not 0.0 < float(fraction) <= 1.0:  # type: ignore[arg-type]
                raise ValueError(f"fraction={fraction!r}; expected a number in (0, 1]")
            k = int(math.ceil(float(fraction) * n))  # type: ignore[arg-type]
        order = rank_cases(e)
        extra = [i for i in order[: max(k, 0)] if not undefined[i]]
        flags[extra] = True
        extra_set = set(extra)
        for r, i in enumerate(order):
            if i in extra_set:
                reasons[i] = f"rank {r + 1} of {n} (lowest {k})"
    flags = flags.astype(bool)
    if return_reasons:
        return flags, reasons.astype(str)
    return flags

