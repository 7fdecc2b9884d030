"""Cross-validated calibration: which layer(s) and level rank true Dice best (SPEC §4).

:func:`calibrate` scores every candidate of :func:`default_candidates` (each single layer at
layer and at unit level, all layers, the paper recipe, every contiguous depth window) on
labelled cases and chooses by rank correlation with true Dice. The choice is made by
cross-validation over :func:`group_folds` (whole groups per fold when groups are given): in
each fold the candidate is chosen on the training part only and scored on the held-out part.
The result, a :class:`Calibration`, is saved as versioned JSON and reused on unlabelled data
by ``estimate_quality(..., estimator="calibrated")``.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine._checks import check_choice
from engine._json import dumps
from engine.quality.table import ScoreTable, depth_order, parse_layers, score_table
from engine.quality.validation import correlation

__all__ = [
    "CALIBRATION_ENCODING",
    "Calibration",
    "calibrate",
    "candidate_estimates",
    "default_candidates",
    "group_folds",
]

CALIBRATION_ENCODING = ("protoseg-calibration", "2")
#: Versions :meth:`Calibration.from_json` reads (version 1 had no ``combined`` and ``conformal``).
READABLE_VERSIONS = ("1", "2")
METRICS = ("spearman", "pearson")


def default_candidates(layers: Any, *, has_units: Sequence[bool] | None = None, last_k: int = 2) -> list[dict[str, Any]]:
    """The candidate estimators :func:`calibrate` chooses from.

    Each single layer at layer level (``layer:<name>``) and at unit level
    (``units:<name>``, when unit scores exist), the mean over all layers (``all-layers``),
    the paper recipe (``paper``) and every contiguous depth window of 2 to L-1 layers at
    layer level (``window:<first>..<last>``).

    Parameters
    ----------
    layers : structured array or list
        As in :func:`engine.quality.estimate_quality`.
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
    lay = parse_layers(layers)
    order = depth_order(lay)
    has_units = [False] * len(lay) if has_units is None else list(has_units)
    names = [lay[i].name for i in order]
    cands: list[dict[str, Any]] = []
    for j in order:
        cands.append({"name": f"layer:{lay[j].name}", "level": "layer", "layers": [lay[j].name]})
        if has_units[j]:
            cands.append({"name": f"units:{lay[j].name}", "level": "unit", "layers": [lay[j].name]})
    cands.append({"name": "all-layers", "level": "layer", "layers": names})
    if len(order) >= last_k and all(has_units[j] for j in order[-last_k:]):
        cands.append({"name": "paper", "level": "unit", "layers": [lay[j].name for j in order[-last_k:]]})
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
        As in :func:`engine.quality.estimate_quality`.
    candidates : sequence of dict
        Specs as returned by :func:`default_candidates` (or ``Calibration.choice``).
    class_index : int, optional
        Which class when the scores carry a class axis.

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
    table = score_table(layer_scores, unit_scores, layers, class_index=class_index)
    return np.stack([table.mean(c)[0] for c in candidates]) if candidates else np.zeros((0, table.n_cases))


def group_folds(n_cases: int, folds: int, *, groups: Sequence[Any] | None = None, seed: int = 0) -> np.ndarray:
    """Assign each case to a fold (int array ``(n_cases,)``).

    With ``groups``, whole groups go to one fold (largest groups first, each to the fold
    with the fewest cases so far; ties by a seeded shuffle), as scikit-learn's
    ``GroupKFold`` (written here with NumPy: scikit-learn is not a dependency); the number
    of folds is capped at the number of groups. Without groups, a seeded random
    permutation is cut into ``folds`` near-equal parts.

    Parameters
    ----------
    n_cases : int
        Number of cases.
    folds : int
        At least 2.
    groups : sequence, optional
        One label per case.
    seed : int, optional
        Seed of the permutation (and of the order among groups of equal size).

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
    ``combined`` is the fitted combined estimator (:meth:`engine.quality.combined.CombinedModel.to_dict`)
    or None; ``conformal`` maps an estimator name to what Dice lower bounds are drawn from at
    any coverage (:func:`engine.quality.conformal_entry`): its sorted conformity scores on the
    labelled cases (``scores``: out-of-fold estimate − true Dice, the constant method) and,
    when fitted, ``normalized`` — the cross-fitted scores ``(estimate − Dice) / σ`` and the
    label-free difficulty model of ``σ`` (see :mod:`engine.quality.conformal`). The
    ``normalized`` key is an addition within format version 2: files without it (written
    before it existed) still read, and give the constant bound; older readers ignore it.
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
    combined: dict[str, Any] | None = None
    conformal: dict[str, Any] = field(default_factory=dict)

    def check_layers(self, names: Sequence[str]) -> None:
        """Raise when the chosen layers are not among ``names`` (another model or layer set)."""
        self.check_layers_of(self.choice["layers"], names)

    @staticmethod
    def check_layers_of(needed: Sequence[str], names: Sequence[str]) -> None:
        """Raise when a layer of ``needed`` is not among the scored ``names``."""
        missing = [n for n in needed if n not in set(names)]
        if missing:
            raise ValueError(
                f"calibration was made for layers {', '.join(needed)} but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not among the scored layers "
                f"({len(names)} scored); use a calibration made for this model, or score those layers"
            )

    def combined_model(self) -> Any:
        """The stored :class:`~engine.quality.combined.CombinedModel`; ValueError when none was fitted."""
        from engine.quality.combined import CombinedModel

        if not self.combined:
            raise ValueError(
                "this calibration holds no combined estimator (written by an older protoseg, or fitted "
                "without baselines); refit it on labelled data with fit_combined(...) or protoseg estimate "
                "--calibration NEW.json"
            )
        return CombinedModel.from_dict(self.combined)

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``encoding-type`` and ``encoding-version`` (NaN kept as NaN)."""
        d = asdict(self)
        d["encoding-type"], d["encoding-version"] = CALIBRATION_ENCODING
        return d

    def to_json(self) -> str:
        """Serialise to a JSON string (NaN written as ``null``)."""
        return dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Parse :meth:`to_json` output; refuses unknown encodings with advice."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration is not valid JSON ({exc}); pass a file written by protoseg calibrate") from None
        if not isinstance(d, dict) or d.get("encoding-type") != CALIBRATION_ENCODING[0]:
            raise ValueError("not a protoseg calibration (encoding-type missing); pass a file written by Calibration.save")
        if d.get("encoding-version") not in READABLE_VERSIONS:
            raise ValueError(
                f"calibration encoding version {d.get('encoding-version')!r} is not supported (expected one of "
                f"{', '.join(READABLE_VERSIONS)}); upgrade protoseg or recalibrate"
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


def _candidate_specs(
    table: ScoreTable, candidates: Sequence[Mapping[str, Any]] | None, *, exclude: Sequence[str], last_k: int
) -> list[dict[str, Any]]:
    """The given candidates (checked), or the defaults over the layers not in ``exclude``."""
    if candidates is None:
        usable = [j for j, lay in enumerate(table.layers) if lay.name not in set(exclude)]
        if not usable:
            raise ValueError(f"exclude={list(exclude)!r} leaves no layer to calibrate on; exclude fewer layers")
        candidates = default_candidates(
            [{"name": table.layers[j].name, "depth": table.layers[j].depth, "index": table.layers[j].index} for j in usable],
            has_units=[bool(table.unit_total[j]) for j in usable],
            last_k=last_k,
        )
    specs = [dict(c) for c in candidates]
    for c in specs:
        for key in ("name", "level", "layers"):
            if key not in c:
                raise ValueError(f"candidate {c!r} has no {key!r}; each candidate needs name, level and layers")
    return specs


def _select(values: np.ndarray, target: np.ndarray, rows: np.ndarray, metric: str, min_coverage: float) -> tuple[int, np.ndarray]:
    """Index of the best candidate on ``rows`` and every candidate's metric there."""
    scores = np.full(values.shape[0], np.nan)
    for c in range(values.shape[0]):
        x = values[c, rows]
        if np.isfinite(x).mean() < min_coverage:
            continue
        scores[c] = correlation(x, target[rows], metric)
    if not np.isfinite(scores).any():
        raise ValueError(
            "no candidate estimator has a defined correlation on the training cases (too few cases with "
            "defined scores, or constant Dice); label more cases or use fewer folds"
        )
    return int(np.nanargmax(scores)), scores


def _cross_validate(
    values: np.ndarray, y: np.ndarray, labelled: np.ndarray, fold: np.ndarray, names: Sequence[str],
    groups: np.ndarray | None, *, metric: str, min_coverage: float,
) -> tuple[np.ndarray, list[dict[str, Any]], Counter]:
    """Out-of-fold estimates, per-fold records and how often each candidate was selected.

    In each fold the candidate is selected on the training cases only, then scored on the
    held-out cases.
    """
    oof = np.full(y.size, np.nan)
    fold_info = []
    times: Counter = Counter()
    for f in np.unique(fold):
        test = labelled[fold == f]
        train = labelled[fold != f]
        best, _ = _select(values, y, train, metric, min_coverage)
        oof[test] = values[best, test]
        times[best] += 1
        fold_info.append(
            {
                "fold": int(f),
                "selected": names[best],
                "train_metric": correlation(values[best, train], y[train], metric),
                "test_metric": correlation(values[best, test], y[test], metric),
                "n_train": int(train.size),
                "n_test": int(test.size),
                "test_cases": test.tolist(),
                "test_groups": sorted(set(groups[test].tolist())) if groups is not None else None,
            }
        )
    return oof, fold_info, times


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


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
        As in :func:`engine.quality.estimate_quality` (SA against the prediction, on
        labelled cases).
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
    last_k : int, optional
        Layers of the default ``paper`` candidate.
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
    check_choice(metric, "metric", METRICS)
    table = score_table(layer_scores, unit_scores, layers, class_index=class_index)
    y = np.asarray(true_dice, dtype=np.float64).reshape(-1)
    if y.shape[0] != table.n_cases:
        raise ValueError(f"true_dice has {y.shape[0]} values but the scores hold {table.n_cases} cases")
    specs = _candidate_specs(table, candidates, exclude=exclude, last_k=last_k)
    values = np.stack([table.mean(c)[0] for c in specs])
    labelled = np.flatnonzero(np.isfinite(y))
    if labelled.size < 6:
        raise ValueError(f"only {labelled.size} cases have a finite true Dice; calibration needs at least 6")
    g = None if groups is None else np.asarray([str(v) for v in groups], dtype=object)
    if g is not None and len(g) != table.n_cases:
        raise ValueError(f"groups has {len(g)} entries but there are {table.n_cases} cases; give one group per case")
    fold = group_folds(labelled.size, folds, groups=None if g is None else g[labelled], seed=seed)
    oof, fold_info, times = _cross_validate(values, y, labelled, fold, [c["name"] for c in specs], g,
                                            metric=metric, min_coverage=min_coverage)
    best, all_scores = _select(values, y, labelled, metric, min_coverage)
    return Calibration(
        choice={"name": specs[best]["name"], "level": specs[best]["level"], "layers": list(specs[best]["layers"])},
        metric=metric,
        cv_metric=correlation(oof[labelled], y[labelled], metric),
        in_sample_metric=float(all_scores[best]),
        layer_names=table.names,
        n_cases=int(labelled.size),
        n_groups=None if g is None else int(len(set(g[labelled].tolist()))),
        folds=fold_info,
        candidates=[
            {"name": c["name"], "level": c["level"], "n_layers": len(c["layers"]), "in_sample": float(all_scores[i]),
             "times_selected": int(times[i])}
            for i, c in enumerate(specs)
        ],
        class_index=class_index,
        seed=seed,
        oof_estimate=oof.tolist(),
        cv_fold_mean=_nanmean([f["test_metric"] for f in fold_info]),
    )
