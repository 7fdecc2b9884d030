"""Tests for engine/quality/conformal.py: the quantile, the finite-sample guarantee, coverage."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from engine.quality import (
    conformal_quantile,
    conformal_scores,
    coverage_interval,
    dice_lower_bound,
    empirical_coverage,
)


def naive_quantile(scores, coverage) -> float:
    """The smallest score q with #{s ≤ q} ≥ ⌈(n + 1)·coverage⌉; +inf when no score has enough."""
    need = math.ceil((len(scores) + 1) * coverage - 1e-12)
    for q in sorted(scores):
        if sum(s <= q for s in scores) >= need:
            return q
    return float("inf")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=0, max_size=25), st.sampled_from([0.5, 0.8, 0.9, 0.95]))
def test_quantile_matches_the_counting_definition(scores, coverage):
    assert conformal_quantile(np.array(scores), coverage) == naive_quantile(scores, coverage)


def test_small_example_by_hand():
    """Scores 0.00 … 0.08 (n = 9), coverage 0.9: ⌈10 · 0.9⌉ = 9 → q = 0.08, bound = ŷ − 0.08.

    With n = 8 the rank ⌈9 · 0.9⌉ = 9 exceeds n: no finite q, the bound is 0 (Dice ≥ 0).
    """
    s = np.arange(9) / 100
    assert dice_lower_bound(np.array([0.9, 0.05, np.nan]), s, 0.9) == pytest.approx([0.82, 0.0, np.nan], nan_ok=True)
    assert dice_lower_bound(np.array([0.9]), s[:8], 0.9).tolist() == [0.0]
    assert conformal_scores(np.array([0.9, 0.5]), np.array([0.8, 0.7])) == pytest.approx([-0.2, 0.1])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        conformal_quantile(s, 1.0)


def _sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Estimates and Dice with a known relation: Dice = clip(estimate − 0.1·|noise|, 0, 1)."""
    rng = np.random.default_rng(seed)
    est = rng.uniform(0.3, 1.0, n)
    dice = np.clip(est - 0.1 * np.abs(rng.standard_normal(n)), 0, 1)
    return est, dice


@pytest.mark.parametrize("coverage", [0.5, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_finite_sample_guarantee_on_a_fixed_sample(coverage, seed):
    """Hold out each of the N cases in turn and calibrate on the other N − 1.

    With distinct scores, case i is covered iff its score ranks among the ⌈N·coverage⌉
    smallest of all N, so exactly ⌈N·coverage⌉ of the N hold-outs are covered: the
    average coverage over hold-outs is ⌈N·coverage⌉ / N ≥ coverage, whatever the sample —
    the exchangeability guarantee, computed exactly instead of sampled.
    """
    n = 41
    est, dice = _sample(n, seed)
    covered = 0
    for i in range(n):
        rest = np.arange(n) != i
        bound = dice_lower_bound(est[i : i + 1], conformal_scores(est[rest], dice[rest]), coverage)
        covered += int(dice[i] >= bound[0])
    assert covered == math.ceil(n * coverage - 1e-12)
    assert covered / n >= coverage


def test_coverage_on_held_out_groups_within_the_exact_tolerance():
    """Calibrate on 10 groups, test on 20 others: the coverage given the calibration set is
    Beta(k, n + 1 − k) (k = ⌈(n+1)·0.9⌉); the test fraction adds binomial noise. The assertion
    uses the 1e-6 quantiles of both, so it holds for this fixed sample and essentially any other."""
    n_groups, per = 30, 150
    groups = np.repeat(np.arange(n_groups), per)
    est, dice = _sample(groups.size, 11)
    cal = groups < 10
    scores = conformal_scores(est[cal], dice[cal])
    test = ~cal
    cov = empirical_coverage(dice_lower_bound(est[test], scores, 0.9), dice[test])
    n_cal, m = int(cal.sum()), int(test.sum())
    k = math.ceil((n_cal + 1) * 0.9)
    lo_beta, hi_beta = stats.beta(k, n_cal + 1 - k).ppf([1e-6, 1 - 1e-6])
    lo = stats.binom(m, lo_beta).ppf(1e-6) / m
    hi = stats.binom(m, hi_beta).ppf(1 - 1e-6) / m
    assert lo <= cov["coverage"] <= hi
    assert cov["n"] == m
    lo95, hi95 = coverage_interval(n_cal, 0.9)
    assert lo_beta < lo95 < 0.9 < hi95 < hi_beta


def test_a_nan_bound_counts_as_zero_in_the_coverage():
    assert empirical_coverage(np.array([np.nan, 0.5]), np.array([0.1, 0.4])) == {"n": 2, "covered": 1, "coverage": 0.5}
