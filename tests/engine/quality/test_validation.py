"""Tests for engine/quality/validation.py against scipy and direct computations."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from engine.quality import auroc, partial_spearman, validate, validation_rows, worst_overlap

DICE = np.array([0.91, 0.42, 0.77, 0.88, 0.15, 0.63, 0.95, 0.70, 0.55, 0.83, 0.30, 0.99])
EST = np.array([0.80, 0.50, 0.60, 0.85, 0.20, 0.66, 0.90, 0.52, 0.58, 0.70, 0.45, 0.93])
VOL = np.array([0.2, 0.05, 0.1, 0.3, 0.01, 0.12, 0.25, 0.08, 0.2, 0.18, 0.02, 0.4])
GROUPS = np.array(list("aabbaabbaabb"))


def pairwise_auroc(score_good: np.ndarray, bad: np.ndarray) -> float:
    """P(a good case's estimate > a bad case's) + ½ P(tie), by counting every pair."""
    good_vals = score_good[~bad]
    bad_vals = score_good[bad]
    wins = sum((g > b) + 0.5 * (g == b) for g in good_vals for b in bad_vals)
    return wins / (good_vals.size * bad_vals.size)


def residual_partial(x, y, z) -> float:
    """Direct: ranks, least-squares residuals on [1, rank z], Pearson of residuals."""
    rx, ry, rz = (stats.rankdata(a) for a in (x, y, z))
    A = np.column_stack([np.ones_like(rz), rz])
    res_x = rx - A @ np.linalg.lstsq(A, rx, rcond=None)[0]
    res_y = ry - A @ np.linalg.lstsq(A, ry, rcond=None)[0]
    for r, a in ((res_x, rx), (res_y, ry)):
        if np.linalg.norm(r) <= 1e-10 * np.linalg.norm(a - a.mean()):
            return float("nan")  # a is a linear function of z: no residual, undefined
    return float(np.corrcoef(res_x, res_y)[0, 1])


def test_correlations_match_scipy():
    res = validate({"e": EST}, DICE, n_boot=200)["e"]
    assert res["pearson"]["r"] == pytest.approx(stats.pearsonr(EST, DICE)[0])
    assert res["spearman"]["r"] == pytest.approx(stats.spearmanr(EST, DICE)[0])
    assert res["pearson"]["p"] == pytest.approx(stats.pearsonr(EST, DICE)[1])
    for key in ("pearson", "spearman"):
        lo, hi = res[key]["ci"]
        assert -1 <= lo <= res[key]["r"] <= hi <= 1


def test_auroc_matches_pairwise_count():
    res = validate({"e": EST}, DICE, dice_threshold=0.6, n_boot=0)["e"]
    bad = DICE < 0.6
    assert res["auroc"]["value"] == pytest.approx(pairwise_auroc(EST, bad))
    assert res["auroc"]["n_bad"] == bad.sum() and res["auroc"]["n_good"] == (~bad).sum()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=15))
def test_auroc_with_ties_matches_pairwise(pairs):
    score = np.array([p[0] for p in pairs], float)
    positive = np.array([p[1] for p in pairs])
    got = auroc(score, positive)
    if positive.all() or (~positive).all():
        assert np.isnan(got)
    else:
        # auroc(): higher score = positive; pairwise_auroc(): higher = good (negative)
        assert got == pytest.approx(pairwise_auroc(-score, positive))


def test_partial_spearman_matches_residuals():
    assert partial_spearman(EST, DICE, VOL) == pytest.approx(residual_partial(EST, DICE, VOL))
    res = validate({"e": EST}, DICE, predicted_volume=VOL, n_boot=100)["e"]
    assert res["partial_spearman"]["r"] == pytest.approx(residual_partial(EST, DICE, VOL))


@settings(max_examples=30, deadline=None)
@given(st.integers(5, 20), st.integers(0, 2**31 - 1))
@example(n=5, seed=6922)  # y's ranks are exactly linear in z's: undefined, not rounding noise
def test_partial_spearman_random(n, seed):
    rng = np.random.default_rng(seed)
    x, y, z = rng.normal(size=(3, n)).round(1)  # rounding makes ties
    want = residual_partial(x, y, z)
    np.testing.assert_allclose(partial_spearman(x, y, z), want, atol=1e-9, equal_nan=True)


def test_estimate_that_is_only_volume_has_low_partial():
    rng = np.random.default_rng(0)
    vol = rng.random(60)
    dice = vol + rng.normal(0, 0.05, 60)
    est = vol + rng.normal(0, 0.02, 60)  # volume plus noise unrelated to Dice
    res = validate({"vol": est}, dice, predicted_volume=vol, n_boot=0)["vol"]
    assert res["spearman"]["r"] > 0.8
    assert abs(res["partial_spearman"]["r"]) < 0.3
    # an estimate that is exactly a monotone function of volume leaves no residual: undefined
    same = validate({"vol": vol * 2}, dice, predicted_volume=vol, n_boot=0)["vol"]["partial_spearman"]
    assert np.isnan(same["r"]) and "residual" in same["reason"]


def test_worst_overlap_brute_force():
    out = worst_overlap(EST, DICE, 0.25)
    k = 3
    assert out["k"] == k
    worst_d = set(np.argsort(DICE)[:k])
    worst_e = set(np.argsort(EST)[:k])
    assert out["overlap"] == len(worst_d & worst_e)
    assert out["expected"] == pytest.approx(k * k / DICE.size)


def test_nan_cases_dropped_and_counted():
    est = EST.copy()
    est[[0, 3]] = np.nan
    dice = DICE.copy()
    dice[5] = np.nan
    res = validate({"e": est}, dice, n_boot=0)["e"]
    assert res["n"] == 9 and res["n_dropped"] == 3
    assert res["n_dropped_estimate"] == 2 and res["n_dropped_dice"] == 1
    ok = np.isfinite(est) & np.isfinite(dice)
    assert res["spearman"]["r"] == pytest.approx(stats.spearmanr(est[ok], dice[ok])[0])


def test_within_group_statistics_match_scipy_on_subsets():
    res = validate({"e": EST}, DICE, groups=GROUPS, n_boot=50)["e"]
    for g in ("a", "b"):
        sel = GROUPS == g
        assert res["groups"][g]["n"] == sel.sum()
        assert res["groups"][g]["spearman"]["r"] == pytest.approx(stats.spearmanr(EST[sel], DICE[sel])[0])
    rows = validation_rows({"e": res})
    assert [r["scope"] for r in rows] == ["all", "group:a", "group:b"]


def test_lower_is_better_names_are_negated_for_auroc_and_overlap():
    ent = 1.0 - EST  # entropy-like: high = bad
    v = validate({"mean_entropy": ent, "e": EST}, DICE, n_boot=0)
    assert v["mean_entropy"]["auroc"]["value"] == pytest.approx(v["e"]["auroc"]["value"])
    assert v["mean_entropy"]["spearman"]["r"] == pytest.approx(-v["e"]["spearman"]["r"])
    assert v["mean_entropy"]["orientation"] == "lower is better"


def test_bootstrap_is_seeded_and_stratified_resampling_keeps_groups():
    a = validate({"e": EST}, DICE, n_boot=200, seed=3)["e"]["spearman"]["ci"]
    b = validate({"e": EST}, DICE, n_boot=200, seed=3)["e"]["spearman"]["ci"]
    c = validate({"e": EST}, DICE, n_boot=200, seed=4)["e"]["spearman"]["ci"]
    assert a == b and a != c
    s = validate({"e": EST}, DICE, groups=GROUPS, n_boot=200, stratified=True)["e"]["spearman"]
    assert s["ci"][0] <= s["r"] <= s["ci"][1]


def test_undefined_statistics_say_why():
    res = validate({"e": np.ones(5)}, np.linspace(0.5, 0.9, 5), n_boot=10)["e"]
    assert np.isnan(res["spearman"]["r"]) and res["spearman"]["reason"] == "constant values"
    res = validate({"e": EST}, np.full(EST.size, 0.9), dice_threshold=0.8, n_boot=0)["e"]
    assert np.isnan(res["auroc"]["value"]) and "Dice" in res["auroc"]["reason"]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"groups": ["a"]}, "groups"), ({"predicted_volume": np.ones(2)}, "predicted_volume"),
     ({"worst_fraction": 0.0}, "worst_fraction"), ({"n_boot": -1}, "n_boot")],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate({"e": EST}, DICE, **kwargs)
    with pytest.raises(ValueError, match="values"):
        validate({"e": EST[:3]}, DICE)


# ---------------------------------------------------------------- rank_rows (issue 15)
RANK_CASES = [
    np.array([0.0, 2.0, 3.0, 2.0]),
    np.array([[0.5, 0.5, 0.5], [3.0, -np.inf, np.inf]]),
    np.array([[1.0, np.nan, 2.0], [2.0, 2.0, 1.0]]),  # a NaN row: all NaN, result float64
    np.array([-0.0, 0.0, 1.0, -1.0]),  # -0.0 and 0.0 tie
    np.zeros((3, 0)),
    np.arange(12.0).reshape(2, 3, 2)[..., ::-1],
    np.array([3, 1, 2, 1], dtype=np.int64),
]


@pytest.mark.parametrize("method", ["average", "min", "max"])
@pytest.mark.parametrize("case", range(len(RANK_CASES)))
def test_rank_rows_is_scipy_rankdata(case, method):
    from engine.quality.validation import rank_rows

    a = RANK_CASES[case]
    got, want = rank_rows(a, method), stats.rankdata(a, method=method, axis=-1)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, np.inf, -np.inf]), min_size=4, max_size=4),
                min_size=1, max_size=6),
       st.sampled_from(["average", "min", "max"]))
def test_rank_rows_is_scipy_rankdata_with_ties(rows, method):
    from engine.quality.validation import rank_rows

    a = np.array(rows)
    got, want = rank_rows(a, method), stats.rankdata(a, method=method, axis=-1)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_one_case_estimate_never_imports_scipy_stats():
    """The failure benchmark of one case (``protoseg demo``) ranks without scipy.stats."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from engine.quality.failure import failure_benchmark; "
            "failure_benchmark({'e': np.array([0.7])}, np.array([0.9]), n_boot=50); "
            "print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
