"""The score table every estimator and calibration candidate is computed from.

Adapts what a caller holds — the arrays a store returns (``layer_scores()``,
``unit_scores(layer)``, ``layers``) or arrays built by hand — into one duck-typed view:
per case and layer, the layer-level SA and the sum and count of the defined unit-level SA.
A score counts only when it is finite and (when a status is given) its status is ``OK``;
undefined scores are left out of every mean, never counted as 1 (SPEC §4).

This module is internal to :mod:`engine.quality`; its names are not re-exported.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

import numpy as np

from engine._json import text
from engine.status import Status

__all__ = ["Layer", "ScoreTable", "parse_layers", "depth_order", "score_table"]


@dataclass(frozen=True)
class Layer:
    """One scored tensor: its unique ``name``, ``depth``, position ``index`` in the store and
    display ``label`` (the layer name an exporter gave it)."""

    name: str
    depth: int
    index: int
    label: str


def parse_layers(layers: Any) -> list[Layer]:
    """Normalise a store ``layers`` table, a list of dicts, or a list of names.

    Parameters
    ----------
    layers : structured array or list
        The store's ``layers`` table (fields ``name``, ``depth``, optionally ``index``,
        ``layer``), a list of dicts with those keys, or a list of names in depth order
        (a missing ``depth`` or ``index`` is the position).

    Returns
    -------
    list of Layer

    Raises
    ------
    TypeError
        ``layers`` is none of the above.
    ValueError
        A row without a name, or duplicate names.
    """
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
        name = text(r["name"])
        label = text(r.get("layer", name))
        out.append(Layer(name, int(r.get("depth", i)), int(r.get("index", i)), label or name))
    if len({lay.name for lay in out}) != len(out):
        raise ValueError("layers holds duplicate names; each scored tensor must have a unique name")
    return out


def depth_order(layers: Sequence[Layer]) -> list[int]:
    """Positions of ``layers`` sorted by depth, shallowest first (stable for equal depths)."""
    return sorted(range(len(layers)), key=lambda i: (layers[i].depth, i))


def _score_array(scores: Any, what: str, class_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(score (n_cases, k), status or None)`` from an array or a dict with score/status.

    A score whose status is not ``OK`` becomes NaN.
    """
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


def _unit_lookup(unit_scores: Any, layer: Layer) -> Any:
    """One layer's unit scores from a mapping (by index or name) or a callable, or None."""
    if unit_scores is None:
        return None
    if callable(unit_scores) and not isinstance(unit_scores, Mapping):
        return unit_scores(layer.index)
    for key in (layer.index, layer.name, str(layer.index)):
        if key in unit_scores:
            return unit_scores[key]
    return None


def _status_name(code: Any) -> str:
    try:
        return Status(int(code)).name
    except ValueError:
        return f"STATUS_{int(code)}"


def _undefined_counts(defined: np.ndarray, status: np.ndarray | None) -> list[Counter]:
    """Per case (row): how many scores are undefined, by status name ("NaN" without status)."""
    out = []
    for i in range(defined.shape[0]):
        bad = ~defined[i]
        if not bad.any():
            out.append(Counter())
        elif status is None:
            out.append(Counter({"NaN": int(bad.sum())}))
        else:
            codes, counts = np.unique(status[i][bad], return_counts=True)
            out.append(Counter({_status_name(c): int(k) for c, k in zip(codes, counts)}))
    return out


@dataclass
class ScoreTable:
    """Per-case, per-layer aggregates every estimator and candidate is built from.

    Attributes
    ----------
    layers : list of Layer
    layer_score : ndarray
        ``(n_cases, n_layers)`` layer-level SA, NaN where undefined.
    layer_status : ndarray or None
        ``(n_cases, n_layers)`` status codes when they were given.
    unit_sum, unit_count : ndarray
        ``(n_cases, n_layers)`` sum and number of the defined unit-level scores.
    unit_total : ndarray
        ``(n_layers,)`` units per layer (0 where unit scores are absent).
    unit_reasons : dict of int to list of Counter
        Per layer position with unit scores, per case: undefined units by status name.
    """

    layers: list[Layer]
    layer_score: np.ndarray
    layer_status: np.ndarray | None
    unit_sum: np.ndarray
    unit_count: np.ndarray
    unit_total: np.ndarray
    unit_reasons: dict[int, list[Counter]]

    @property
    def n_cases(self) -> int:
        return self.layer_score.shape[0]

    @property
    def names(self) -> list[str]:
        return [lay.name for lay in self.layers]

    def order(self) -> list[int]:
        """Layer positions sorted by depth (stable)."""
        return depth_order(self.layers)

    def columns(self, names: Sequence[str]) -> list[int]:
        """Positions of the layers ``names``; KeyError naming the closest scored layers."""
        scored = self.names
        cols = []
        for name in names:
            if name not in scored:
                close = get_close_matches(name, scored, n=3)
                hint = (f"closest: {', '.join(close)}" if close
                        else f"available: {', '.join(scored[:8])}{'...' if len(scored) > 8 else ''}")
                raise KeyError(
                    f"layer {name!r} used by this estimator is not among the scored layers ({hint}); "
                    "score the same layers as the calibration data, or recalibrate"
                )
            cols.append(scored.index(name))
        return cols

    def mean(self, spec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Evaluate an estimator spec (``level`` ∈ {layer, unit}, ``layers``: names).

        Returns
        -------
        estimate : ndarray
            ``(n_cases,)`` mean of the defined scores; NaN where none is defined.
        used : ndarray
            ``(n_cases,)`` number of defined scores that entered the mean.
        cols : list of int
            The layer positions used.

        Notes
        -----
        Layer level: ``mean_l SA_l`` over defined layers. Unit level: ``Σ SA_u / #u`` over the
        defined units of all chosen layers, every unit weighted equally.
        """
        cols = self.columns(spec["layers"])
        if spec["level"] == "unit":
            missing = [self.layers[j].name for j in cols if self.unit_total[j] == 0]
            if missing:
                raise ValueError(
                    f"unit-level scores are missing for layer(s) {', '.join(missing)}; "
                    "score with level='unit' or level='both' to use this estimator"
                )
            s = self.unit_sum[:, cols].sum(axis=1)
            used = self.unit_count[:, cols].sum(axis=1)
            return np.where(used > 0, s / np.maximum(used, 1), np.nan), used, cols
        if spec["level"] == "layer":
            vals = self.layer_score[:, cols]
            used = np.isfinite(vals).sum(axis=1)
            with np.errstate(invalid="ignore"):
                est = np.where(used > 0, np.nansum(vals, axis=1) / np.maximum(used, 1), np.nan)
            return est, used, cols
        raise ValueError(f"estimator level {spec['level']!r}; expected 'layer' or 'unit'")

    def undefined(self, level: str, cols: Sequence[int]) -> list[Counter]:
        """Per case: the undefined scores among ``cols`` at ``level``, counted by status name."""
        cols = list(cols)
        if level == "unit":
            return [sum((self.unit_reasons[j][i] for j in cols), Counter()) for i in range(self.n_cases)]
        if self.layer_status is None:
            return [Counter({"NaN": int(np.isnan(self.layer_score[i, cols]).sum())}) for i in range(self.n_cases)]
        st = self.layer_status[:, cols]
        return [Counter(_status_name(c) for c in row[row != Status.OK]) for row in st]


def score_table(layer_scores: Any, unit_scores: Any, layers: Any, *, class_index: int = 0) -> ScoreTable:
    """Build the :class:`ScoreTable` for one class.

    Parameters
    ----------
    layer_scores : ndarray or dict
        ``(n_cases, [n_classes,] n_layers)``, or a dict with ``score`` and ``status``.
    unit_scores : mapping, callable or None
        Layer index or name → ``(n_cases, [n_classes,] C)`` array or score/status dict, or a
        callable ``f(layer_index)`` (e.g. ``store.unit_scores``).
    layers : structured array or list
        See :func:`parse_layers`.
    class_index : int, optional
        Which class when the scores carry a class axis.

    Raises
    ------
    ValueError
        Shapes that do not match each other or ``layers``.
    """
    lay = parse_layers(layers)
    s, st = _score_array(layer_scores, "layer_scores", class_index)
    if s.shape[1] != len(lay):
        raise ValueError(f"layer_scores has {s.shape[1]} layers but layers lists {len(lay)}; pass matching arrays")
    n, n_layers = s.shape
    usum = np.zeros((n, n_layers))
    ucount = np.zeros((n, n_layers), dtype=np.int64)
    utotal = np.zeros(n_layers, dtype=np.int64)
    reasons: dict[int, list[Counter]] = {}
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
        reasons[j] = _undefined_counts(ok, ust)
    return ScoreTable(lay, s, st, usum, ucount, utotal, reasons)
