"""Tests for engine/quality/calibration.py: folds, cross-validated choice, JSON file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from engine.quality import Calibration, calibrate, candidate_estimates, default_candidates, estimate_quality, group_folds


def _calibration_data(n_groups=4, per_group=10, seed=0):
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    dice = rng.uniform(0.3, 1.0, n)
    groups = np.repeat([f"s{k}" for k in range(n_groups)], per_group)
    honest = dice + rng.normal(0, 0.05, n)  # good everywhere, not perfect
    noise = rng.random(n)
    return dice, groups, honest, noise


def test_group_folds_keep_groups_together_and_balance():
    groups = np.repeat(list("abcdefg"), [5, 5, 4, 4, 3, 2, 1])
    f = group_folds(groups.size, 3, groups=groups, seed=1)
    for g in set(groups):
        assert len(set(f[groups == g])) == 1
    counts = np.bincount(f)
    assert counts.size == 3 and counts.max() - counts.min() <= 2
    assert group_folds(4, 5, groups=list("aabb")).max() == 1  # capped at 2 groups
    with pytest.raises(ValueError, match="single group"):
        group_folds(3, 2, groups=["a"] * 3)


def test_calibration_never_selects_on_the_test_fold():
    # honest: good everywhere; cheat: a bit worse everywhere, but perfect on one fold's
    # test cases -- enough to win on all cases, not on that fold's training part.
    rng = np.random.default_rng(1)
    n = 40
    dice = rng.uniform(0.3, 1.0, n)
    groups = np.repeat([f"s{k}" for k in range(4)], 10)
    honest = dice + rng.normal(0, 0.10, n)
    cheat = dice + rng.normal(0, 0.14, n)
    folds = group_folds(n, 4, groups=groups, seed=0)
    target = 2
    cheat[folds == target] = dice[folds == target]
    train = folds != target
    rho = lambda x, sel: stats.spearmanr(x[sel], dice[sel])[0]  # noqa: E731
    everything = np.ones(n, bool)
    # instrument: selecting with the test fold picks the cheat, without it the honest one
    assert rho(cheat, everything) > rho(honest, everything)
    assert rho(honest, train) > rho(cheat, train)
    layers = ["honest", "cheat"]
    scores = np.stack([honest, cheat], axis=1)
    cands = [{"name": "honest", "level": "layer", "layers": ["honest"]},
             {"name": "cheat", "level": "layer", "layers": ["cheat"]}]
    cal = calibrate(scores, None, layers, dice, groups=groups, folds=4, candidates=cands, seed=0)
    by_fold = {f["fold"]: f for f in cal.folds}
    assert sorted(by_fold[target]["test_cases"]) == np.flatnonzero(folds == target).tolist()
    assert by_fold[target]["selected"] == "honest"
    oof = np.asarray(cal.oof_estimate)
    np.testing.assert_allclose(oof[folds == target], honest[folds == target])
    assert cal.cv_metric == pytest.approx(stats.spearmanr(oof, dice)[0])
    held_out = [stats.spearmanr(oof[folds == f], dice[folds == f])[0] for f in range(4)]
    assert cal.cv_fold_mean == pytest.approx(np.mean(held_out))
    # the final choice uses all labelled data, and its in-sample figure is reported apart
    assert cal.choice["name"] == "cheat"
    assert cal.in_sample_metric == pytest.approx(rho(cheat, everything))


def test_calibration_reports_cv_below_in_sample_when_choice_overfits():
    rng = np.random.default_rng(3)
    n = 30
    dice = rng.uniform(0.3, 1.0, n)
    scores = rng.random((n, 25))  # 25 uninformative layers: in-sample best is luck
    cal = calibrate(scores, None, [f"l{j}" for j in range(25)], dice, folds=5,
                    candidates=[{"name": f"l{j}", "level": "layer", "layers": [f"l{j}"]} for j in range(25)])
    assert cal.in_sample_metric > cal.cv_metric
    assert len(cal.folds) == 5 and sum(f["n_test"] for f in cal.folds) == n


def test_calibration_json_roundtrip_and_apply(tmp_path):
    dice, groups, honest, noise = _calibration_data()
    scores = np.stack([noise, honest, noise[::-1]], axis=1)
    units = {j: scores[:, j : j + 1] for j in range(3)}
    layers = [{"name": n, "depth": d} for n, d in (("enc", 0), ("mid", 1), ("dec", 2))]
    cal = calibrate(scores, units, layers, dice, groups=groups, folds=4)
    assert "mid" in cal.choice["layers"]
    path = cal.save(tmp_path / "cal.json")
    loaded = Calibration.load(path)
    assert loaded.choice == cal.choice and loaded.folds == cal.folds
    assert np.isnan(loaded.cv_metric) == np.isnan(cal.cv_metric)
    est = estimate_quality(scores, units, layers, estimator="calibrated", calibration=path)
    want = candidate_estimates(scores, units, layers, [cal.choice])[0]
    np.testing.assert_allclose(est, want)
    assert json.loads(path.read_text())["encoding-type"] == "protoseg-calibration"


def test_calibration_refuses_other_layer_names(tmp_path):
    dice, groups, honest, noise = _calibration_data()
    cal = calibrate(np.stack([honest, noise], 1), None, ["a", "b"], dice, groups=groups,
                    candidates=[{"name": "a", "level": "layer", "layers": ["a"]}])
    with pytest.raises(ValueError, match="not among the scored layers"):
        estimate_quality(np.ones((3, 2)), None, ["x", "y"], estimator="calibrated", calibration=cal)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"encoding-type": "protoseg-calibration", "encoding-version": "99"}))
    with pytest.raises(ValueError, match="version"):
        Calibration.load(bad)
    with pytest.raises(ValueError, match="calibration"):
        estimate_quality(np.ones((3, 1)), None, ["a"], estimator="calibrated")


def test_default_candidates_cover_the_documented_families():
    layers = [{"name": f"l{j}", "depth": j} for j in range(4)]
    names = [c["name"] for c in default_candidates(layers, has_units=[True] * 4)]
    for want in ("layer:l0", "units:l3", "all-layers", "paper", "window:l0..l1", "window:l1..l3"):
        assert want in names
    assert "window:l0..l3" not in names  # the full window is all-layers
