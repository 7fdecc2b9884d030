"""Tests for engine/quality/estimators.py (and the score table behind it): paper, all-layers."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.quality import calibrate, estimate_quality
from engine.status import Status

# ----------------------------------------------------------------------------- naive twins


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
