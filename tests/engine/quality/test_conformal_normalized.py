"""Tests for the normalised (locally adaptive) conformal Dice lower bound of
engine/quality/conformal.py: a literal twin, finite-sample coverage on a heteroscedastic
exchangeable set, positivity of the difficulty scale, undefined features, old calibrations."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from engine.quality import (
    Calibration,
    DifficultyModel,
    apply_bound,
    conformal_entry,
    conformal_scores,
    dice_lower_bound,
    difficulty_features,
    empirical_coverage,
    fit_difficulty,
    group_folds,
    normalized_scores,
)

# ----------------------------------------------------------------------------- naive twin


def naive_nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ‖a b − y‖² subject to b ≥ 0, by trying every set of free columns.

    The optimum is the unconstrained least-squares solution on some subset of columns (the
    others at 0) that is non-negative; among the feasible subsets, the one with the least
    residual is the optimum (KKT). Exponential in the columns: only for a handful.
    """
    p = a.shape[1]
    best, best_err = np.zeros(p), float(np.sum(y**2))
    for k in range(1, p + 1):
        for cols in itertools.combinations(range(p), k):
            sub = a[:, cols]
            coef, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if np.any(coef < -1e-12):
                continue
            b = np.zeros(p)
            b[list(cols)] = np.clip(coef, 0, None)
            err = float(np.sum((a @ b - y) ** 2))
            if err < best_err - 1e-12:
                best, best_err = b, err
    return best


def naive_sigma(x_fit: np.ndarray, r_fit: np.ndarray, x_new: np.ndarray, floor_fraction: float = 0.1) -> np.ndarray:
    """σ of new cases from a model fitted on (x_fit, |r_fit|), written out step by step."""
    scale = np.array([c.mean() if c.mean() > 1e-12 else 1.0 for c in x_fit.T])
    a = np.column_stack([np.ones(len(r_fit))] + [x_fit[:, j] / scale[j] for j in range(x_fit.shape[1])])
    b = naive_nnls(a, np.abs(r_fit))
    floor = max(floor_fraction * float(np.mean(np.abs(r_fit))), 1e-6)
    out = []
    for row in x_new:
        s = b[0] + sum(b[j + 1] * row[j] / scale[j] for j in range(len(row)))
        out.append(max(s, floor))
    return np.array(out)


def naive_normalized_bound(est_cal, dice_cal, x_cal, fold, est_new, x_new, coverage) -> np.ndarray:
    """Cross-fitted scores r_i / σ_{-fold(i)}(x_i), the counting quantile, L = clip(ŷ − qσ, 0, 1)."""
    r = est_cal - dice_cal
    scores = []
    for i in range(len(r)):
        train = fold != fold[i]
        scores.append(r[i] / naive_sigma(x_cal[train], r[train], x_cal[i : i + 1])[0])
    need = math.ceil((len(scores) + 1) * coverage - 1e-12)
    q = math.inf
    for cand in sorted(scores):
        if sum(s <= cand for s in scores) >= need:
            q = cand
            break
    sigma = naive_sigma(x_cal, r, x_new)
    if math.isinf(q):
        return np.zeros(len(est_new))
    return np.clip(est_new - q * sigma, 0.0, 1.0)


def _hetero(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Exchangeable cases whose error grows with a label-free difficulty u (the entropy).

    ``Dice = clip(ŷ − (0.02 + 0.3·u)·(z + 0.3), 0, 1)`` with u, ŷ uniform and z standard
    normal: easy cases (u ≈ 0) are estimated almost exactly, hard ones (u ≈ 1) badly.
    """
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, n)
    est = rng.uniform(0.6, 1.0, n)
    dice = np.clip(est - (0.02 + 0.3 * u) * (rng.standard_normal(n) + 0.3), 0, 1)
    feats = {"mean_entropy": u, "uncertain_fraction": np.clip(u + rng.normal(0, 0.2, n), 0, 1)}
    return est, dice, feats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normalized_bound_matches_the_naive_twin(seed):
    est, dice, feats = _hetero(40, seed)
    new_est, _, new_feats = _hetero(15, 100 + seed)
    fold = group_folds(40, 5, seed=0)
    entry = conformal_entry(est, dice, feats, folds=5, seed=0)
    got = apply_bound(entry, new_est, 0.9, features=new_feats, method="normalized")
    x = np.column_stack([feats["mean_entropy"], feats["uncertain_fraction"]])
    x_new = np.column_stack([new_feats["mean_entropy"], new_feats["uncertain_fraction"]])
    want = naive_normalized_bound(est, dice, x, fold, new_est, x_new, 0.9)
    assert got.method == "normalized" and got.n_calibration == 40
    np.testing.assert_allclose(got.bound, want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.sigma, naive_sigma(x, est - dice, x_new), rtol=0, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 30), st.integers(1, 3))
def test_difficulty_fit_is_the_nonnegative_least_squares_optimum(seed, n, p):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, p)) * (rng.uniform(0, 1, p) > 0.2)  # some all-zero columns
    r = rng.normal(0, 0.2, n)
    m = fit_difficulty({f"f{j}": x[:, j] for j in range(p)}, r)
    np.testing.assert_allclose(m.sigma({f"f{j}": x[:, j] for j in range(p)}), naive_sigma(x, r, x), atol=1e-8)
    assert m.intercept >= 0 and min(m.coef) >= 0


# ----------------------------------------------------------------------------- coverage


SEEDS = range(40)


def _split_bounds(seed: int, n_cal: int = 200, n_test: int = 300):
    est, dice, feats = _hetero(n_cal + n_test, seed)
    cal, test = np.arange(n_cal), np.arange(n_cal, n_cal + n_test)
    entry = conformal_entry(est[cal], dice[cal], {k: v[cal] for k, v in feats.items()}, seed=seed)
    new = {k: v[test] for k, v in feats.items()}
    norm = apply_bound(entry, est[test], 0.9, features=new, method="normalized")
    const = apply_bound(entry, est[test], 0.9, method="constant")
    return norm, const, est[test], dice[test], feats["mean_entropy"][test]


def test_coverage_on_a_heteroscedastic_exchangeable_set_over_fixed_seeds():
    """Calibrate on 200 cases, bound 300 new ones drawn the same way, 40 fixed seeds.

    Each seed's coverage must reach 0.9 within the 1e-6 quantiles of the calibration draw
    (Beta(k, n + 1 − k)) and the test draw (binomial) — the finite-sample slack; pooled over
    the seeds, within 4 standard deviations (beta-binomial: calibration and test draws) of
    its mean k / (n + 1) ≥ 0.9. The normalised bound varies with the
    case, is tighter (closer to the estimate) on easy cases and lower on hard ones than the
    constant bound, and covers the hard cases about as well as the easy ones, where the
    constant bound over-covers easy cases and under-covers hard ones."""
    n_cal, m = 200, 300
    k = math.ceil((n_cal + 1) * 0.9)
    lo_beta = stats.beta(k, n_cal + 1 - k).ppf(1e-6)
    floor = stats.binom(m, lo_beta).ppf(1e-6) / m
    pooled = {"normalized": 0, "constant": 0}
    hard_cov = {"normalized": [], "constant": []}
    easy_cov = {"normalized": [], "constant": []}
    for seed in SEEDS:
        norm, const, est, dice, u = _split_bounds(seed)
        for name, b in (("normalized", norm), ("constant", const)):
            cov = empirical_coverage(b.bound, dice)
            assert cov["coverage"] >= floor, (seed, name, cov)
            pooled[name] += cov["covered"]
            hard_cov[name].append(empirical_coverage(b.bound[u > 0.7], dice[u > 0.7])["coverage"])
            easy_cov[name].append(empirical_coverage(b.bound[u < 0.3], dice[u < 0.3])["coverage"])
        margin = est - norm.bound
        assert np.std(margin) > 0.02  # the bound varies with the case, not only with the estimate
        assert np.all(norm.sigma > 0)
        # tighter on easy cases, lower on hard ones (mean over the stratum)
        assert np.mean(margin[u < 0.3]) < np.mean((est - const.bound)[u < 0.3])
        assert np.mean(norm.bound[u > 0.7]) < np.mean(const.bound[u > 0.7])
        # ranking by the normalised bound is not ranking by the estimate
        assert not np.array_equal(np.argsort(norm.bound, kind="stable"), np.argsort(est, kind="stable"))
    total = len(SEEDS) * m
    a, b = k, n_cal + 1 - k
    var_one = a * b / ((a + b) ** 2 * (a + b + 1)) + 0.09 / m  # Var(C) + E[C(1 − C)] / m, about
    for name, covered in pooled.items():
        assert covered / total >= a / (a + b) - 4 * math.sqrt(var_one / len(SEEDS)), name
    # conditional on difficulty: the normalised bound is close to nominal in both strata,
    # the constant one is not
    assert np.mean(hard_cov["normalized"]) > 0.85 and np.mean(easy_cov["normalized"]) > 0.85
    assert np.mean(hard_cov["constant"]) < 0.8 < 0.99 < np.mean(easy_cov["constant"])


def test_leave_one_out_coverage_of_the_cross_fitted_scores_is_close_to_nominal():
    """Hold out each of 60 cases, calibrate on the other 59 (scores cross-fitted), bound it:
    the fraction covered over the hold-outs and 5 seeds stays within binomial slack of 0.9."""
    covered = total = 0
    for seed in range(5):
        est, dice, feats = _hetero(60, 50 + seed)
        for i in range(60):
            rest = np.arange(60) != i
            entry = conformal_entry(est[rest], dice[rest], {k: v[rest] for k, v in feats.items()}, seed=seed)
            b = apply_bound(entry, est[i : i + 1], 0.9, features={k: v[i : i + 1] for k, v in feats.items()})
            covered += int(dice[i] >= b.bound[0])
            total += 1
    assert covered / total >= 0.9 - 3 * math.sqrt(0.09 / total)


# ----------------------------------------------------------------------------- positivity


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(-1, 1)), min_size=2, max_size=30),
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=10),
)
def test_sigma_is_never_zero_or_negative(train, new):
    """Zero features, zero residuals, constant columns: σ ≥ floor > 0 wherever it is defined."""
    x = np.array([t[:2] for t in train])
    r = np.array([t[2] for t in train])
    m = fit_difficulty({"a": x[:, 0], "b": x[:, 1]}, r)
    xn = np.array(new)
    s = m.sigma({"a": xn[:, 0], "b": xn[:, 1]})
    assert m.floor > 0
    assert np.all(s >= m.floor) and np.all(s > 0)
    assert np.all(m.sigma({"a": x[:, 0], "b": x[:, 1]}) > 0)


def test_perfect_estimates_give_the_floor_and_the_estimate_as_bound():
    est = np.linspace(0.5, 1.0, 20)
    entry = conformal_entry(est, est, {"mean_entropy": np.linspace(0, 1, 20)})
    b = apply_bound(entry, np.array([0.7]), 0.9, features={"mean_entropy": np.array([0.5])})
    assert b.sigma[0] == pytest.approx(1e-6) and b.bound[0] == pytest.approx(0.7)


def test_a_nonpositive_scale_is_refused():
    with pytest.raises(ValueError, match="<= 0"):
        dice_lower_bound(np.array([0.9, 0.8]), np.arange(9.0), 0.5, sigma=np.array([0.1, 0.0]))
    with pytest.raises(ValueError, match="one scale per case"):
        dice_lower_bound(np.array([0.9, 0.8]), np.arange(9.0), 0.5, sigma=np.array([0.1]))


# ----------------------------------------------------------------------------- undefined values


def test_nan_features_give_a_nan_bound_with_a_reason():
    est, dice, feats = _hetero(40, 3)
    entry = conformal_entry(est, dice, feats)
    new_est = np.array([0.9, np.nan, 0.8, 0.7])
    new = {"mean_entropy": np.array([0.2, 0.2, np.nan, np.nan]),
           "uncertain_fraction": np.array([0.1, 0.1, 0.1, np.nan])}
    b = apply_bound(entry, new_est, 0.9, features=new)
    assert np.isfinite(b.bound[0]) and np.isnan(b.bound[1:]).all()
    assert b.reason.tolist() == [
        "",
        "estimate undefined",
        "difficulty scale undefined: mean_entropy undefined",
        "difficulty scale undefined: mean_entropy, uncertain_fraction undefined",
    ]
    assert np.isnan(b.sigma[1:]).all() or np.isnan(b.sigma[2:]).all()


def test_calibration_cases_with_undefined_features_are_left_out():
    est, dice, feats = _hetero(30, 4)
    feats["mean_entropy"][:3] = np.nan
    dice[3] = np.nan
    entry = conformal_entry(est, dice, feats)
    assert entry["n"] == 29 and entry["normalized"]["n"] == 26
    assert entry["normalized"]["difficulty"]["n"] == 26


def test_too_few_cases_leave_only_the_constant_scores():
    est, dice, feats = _hetero(5, 5)
    entry = conformal_entry(est, dice, feats)
    assert "normalized" not in entry and "at least 10" in entry["normalized_error"]
    b = apply_bound(entry, est, 0.5, features=feats)
    assert b.method == "constant" and "no normalised scores" in b.note
    with pytest.raises(ValueError, match="no normalised conformal scores"):
        apply_bound(entry, est, 0.5, features=feats, method="normalized")
    with pytest.raises(ValueError, match="at least 10"):
        normalized_scores(est, dice, feats)


def test_sa_dispersion_and_estimate_features():
    f = difficulty_features(np.array([1.2, 0.25, 0.5]), baselines={"soft_dice": np.array([[0.9], [0.5], [1.0]])},
                            layer_sa=np.array([[0.2, 0.4, np.nan], [0.5, 0.5, 0.5], [np.nan, 0.3, np.nan]]),
                            names=("estimate", "soft_dice", "sa_dispersion"))
    np.testing.assert_allclose(f["estimate"], [0.0, 0.75, 0.5])
    np.testing.assert_allclose(f["soft_dice"], [0.1, 0.5, 0.0])
    np.testing.assert_allclose(f["sa_dispersion"], [0.1, 0.0, np.nan])
    with pytest.raises(KeyError, match="needs the baseline 'mean_entropy'"):
        difficulty_features(np.array([0.5]), names=("mean_entropy",))
    with pytest.raises(ValueError, match="unknown"):
        difficulty_features(np.array([0.5]), names=("volume",))


# ----------------------------------------------------------------------------- old calibrations


def _old_calibration_json(version: str) -> str:
    """A calibration as protoseg wrote it before the normalised method (no ``normalized``)."""
    est = np.linspace(0.5, 0.95, 12)
    dice = est - np.linspace(-0.05, 0.1, 12)
    d = {"choice": {"name": "layer:a", "level": "layer", "layers": ["a"]}, "metric": "spearman",
         "cv_metric": 0.5, "in_sample_metric": 0.6, "layer_names": ["a"], "n_cases": 12, "n_groups": None,
         "encoding-type": "protoseg-calibration", "encoding-version": version}
    if version == "2":
        d["conformal"] = {"calibrated": {"scores": conformal_scores(est, dice).tolist(), "n": 12,
                                         "method": "split conformal on out-of-fold estimates: score = estimate - true Dice"}}
    return json.dumps(d)


@pytest.mark.parametrize("version", ["1", "2"])
def test_old_calibrations_load_and_give_the_constant_bound(version):
    cal = Calibration.from_json(_old_calibration_json(version))
    if version == "1":
        assert cal.conformal == {}
        return
    entry = cal.conformal["calibrated"]
    new = np.array([0.9, 0.6, np.nan])
    b = apply_bound(entry, new, 0.9)
    assert b.method == "constant" and "written before the normalised method" in b.note
    np.testing.assert_allclose(b.bound, dice_lower_bound(new, np.asarray(entry["scores"]), 0.9), equal_nan=True)
    assert b.bound[0] - b.bound[1] == pytest.approx(0.3)  # estimate minus one constant
    with pytest.raises(ValueError, match="refit the calibration"):
        apply_bound(entry, new, 0.9, method="normalized")
    # a calibration written now round-trips its difficulty model through JSON
    est, dice, feats = _hetero(30, 7)
    cal.conformal["calibrated"] = conformal_entry(est, dice, feats)
    again = Calibration.from_json(cal.to_json())
    model = DifficultyModel.from_dict(again.conformal["calibrated"]["normalized"]["difficulty"])
    assert model.features == ["mean_entropy", "uncertain_fraction"] and model.n == 30
    b2 = apply_bound(again.conformal["calibrated"], est, 0.9, features=feats)
    b1 = apply_bound(cal.conformal["calibrated"], est, 0.9, features=feats)
    np.testing.assert_array_equal(b1.bound, b2.bound)


# ----------------------------------------------------------------------------- triage


def test_triage_ranks_by_the_bound_with_ties_by_the_estimate():
    """Bounds clipped to 0 tie; the estimate orders them, NaN bounds still come first."""
    from engine.quality import flag_cases, rank_cases

    bound = np.array([0.0, 0.4, 0.0, np.nan, 0.2, 0.0])
    est = np.array([0.5, 0.9, 0.3, 0.8, 0.7, np.nan])
    assert rank_cases(bound, then_by=est).tolist() == [3, 5, 2, 0, 4, 1]
    assert rank_cases(bound).tolist() == [3, 0, 2, 5, 4, 1]
    flags, reasons = flag_cases(bound, lowest=3, then_by=est, return_reasons=True)
    assert flags.tolist() == [False, False, True, True, False, True]
    assert reasons[3] == "estimate undefined" and reasons[2] == "rank 3 of 6 (lowest 3)"
    with pytest.raises(ValueError, match="then_by has 2 values"):
        rank_cases(bound, then_by=est[:2])
