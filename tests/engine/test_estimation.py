"""Tests for engine/estimation.py: baselines, estimators, calibration, flagging."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from engine.estimation import (
    Calibration,
    baselines,
    calibrate,
    candidate_estimates,
    default_candidates,
    estimate_quality,
    flag_cases,
    group_folds,
    rank_cases,
)
from engine.status import Status

# ----------------------------------------------------------------------------- naive twins


def naive_baselines(p: np.ndarray, threshold: float, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """One case and class at a time, straight from the definitions."""
    B, K = p.shape[:2]
    out = {k: np.full((B, K), np.nan) for k in ("predicted_fraction", "soft_dice", "uncertain_fraction", "mean_entropy")}
    for b in range(B):
        for k in range(K):
            sel = np.ones(p.shape[2:], bool) if mask is None else mask[b].astype(bool)
            v = p[b, k][sel]
            if v.size == 0:
                continue
            pred = v > threshold
            out["predicted_fraction"][b, k] = pred.mean()
            den = v.sum() + pred.sum()
            out["soft_dice"][b, k] = 2 * (v * pred).sum() / den if den > 0 else np.nan
            out["uncertain_fraction"][b, k] = np.mean((v > 0.1) & (v < 0.9))
            h = [0.0 if q in (0.0, 1.0) else -(q * np.log2(q) + (1 - q) * np.log2(1 - q)) for q in v]
            out["mean_entropy"][b, k] = np.mean(h)
    return out


def naive_protoseg_dice(features: np.ndarray, guide: np.ndarray, reference: np.ndarray) -> float:
    """SPEC §1-2 on one sample at native resolution, no mask: Dice(b, y), NaN when undefined."""
    F = features.reshape(features.shape[0], -1)
    g = guide.reshape(-1).astype(float)
    y = reference.reshape(-1).astype(bool)
    if g.sum() == 0 or (1 - g).sum() == 0:
        return np.nan
    P = (F * g).sum(1) / g.sum()
    N = (F * (1 - g)).sum(1) / (1 - g).sum()
    dp = -((F - P[:, None]) ** 2).sum(0)
    dn = -((F - N[:, None]) ** 2).sum(0)
    b = dp > dn
    tot = b.sum() + y.sum()
    return np.nan if tot == 0 else 2 * (b & y).sum() / tot


def sa_arrays(layers_features: list[np.ndarray], prediction: np.ndarray):
    """(layer_scores (n, L), {layer index: unit scores (n, C)}) with guide = reference = prediction."""
    n = prediction.shape[0]
    L = len(layers_features)
    layer = np.zeros((n, L))
    units = {}
    for j, F in enumerate(layers_features):
        units[j] = np.zeros((n, F.shape[1]))
        for i in range(n):
            layer[i, j] = naive_protoseg_dice(F[i], prediction[i], prediction[i])
            for c in range(F.shape[1]):
                units[j][i, c] = naive_protoseg_dice(F[i, c : c + 1], prediction[i], prediction[i])
    return layer, units


# ----------------------------------------------------------------------------- baselines


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 2), st.integers(1, 5), st.integers(1, 6),
    st.sampled_from([0.3, 0.5, 0.7]), st.booleans(), st.integers(0, 2**31 - 1),
)
def test_baselines_match_naive(B, K, H, W, threshold, use_mask, seed):
    rng = np.random.default_rng(seed)
    p = rng.random((B, K, H, W))
    p[rng.random(p.shape) < 0.3] = 0.0
    p[rng.random(p.shape) < 0.2] = 1.0
    mask = (rng.random((B, H, W)) < 0.6).astype(np.uint8) if use_mask else None
    got = baselines(p, threshold=threshold, mask=mask, class_axis=True)
    if K == 1:  # the pipeline's per-class call
        per_class = baselines(p[:, 0], threshold=threshold, mask=mask)
        for k in got:
            np.testing.assert_array_equal(per_class[k], got[k][:, 0])
    want = naive_baselines(p, threshold, mask)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=k)


def test_baselines_known_values_without_class_axis():
    p = np.array([[[0.0, 1.0], [0.5, 0.5]]])  # one case, 2x2, no class axis
    got = baselines(p)
    assert got["predicted_fraction"].shape == (1,)
    assert got["predicted_fraction"][0] == pytest.approx(0.25)  # only the 1.0 is > 0.5
    assert got["uncertain_fraction"][0] == pytest.approx(0.5)
    assert got["mean_entropy"][0] == pytest.approx(0.5)  # two positions of 1 bit, two of 0
    assert got["soft_dice"][0] == pytest.approx(2 * 1.0 / (2.0 + 1.0))


def test_baselines_empty_prediction_soft_dice_is_nan_not_one():
    got = baselines(np.zeros((2, 1, 4, 4)), class_axis=True)
    assert np.all(np.isnan(got["soft_dice"]))
    assert np.all(got["predicted_fraction"] == 0)


def test_baselines_tolerate_float_rounding_only():
    p = np.array([[1.0 + 1e-7, -1e-7, 0.7, 0.2]], dtype=np.float64)
    got = baselines(p)
    assert got["predicted_fraction"][0] == pytest.approx(0.5)
    assert got["mean_entropy"][0] < 1  # clipped, no NaN from log of a negative number
    with pytest.raises(ValueError, match="range"):
        baselines(np.array([[1.01, 0.5]]))


def test_baselines_empty_mask_gives_nan():
    mask = np.zeros((1, 3, 3), np.uint8)
    got = baselines(np.full((1, 1, 3, 3), 0.7), mask=mask, class_axis=True)
    assert all(np.isnan(v).all() for v in got.values())


@pytest.mark.parametrize(
    "p, kwargs, match",
    [
        (np.full((1, 1, 3, 3), 1.5), {}, "outside"),
        (np.full((1, 1, 3, 3), np.nan), {}, "outside"),
        (np.full((1, 1, 3, 3), 0.5), {"threshold": 1.0}, "threshold"),
        (np.full((1, 3), 0.5), {}, "shape"),
        (np.full((1, 1, 3, 3), 0.5), {"mask": np.ones((2, 2))}, "mask"),
    ],
)
def test_baselines_bad_input(p, kwargs, match):
    with pytest.raises(ValueError, match=match):
        baselines(p, class_axis=True, **kwargs)


# ----------------------------------------------------------------------------- estimators


def _prediction(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pred = np.zeros((n, h, w), bool)
    for i in range(n):
        r0, c0 = rng.integers(1, 4, size=2)
        pred[i, r0 : r0 + 3 + i % 3, c0 : c0 + 4] = True
    return pred


def test_perfectly_separating_features_give_one_for_every_unit():
    pred = _prediction(4)
    rng = np.random.default_rng(1)
    # every channel is the prediction, scaled and shifted: each unit separates it perfectly
    feats = [
        (pred[:, None] * rng.uniform(0.5, 2.0, size=(1, C, 1, 1)) + rng.normal(0, 1, size=(1, C, 1, 1))).astype(float)
        for C in (3, 2, 4)
    ]
    layer, units = sa_arrays(feats, pred)
    layers = [{"name": f"l{j}", "depth": j} for j in range(3)]
    assert np.all(layer == 1.0) and all(np.all(u == 1.0) for u in units.values())
    np.testing.assert_array_equal(estimate_quality(layer, units, layers, estimator="paper"), 1.0)
    np.testing.assert_array_equal(estimate_quality(layer, units, layers, estimator="all-layers"), 1.0)


def test_uninformative_features_score_low():
    pred = _prediction(6, 12, 12)
    rng = np.random.default_rng(2)
    feats = [rng.normal(size=(6, 4, 12, 12)) for _ in range(3)]
    layer, units = sa_arrays(feats, pred)
    layers = [f"l{j}" for j in range(3)]
    assert np.nanmean(estimate_quality(layer, units, layers, estimator="paper")) < 0.5
    assert np.nanmean(estimate_quality(layer, units, layers, estimator="all-layers")) < 0.5


def test_with_engine_sa_scores_if_available():
    scores = pytest.importorskip("engine.scores")
    pred = _prediction(3).astype(np.float32)
    feats = np.repeat(pred[:, None], 2, axis=1) * np.array([1.0, 3.0], np.float32)[None, :, None, None]
    layer, unit = scores.sa_scores(feats, pred, pred, level="both")
    est = estimate_quality(
        {"score": layer.score[:, None], "status": layer.status[:, None]},
        {0: {"score": unit.score, "status": unit.status}},
        ["only"],
        estimator="paper",
        last_k=1,
    )
    np.testing.assert_array_equal(est, 1.0)


def test_paper_uses_deepest_two_layers_by_depth_not_position():
    n = 2
    layer = np.zeros((n, 3))
    units = {0: np.full((n, 2), 0.9), 1: np.full((n, 3), 0.1), 2: np.full((n, 1), 0.4)}
    layers = [{"name": "deep", "depth": 9, "index": 0}, {"name": "shallow", "depth": 1, "index": 1},
              {"name": "mid", "depth": 5, "index": 2}]
    est, det = estimate_quality(layer, units, layers, estimator="paper", return_details=True)
    assert det["layers"] == ["mid", "deep"]
    np.testing.assert_allclose(est, (2 * 0.9 + 0.4) / 3)  # every unit weighted equally
    est_ex, det_ex = estimate_quality(layer, units, layers, estimator="paper", exclude=["deep"], return_details=True)
    assert det_ex["layers"] == ["shallow", "mid"]


def test_undefined_units_are_excluded_never_counted_as_one():
    score = np.array([[0.5, np.nan, np.nan], [np.nan, np.nan, np.nan]])
    status = np.array([[Status.OK, Status.EMPTY_DICE, Status.EMPTY_FOREGROUND]] * 2, dtype=np.uint8)
    status[1, 0] = Status.EMPTY_DICE
    layers = ["a", "b"]
    layer = {"score": np.array([[0.2, np.nan], [np.nan, np.nan]]),
             "status": np.array([[0, Status.EMPTY_DICE], [Status.EMPTY_DICE] * 2], np.uint8)}
    units = {0: {"score": score[:, :2], "status": status[:, :2]}, 1: {"score": score[:, 2:], "status": status[:, 2:]}}
    est, det = estimate_quality(layer, units, layers, estimator="paper", return_details=True)
    assert est[0] == pytest.approx(0.5)
    assert np.isnan(est[1])
    assert det["n_used"].tolist() == [1, 0] and det["n_undefined"].tolist() == [2, 3]
    assert det["reason"][0] == ""
    assert "EMPTY_DICE: 2" in det["reason"][1] and "EMPTY_FOREGROUND: 1" in det["reason"][1]
    est2, det2 = estimate_quality(layer, units, layers, estimator="all-layers", return_details=True)
    assert est2[0] == pytest.approx(0.2) and np.isnan(est2[1])
    assert "EMPTY_DICE: 2" in det2["reason"][1]


def test_exclude_applies_to_all_layers_and_calibration_candidates():
    scores = np.array([[0.2, 0.4, 1.0], [0.3, 0.5, 1.0]])
    est = estimate_quality(scores, None, ["a", "b", "logits"], estimator="all-layers", exclude=["logits"])
    np.testing.assert_allclose(est, [0.3, 0.4])
    rng = np.random.default_rng(0)
    dice = rng.random(12)
    cal = calibrate(np.column_stack([rng.random(12), rng.random(12), dice]), None, ["a", "b", "logits"], dice,
                    folds=3, exclude=["logits"])
    assert all("logits" not in c["name"] for c in cal.candidates)
    assert "logits" not in cal.choice["layers"]


def test_status_not_ok_overrides_a_finite_score():
    layer = {"score": np.array([[1.0, 0.4]]), "status": np.array([[Status.EMPTY_DICE, Status.OK]], np.uint8)}
    assert estimate_quality(layer, None, ["a", "b"], estimator="all-layers")[0] == pytest.approx(0.4)


def test_empty_prediction_gives_nan_with_reason():
    pred = np.zeros((1, 6, 6), bool)
    feats = [np.random.default_rng(0).normal(size=(1, 2, 6, 6))]
    layer, units = sa_arrays(feats, pred)
    assert np.isnan(layer).all()
    est, det = estimate_quality(layer, units, ["x"], estimator="paper", last_k=1, return_details=True)
    assert np.isnan(est[0]) and "undefined" in det["reason"][0]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_all_layers_equals_naive_masked_mean(n, L, seed):
    rng = np.random.default_rng(seed)
    score = rng.random((n, 2, L))
    status = rng.choice([0, 0, 0, Status.EMPTY_DICE, Status.EMPTY_FOREGROUND], size=score.shape).astype(np.uint8)
    score[status == Status.EMPTY_FOREGROUND] = np.nan
    est = estimate_quality({"score": score, "status": status}, None, [f"l{j}" for j in range(L)],
                           estimator="all-layers", class_index=1)
    for i in range(n):
        vals = [score[i, 1, j] for j in range(L) if status[i, 1, j] == 0]
        want = np.mean(vals) if vals else np.nan
        np.testing.assert_allclose(est[i], want, equal_nan=True)


def test_paper_without_unit_scores_asks_for_unit_level():
    with pytest.raises(ValueError, match="level='unit'"):
        estimate_quality(np.ones((2, 3)), None, ["a", "b", "c"], estimator="paper")


def test_unknown_estimator_suggests():
    with pytest.raises(ValueError, match="all-layers"):
        estimate_quality(np.ones((2, 1)), None, ["a"], estimator="all_layers")


def test_unit_scores_as_callable():
    calls = []

    def unit(i):
        calls.append(i)
        return np.full((2, 1, 2), 0.25 * (i + 1))

    est = estimate_quality(np.ones((2, 1, 2)), unit, ["a", "b"], estimator="paper")
    np.testing.assert_allclose(est, (0.25 * 2 + 0.5 * 2) / 4)
    assert sorted(calls) == [0, 1]


# ----------------------------------------------------------------------------- calibration


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


# ----------------------------------------------------------------------------- flagging


def test_flag_rules():
    e = np.array([0.9, np.nan, 0.2, 0.5, 0.7])
    assert flag_cases(e, threshold=0.6).tolist() == [False, True, True, True, False]
    assert flag_cases(e, lowest=2).tolist() == [False, True, True, False, False]
    assert flag_cases(e, fraction=0.6).tolist() == [False, True, True, True, False]  # ceil(3.0)
    flags, reasons = flag_cases(e, lowest=1, return_reasons=True)
    assert flags.tolist() == [False, True, False, False, False]  # NaN counts towards k
    assert reasons[1] == "estimate undefined" and reasons[0] == ""
    assert rank_cases(e).tolist() == [1, 2, 3, 4, 0]


@pytest.mark.parametrize(
    "kwargs", [{}, {"threshold": 0.5, "lowest": 1}, {"lowest": 1, "fraction": 0.1}, {"fraction": 0.0}, {"lowest": -1}]
)
def test_flag_needs_exactly_one_valid_rule(kwargs):
    with pytest.raises(ValueError):
        flag_cases(np.array([0.1, 0.2]), **kwargs)
