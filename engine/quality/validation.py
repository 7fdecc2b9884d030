"""Validation of label-free quality estimates against true Dice (SPEC §4).

For each estimator (and each baseline): Pearson and Spearman correlation with bootstrap 95 %
percentile intervals, the same within every group (subject, site), the partial rank
correlation given the predicted volume, AUROC for flagging cases whose Dice is below a
threshold (a low estimate flags), and how many of the worst k % cases by Dice are also among
the worst k % by the estimate. Cases where the estimate or the Dice is NaN are dropped and
counted.

Correlations and p-values come from :mod:`scipy.stats`, imported on first use (it takes most
of a second; ``import engine.quality`` does not pay for it). Ranks are computed here
(:func:`rank_rows`, the same values as ``scipy.stats.rankdata``), so a validation or a failure
benchmark that needs no correlation (fewer than 3 cases, as in ``protoseg demo``) never
imports scipy.stats. The bootstrap
replicates are computed row-wise in NumPy: ``scipy.stats.bootstrap`` resamples one statistic
at a time and cannot keep the strata, the seeds or the shared indices used here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "LOWER_IS_BETTER",
    "validate",
    "validation_rows",
    "auroc",
    "partial_spearman",
    "worst_overlap",
    "bootstrap_ci",
    "correlation",
    "rank_rows",
]

#: Names whose *high* value means a worse output (the uncertainty baselines); :func:`validate`
#: negates them for AUROC and the worst-k overlap unless told otherwise.
LOWER_IS_BETTER = frozenset({"uncertain_fraction", "mean_entropy"})
_NAN_CI = (float("nan"), float("nan"))


def _stats() -> ModuleType:
    """:mod:`scipy.stats`, imported on first use (about 0.8 s)."""
    from scipy import stats

    return stats


def rank_rows(a: np.ndarray, method: str = "average") -> np.ndarray:
    """Ranks along the last axis, ties by ``method``: ``scipy.stats.rankdata(a, method=method,
    axis=-1)`` without importing :mod:`scipy.stats` (about 0.8 s, more than the rest of an
    estimate of a few cases).

    The same algorithm as scipy's (a stable sort, runs of equal values, their first or last
    position or its mean), so the same values and dtype: int64 for ``"min"``/``"max"``,
    float64 for ``"average"``; a row holding NaN is all NaN (and the result float64), as
    with scipy's default ``nan_policy="propagate"``.

    Parameters
    ----------
    a : ndarray
        Any shape; ranked along its last axis.
    method : {"average", "min", "max"}

    Returns
    -------
    ndarray
        Ranks from 1, shape of ``a``.

    Examples
    --------
    >>> rank_rows(np.array([0.0, 2.0, 3.0, 2.0])).tolist()
    [1.0, 2.5, 4.0, 2.5]
    >>> rank_rows(np.array([[0.0, 2.0, 3.0, 2.0]]), "min").tolist()
    [[1, 2, 4, 2]]
    """
    if method not in ("average", "min", "max"):
        raise ValueError(f"method={method!r} is not a rank method here; use 'average', 'min' or 'max'")
    x = np.asarray(a)
    shape = x.shape
    dtype = np.float64 if method == "average" else np.int64
    if x.ndim == 0 or x.size == 0:
        return np.empty(shape, dtype=dtype)
    j = np.argsort(x, axis=-1, kind="stable")
    y = np.take_along_axis(x, j, axis=-1)
    first = np.concatenate([np.ones(shape[:-1] + (1,), dtype=bool), y[..., :-1] != y[..., 1:]], axis=-1)
    starts = np.flatnonzero(first.reshape(-1))
    counts = np.diff(starts, append=y.size)
    ordinal = np.broadcast_to(np.arange(1, shape[-1] + 1, dtype=dtype), shape)[first]
    if method == "min":
        ranks = ordinal
    elif method == "max":
        ranks = ordinal + counts - 1
    else:
        ranks = ordinal + (counts.astype(np.float64) - 1) / 2
    ranks = np.repeat(ranks, counts).reshape(shape)
    out = np.empty(shape, dtype=dtype)
    np.put_along_axis(out, j, ranks, axis=-1)
    if x.dtype.kind in "fc":
        nan_rows = np.isnan(x).any(axis=-1)
        if nan_rows.any():
            out = out.astype(np.float64)
            out[nan_rows] = np.nan
    return out


def _rank(a: np.ndarray) -> np.ndarray:
    return rank_rows(a)


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis; NaN where either row is constant."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    num = (xc * yc).sum(-1)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _rowwise_partial(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Pearson r of the residuals of x and y after a least-squares fit on z (with intercept)."""

    def resid(a: np.ndarray) -> np.ndarray:
        zc = z - z.mean(-1, keepdims=True)
        ac = a - a.mean(-1, keepdims=True)
        zz = (zc * zc).sum(-1, keepdims=True)
        beta = np.where(zz > 0, (zc * ac).sum(-1, keepdims=True) / np.where(zz > 0, zz, 1.0), 0.0)
        r = ac - beta * zc
        # a residual at rounding level means "a is a linear function of z": nothing is left
        # to correlate, so the partial correlation is undefined (NaN), not rounding noise
        scale = np.sqrt((ac * ac).sum(-1, keepdims=True))
        tiny = np.sqrt((r * r).sum(-1, keepdims=True)) <= 1e-10 * scale
        return np.where(tiny, 0.0, r)

    return _rowwise_pearson(resid(x), resid(y))


def _rowwise_auroc(score: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC per row: P(score of a positive > score of a negative) + ½ P(tie) (Mann–Whitney)."""
    ranks = _rank(score)
    n_pos = positive.sum(-1)
    n_neg = positive.shape[-1] - n_pos
    u = (ranks * positive).sum(-1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def correlation(x: np.ndarray, y: np.ndarray, metric: str = "spearman") -> float:
    """Spearman (or Pearson) r over the pairs where both values are finite.

    Parameters
    ----------
    x, y : ndarray
        ``(n,)`` each.
    metric : {"spearman", "pearson"}

    Returns
    -------
    float
        NaN with fewer than 3 finite pairs or when either side is constant.

    Examples
    --------
    >>> correlation(np.array([1.0, 2.0, np.nan, 4.0]), np.array([0.1, 0.5, 0.2, 0.9]))
    1.0
    """
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    if metric == "spearman":
        return float(_stats().spearmanr(x[ok], y[ok])[0])
    return float(_stats().pearsonr(x[ok], y[ok])[0])


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``score`` for separating ``positive`` cases (ties count one half).

    Parameters
    ----------
    score : ndarray
        Higher = more likely positive.
    positive : ndarray of bool

    Returns
    -------
    float
        NaN when there is no positive or no negative case.

    Examples
    --------
    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    0.75
    """
    s = np.asarray(score, dtype=np.float64)
    p = np.asarray(positive, dtype=bool)
    if s.shape != p.shape:
        raise ValueError(f"score has shape {s.shape} but positive has {p.shape}; pass one label per score")
    return float(_rowwise_auroc(s, p))


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman correlation of ``x`` and ``y`` given ``z``: Pearson r of rank residuals.

    Notes
    -----
    Ranks of x, y and z are taken (average ranks for ties); x-ranks and y-ranks are each
    regressed linearly on z-ranks, and the residuals are correlated.
    """
    x, y, z = (np.asarray(a, dtype=np.float64) for a in (x, y, z))
    return float(_rowwise_partial(_rank(x), _rank(y), _rank(z)))


def worst_overlap(estimate: np.ndarray, true_dice: np.ndarray, fraction: float) -> dict[str, Any]:
    """How many of the worst ``fraction`` of cases by Dice are among the worst by the estimate.

    ``k = max(1, round(fraction · n))``; lowest values are worst for both (ties broken by
    case order). ``expected`` = ``k² / n`` for an uninformative estimate.
    """
    e = np.asarray(estimate, dtype=np.float64)
    d = np.asarray(true_dice, dtype=np.float64)
    n = e.size
    if n == 0:
        return {"k": 0, "overlap": 0, "fraction": float("nan"), "expected": float("nan")}
    k = max(1, int(round(fraction * n)))
    worst_d = set(np.argsort(d, kind="stable")[:k].tolist())
    worst_e = set(np.argsort(e, kind="stable")[:k].tolist())
    ov = len(worst_d & worst_e)
    return {"k": k, "overlap": ov, "fraction": ov / k, "expected": k * k / n}


def bootstrap_ci(
    stat_rows: np.ndarray, *, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN replicates ignored)."""
    r = stat_rows[np.isfinite(stat_rows)]
    if r.size == 0:
        return _NAN_CI
    return float(np.quantile(r, alpha / 2)), float(np.quantile(r, 1 - alpha / 2))


def _boot_indices(n: int, n_boot: int, rng: np.random.Generator, groups: np.ndarray | None) -> np.ndarray:
    """``(n_boot, n)`` resampled case indices; within each group when ``groups`` is given."""
    if groups is None:
        return rng.integers(0, n, size=(n_boot, n))
    out = np.empty((n_boot, n), dtype=np.int64)
    pos = 0
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        out[:, pos : pos + members.size] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
        pos += members.size
    return out


def _correlations(
    x: np.ndarray, y: np.ndarray, *, n_boot: int, rng: np.random.Generator, strata: np.ndarray | None
) -> dict[str, Any]:
    """Pearson and Spearman r, p-value and bootstrap interval (``n``; ``reason`` when undefined)."""
    n = x.size
    out: dict[str, Any] = {"n": int(n)}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        why = "fewer than 3 cases" if n < 3 else "constant values"
        for key in ("pearson", "spearman"):
            out[key] = {"r": float("nan"), "ci": list(_NAN_CI), "p": float("nan"), "reason": why}
        return out
    pr = _stats().pearsonr(x, y)
    sr = _stats().spearmanr(x, y)
    if n_boot > 0:
        idx = _boot_indices(n, n_boot, rng, strata)
        xb, yb = x[idx], y[idx]
        bp = _rowwise_pearson(xb, yb)
        bs = _rowwise_pearson(_rank(xb), _rank(yb))
    else:
        bp = bs = np.array([])
    out["pearson"] = {"r": float(pr[0]), "ci": list(bootstrap_ci(bp)), "p": float(pr[1])}
    out["spearman"] = {"r": float(sr[0]), "ci": list(bootstrap_ci(bs)), "p": float(sr[1])}
    return out


def _auroc_entry(
    x: np.ndarray, t: np.ndarray, sign: float, *, dice_threshold: float, n_boot: int,
    rng: np.random.Generator, strata: np.ndarray | None,
) -> dict[str, Any]:
    """AUROC of a low oriented estimate ``sign·x`` for flagging ``Dice < dice_threshold``."""
    bad = t < dice_threshold
    good_score = sign * x
    auc: dict[str, Any] = {"value": float("nan"), "ci": list(_NAN_CI), "n_bad": int(bad.sum()),
                           "n_good": int((~bad).sum()), "threshold": dice_threshold}
    if bad.any() and (~bad).any():
        auc["value"] = float(_rowwise_auroc(-good_score, bad))
        if n_boot > 0:
            idx = _boot_indices(x.size, n_boot, rng, strata)
            auc["ci"] = list(bootstrap_ci(_rowwise_auroc(-good_score[idx], bad[idx])))
    else:
        auc["reason"] = f"no case with Dice {'<' if not bad.any() else '>='} {dice_threshold:g}"
    return auc


def _partial_entry(
    x: np.ndarray, t: np.ndarray, v: np.ndarray, *, n_boot: int, rng: np.random.Generator,
    strata: np.ndarray | None,
) -> dict[str, Any]:
    """Partial Spearman of estimate and Dice given volume, with its bootstrap interval."""
    part: dict[str, Any] = {"r": float("nan"), "ci": list(_NAN_CI), "n": int(x.size)}
    if x.size < 4:
        part["reason"] = "fewer than 4 cases"
        return part
    part["r"] = partial_spearman(x, t, v)
    if not np.isfinite(part["r"]):
        part["reason"] = "no residual variation once predicted volume is given (ranks determined by volume)"
    if n_boot > 0:
        idx = _boot_indices(x.size, n_boot, rng, strata)
        reps = _rowwise_partial(_rank(x[idx]), _rank(t[idx]), _rank(v[idx]))
        part["ci"] = list(bootstrap_ci(reps))
    return part


def _validate_one(
    e: np.ndarray, y: np.ndarray, *, sign: float, groups: np.ndarray | None, volume: np.ndarray | None,
    dice_threshold: float, worst_fraction: float, n_boot: int, seed: int, stratified: bool,
) -> dict[str, Any]:
    """Every statistic of :func:`validate` for one estimate (one seeded generator, fixed order)."""
    rng = np.random.default_rng(seed)
    ok = np.isfinite(e) & np.isfinite(y)
    x, t = e[ok], y[ok]
    strata = groups[ok] if (groups is not None and stratified) else None
    res = _correlations(x, t, n_boot=n_boot, rng=rng, strata=strata)
    res["n_dropped"] = int(y.size - ok.sum())
    res["n_dropped_estimate"] = int((~np.isfinite(e)).sum())
    res["n_dropped_dice"] = int((np.isfinite(e) & ~np.isfinite(y)).sum())
    res["orientation"] = "lower is better" if sign < 0 else "higher is better"
    res["auroc"] = _auroc_entry(x, t, sign, dice_threshold=dice_threshold, n_boot=n_boot, rng=rng, strata=strata)
    res["worst_overlap"] = worst_overlap(sign * x, t, worst_fraction)
    res["worst_overlap"]["worst_fraction"] = worst_fraction
    if volume is not None:
        ok_v = ok & np.isfinite(volume)
        strata_v = groups[ok_v] if (groups is not None and stratified) else None
        res["partial_spearman"] = _partial_entry(e[ok_v], y[ok_v], volume[ok_v], n_boot=n_boot, rng=rng,
                                                 strata=strata_v)
    if groups is not None:
        res["groups"] = {}
        for grp in sorted(set(groups[ok].tolist())):
            sel = groups[ok] == grp
            res["groups"][grp] = _correlations(x[sel], t[sel], n_boot=n_boot, rng=rng, strata=None)
    return res


def validate(
    estimates: Mapping[str, np.ndarray],
    true_dice: np.ndarray,
    *,
    groups: Sequence[Any] | None = None,
    predicted_volume: np.ndarray | None = None,
    dice_threshold: float = 0.8,
    worst_fraction: float = 0.1,
    n_boot: int = 1000,
    seed: int = 0,
    stratified: bool = False,
    lower_is_better: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Validate quality estimates against the output's true Dice.

    Parameters
    ----------
    estimates : mapping of str to ndarray
        Estimator or baseline name → ``(n_cases,)`` values.
    true_dice : ndarray
        ``(n_cases,)`` Dice of the output against ground truth.
    groups : sequence, optional
        One group label per case; adds within-group statistics.
    predicted_volume : ndarray, optional
        ``(n_cases,)`` predicted volume (or fraction); adds the partial Spearman given it.
    dice_threshold : float, optional
        Cases with Dice below it are "bad" for the AUROC.
    worst_fraction : float, optional
        k % for the worst-case overlap.
    n_boot : int, optional
        Bootstrap replicates (cases resampled with replacement; 0 disables intervals).
    seed : int, optional
        Seed of the bootstrap; every estimate starts from the same seed.
    stratified : bool, optional
        Resample within each group (keeps group sizes) instead of over all cases.
    lower_is_better : sequence of str, optional
        Names whose low values mean a *good* output (default :data:`LOWER_IS_BETTER`:
        ``uncertain_fraction`` and ``mean_entropy``); they are negated for AUROC and the
        worst-k overlap. Correlations are reported with their raw sign.

    Returns
    -------
    dict
        Per name: ``n``, ``n_dropped`` (NaN estimate or Dice), ``pearson`` and ``spearman``
        (``r``, ``ci`` [lo, hi], ``p``), ``partial_spearman`` (``r``, ``ci``) when a volume
        is given, ``auroc`` (``value``, ``ci``, ``n_bad``, ``n_good``), ``worst_overlap``,
        ``groups`` (name → ``n``, ``pearson``, ``spearman``) and ``orientation``.

    Raises
    ------
    ValueError
        Mismatched lengths or out-of-range options.

    Notes
    -----
    AUROC treats a low (oriented) estimate as a flag for ``Dice < dice_threshold``:
    ``AUROC = P(e_good > e_bad) + ½ P(e_good = e_bad)`` over all good/bad pairs
    (Mann–Whitney U / (n_good · n_bad)). Partial Spearman: Pearson r between the residuals
    of rank(e) and rank(Dice), each regressed on rank(volume).

    Examples
    --------
    >>> d = np.array([0.9, 0.5, 0.8, 0.95, 0.3])
    >>> v = validate({"e": d + 0.01}, d, n_boot=0)
    >>> round(v["e"]["spearman"]["r"], 3)
    1.0
    """
    y = np.asarray(true_dice, dtype=np.float64).reshape(-1)
    n = y.size
    if not 0.0 < worst_fraction <= 1.0:
        raise ValueError(f"worst_fraction={worst_fraction!r}; expected a number in (0, 1]")
    if n_boot < 0:
        raise ValueError(f"n_boot={n_boot!r}; expected 0 (no intervals) or a positive number of replicates")
    g = None if groups is None else np.asarray([str(v) for v in groups], dtype=object)
    if g is not None and g.size != n:
        raise ValueError(f"groups has {g.size} entries but true_dice has {n}; give one group per case")
    vol = None if predicted_volume is None else np.asarray(predicted_volume, dtype=np.float64).reshape(-1)
    if vol is not None and vol.size != n:
        raise ValueError(f"predicted_volume has {vol.size} values but true_dice has {n}; give one per case")
    lower = LOWER_IS_BETTER if lower_is_better is None else frozenset(lower_is_better)
    results: dict[str, dict[str, Any]] = {}
    for name, values in estimates.items():
        e = np.asarray(values, dtype=np.float64).reshape(-1)
        if e.size != n:
            raise ValueError(f"estimate {name!r} has {e.size} values but true_dice has {n}; give one per case")
        results[name] = _validate_one(
            e, y, sign=-1.0 if name in lower else 1.0, groups=g, volume=vol, dice_threshold=dice_threshold,
            worst_fraction=worst_fraction, n_boot=n_boot, seed=seed, stratified=stratified,
        )
    return results


def _correlation_columns(res: Mapping[str, Any]) -> dict[str, Any]:
    """``pearson``, ``pearson_lo``, …, ``spearman_hi`` of one :func:`_correlations` result."""
    out: dict[str, Any] = {}
    for key in ("pearson", "spearman"):
        out[key] = res[key]["r"]
        out[f"{key}_lo"], out[f"{key}_hi"] = res[key]["ci"]
    return out


def _failure_columns(fail: Mapping[str, Any] | None) -> dict[str, Any]:
    """``aurc``, ``e_aurc`` (with intervals) of a :func:`engine.quality.failure_benchmark`
    entry attached as ``results[name]["failure"]``; nothing when absent."""
    if not fail:
        return {}
    return {"aurc": fail["aurc"]["value"], "aurc_lo": fail["aurc"]["ci"][0], "aurc_hi": fail["aurc"]["ci"][1],
            "e_aurc": fail["e_aurc"]["value"], "e_aurc_lo": fail["e_aurc"]["ci"][0],
            "e_aurc_hi": fail["e_aurc"]["ci"][1]}


def validation_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flatten :func:`validate` output into one row per (estimator, scope) for tables/CSV.

    ``scope`` is ``"all"`` or ``"group:<name>"``. When a result carries the failure-detection
    benchmark (``results[name]["failure"]``, as :func:`engine.run.estimate_store` stores it),
    the ``all`` rows also hold ``aurc`` and ``e_aurc`` with their intervals.
    """
    rows = []
    for name, res in results.items():
        rows.append({
            "estimator": name,
            "scope": "all",
            "n": res["n"],
            "n_dropped": res["n_dropped"],
            **_correlation_columns(res),
            "partial_spearman": res.get("partial_spearman", {}).get("r", math.nan),
            "auroc": res["auroc"]["value"],
            "auroc_lo": res["auroc"]["ci"][0],
            "auroc_hi": res["auroc"]["ci"][1],
            "worst_overlap": res["worst_overlap"]["overlap"],
            "worst_k": res["worst_overlap"]["k"],
            **_failure_columns(res.get("failure")),
        })
        for grp, gres in res.get("groups", {}).items():
            rows.append({"estimator": name, "scope": f"group:{grp}", "n": gres["n"], **_correlation_columns(gres)})
    return rows
