"""The ``combined`` estimator: SA features and the trivial baselines in a small ridge model.

Features per case (:func:`feature_specs`): the layer-level SA of every hidden layer
(``layer:<name>``), the mean unit-level SA of every layer with unit scores (``units:<name>``),
the ``all-layers`` and ``paper`` means, and three depth windows (shallow, middle, deep
thirds of the layers by depth) at layer level and, when every layer in them has units, at
unit level — together with the baselines (predicted-volume fraction, soft Dice, uncertain
fraction, mean entropy). An undefined value (NaN) becomes 0: no support, the worst SA.

The model predicts the true Dice by ridge regression on standardised features
(``min ‖y − ȳ − Zβ‖² + λ‖β‖²``, ``λ = α · n``, intercept unpenalised), solved in closed form
with NumPy (scikit-learn's ``Ridge`` does the same; it is not a dependency). ``α`` is chosen
from :data:`ALPHAS` by cross-validated squared error, and the whole fit is cross-validated
the way :func:`engine.quality.calibrate` is: outer folds hold whole groups
(:func:`engine.quality.group_folds`); in each, ``α`` is chosen by an inner cross-validation
on the training part only (over its groups when it holds at least two, else over cases),
and the held-out part is predicted. The out-of-fold predictions are the honest figures;
the model kept is refitted on every labelled case.

Three feature sets (:data:`FEATURE_SETS`): ``sa+baselines`` (the estimator), ``baselines``
and ``sa`` (to measure what SA adds: :func:`sa_added_value`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine._checks import check_choice
from engine.quality.table import ScoreTable, score_table

__all__ = [
    "ALPHAS",
    "BASELINE_FEATURES",
    "FEATURE_SETS",
    "CombinedModel",
    "feature_specs",
    "feature_matrix",
    "fit_combined",
    "sa_added_value",
]

ALPHAS = tuple(float(a) for a in np.logspace(-3, 2, 11))
BASELINE_FEATURES = ("predicted_fraction", "soft_dice", "uncertain_fraction", "mean_entropy")
FEATURE_SETS = ("sa+baselines", "sa", "baselines")


def feature_specs(table: ScoreTable, *, exclude: Sequence[str] = (), last_k: int = 2) -> list[dict[str, Any]]:
    """SA feature specs (``name``, ``level``, ``layers``) over the layers not in ``exclude``."""
    order = [j for j in table.order() if table.layers[j].name not in set(exclude)]
    if not order:
        raise ValueError(f"exclude={list(exclude)!r} leaves no layer for the combined estimator; exclude fewer layers")
    names = [table.layers[j].name for j in order]
    has_units = {table.layers[j].name: bool(table.unit_total[j]) for j in order}
    specs: list[dict[str, Any]] = []
    for n in names:
        specs.append({"name": f"layer:{n}", "level": "layer", "layers": [n]})
        if has_units[n]:
            specs.append({"name": f"units:{n}", "level": "unit", "layers": [n]})
    specs.append({"name": "all-layers", "level": "layer", "layers": names})
    if len(names) >= last_k and all(has_units[n] for n in names[-last_k:]):
        specs.append({"name": "paper", "level": "unit", "layers": names[-last_k:]})
    if len(names) >= 3:
        for label, part in zip(("shallow", "middle", "deep"), np.array_split(np.array(names, dtype=object), 3)):
            win = [str(x) for x in part]
            specs.append({"name": f"window:{label}", "level": "layer", "layers": win})
            if all(has_units[n] for n in win):
                specs.append({"name": f"unitwindow:{label}", "level": "unit", "layers": win})
    return specs


def feature_matrix(
    table: ScoreTable, baselines: Mapping[str, np.ndarray] | None, specs: Sequence[Mapping[str, Any]]
) -> np.ndarray:
    """``(n_cases, n_features)`` raw feature values (NaN where undefined).

    A spec with ``level="baseline"`` reads ``baselines[name]``; others are SA means
    (:meth:`ScoreTable.mean`).
    """
    cols = []
    for s in specs:
        if s["level"] == "baseline":
            if baselines is None or s["name"] not in baselines:
                have = sorted(baselines) if baselines else []
                raise KeyError(f"baseline {s['name']!r} is needed by the combined estimator but was not given "
                               f"(have: {', '.join(have) or 'none'}); pass baselines=store.baselines()")
            v = np.asarray(baselines[s["name"]], dtype=np.float64)
            v = v[:, 0] if v.ndim == 2 else v.reshape(-1)
            if v.size != table.n_cases:
                raise ValueError(f"baseline {s['name']!r} has {v.size} values for {table.n_cases} cases")
            cols.append(v)
        else:
            cols.append(table.mean(s)[0])
    return np.stack(cols, axis=1) if cols else np.zeros((table.n_cases, 0))


def _specs_for(table: ScoreTable, baselines: Mapping[str, np.ndarray] | None, feature_set: str,
               exclude: Sequence[str], last_k: int) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    if feature_set in ("sa+baselines", "sa"):
        specs += feature_specs(table, exclude=exclude, last_k=last_k)
    if feature_set in ("sa+baselines", "baselines"):
        if not baselines:
            raise ValueError(f"feature_set={feature_set!r} needs the baselines; pass baselines=store.baselines()")
        specs += [{"name": b, "level": "baseline", "layers": []} for b in BASELINE_FEATURES if b in baselines]
    return specs


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(mean, scale, coef, intercept)`` of ridge on standardised features, ``λ = α · n``."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    yc = y - y.mean()
    p = z.shape[1]
    coef = np.linalg.solve(z.T @ z + alpha * y.size * np.eye(p), z.T @ yc) if p else np.zeros(0)
    return mean, scale, coef, float(y.mean())


def _predict(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    return np.clip(((x - mean) / scale) @ coef + intercept, 0.0, 1.0)


def _inner_folds(n: int, folds: int, groups: np.ndarray | None, seed: int) -> np.ndarray:
    from engine.quality.calibration import group_folds

    if groups is not None and len(set(groups.tolist())) >= 2:
        return group_folds(n, folds, groups=groups, seed=seed)
    return group_folds(n, max(2, min(folds, n)), seed=seed)


def _choose_alpha(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int,
                  alphas: Sequence[float]) -> tuple[float, list[float]]:
    """The α of least cross-validated squared error (ties: the larger α)."""
    fold = _inner_folds(y.size, folds, groups, seed)
    errs = []
    for a in alphas:
        pred = np.empty(y.size)
        for f in np.unique(fold):
            tr, te = fold != f, fold == f
            pred[te] = _predict(x[te], *_ridge(x[tr], y[tr], a))
        errs.append(float(np.mean((pred - y) ** 2)))
    best = min(range(len(alphas)), key=lambda i: (errs[i], -alphas[i]))
    return float(alphas[best]), errs


@dataclass
class CombinedModel:
    """A fitted combined estimator (JSON-ready; stored in :class:`engine.quality.Calibration`).

    ``features`` are the specs in column order; ``mean``/``scale`` standardise them, ``coef``
    and ``intercept`` map them to a predicted Dice (clipped to [0, 1]); ``alpha`` is the
    chosen penalty; ``cv`` holds the out-of-fold figures (``spearman_oof``, ``mse_oof``, per
    fold ``alpha``, ``test_spearman``, ``test_groups``) and ``oof_estimate`` the out-of-fold
    predictions per labelled case (NaN for unlabelled ones).
    """

    feature_set: str
    features: list[dict[str, Any]]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    alpha: float
    cv: dict[str, Any] = field(default_factory=dict)
    oof_estimate: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CombinedModel:
        d = dict(d)
        d["oof_estimate"] = [float("nan") if v is None else float(v) for v in d.get("oof_estimate", [])]
        return cls(**d)

    def layers(self) -> list[str]:
        """Every layer a feature reads."""
        return sorted({n for s in self.features for n in s["layers"]})

    def predict(self, table: ScoreTable, baselines: Mapping[str, np.ndarray] | None) -> np.ndarray:
        """Predicted Dice per case; NaN where none of the SA features is defined."""
        x = feature_matrix(table, baselines, self.features)
        est = _predict(np.nan_to_num(x, nan=0.0), np.asarray(self.mean), np.asarray(self.scale),
                       np.asarray(self.coef), self.intercept)
        sa = [i for i, s in enumerate(self.features) if s["level"] != "baseline"]
        cols = sa or list(range(x.shape[1]))
        undefined = ~np.isfinite(x[:, cols]).any(axis=1) if cols else np.zeros(table.n_cases, bool)
        return np.where(undefined, np.nan, est)


def fit_combined(
    layer_scores: Any,
    unit_scores: Any,
    layers: Any,
    baselines: Mapping[str, np.ndarray] | None,
    true_dice: np.ndarray,
    *,
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    feature_set: str = "sa+baselines",
    alphas: Sequence[float] = ALPHAS,
    seed: int = 0,
    exclude: Sequence[str] = (),
    last_k: int = 2,
    class_index: int = 0,
) -> CombinedModel:
    """Fit the combined estimator by grouped cross-validation (see the module notes).

    Parameters
    ----------
    layer_scores, unit_scores, layers
        As in :func:`engine.quality.estimate_quality` (SA against the prediction).
    baselines : mapping, optional
        Baseline name → ``(n_cases,)`` or ``(n_cases, n_classes)`` (``store.baselines()``);
        needed unless ``feature_set="sa"``.
    true_dice : ndarray
        ``(n_cases,)``; NaN cases are not used for fitting.
    groups : sequence, optional
        Subject or site per case; folds hold whole groups.
    folds : int, optional
        Outer folds (capped at the number of groups) and inner folds.
    feature_set : {"sa+baselines", "sa", "baselines"}
    alphas : sequence of float, optional
        Penalties tried (``λ = α · n`` on standardised features).
    seed : int, optional
        Fold assignment seed.
    exclude : sequence of str, optional
        Layers left out (tensors on the output path).
    last_k : int, optional
        Layers of the ``paper`` feature.
    class_index : int, optional

    Returns
    -------
    CombinedModel

    Raises
    ------
    ValueError
        Fewer than 6 labelled cases, a single group with too few cases, a missing baseline.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sa = rng.uniform(0, 1, (30, 3))
    >>> m = fit_combined(sa, None, ["a", "b", "c"], None, sa[:, 0], feature_set="sa")
    >>> m.cv["spearman_oof"] > 0.9
    True
    """
    check_choice(feature_set, "feature_set", FEATURE_SETS)
    from engine.quality.calibration import group_folds
    from engine.quality.validation import correlation

    table = score_table(layer_scores, unit_scores, layers, class_index=class_index)
    y = np.asarray(true_dice, dtype=np.float64).reshape(-1)
    if y.size != table.n_cases:
        raise ValueError(f"true_dice has {y.size} values but the scores hold {table.n_cases} cases")
    specs = _specs_for(table, baselines, feature_set, exclude, last_k)
    x = np.nan_to_num(feature_matrix(table, baselines, specs), nan=0.0)
    lab = np.flatnonzero(np.isfinite(y))
    if lab.size < 6:
        raise ValueError(f"only {lab.size} cases have a finite true Dice; the combined estimator needs at least 6")
    g = None if groups is None else np.asarray([str(v) for v in groups], dtype=object)
    if g is not None and g.size != y.size:
        raise ValueError(f"groups has {g.size} entries but there are {y.size} cases; give one group per case")
    gl = None if g is None else g[lab]
    use_groups = gl is not None and len(set(gl.tolist())) >= 2
    fold = group_folds(lab.size, folds, groups=gl if use_groups else None, seed=seed)
    oof = np.full(y.size, np.nan)
    fold_info = []
    for f in np.unique(fold):
        tr, te = lab[fold != f], lab[fold == f]
        a, _ = _choose_alpha(x[tr], y[tr], None if g is None else g[tr], folds, seed, alphas)
        oof[te] = _predict(x[te], *_ridge(x[tr], y[tr], a))
        fold_info.append({"fold": int(f), "alpha": a, "n_test": int(te.size),
                          "test_spearman": correlation(oof[te], y[te]),
                          "test_groups": sorted(set(g[te].tolist())) if g is not None else None})
    alpha, errs = _choose_alpha(x[lab], y[lab], gl, folds, seed, alphas)
    mean, scale, coef, intercept = _ridge(x[lab], y[lab], alpha)
    cv = {"spearman_oof": correlation(oof[lab], y[lab]),
          "mse_oof": float(np.mean((oof[lab] - y[lab]) ** 2)),
          "folds": fold_info, "alphas": list(alphas), "cv_mse_by_alpha": errs,
          "n_cases": int(lab.size), "grouped": bool(use_groups)}
    return CombinedModel(feature_set=feature_set, features=specs, mean=mean.tolist(), scale=scale.tolist(),
                         coef=coef.tolist(), intercept=intercept, alpha=alpha, cv=cv, oof_estimate=oof.tolist())


def sa_added_value(
    layer_scores: Any,
    unit_scores: Any,
    layers: Any,
    baselines: Mapping[str, np.ndarray],
    true_dice: np.ndarray,
    *,
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    exclude: Sequence[str] = (),
    class_index: int = 0,
) -> dict[str, Any]:
    """Does SA add information beyond the baselines? AURC(sa+baselines) − AURC(baselines).

    Both models are fitted the same way (:func:`fit_combined`, same folds); their out-of-fold
    predictions are compared by :func:`engine.quality.failure.compare_aurc` (paired bootstrap).

    Returns
    -------
    dict
        ``difference`` (negative: SA helps), ``ci``, ``p_not_better``, ``aurc_a``
        (sa+baselines), ``aurc_b`` (baselines), ``verdict`` (a sentence), and both models'
        ``spearman_oof``.
    """
    from engine.quality.failure import compare_aurc

    kw = dict(groups=groups, folds=folds, seed=seed, exclude=exclude, class_index=class_index)
    both = fit_combined(layer_scores, unit_scores, layers, baselines, true_dice, feature_set="sa+baselines", **kw)
    base = fit_combined(layer_scores, unit_scores, layers, baselines, true_dice, feature_set="baselines", **kw)
    cmp = compare_aurc(np.asarray(both.oof_estimate), np.asarray(base.oof_estimate), true_dice, groups=groups,
                       n_boot=n_boot, seed=seed)
    lo, hi = cmp["ci"]
    if np.isfinite(hi) and hi < 0:
        verdict = "SA adds information beyond the baselines (the whole interval of the AURC difference is below 0)"
    elif np.isfinite(lo) and lo > 0:
        verdict = "SA makes the baselines worse here (the whole interval of the AURC difference is above 0)"
    else:
        verdict = "no evidence that SA adds information beyond the baselines (the interval of the AURC difference contains 0)"
    return {**cmp, "verdict": verdict, "spearman_oof_combined": both.cv["spearman_oof"],
            "spearman_oof_baselines": base.cv["spearman_oof"]}
