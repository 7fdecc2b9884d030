"""Tests for engine/quality/combined.py: the ridge solve, grouped CV, the estimator interface."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.quality import (
    Calibration,
    calibrate,
    conformal_scores,
    dice_lower_bound,
    empirical_coverage,
    estimate_quality,
    fit_combined,
    sa_added_value,
)
from engine.quality.combined import _ridge, feature_specs
from engine.quality.table import score_table

LAYERS = [{"name": n, "depth": d} for d, n in enumerate(["a", "b", "c", "d"])]


def synthetic(n_groups: int = 12, per: int = 10, *, sa_informative: bool = True, seed: int = 0):
    """Dice = 0.5·s + 0.3·(1 − entropy) + noise, where s is hidden; layer 'b' sees s (or not)."""
    rng = np.random.default_rng(seed)
    n = n_groups * per
    s = rng.uniform(0, 1, n)
    ent = rng.uniform(0, 1, n)
    dice = np.clip(0.15 + 0.5 * s + 0.3 * (1 - ent) + 0.03 * rng.standard_normal(n), 0, 1)
    ls = rng.uniform(0.3, 0.9, (n, 4))
    if sa_informative:
        ls[:, 1] = 0.2 + 0.7 * s + 0.02 * rng.standard_normal(n)
    units = {j: ls[:, j : j + 1] + 0.01 * rng.standard_normal((n, 3)) for j in range(4)}
    base = {"mean_entropy": ent, "uncertain_fraction": ent * 0.5 + 0.05 * rng.standard_normal(n),
            "predicted_fraction": rng.uniform(0.1, 0.3, n), "soft_dice": rng.uniform(0.8, 1.0, n)}
    groups = np.repeat([f"g{i}" for i in range(n_groups)], per)
    return ls, units, base, dice, groups


def test_ridge_matches_the_augmented_least_squares_problem():
    """min ‖ȳ-centred y − Zβ‖² + λ‖β‖² is ordinary least squares on [Z; √λ·I], [y − ȳ; 0]."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 5)) * [1, 2, 3, 0.5, 10] + 4
    y = rng.standard_normal(20)
    alpha = 0.3
    mean, scale, coef, intercept = _ridge(x, y, alpha)
    z = (x - x.mean(0)) / x.std(0)
    lam = alpha * 20
    aug_x = np.vstack([z, np.sqrt(lam) * np.eye(5)])
    aug_y = np.concatenate([y - y.mean(), np.zeros(5)])
    assert coef == pytest.approx(np.linalg.lstsq(aug_x, aug_y, rcond=None)[0])
    assert intercept == pytest.approx(y.mean()) and mean == pytest.approx(x.mean(0))


def test_feature_specs_cover_layers_units_and_depth_windows():
    ls, units, *_ = synthetic()
    names = [s["name"] for s in feature_specs(score_table(ls, units, LAYERS))]
    assert {"layer:a", "units:d", "all-layers", "paper", "window:shallow", "unitwindow:deep"} <= set(names)
    spec = {s["name"]: s for s in feature_specs(score_table(ls, units, LAYERS))}
    assert spec["paper"]["layers"] == ["c", "d"] and spec["window:shallow"]["layers"] == ["a", "b"]


def test_grouped_cross_validation_keeps_groups_whole():
    ls, units, base, dice, groups = synthetic()
    m = fit_combined(ls, units, LAYERS, base, dice, groups=groups, folds=4)
    seen = [g for f in m.cv["folds"] for g in f["test_groups"]]
    assert sorted(seen) == sorted(set(groups.tolist()))  # every group held out exactly once
    assert m.cv["grouped"] and np.isfinite(m.oof_estimate).all()
    assert m.cv["spearman_oof"] > 0.9


def test_sa_added_value_says_yes_when_sa_carries_the_signal_and_no_when_it_does_not():
    ls, units, base, dice, groups = synthetic(seed=2)
    yes = sa_added_value(ls, units, LAYERS, base, dice, groups=groups, n_boot=300)
    assert yes["difference"] < 0 and yes["ci"][1] < 0 and yes["verdict"].startswith("SA adds")
    ls, units, base, dice, groups = synthetic(sa_informative=False, seed=2)
    no = sa_added_value(ls, units, LAYERS, base, dice, groups=groups, n_boot=300)
    assert no["ci"][0] <= 0 <= no["ci"][1] and no["verdict"].startswith("no evidence")


def test_combined_estimator_through_estimate_quality_and_json():
    ls, units, base, dice, groups = synthetic()
    model = fit_combined(ls, units, LAYERS, base, dice, groups=groups)
    cal = calibrate(ls, units, LAYERS, dice, groups=groups)
    cal.combined = model.to_dict()
    cal.conformal["combined"] = {"scores": conformal_scores(np.asarray(model.oof_estimate), dice).tolist()}
    again = Calibration.from_json(cal.to_json())
    ls2 = ls.copy()
    ls2[0] = np.nan  # nothing defined for case 0 (units too)
    units2 = {j: u.copy() for j, u in units.items()}
    for u in units2.values():
        u[0] = np.nan
    est, info = estimate_quality(ls2, units2, LAYERS, estimator="combined", calibration=again, baselines=base,
                                 return_details=True)
    assert np.isnan(est[0]) and "every SA feature" in info["reason"][0]
    assert est[1:] == pytest.approx(model.predict(score_table(ls, units, LAYERS), base)[1:])
    assert ((est[1:] >= 0) & (est[1:] <= 1)).all()
    with pytest.raises(KeyError, match="baseline"):
        estimate_quality(ls, units, LAYERS, estimator="combined", calibration=again)
    with pytest.raises(ValueError, match="not among the scored layers"):
        estimate_quality(ls[:, :3], units, LAYERS[:3], estimator="combined", calibration=again, baselines=base)
    with pytest.raises(ValueError, match="no combined estimator"):
        estimate_quality(ls, units, LAYERS, estimator="combined", calibration=calibrate(ls, units, LAYERS, dice),
                         baselines=base)


def test_conformal_bound_of_the_combined_estimator_covers_held_out_groups():
    """Fit on 20 groups (out-of-fold residuals as conformity scores), bound 20 new groups drawn
    the same way: the coverage must reach the nominal 0.9 up to the binomial 1e-6 tolerance
    of the test fraction and of the calibration quantile (fixed seed)."""
    from scipy import stats

    ls, units, base, dice, groups = synthetic(n_groups=40, per=15, seed=5)
    train = np.isin(groups, [f"g{i}" for i in range(20)])
    sub = lambda a: a[train]  # noqa: E731
    model = fit_combined(sub(ls), {j: sub(u) for j, u in units.items()}, LAYERS,
                         {k: sub(v) for k, v in base.items()}, sub(dice), groups=sub(groups))
    scores = conformal_scores(np.asarray(model.oof_estimate), sub(dice))
    test = ~train
    pred = model.predict(score_table(ls[test], {j: u[test] for j, u in units.items()}, LAYERS),
                         {k: v[test] for k, v in base.items()})
    cov = empirical_coverage(dice_lower_bound(pred, scores, 0.9), dice[test])
    n_cal, m = scores.size, cov["n"]
    k = int(np.ceil((n_cal + 1) * 0.9))
    lo_beta = stats.beta(k, n_cal + 1 - k).ppf(1e-6)
    assert cov["coverage"] >= stats.binom(m, lo_beta).ppf(1e-6) / m


def test_calibration_written_by_version_1_still_reads():
    v1 = {"choice": {"name": "layer:a", "level": "layer", "layers": ["a"]}, "metric": "spearman",
          "cv_metric": 0.5, "in_sample_metric": 0.6, "layer_names": ["a"], "n_cases": 8, "n_groups": None,
          "folds": [], "candidates": [], "class_index": 0, "seed": 0, "oof_estimate": [None, 0.5],
          "cv_fold_mean": None, "encoding-type": "protoseg-calibration", "encoding-version": "1"}
    cal = Calibration.from_json(json.dumps(v1))
    assert cal.combined is None and cal.conformal == {} and np.isnan(cal.cv_fold_mean)
    assert json.loads(cal.to_json())["encoding-version"] == "2"
