"""Per-case lower bounds on Dice by split-conformal calibration on labelled cases.

On labelled cases, the conformity score of a case is how much its estimate overshoots its
true Dice, ``s_i = ŷ_i − Dice_i``. For a chosen coverage ``1 − α`` the bound of a new case
is ``L = ŷ − q`` with ``q`` the ``⌈(n + 1)(1 − α)⌉``-th smallest score (``q = +∞``, i.e. the
trivial bound 0, when that rank exceeds ``n``). If the labelled and the new cases are
exchangeable and the estimator was not fitted on the labelled cases used here,
``P(Dice_new ≥ L) ≥ 1 − α`` (Vovk et al. 2005; Lei et al. 2018; Angelopoulos & Bates 2023).
A shift between the labelled cases and the new ones (another scanner, a corruption never
seen) breaks exchangeability: the guarantee is then void, which is why the evaluation
measures coverage on held-out groups and shift families.

The bound is the estimate shifted by a constant, so ranking cases by it gives the same order
as ranking by the estimate; what it adds is a number on the Dice scale with a stated coverage.
The scores are stored sorted with the calibration (:class:`engine.quality.Calibration`), so the
coverage can be chosen when the bound is applied. MAPIE implements the same (``method=
"base"``); it is not a dependency, and the computation is a quantile.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "conformal_scores",
    "conformal_quantile",
    "dice_lower_bound",
    "empirical_coverage",
    "coverage_interval",
]


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


def dice_lower_bound(estimate: np.ndarray, scores: np.ndarray, coverage: float) -> np.ndarray:
    """Per-case lower bound on Dice: ``clip(ŷ − q, 0, 1)``; NaN where the estimate is NaN.

    Parameters
    ----------
    estimate : ndarray
        ``(n_cases,)`` estimates of the same estimator the scores were computed for.
    scores : ndarray
        Its conformity scores on labelled cases (:func:`conformal_scores`).
    coverage : float
        Nominal coverage (e.g. 0.9).

    Returns
    -------
    ndarray
        float64; 0 when too few labelled cases exist for the coverage (``q = inf``).

    Examples
    --------
    >>> dice_lower_bound(np.array([0.9, np.nan]), np.arange(9.0) / 100, 0.9).round(2).tolist()
    [0.82, nan]
    """
    e = np.asarray(estimate, dtype=np.float64).reshape(-1)
    q = conformal_quantile(scores, coverage)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(e), np.nan, np.clip(e - q, 0.0, 1.0))


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
