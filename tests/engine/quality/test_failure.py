"""Tests for engine/quality/failure.py against explicit loops and examples worked by hand."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from engine.quality import aurc, compare_aurc, e_aurc, failure_benchmark, failure_rows, risk_coverage_curve
from engine.quality.failure import MIN_CLUSTERS, resample_indices


def naive_aurc(conf, risk) -> float:
    """AURC by an explicit loop over the coverage levels k = 1 … n.

    At coverage k/n the k most confident cases are kept; when the k-th place falls inside a
    block of equal confidences, the block's places are filled in every order with equal
    probability, so each kept place of the block carries the block's mean risk.
    """
    conf = [(-np.inf if np.isnan(c) else c) for c in conf]
    n = len(conf)
    ranked = sorted(conf, reverse=True)
    total = 0.0
    for k in range(1, n + 1):
        kth = ranked[k - 1]
        above = [r for c, r in zip(conf, risk) if c > kth]
        tied = [r for c, r in zip(conf, risk) if c == kth]
        need = k - len(above)
        total += (sum(above) + need * sum(tied) / len(tied)) / k
    return total / n


def brute_force_aurc(conf, risk) -> float:
    """Mean AURC over every strict order of the cases consistent with the confidences."""
    n = len(conf)
    values = []
    for perm in itertools.permutations(range(n)):
        if all(conf[perm[i]] >= conf[perm[i + 1]] for i in range(n - 1)):
            r = [risk[j] for j in perm]
            values.append(np.mean([np.mean(r[:k]) for k in range(1, n + 1)]))
    return float(np.mean(values))


def pairwise_auroc(conf, bad) -> float:
    """P(conf of a good case > conf of a bad case) + ½ P(tie), counting every pair."""
    good_c, bad_c = conf[~bad], conf[bad]
    return sum((g > b) + 0.5 * (g == b) for g in good_c for b in bad_c) / (good_c.size * bad_c.size)


def test_aurc_of_a_small_example_worked_by_hand():
    """conf (0.9, 0.8, 0.7), risk (0, 1, 0.5): selective risks 0, ½, ½ → AURC = 1/3.

    The oracle keeps risks in the order 0, 0.5, 1: 0, ¼, ½ → 1/4, so E-AURC = 1/12.
    With conf (1, 1, 0) the first two places are tied: at k = 1 the expected risk is ½,
    at k = 2 it is ½, at k = 3 it is ½ → AURC = ½. A constant confidence gives the mean risk.
    """
    c, r = np.array([0.9, 0.8, 0.7]), np.array([0.0, 1.0, 0.5])
    assert aurc(c, r) == pytest.approx(1 / 3)
    assert e_aurc(c, r) == pytest.approx(1 / 12)
    assert aurc(np.array([1.0, 1.0, 0.0]), r) == pytest.approx(0.5)
    assert aurc(np.zeros(3), r) == pytest.approx(r.mean())
    cov, sel = risk_coverage_curve(c, r)
    assert cov.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0]) and sel.tolist() == pytest.approx([0.0, 0.5, 0.5])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.integers(0, 3).map(float), st.just(float("nan"))),
                          st.floats(0, 1, allow_nan=False)), min_size=1, max_size=12))
def test_vectorised_aurc_matches_the_loop_over_coverage_levels(pairs):
    conf = np.array([p[0] for p in pairs])
    risk = np.array([p[1] for p in pairs])
    assert aurc(conf, risk) == pytest.approx(naive_aurc(conf, risk), abs=1e-12)
    assert risk_coverage_curve(conf, risk)[1].mean() == pytest.approx(naive_aurc(conf, risk), abs=1e-12)
    assert e_aurc(conf, risk) >= -1e-12  # the oracle is never beaten


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2).map(float), st.floats(0, 1, allow_nan=False)), min_size=1, max_size=6))
def test_ties_equal_the_mean_over_every_consistent_order(pairs):
    conf = [p[0] for p in pairs]
    risk = [p[1] for p in pairs]
    assert aurc(np.array(conf), np.array(risk)) == pytest.approx(brute_force_aurc(conf, risk), abs=1e-12)


def test_an_undefined_estimate_is_the_least_confident():
    r = np.array([0.1, 0.9, 0.3, 0.5])
    with_nan = np.array([0.8, np.nan, 0.6, 0.4])
    assert aurc(with_nan, r) == pytest.approx(aurc(np.array([0.8, -1e9, 0.6, 0.4]), r))


DICE = np.array([0.91, 0.42, 0.77, 0.88, 0.15, 0.63, 0.95, 0.70, 0.55, 0.83, 0.30, 0.99])
EST = np.array([0.80, 0.50, 0.60, 0.85, 0.20, 0.66, 0.90, 0.52, 0.58, 0.70, 0.45, 0.93])
ENTROPY = 1 - EST + 0.05 * np.sin(np.arange(12))
GROUPS = np.array(list("aabbaabbaabb"))


def test_benchmark_point_values_match_the_naive_twins():
    res = failure_benchmark({"e": EST, "mean_entropy": ENTROPY}, DICE, groups=GROUPS, n_boot=0,
                            dice_thresholds=(0.5, 0.8))
    risk = 1 - DICE
    for name, conf in (("e", EST), ("mean_entropy", -ENTROPY)):
        r = res[name]
        assert r["aurc"]["value"] == pytest.approx(naive_aurc(conf, risk))
        assert r["e_aurc"]["value"] == pytest.approx(naive_aurc(conf, risk) - naive_aurc(-risk, risk))
        assert r["oracle_aurc"] == pytest.approx(naive_aurc(-risk, risk))
        assert r["random_aurc"] == pytest.approx(risk.mean())
        for t in (0.5, 0.8):
            assert r["auroc"][f"{t:g}"]["value"] == pytest.approx(pairwise_auroc(conf, DICE < t))
        assert r["spearman"]["value"] == pytest.approx(stats.spearmanr(conf, DICE)[0])
        for g in "ab":
            sel = GROUPS == g
            assert r["groups"][g]["spearman"]["value"] == pytest.approx(stats.spearmanr(conf[sel], DICE[sel])[0])
            assert r["groups"][g]["aurc"] == pytest.approx(naive_aurc(conf[sel], risk[sel]))
    assert res["mean_entropy"]["orientation"] == "lower is better"
    rows = failure_rows(res)
    assert rows[0]["estimator"] == "e" and rows[0]["aurc"] == res["e"]["aurc"]["value"]


def test_bootstrap_interval_matches_a_loop_over_the_same_replicates():
    groups = np.repeat([f"s{i}" for i in range(6)], 2)
    res = failure_benchmark({"e": EST}, DICE, groups=groups, n_boot=200, seed=3)["e"]
    assert res["resample"]["mode"] == "cluster"
    reps, mode = resample_indices(groups, DICE.size, n_boot=200, seed=3)
    assert mode == "cluster"
    naive = [naive_aurc(EST[i], 1 - DICE[i]) for i in reps]
    assert res["aurc"]["ci"] == pytest.approx([np.quantile(naive, 0.025), np.quantile(naive, 0.975)])
    again = failure_benchmark({"e": EST}, DICE, groups=groups, n_boot=200, seed=3)["e"]
    assert again["aurc"]["ci"] == res["aurc"]["ci"]  # deterministic


def test_resampling_keeps_groups_whole_or_strata_sized():
    many = np.repeat([f"s{i}" for i in range(MIN_CLUSTERS)], 3)
    reps, mode = resample_indices(many, many.size, n_boot=20, seed=0)
    assert mode == "cluster"
    for idx in reps:  # every drawn subject comes with all three of its cases
        drawn = many[idx]
        for g in set(drawn.tolist()):
            assert (drawn == g).sum() % 3 == 0
    two = np.array(list("aaabb"))
    reps, mode = resample_indices(two, 5, n_boot=20, seed=0)
    assert mode == "stratified"
    for idx in reps:
        assert (two[idx] == "a").sum() == 3 and (two[idx] == "b").sum() == 2


def test_compare_aurc_is_paired_and_signed():
    same = compare_aurc(EST, EST, DICE, n_boot=100)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    cmp = compare_aurc(DICE, np.zeros(12), DICE, n_boot=100)
    assert cmp["difference"] == pytest.approx(naive_aurc(DICE, 1 - DICE) - (1 - DICE).mean())
    assert cmp["difference"] < 0 and cmp["ci"][1] < 0 and cmp["p_not_better"] == 0.0


def test_nan_dice_is_dropped_and_counted():
    d = DICE.copy()
    d[0] = np.nan
    res = failure_benchmark({"e": EST}, d, n_boot=0)["e"]
    assert res["n"] == 11 and res["n_dropped_dice"] == 1
    assert res["aurc"]["value"] == pytest.approx(naive_aurc(EST[1:], 1 - DICE[1:]))
