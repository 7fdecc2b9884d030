"""Label-free quality estimates (mean SA) per case: the named estimators of SPEC §4.

- ``paper`` — mean unit-level SA over every unit of the last ``last_k`` (2) hidden layers
  before the output, ordered by depth (guide = reference = the prediction);
- ``all-layers`` — mean layer-level SA over every scored hidden layer;
- ``calibrated`` — the layer(s) and level chosen by :func:`engine.quality.calibrate` on
  labelled data;
- ``combined`` — SA features and the baselines in a ridge model fitted on labelled data
  (:func:`engine.quality.fit_combined`, stored in the calibration); a predicted Dice.

Undefined scores (NaN, any status other than OK — e.g. ``EMPTY_DICE`` when the map and the
reference are both empty) are left out of every mean, never counted as 1; a case where nothing
is defined gets NaN and a reason.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine._checks import check_choice
from engine.quality.calibration import Calibration
from engine.quality.table import ScoreTable, score_table

__all__ = ["ESTIMATORS", "estimate_quality"]

ESTIMATORS = ("paper", "all-layers", "calibrated", "combined")


def _paper_spec(table: ScoreTable, last_k: int, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The ``last_k`` deepest layers not in ``exclude``, at unit level."""
    order = [j for j in table.order() if table.layers[j].name not in set(exclude)]
    if last_k < 1:
        raise ValueError(f"last_k={last_k}; expected a positive number of layers")
    if len(order) < last_k:
        raise ValueError(f"the paper estimator needs {last_k} hidden layers but {len(order)} are scored")
    return {"name": "paper", "level": "unit", "layers": [table.layers[j].name for j in order[-last_k:]]}


def _all_layers_spec(table: ScoreTable, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Every layer not in ``exclude``, at layer level."""
    kept = [name for name in table.names if name not in set(exclude)]
    if not kept:
        raise ValueError(f"exclude={list(exclude)!r} leaves no layer for 'all-layers'; exclude fewer layers")
    return {"name": "all-layers", "level": "layer", "layers": kept}


def _load_calibration(calibration: Calibration | str | Path | None) -> Calibration:
    if calibration is None:
        raise ValueError("estimators 'calibrated' and 'combined' need calibration=...; run calibrate() "
                         "(and fit_combined()) on labelled data first")
    return calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)


def _details(
    table: ScoreTable, estimator: str, spec: dict[str, Any], est: np.ndarray, used: np.ndarray, cols: list[int]
) -> dict[str, Any]:
    """What ``return_details=True`` returns: the spec, counts and a reason for every NaN."""
    total = int(table.unit_total[cols].sum()) if spec["level"] == "unit" else len(cols)
    word = "units" if spec["level"] == "unit" else "layers"
    undefined = table.undefined(spec["level"], cols)
    reason = []
    for i in range(table.n_cases):
        if np.isfinite(est[i]):
            reason.append("")
        else:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(undefined[i].items())) or "no scores"
            reason.append(f"no defined score: all {total} {word} undefined ({why})")
    return {
        "estimator": estimator,
        "spec": spec,
        "level": spec["level"],
        "layers": list(spec["layers"]),
        "n_total": total,
        "n_used": np.asarray(used, dtype=np.int64),
        "n_undefined": np.asarray(total - used, dtype=np.int64),
        "reason": np.asarray(reason, dtype=object),
    }


def _combined(table: ScoreTable, cal: Calibration, baselines: Mapping[str, np.ndarray] | None,
              return_details: bool) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """The ``combined`` estimate (predicted Dice) from the calibration's ridge model."""
    model = cal.combined_model()
    cal.check_layers_of(model.layers(), table.names)
    est = model.predict(table, baselines)
    if not return_details:
        return est
    sa = [s for s in model.features if s["level"] != "baseline"]
    used = np.isfinite(np.stack([table.mean(s)[0] for s in sa], axis=1)).sum(1) if sa else np.zeros(table.n_cases)
    reason = np.asarray(["" if np.isfinite(v) else "no defined score: every SA feature of the combined "
                         "estimator is undefined" for v in est], dtype=object)
    return est, {"estimator": "combined", "spec": {"name": "combined", "level": "combined",
                                                   "layers": model.layers()},
                 "level": "combined", "layers": model.layers(), "n_total": len(sa),
                 "n_used": np.asarray(used, dtype=np.int64), "n_undefined": np.asarray(len(sa) - used, dtype=np.int64),
                 "reason": reason, "alpha": model.alpha, "feature_set": model.feature_set}


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
    baselines: Mapping[str, np.ndarray] | None = None,
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
    estimator : {"paper", "all-layers", "calibrated", "combined"}
        Which estimator (SPEC §4; ``combined``: :mod:`engine.quality.combined`).
    calibration : Calibration, str or Path, optional
        Required by ``calibrated`` and ``combined``: a :class:`~engine.quality.Calibration` or
        a JSON file written by :meth:`Calibration.save` (holding a combined model for
        ``combined``).
    last_k : int, optional
        ``paper``: how many of the deepest layers (by ``depth``) to use.
    exclude : sequence of str, optional
        ``paper`` and ``all-layers``: layer names that are not hidden layers and must not be
        used (e.g. the logits tensor, or any tensor on the output path, when it was scored).
    class_index : int, optional
        Which class (position along the class axis) when the scores carry one.
    baselines : mapping, optional
        ``combined`` only: the baselines per case (``store.baselines()``).
    return_details : bool, optional
        Also return a details dict.

    Returns
    -------
    estimate : ndarray
        float64 ``(n_cases,)``; NaN where no score was defined.
    details : dict, only with ``return_details=True``
        ``estimator``, ``spec``, ``level``, ``layers`` (names used), ``n_total``, ``n_used``
        (defined scores per case), ``n_undefined`` (per case), ``reason`` (per case: ``""`` or
        why it is NaN).

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

    References
    ----------
    He et al. (2023), the mean SA of the last two hidden layers as a label-free quality
    estimate (the ``paper`` recipe).

    Examples
    --------
    >>> est = estimate_quality(np.array([[0.9, 0.7], [np.nan, 0.2]]), None, ["a", "b"],
    ...                        estimator="all-layers")
    >>> est.round(2).tolist()
    [0.8, 0.2]
    """
    check_choice(estimator, "estimator", ESTIMATORS)
    cal = _load_calibration(calibration) if estimator in ("calibrated", "combined") else None
    table = score_table(layer_scores, unit_scores, layers, class_index=class_index)
    if estimator == "combined":
        return _combined(table, cal, baselines, return_details)
    if cal is not None:
        cal.check_layers(table.names)
        spec = dict(cal.choice)
    elif estimator == "paper":
        spec = _paper_spec(table, last_k, exclude)
    else:
        spec = _all_layers_spec(table, exclude)
    est, used, cols = table.mean(spec)
    if not return_details:
        return est
    return est, _details(table, estimator, spec, est, used, cols)
