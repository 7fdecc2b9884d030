"""Failure-detection benchmark: how well an estimate tells failed outputs from good ones.

In the style of the segmentation failure-detection literature (risk = 1 − Dice; Geifman et
al. 2019, Jaeger et al. 2023, Zenk et al. 2024): per estimator and baseline, the area under
the risk–coverage curve (AURC), its excess over the oracle (E-AURC), AUROC for flagging
``Dice < t`` at several thresholds, and the Spearman correlation of the (oriented) estimate
with Dice, pooled and within each group — each with a bootstrap percentile interval.

The confidence of a case is its estimate, negated for the names in
:data:`engine.quality.validation.LOWER_IS_BETTER` (high entropy = low confidence). A case
whose estimate is undefined (NaN) is the *least* confident (it is flagged first, as in
:func:`engine.quality.rank_cases`); a case without a true Dice is dropped and counted.

Bootstrap replicates resample whole groups (subjects) when there are at least
:data:`MIN_CLUSTERS` groups, cases within each group when there are fewer (a two-subject
study cannot be resampled by subject: the interval would say nothing), and cases otherwise;
the mode used is reported. Every estimator is evaluated on the *same* replicates, so
differences between estimators (:func:`compare_aurc`) are paired.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.quality.validation import LOWER_IS_BETTER, _rank, _rowwise_auroc, _rowwise_pearson, bootstrap_ci, rank_rows

__all__ = [
    "MIN_CLUSTERS",
    "DICE_THRESHOLDS",
    "aurc",
    "e_aurc",
    "risk_coverage_curve",
    "resample_indices",
    "failure_benchmark",
    "compare_aurc",
    "failure_rows",
]

#: Fewest groups for which the bootstrap resamples whole groups (``resample="auto"``).
MIN_CLUSTERS = 5
#: Default Dice thresholds of the AUROC ("failed" = Dice below).
DICE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9)
_NAN2 = [float("nan"), float("nan")]


def _position_weights(n: int) -> np.ndarray:
    """``w_i = (1/n) Σ_{k ≥ i} 1/k``: the weight of the i-th most confident case in AURC."""
    inv = 1.0 / np.arange(1, n + 1)
    return np.cumsum(inv[::-1])[::-1] / n


def _aurc_rows(conf: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """AURC along the last axis (ties in ``conf`` averaged over their orderings)."""
    n = conf.shape[-1]
    if n == 0:
        return np.full(conf.shape[:-1], np.nan)
    lo = rank_rows(-conf, "min").astype(np.int64)
    hi = rank_rows(-conf, "max").astype(np.int64)
    cw = np.concatenate([[0.0], np.cumsum(_position_weights(n))])
    wbar = (cw[hi] - cw[lo - 1]) / (hi - lo + 1)
    return (risk * wbar).sum(-1)


def _confidence(estimate: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """Oriented estimate; NaN → −inf (least confident)."""
    e = np.asarray(estimate, dtype=np.float64)
    c = -e if lower_is_better else e
    return np.where(np.isnan(c), -np.inf, c)


def risk_coverage_curve(confidence: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk at every coverage ``k/n``, most confident cases kept first.

    Parameters
    ----------
    confidence : ndarray
        ``(n,)``; higher = more trusted (NaN = least trusted).
    risk : ndarray
        ``(n,)`` finite, e.g. ``1 − Dice``.

    Returns
    -------
    coverage : ndarray
        ``k / n`` for ``k = 1 … n``.
    selective_risk : ndarray
        Mean risk of the ``k`` most confident cases; where the ``k``-th place falls inside a
        block of tied confidences, the expectation over the orders of that block.

    Examples
    --------
    >>> cov, r = risk_coverage_curve(np.array([0.9, 0.8, 0.7]), np.array([0.0, 1.0, 0.5]))
    >>> r.tolist()
    [0.0, 0.5, 0.5]
    """
    c = _confidence(confidence, False)
    r = np.asarray(risk, dtype=np.float64)
    n = r.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    lo = rank_rows(-c, "min").astype(np.int64)
    hi = rank_rows(-c, "max").astype(np.int64)
    order = np.argsort(-c, kind="stable")
    cr = np.concatenate([[0.0], np.cumsum(r[order])])
    block_mean = (cr[hi] - cr[lo - 1]) / (hi - lo + 1)  # per case: mean risk of its tie block
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(block_mean[order]) / k


def aurc(confidence: np.ndarray, risk: np.ndarray) -> float:
    """Area under the risk–coverage curve (lower is better).

    Parameters
    ----------
    confidence : ndarray
        ``(n,)``; higher = more trusted. NaN counts as the least trusted.
    risk : ndarray
        ``(n,)`` finite risks, e.g. ``1 − Dice``.

    Returns
    -------
    float
        NaN for no case.

    Notes
    -----
    ``AURC = (1/n) Σ_{k=1..n} R(k)`` with ``R(k)`` the mean risk of the ``k`` most confident
    cases (Geifman et al. 2019). Ties in confidence are resolved by their expectation over all
    orders, which is the same as ``Σ_i r_i · mean(w over i's tie block)`` with
    ``w_i = (1/n) Σ_{k≥i} 1/k``; a constant confidence gives the mean risk.

    Examples
    --------
    >>> round(aurc(np.array([0.9, 0.8, 0.7]), np.array([0.0, 1.0, 0.5])), 4)  # (0 + 0.5 + 0.5) / 3
    0.3333
    """
    c = _confidence(confidence, False)
    r = np.asarray(risk, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 1:
        raise ValueError(f"confidence has shape {c.shape} and risk {r.shape}; pass two 1-D arrays of one value per case")
    return float(_aurc_rows(c, r))


def e_aurc(confidence: np.ndarray, risk: np.ndarray) -> float:
    """AURC minus the oracle's AURC (confidence = −risk): 0 for a perfect ranking.

    Examples
    --------
    >>> round(e_aurc(np.array([0.9, 0.8, 0.7]), np.array([0.0, 1.0, 0.5])), 4)  # 1/3 − 1/4
    0.0833
    """
    r = np.asarray(risk, dtype=np.float64)
    return aurc(confidence, r) - aurc(-r, r)


def resample_indices(
    groups: np.ndarray | None, n: int, *, n_boot: int, seed: int = 0, mode: str = "auto"
) -> tuple[list[np.ndarray], str]:
    """Bootstrap replicates of case indices.

    Parameters
    ----------
    groups : ndarray or None
        One label per case.
    n : int
        Number of cases.
    n_boot : int
        Replicates.
    seed : int, optional
    mode : {"auto", "cluster", "stratified", "cases"}
        ``cluster``: whole groups drawn with replacement (a replicate may hold more or fewer
        cases); ``stratified``: cases drawn within each group; ``cases``: cases drawn over
        all. ``auto``: cluster with at least :data:`MIN_CLUSTERS` groups, stratified with
        fewer, cases without groups.

    Returns
    -------
    replicates : list of ndarray
    mode : str
        The mode used.
    """
    rng = np.random.default_rng(seed)
    if mode not in ("auto", "cluster", "stratified", "cases"):
        raise ValueError(f"mode={mode!r}; expected 'auto', 'cluster', 'stratified' or 'cases'")
    if groups is None or mode == "cases":
        return list(rng.integers(0, n, size=(n_boot, n))), "cases"
    uniq, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    if mode == "auto":
        mode = "cluster" if len(uniq) >= MIN_CLUSTERS else "stratified"
    out = []
    for _ in range(n_boot):
        if mode == "cluster":
            pick = rng.integers(0, len(uniq), size=len(uniq))
            out.append(np.concatenate([members[g] for g in pick]))
        else:
            out.append(np.concatenate([m[rng.integers(0, m.size, size=m.size)] for m in members]))
    return out, mode


def _boot(stat: Any, reps: Sequence[np.ndarray], *arrays: np.ndarray) -> np.ndarray:
    """``stat`` on every replicate (stacked when all replicates have one length)."""
    if not reps:
        return np.zeros(0)
    if len({r.size for r in reps}) == 1:
        idx = np.stack(reps)
        return np.asarray(stat(*(a[idx] for a in arrays)), dtype=np.float64)
    return np.array([float(stat(*(a[r][None] for a in arrays))[0]) for r in reps])


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _rowwise_pearson(_rank(x), _rank(y))


def _eaurc_rows(c: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _aurc_rows(c, r) - _aurc_rows(-r, r)


def _entry(value: float, reps: np.ndarray, alpha: float) -> dict[str, Any]:
    return {"value": float(value), "ci": list(bootstrap_ci(reps, alpha=alpha)) if reps.size else list(_NAN2)}


def _spearman_entry(c: np.ndarray, d: np.ndarray, reps: Sequence[np.ndarray], alpha: float) -> dict[str, Any]:
    # ranks only: an undefined estimate (−inf) is simply the lowest
    if c.size < 3 or np.unique(c).size < 2 or np.unique(d).size < 2:
        return {"value": float("nan"), "ci": list(_NAN2), "reason": "fewer than 3 cases or constant values"}
    value = float(_spearman_rows(c[None], d[None])[0])
    return _entry(value, _boot(_spearman_rows, reps, c, d), alpha)


def _one(
    c: np.ndarray, dice: np.ndarray, groups: np.ndarray | None, reps: Sequence[np.ndarray],
    group_reps: Mapping[str, Sequence[np.ndarray]], thresholds: Sequence[float], alpha: float,
) -> dict[str, Any]:
    risk = 1.0 - dice
    out: dict[str, Any] = {"n": int(c.size)}
    out["aurc"] = _entry(_aurc_rows(c, risk), _boot(_aurc_rows, reps, c, risk), alpha)
    out["e_aurc"] = _entry(_eaurc_rows(c, risk), _boot(_eaurc_rows, reps, c, risk), alpha)
    out["oracle_aurc"] = float(_aurc_rows(-risk, risk))
    out["random_aurc"] = float(risk.mean()) if risk.size else float("nan")
    out["auroc"] = {}
    for t in thresholds:
        bad = dice < t
        key = f"{t:g}"
        if not bad.any() or bad.all():
            out["auroc"][key] = {"value": float("nan"), "ci": list(_NAN2), "n_bad": int(bad.sum()),
                                 "reason": f"no case with Dice {'<' if not bad.any() else '>='} {t:g}"}
            continue
        stat = lambda cc, bb: _rowwise_auroc(-cc, bb)  # noqa: E731 — low confidence flags
        out["auroc"][key] = {**_entry(stat(c, bad), _boot(stat, reps, c, bad), alpha), "n_bad": int(bad.sum())}
    out["spearman"] = _spearman_entry(c, dice, reps, alpha)
    if groups is not None:
        out["groups"] = {}
        for g, g_reps in group_reps.items():
            sel = groups == g
            cg, dg = c[sel], dice[sel]
            out["groups"][g] = {
                "n": int(sel.sum()),
                "spearman": _spearman_entry(cg, dg, g_reps, alpha),
                "aurc": float(_aurc_rows(cg, 1.0 - dg)),
                "e_aurc": float(_eaurc_rows(cg, 1.0 - dg)),
            }
    return out


def _prepare(
    true_dice: np.ndarray, groups: Sequence[Any] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    d = np.asarray(true_dice, dtype=np.float64).reshape(-1)
    ok = np.isfinite(d)
    g = None
    if groups is not None:
        g = np.asarray([str(v) for v in groups], dtype=object)
        if g.size != d.size:
            raise ValueError(f"groups has {g.size} entries but true_dice has {d.size}; give one group per case")
        g = g[ok]
    return ok, d[ok], g


def failure_benchmark(
    estimates: Mapping[str, np.ndarray],
    true_dice: np.ndarray,
    *,
    groups: Sequence[Any] | None = None,
    dice_thresholds: Sequence[float] = DICE_THRESHOLDS,
    n_boot: int = 1000,
    seed: int = 0,
    resample: str = "auto",
    lower_is_better: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Failure-detection benchmark of every estimate against true Dice (risk = 1 − Dice).

    Parameters
    ----------
    estimates : mapping of str to ndarray
        Name → ``(n_cases,)``; NaN = undefined (least confident).
    true_dice : ndarray
        ``(n_cases,)``; cases with NaN are dropped (counted in ``n_dropped_dice``).
    groups : sequence, optional
        Subject (or site) per case: within-group statistics and the bootstrap's clusters.
    dice_thresholds : sequence of float, optional
        AUROC for flagging ``Dice < t`` at each.
    n_boot : int, optional
        Replicates (0: no intervals). The same replicates serve every estimator.
    seed : int, optional
    resample : {"auto", "cluster", "stratified", "cases"}
        See :func:`resample_indices`.
    lower_is_better : sequence of str, optional
        Names oriented by negation (default :data:`~engine.quality.validation.LOWER_IS_BETTER`).
    alpha : float, optional
        Intervals are ``1 − alpha`` percentile intervals.

    Returns
    -------
    dict
        Per name: ``n``, ``n_undefined_estimate``, ``n_dropped_dice``, ``orientation``,
        ``aurc`` and ``e_aurc`` (``value``, ``ci``), ``oracle_aurc``, ``random_aurc`` (the
        mean risk: AURC of an uninformative estimate), ``auroc`` (threshold → ``value``,
        ``ci``, ``n_bad``), ``spearman`` (oriented estimate vs Dice: positive = good;
        ``value``, ``ci``), ``groups`` (name → ``n``, ``spearman``, ``aurc``, ``e_aurc``),
        ``resample`` (mode, ``n_boot``, ``n_groups``).

    Notes
    -----
    ``AURC`` and ``E-AURC`` as in :func:`aurc` and :func:`e_aurc`; ``AUROC_t = P(c_good >
    c_bad) + ½ P(tie)`` over pairs with ``Dice_bad < t ≤ Dice_good``. Within-group
    intervals resample cases within that group.

    Examples
    --------
    >>> d = np.array([0.9, 0.2, 0.7, 0.95])
    >>> r = failure_benchmark({"e": d}, d, n_boot=0)
    >>> r["e"]["e_aurc"]["value"]
    0.0
    """
    if n_boot < 0:
        raise ValueError(f"n_boot={n_boot!r}; expected 0 (no intervals) or a positive number of replicates")
    ok, d, g = _prepare(true_dice, groups)
    lower = LOWER_IS_BETTER if lower_is_better is None else frozenset(lower_is_better)
    reps, mode = resample_indices(g, d.size, n_boot=n_boot, seed=seed, mode=resample) if n_boot else ([], "none")
    group_reps: dict[str, list[np.ndarray]] = {}
    if g is not None:
        for i, grp in enumerate(sorted(set(g.tolist()))):
            m = int((g == grp).sum())
            rng = np.random.default_rng([seed, i + 1])
            group_reps[grp] = list(rng.integers(0, m, size=(n_boot, m))) if n_boot else []
    out: dict[str, dict[str, Any]] = {}
    for name, values in estimates.items():
        e = np.asarray(values, dtype=np.float64).reshape(-1)
        if e.size != ok.size:
            raise ValueError(f"estimate {name!r} has {e.size} values but true_dice has {ok.size}; give one per case")
        c = _confidence(e[ok], name in lower)
        res = _one(c, d, g, reps, group_reps, dice_thresholds, alpha)
        res["n_undefined_estimate"] = int(np.isinf(c).sum())
        res["n_dropped_dice"] = int((~ok).sum())
        res["orientation"] = "lower is better" if name in lower else "higher is better"
        res["resample"] = {"mode": mode, "n_boot": int(n_boot),
                           "n_groups": None if g is None else int(len(set(g.tolist())))}
        out[name] = res
    return out


def compare_aurc(
    estimate_a: np.ndarray,
    estimate_b: np.ndarray,
    true_dice: np.ndarray,
    *,
    groups: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    resample: str = "auto",
    lower_is_better: tuple[bool, bool] = (False, False),
    alpha: float = 0.05,
) -> dict[str, Any]:
    """``AURC(a) − AURC(b)`` with a paired bootstrap interval (negative: ``a`` is better).

    Both estimates are evaluated on the same replicates (:func:`resample_indices`).
    ``p_not_better`` is the fraction of replicates where ``a`` is not better (difference ≥ 0):
    a one-sided bootstrap p-value for "a beats b".

    Examples
    --------
    >>> d = np.array([0.9, 0.2, 0.7, 0.95])
    >>> round(compare_aurc(d, np.zeros(4), d, n_boot=0)["difference"], 4)  # 0.146875 − mean risk 0.3125
    -0.1656
    """
    ok, d, g = _prepare(true_dice, groups)
    a = _confidence(np.asarray(estimate_a, dtype=np.float64).reshape(-1)[ok], lower_is_better[0])
    b = _confidence(np.asarray(estimate_b, dtype=np.float64).reshape(-1)[ok], lower_is_better[1])
    if a.size != d.size or b.size != d.size:
        raise ValueError("estimate_a, estimate_b and true_dice need one value per case each")
    risk = 1.0 - d
    diff = float(_aurc_rows(a, risk) - _aurc_rows(b, risk))
    reps, mode = resample_indices(g, d.size, n_boot=n_boot, seed=seed, mode=resample) if n_boot else ([], "none")
    stat = lambda aa, bb, rr: _aurc_rows(aa, rr) - _aurc_rows(bb, rr)  # noqa: E731
    boot = _boot(stat, reps, a, b, risk)
    return {
        "difference": diff,
        "ci": list(bootstrap_ci(boot, alpha=alpha)) if boot.size else list(_NAN2),
        "p_not_better": float((boot >= 0).mean()) if boot.size else float("nan"),
        "aurc_a": float(_aurc_rows(a, risk)),
        "aurc_b": float(_aurc_rows(b, risk)),
        "n": int(d.size),
        "resample": mode,
    }


def failure_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per estimator of a :func:`failure_benchmark` result (for tables/CSV)."""
    rows = []
    for name, res in results.items():
        row: dict[str, Any] = {
            "estimator": name, "n": res["n"],
            "aurc": res["aurc"]["value"], "aurc_lo": res["aurc"]["ci"][0], "aurc_hi": res["aurc"]["ci"][1],
            "e_aurc": res["e_aurc"]["value"], "e_aurc_lo": res["e_aurc"]["ci"][0],
            "e_aurc_hi": res["e_aurc"]["ci"][1],
            "spearman": res["spearman"]["value"], "spearman_lo": res["spearman"]["ci"][0],
            "spearman_hi": res["spearman"]["ci"][1],
        }
        for t, a in res["auroc"].items():
            row[f"auroc_{t}"] = a["value"]
        for grp, gres in res.get("groups", {}).items():
            row[f"spearman_in_{grp}"] = gres["spearman"]["value"]
        rows.append(row)
    return rows
