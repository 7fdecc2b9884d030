"""Per-case lower bounds on Dice by split-conformal calibration on labelled cases.

Two methods, both calibrated on labelled cases whose estimates were not fitted on them
(out-of-fold estimates), both chosen per estimator and coverage when the bound is applied:

``constant`` (Vovk et al. 2005; Lei et al. 2018 §2): the conformity score of a labelled case
is how much its estimate overshoots its true Dice, ``s_i = ŷ_i − Dice_i``. For a chosen
coverage ``1 − α`` the bound of a new case is ``L = ŷ − q`` with ``q`` the
``⌈(n + 1)(1 − α)⌉``-th smallest score (``q = +∞``, i.e. the trivial bound 0, when that rank
exceeds ``n``). The bound is the estimate shifted by a constant: it carries no per-case
information beyond the estimate, and ranking by it is ranking by the estimate.

``normalized`` (locally adaptive split conformal, Lei et al. 2018 §5.2; Papadopoulos et al.
2008): the score is divided by a per-case *difficulty scale* ``σ_i > 0`` computed without
labels from the case's own features, ``s_i = (ŷ_i − Dice_i) / σ_i``, and the bound is
``L = ŷ − q · σ`` with ``q`` the same order statistic of these scores. ``σ`` is a small
non-negative linear model of ``|ŷ − Dice|`` (:class:`DifficultyModel`, non-negative least
squares on features where higher means harder: ``1 − ŷ``, the mean entropy and the uncertain
fraction of the probability map, the spread of the layer-level SA across hidden layers;
floored at :data:`SIGMA_FLOOR` × the mean ``|ŷ − Dice|`` so it stays positive). Each
labelled case's ``σ`` comes from a model fitted on the other folds (cross-fitting, whole
groups per fold), so its score is computed as a new case's would be; the model applied to
new cases is refitted on all labelled cases. Easy cases (confident map, layers agreeing, high
estimate) get a tighter bound, hard ones a lower bound; the order of the bounds differs from
that of the estimates. Conformalised quantile regression (Romano et al. 2019) would need a
model of the Dice quantile itself; with the 20–150 labelled cases typical here a scale model
of four non-negative coefficients is the smaller thing to fit, and its failure mode is benign
(a σ that explains nothing gives back the constant method up to a scale).

Guarantee: if the labelled and the new cases are exchangeable and the estimator and ``σ`` were
not fitted on the calibration cases, ``P(Dice_new ≥ L) ≥ 1 − α`` (Vovk et al. 2005; Lei et al.
2018; Angelopoulos & Bates 2023). Here both are cross-fitted rather than split (the models
applied to new cases are refitted on all labelled cases), so the guarantee is approximate, as
for CV+ (Barber et al. 2021). A shift between the labelled cases and the new ones (another
scanner, a corruption never seen) breaks exchangeability: the guarantee is then void, which is
why ``scripts/evaluate_estimators.py`` measures coverage on held-out groups and shift families.

The calibration stores, per estimator, the sorted scores of both methods and the difficulty
model (:func:`conformal_entry`; held in :class:`engine.quality.Calibration`), so the coverage
and the method can be chosen when the bound is applied (:func:`apply_bound`). MAPIE implements
the constant method (``method="base"``) and a normalised one for regressors with a fitted
residual model; it is not a dependency, and the computation is a quantile.

References
----------
V. Vovk, A. Gammerman, G. Shafer, *Algorithmic Learning in a Random World*, Springer 2005.
H. Papadopoulos, V. Vovk, A. Gammerman, "Normalized nonconformity measures for regression
conformal prediction", AIA 2008.
J. Lei, M. G'Sell, A. Rinaldo, R. J. Tibshirani, L. Wasserman, "Distribution-free predictive
inference for regression", JASA 113 (2018) — §5.2, locally weighted conformal inference.
Y. Romano, E. Patterson, E. Candès, "Conformalized quantile regression", NeurIPS 2019.
R. F. Barber, E. J. Candès, A. Ramdas, R. J. Tibshirani, "Predictive inference with the
jackknife+", Annals of Statistics 49 (2021).
A. N. Angelopoulos, S. Bates, "Conformal prediction: a gentle introduction", FnT ML 16 (2023).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine._checks import check_choice

__all__ = [
    "BOUND_METHODS",
    "DEFAULT_BOUND_METHOD",
    "DIFFICULTY_FEATURES",
    "SIGMA_FLOOR",
    "Bound",
    "DifficultyModel",
    "apply_bound",
    "conformal_entry",
    "conformal_scores",
    "conformal_quantile",
    "coverage_interval",
    "dice_lower_bound",
    "difficulty_features",
    "empirical_coverage",
    "fit_difficulty",
    "hidden_layer_sa",
    "normalized_scores",
]

#: Methods of :func:`apply_bound` (see the module notes).
BOUND_METHODS = ("normalized", "constant")
#: The method used when none is named and the calibration holds both (chosen by the
#: coverage evaluation in docs/estimation.md, "Per-case Dice lower bounds").
DEFAULT_BOUND_METHOD = "normalized"
#: Label-free features of the difficulty model, each oriented so that higher = harder
#: (:func:`difficulty_features`).
DIFFICULTY_FEATURES = ("estimate", "mean_entropy", "uncertain_fraction", "sa_dispersion")
#: ``σ`` is floored at this fraction of the mean ``|ŷ − Dice|`` of the labelled cases.
SIGMA_FLOOR = 0.1
#: Fewer labelled cases than this (with every feature defined): no difficulty model (a
#: scale of up to five coefficients cross-fitted on fewer cases would be noise).
MIN_NORMALIZED_CASES = 10


def conformal_scores(estimate: np.ndarray, true_dice: np.ndarray) -> np.ndarray:
    """Sorted conformity scores ``ŷ − Dice`` over the cases where both are finite.

    Examples
    --------
    >>> conformal_scores(np.array([0.9, 0.5, np.nan]), np.array([0.8, 0.7, 0.9])).round(2).tolist()
    [-0.2, 0.1]
    """
    e = np.asarray(estimate, dtype=np.float64).reshape(-1)
    d = np.asarray(true_dice, dtype=np.float64).reshape(-1)
    if e.shape != d.shape:
        raise ValueError(f"estimate has {e.size} values but true_dice has {d.size}; give one per case")
    ok = np.isfinite(e) & np.isfinite(d)
    return np.sort(e[ok] - d[ok])


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ``⌈(n + 1) · coverage⌉``-th smallest score (``+inf`` when that exceeds ``n``).

    Parameters
    ----------
    scores : ndarray
        Conformity scores of the labelled cases (any order).
    coverage : float
        Nominal coverage ``1 − α`` in (0, 1).

    Examples
    --------
    >>> conformal_quantile(np.arange(9.0), 0.9)   # ⌈10 · 0.9⌉ = 9th smallest
    8.0
    >>> conformal_quantile(np.arange(8.0), 0.9)   # ⌈9 · 0.9⌉ = 9 > 8: no finite bound
    inf
    """
    if not 0.0 < float(coverage) < 1.0:
        raise ValueError(f"coverage={coverage!r}; expected a number strictly between 0 and 1 (e.g. 0.9)")
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    s = s[np.isfinite(s)]
    k = math.ceil((s.size + 1) * float(coverage) - 1e-12)
    return float("inf") if k > s.size else float(s[k - 1])


def dice_lower_bound(estimate: np.ndarray, scores: np.ndarray, coverage: float, *,
                     sigma: np.ndarray | None = None) -> np.ndarray:
    """Per-case lower bound on Dice: ``clip(ŷ − q · σ, 0, 1)``; NaN where ``ŷ`` or ``σ`` is NaN.

    Parameters
    ----------
    estimate : ndarray
        ``(n_cases,)`` estimates of the same estimator the scores were computed for.
    scores : ndarray
        Its conformity scores on labelled cases: ``ŷ − Dice`` (:func:`conformal_scores`)
        without ``sigma``, ``(ŷ − Dice) / σ`` (:func:`normalized_scores`) with it.
    coverage : float
        Nominal coverage (e.g. 0.9).
    sigma : ndarray, optional
        ``(n_cases,)`` difficulty scales of the new cases (:meth:`DifficultyModel.sigma`);
        absent means 1 (the constant method).

    Returns
    -------
    ndarray
        float64; 0 when too few labelled cases exist for the coverage (``q = inf``).

    Raises
    ------
    ValueError
        ``sigma`` does not have one value per case, or holds a value ``≤ 0``.

    Examples
    --------
    >>> dice_lower_bound(np.array([0.9, np.nan]), np.arange(9.0) / 100, 0.9).round(2).tolist()
    [0.82, nan]
    >>> dice_lower_bound(np.array([0.9, 0.9]), np.arange(9.0) / 10, 0.9, sigma=np.array([0.05, 0.5])).round(2).tolist()
    [0.86, 0.5]
    """
    e = np.asarray(estimate, dtype=np.float64).reshape(-1)
    q = conformal_quantile(scores, coverage)
    if sigma is None:
        sd = np.ones_like(e)
    else:
        sd = np.asarray(sigma, dtype=np.float64).reshape(-1)
        if sd.shape != e.shape:
            raise ValueError(f"sigma has {sd.size} values but estimate has {e.size}; give one scale per case")
        if np.any(sd <= 0):
            raise ValueError(f"sigma holds {int(np.sum(sd <= 0))} value(s) <= 0; difficulty scales must be "
                             "positive (use DifficultyModel.sigma, which floors them)")
    if math.isinf(q):
        return np.where(np.isnan(e) | np.isnan(sd), np.nan, 0.0)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(e) | np.isnan(sd), np.nan, np.clip(e - q * sd, 0.0, 1.0))


def empirical_coverage(bound: np.ndarray, true_dice: np.ndarray) -> dict[str, Any]:
    """Fraction of cases (finite Dice) whose Dice is at least the bound (a NaN bound counts as 0)."""
    b = np.asarray(bound, dtype=np.float64).reshape(-1)
    d = np.asarray(true_dice, dtype=np.float64).reshape(-1)
    ok = np.isfinite(d)
    covered = d[ok] >= np.where(np.isnan(b[ok]), 0.0, b[ok])
    n = int(ok.sum())
    return {"n": n, "covered": int(covered.sum()), "coverage": float(covered.mean()) if n else float("nan")}


def coverage_interval(n_calibration: int, coverage: float, *, prob: float = 0.95) -> tuple[float, float]:
    """Range of the coverage *given* the calibration set (exchangeable, continuous scores).

    With ``k = ⌈(n + 1) · coverage⌉ ≤ n``, the coverage conditional on the labelled cases is
    distributed as ``Beta(k, n + 1 − k)`` (Vovk 2012); its mean is ``k / (n + 1) ≥ coverage``.
    Returns the central ``prob`` interval (``(1, 1)`` when ``k > n``: the bound is 0).

    Examples
    --------
    >>> lo, hi = coverage_interval(99, 0.9)
    >>> 0.83 < lo < 0.9 < hi < 0.96
    True
    """
    k = math.ceil((n_calibration + 1) * float(coverage) - 1e-12)
    if k > n_calibration:
        return 1.0, 1.0
    from scipy import stats

    dist = stats.beta(k, n_calibration + 1 - k)
    return float(dist.ppf((1 - prob) / 2)), float(dist.ppf(1 - (1 - prob) / 2))


# ----------------------------------------------------------------------------- difficulty scale


def hidden_layer_sa(layer_scores: Any, layers: Any, *, names: Sequence[str] | None = None,
                    exclude: Sequence[str] = (), class_index: int = 0) -> tuple[np.ndarray, list[str]]:
    """Layer-level SA of the hidden layers, ``(n_cases, n_layers)``, and their names.

    Parameters
    ----------
    layer_scores, layers
        As in :func:`engine.quality.estimate_quality` (a score whose status is not OK is NaN).
    names : sequence of str, optional
        These layers, in this order (KeyError naming the closest scored ones when one is
        missing); default every layer not in ``exclude``, by depth.
    exclude : sequence of str, optional
        Layers left out by default (tensors on the output path).
    class_index : int, optional
        Which class when the scores carry a class axis.
    """
    from engine.quality.table import score_table

    table = score_table(layer_scores, None, layers, class_index=class_index)
    if names is None:
        names = [table.layers[j].name for j in table.order() if table.layers[j].name not in set(exclude)]
    cols = table.columns(list(names))
    return table.layer_score[:, cols], list(names)


def difficulty_features(
    estimate: np.ndarray,
    *,
    baselines: Mapping[str, np.ndarray] | None = None,
    layer_sa: np.ndarray | None = None,
    names: Sequence[str] = DIFFICULTY_FEATURES,
) -> dict[str, np.ndarray]:
    """Label-free per-case features of the difficulty model, each ``≥ 0``, higher = harder.

    Parameters
    ----------
    estimate : ndarray
        ``(n_cases,)`` the estimate being bounded.
    baselines : mapping, optional
        ``store.baselines()`` (``(n_cases,)`` or ``(n_cases, n_classes)`` arrays; class 0).
    layer_sa : ndarray, optional
        ``(n_cases, n_layers)`` layer-level SA of the hidden layers (:func:`hidden_layer_sa`).
    names : sequence of str, optional
        Which features (default :data:`DIFFICULTY_FEATURES`).

    Returns
    -------
    dict of str to ndarray
        ``estimate``: ``1 − clip(ŷ, 0, 1)``; ``mean_entropy``, ``uncertain_fraction``: the
        baselines as they are; ``soft_dice``: ``1 −`` the baseline; ``sa_dispersion``: the
        standard deviation (ddof 0) of the defined layer-level SA across the hidden layers,
        NaN with fewer than 2 defined. NaN where a feature is undefined.

    Raises
    ------
    KeyError
        A feature needs a baseline or the layer scores that were not given.
    ValueError
        An unknown feature name, or arrays without one row per case.

    Examples
    --------
    >>> f = difficulty_features(np.array([0.9, 0.5]), layer_sa=np.array([[0.8, 0.8], [0.2, np.nan]]),
    ...                         names=("estimate", "sa_dispersion"))
    >>> f["estimate"].round(2).tolist(), f["sa_dispersion"].tolist()
    ([0.1, 0.5], [0.0, nan])
    """
    e = np.asarray(estimate, dtype=np.float64).reshape(-1)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "estimate":
            out[name] = 1.0 - np.clip(e, 0.0, 1.0)
        elif name in ("mean_entropy", "uncertain_fraction", "soft_dice"):
            if not baselines or name not in baselines:
                have = sorted(baselines) if baselines else []
                raise KeyError(f"difficulty feature {name!r} needs the baseline {name!r}, which was not given "
                               f"(have: {', '.join(have) or 'none'}); pass baselines=store.baselines(), or use "
                               "the constant bound (method='constant')")
            v = np.asarray(baselines[name], dtype=np.float64)
            v = v[:, 0] if v.ndim == 2 else v.reshape(-1)
            out[name] = 1.0 - v if name == "soft_dice" else v
        elif name == "sa_dispersion":
            if layer_sa is None:
                raise KeyError("difficulty feature 'sa_dispersion' needs the layer-level SA of the hidden layers; "
                               "pass layer_sa=hidden_layer_sa(...)[0]")
            x = np.asarray(layer_sa, dtype=np.float64)
            x = x.reshape(x.shape[0], -1)
            defined = np.isfinite(x)
            k = defined.sum(axis=1)
            xm = np.where(defined, x, 0.0)
            mean = xm.sum(axis=1) / np.maximum(k, 1)
            var = (np.where(defined, x - mean[:, None], 0.0) ** 2).sum(axis=1) / np.maximum(k, 1)
            out[name] = np.where(k >= 2, np.sqrt(var), np.nan)
        else:
            raise ValueError(f"difficulty feature {name!r} is unknown; expected some of "
                             f"estimate, mean_entropy, uncertain_fraction, soft_dice, sa_dispersion")
        if out[name].shape != e.shape:
            raise ValueError(f"difficulty feature {name!r} has {out[name].size} values for {e.size} cases; "
                             "give one row per case")
    return out


def _matrix(features: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    missing = [n for n in names if n not in features]
    if missing:
        raise KeyError(f"difficulty feature(s) {', '.join(missing)} not given (have: {', '.join(features) or 'none'}); "
                       "compute them with difficulty_features(..., names=model.features)")
    cols = [np.asarray(features[n], dtype=np.float64).reshape(-1) for n in names]
    return np.stack(cols, axis=1) if cols else np.zeros((0, 0))


@dataclass
class DifficultyModel:
    """Per-case difficulty scale ``σ = max(floor, b₀ + Σ_j b_j · x_j / scale_j)``, all ``b ≥ 0``.

    ``features`` are the names of :func:`difficulty_features` in column order, ``scale``
    their training means (a positive rescaling, so the coefficients are comparable), ``coef``
    ``b_1 …`` and ``intercept`` ``b₀`` (non-negative least squares of ``|ŷ − Dice|``),
    ``floor`` the smallest ``σ``, ``layers`` the hidden layers of ``sa_dispersion`` (empty when
    unused), ``n`` the labelled cases it was fitted on. JSON-ready; stored in the calibration.
    """

    features: list[str]
    scale: list[float]
    coef: list[float]
    intercept: float
    floor: float
    layers: list[str] = field(default_factory=list)
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DifficultyModel:
        return cls(**dict(d))

    def sigma(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``(n_cases,)`` difficulty scales, ``≥ floor > 0``; NaN where a feature is NaN."""
        x = _matrix(features, self.features)
        ok = np.isfinite(x).all(axis=1)
        z = np.where(np.isfinite(x), x, 0.0) / np.asarray(self.scale, dtype=np.float64)
        s = np.maximum(self.intercept + z @ np.asarray(self.coef, dtype=np.float64), self.floor)
        return np.where(ok, s, np.nan)


def fit_difficulty(features: Mapping[str, np.ndarray], abs_residual: np.ndarray, *,
                   floor_fraction: float = SIGMA_FLOOR, layers: Sequence[str] = ()) -> DifficultyModel:
    """Fit :class:`DifficultyModel` to ``|ŷ − Dice|`` by non-negative least squares.

    Cases with a NaN feature or residual are left out. ``scipy.optimize.nnls`` solves
    ``min ‖[1, x / scale] b − |r|‖²`` subject to ``b ≥ 0`` (Lawson & Hanson), so ``σ`` can
    only grow with a feature that means "harder" and is positive wherever the intercept or a
    feature is; the floor ``floor_fraction · mean |r|`` (at least 1e-6) covers the rest.

    Raises
    ------
    ValueError
        Fewer than 2 usable cases.

    Examples
    --------
    >>> x = np.linspace(0, 1, 20)
    >>> m = fit_difficulty({"estimate": x}, 0.05 + 0.2 * x)
    >>> round(m.intercept, 3), round(m.coef[0] / m.scale[0], 3)
    (0.05, 0.2)
    """
    from scipy.optimize import nnls

    names = list(features)
    x = _matrix(features, names)
    y = np.abs(np.asarray(abs_residual, dtype=np.float64).reshape(-1))
    if x.shape[0] != y.size:
        raise ValueError(f"features have {x.shape[0]} rows but abs_residual has {y.size} values")
    ok = np.isfinite(x).all(axis=1) & np.isfinite(y)
    if ok.sum() < 2:
        raise ValueError(f"only {int(ok.sum())} labelled case(s) have every difficulty feature defined; "
                         "a difficulty model needs at least 2")
    xo, yo = x[ok], y[ok]
    scale = xo.mean(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    a = np.column_stack([np.ones(yo.size), xo / scale])
    b, _ = nnls(a, yo)
    return DifficultyModel(features=names, scale=scale.tolist(), coef=b[1:].tolist(), intercept=float(b[0]),
                           floor=max(float(floor_fraction) * float(yo.mean()), 1e-6), layers=list(layers),
                           n=int(ok.sum()))


def normalized_scores(
    estimate: np.ndarray,
    true_dice: np.ndarray,
    features: Mapping[str, np.ndarray],
    *,
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    floor_fraction: float = SIGMA_FLOOR,
    layers: Sequence[str] = (),
) -> tuple[np.ndarray, DifficultyModel]:
    """Cross-fitted normalised conformity scores ``(ŷ − Dice) / σ`` and the model for new cases.

    The labelled cases with a finite estimate, Dice and every feature are split into folds
    (:func:`engine.quality.group_folds`: whole groups per fold when ``groups`` holds at least
    two, else cases); each case's ``σ`` comes from a :class:`DifficultyModel` fitted on the
    other folds. The model returned is fitted on all those cases.

    Parameters
    ----------
    estimate : ndarray
        ``(n_cases,)`` out-of-fold estimates of the labelled cases.
    true_dice : ndarray
        ``(n_cases,)``; NaN cases are left out.
    features : mapping
        :func:`difficulty_features` of the same cases (computed with these estimates).
    groups, folds, seed
        Fold assignment (folds capped at the number of cases or groups).
    floor_fraction, layers
        As in :func:`fit_difficulty`.

    Returns
    -------
    scores : ndarray
        Sorted normalised scores, one per usable case.
    model : DifficultyModel

    Raises
    ------
    ValueError
        Fewer than :data:`MIN_NORMALIZED_CASES` usable cases.
    """
    from engine.quality.calibration import group_folds

    e = np.asarray(estimate, dtype=np.float64).reshape(-1)
    d = np.asarray(true_dice, dtype=np.float64).reshape(-1)
    if e.shape != d.shape:
        raise ValueError(f"estimate has {e.size} values but true_dice has {d.size}; give one per case")
    names = list(features)
    x = _matrix(features, names)
    if x.shape[0] != e.size:
        raise ValueError(f"features have {x.shape[0]} rows for {e.size} cases; give one row per case")
    idx = np.flatnonzero(np.isfinite(e) & np.isfinite(d) & np.isfinite(x).all(axis=1))
    if idx.size < MIN_NORMALIZED_CASES:
        raise ValueError(f"only {idx.size} labelled case(s) have a finite estimate, Dice and every difficulty "
                         f"feature; the normalised bound needs at least {MIN_NORMALIZED_CASES}")
    r = e[idx] - d[idx]
    g = None if groups is None else np.asarray([str(v) for v in groups], dtype=object)
    if g is not None and g.size != e.size:
        raise ValueError(f"groups has {g.size} entries but there are {e.size} cases; give one group per case")
    gi = None if g is None or len(set(g[idx].tolist())) < 2 else g[idx]
    fold = group_folds(idx.size, min(int(folds), idx.size), groups=gi, seed=seed)
    scores = np.empty(idx.size)
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        m = fit_difficulty({n: x[idx[tr], j] for j, n in enumerate(names)}, r[tr], floor_fraction=floor_fraction)
        scores[te] = r[te] / m.sigma({n: x[idx[te], j] for j, n in enumerate(names)})
    model = fit_difficulty({n: x[idx, j] for j, n in enumerate(names)}, r, floor_fraction=floor_fraction,
                           layers=layers)
    return np.sort(scores), model


def conformal_entry(
    estimate: np.ndarray,
    true_dice: np.ndarray,
    features: Mapping[str, np.ndarray] | None = None,
    *,
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    layers: Sequence[str] = (),
) -> dict[str, Any]:
    """What a calibration stores per estimator to draw Dice lower bounds at any coverage.

    Returns
    -------
    dict
        ``scores`` (sorted ``ŷ − Dice``), ``n`` and ``method`` — the constant method, as
        calibration files have held since format version 2 — and, when ``features`` are given
        and enough cases have them, ``normalized``: ``scores`` (sorted cross-fitted
        ``(ŷ − Dice) / σ``), ``n`` and ``difficulty`` (:meth:`DifficultyModel.to_dict`);
        else ``normalized_error`` saying why not.
    """
    scores = conformal_scores(estimate, true_dice)
    out: dict[str, Any] = {"scores": scores.tolist(), "n": int(scores.size),
                           "method": "split conformal on out-of-fold estimates: score = estimate - true Dice"}
    if features is not None:
        try:
            ns, model = normalized_scores(estimate, true_dice, features, groups=groups, folds=folds, seed=seed,
                                          layers=layers)
        except ValueError as exc:
            out["normalized_error"] = str(exc)
        else:
            out["normalized"] = {"scores": ns.tolist(), "n": int(ns.size), "difficulty": model.to_dict(),
                                 "method": "locally adaptive split conformal: score = (estimate - true Dice) / "
                                           "sigma, sigma cross-fitted on label-free features"}
    return out


@dataclass(frozen=True)
class Bound:
    """Per-case Dice lower bounds of one estimator (:func:`apply_bound`).

    ``bound`` (NaN where undefined), ``sigma`` (the difficulty scale; 1 for the constant
    method, NaN where undefined), ``reason`` (``""``, or why the bound is undefined),
    ``method`` (``"normalized"`` or ``"constant"``), ``q`` (the conformal quantile, ``inf``
    when too few labelled cases exist for the coverage), ``n_calibration`` and ``note``
    (why the method differs from the one asked for, else ``""``).
    """

    bound: np.ndarray
    sigma: np.ndarray
    reason: np.ndarray
    method: str
    q: float
    n_calibration: int
    note: str = ""


def apply_bound(
    entry: Mapping[str, Any],
    estimate: np.ndarray,
    coverage: float,
    *,
    features: Mapping[str, np.ndarray] | None = None,
    method: str | None = None,
) -> Bound:
    """Dice lower bounds of new cases from a calibration's :func:`conformal_entry`.

    Parameters
    ----------
    entry : mapping
        ``Calibration.conformal[estimator]``.
    estimate : ndarray
        ``(n_cases,)`` the estimator's values on the new cases.
    coverage : float
        Nominal coverage in (0, 1).
    features : mapping, optional
        :func:`difficulty_features` of the new cases (names ``entry["normalized"]
        ["difficulty"]["features"]``); needed by the normalised method.
    method : {"normalized", "constant"}, optional
        Default :data:`DEFAULT_BOUND_METHOD` when the entry holds it, else ``constant`` (a
        calibration written before the normalised method existed; ``note`` says so).

    Returns
    -------
    Bound

    Raises
    ------
    ValueError
        An unknown method, or ``normalized`` asked for an entry without it.
    KeyError
        ``normalized`` without the features its difficulty model needs.
    """
    if method is not None:
        check_choice(method, "method", BOUND_METHODS)
    e = np.asarray(estimate, dtype=np.float64).reshape(-1)
    norm = entry.get("normalized")
    note = ""
    chosen = method or DEFAULT_BOUND_METHOD
    if chosen == "normalized" and not norm:
        why = entry.get("normalized_error") or "the calibration was written before the normalised method existed"
        if method == "normalized":
            raise ValueError(f"the calibration holds no normalised conformal scores ({why}); refit the calibration "
                             "on labelled data with this protoseg, or use the constant bound")
        chosen, note = "constant", f"constant bound: no normalised scores in the calibration ({why})"
    reason = np.where(np.isnan(e), "estimate undefined", "").astype(object)
    if chosen == "constant":
        scores = np.asarray(entry["scores"], dtype=np.float64)
        sigma = np.where(np.isnan(e), np.nan, 1.0)
        bound = dice_lower_bound(e, scores, coverage)
        n = int(entry.get("n", scores.size))
    else:
        model = DifficultyModel.from_dict(norm["difficulty"])
        if features is None:
            raise KeyError(f"the normalised bound needs the difficulty features {', '.join(model.features)}; pass "
                           "features=difficulty_features(...)")
        sigma = model.sigma(features)
        x = _matrix(features, model.features)
        bad = ~np.isfinite(x)
        for i in np.flatnonzero(np.isfinite(e) & bad.any(axis=1)):
            reason[i] = ("difficulty scale undefined: "
                         + ", ".join(n for n, b in zip(model.features, bad[i]) if b) + " undefined")
        scores = np.asarray(norm["scores"], dtype=np.float64)
        bound = dice_lower_bound(e, scores, coverage, sigma=sigma)
        n = int(norm.get("n", scores.size))
    return Bound(bound=bound, sigma=np.asarray(sigma, dtype=np.float64), reason=reason.astype(str),
                 method=chosen, q=conformal_quantile(scores, coverage), n_calibration=n, note=note)
