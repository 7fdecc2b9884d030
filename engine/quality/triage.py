"""Triage: order cases from least to best supported, and flag the ones to review first.

A case whose estimate is undefined (NaN: no score was defined, e.g. an empty prediction)
always comes first and is always flagged — it cannot look good by having no score.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["rank_cases", "flag_cases"]


def rank_cases(estimates: np.ndarray, *, then_by: np.ndarray | None = None) -> np.ndarray:
    """Case indices, least supported first: NaN estimates first, then ascending (stable).

    Parameters
    ----------
    estimates : ndarray
        ``(n_cases,)``; higher = better supported (an estimate, or a Dice lower bound).
    then_by : ndarray, optional
        ``(n_cases,)`` tie-break among equal values (NaN first, then ascending): e.g. the
        estimate when ranking by Dice lower bounds, several of which may be clipped to 0.

    Returns
    -------
    ndarray of int
        A permutation of ``range(n_cases)``.

    Examples
    --------
    >>> rank_cases(np.array([0.5, np.nan, 0.1])).tolist()
    [1, 2, 0]
    >>> rank_cases(np.array([0.0, 0.0, 0.3]), then_by=np.array([0.6, 0.4, 0.9])).tolist()
    [1, 0, 2]
    """
    e = np.asarray(estimates, dtype=np.float64).reshape(-1)
    key = np.where(np.isnan(e), -np.inf, e)
    if then_by is None:
        return np.lexsort((np.arange(e.size), key, ~np.isnan(e)))
    t = np.asarray(then_by, dtype=np.float64).reshape(-1)
    if t.shape != e.shape:
        raise ValueError(f"then_by has {t.size} values but estimates has {e.size}; give one per case")
    return np.lexsort((np.arange(e.size), np.where(np.isnan(t), -np.inf, t), key, ~np.isnan(e)))


def flag_cases(
    estimates: np.ndarray,
    *,
    threshold: float | None = None,
    lowest: int | None = None,
    fraction: float | None = None,
    return_reasons: bool = False,
    then_by: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Flag the least-supported cases by exactly one rule.

    Parameters
    ----------
    estimates : ndarray
        ``(n_cases,)`` quality estimates (higher = better supported).
    threshold : float, optional
        Flag cases with estimate ``< threshold``.
    lowest : int, optional
        Flag the ``lowest`` least-supported cases.
    fraction : float, optional
        Flag the ``ceil(fraction · n)`` least-supported cases, ``0 < fraction <= 1``.
    return_reasons : bool, optional
        Also return a per-case reason string (``""`` when not flagged).
    then_by : ndarray, optional
        Tie-break of the ``lowest``/``fraction`` order (:func:`rank_cases`).

    Returns
    -------
    flags : ndarray of bool
        NaN estimates are always flagged (first, reason "estimate undefined"); they count
        towards ``lowest``/``fraction``.
    reasons : ndarray of str, only with ``return_reasons=True``

    Raises
    ------
    ValueError
        When not exactly one rule is given, or a rule's value is out of range.

    Examples
    --------
    >>> flag_cases(np.array([0.9, np.nan, 0.2, 0.5]), lowest=2).tolist()
    [False, True, True, False]
    """
    given = {k: v for k, v in (("threshold", threshold), ("lowest", lowest), ("fraction", fraction)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            f"got {len(given)} flagging rules ({', '.join(given) or 'none'}); give exactly one of threshold=, lowest=, fraction="
        )
    e = np.asarray(estimates, dtype=np.float64).reshape(-1)
    n = e.size
    undefined = np.isnan(e)
    flags = undefined.copy()
    reasons = np.where(undefined, "estimate undefined", "").astype(object)
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold={threshold!r}; expected a finite number")
        low = ~undefined & (e < threshold)
        flags |= low
        reasons[low] = f"estimate < {threshold:g}"
    else:
        if lowest is not None:
            if int(lowest) != lowest or lowest < 0:
                raise ValueError(f"lowest={lowest!r}; expected a non-negative whole number of cases")
            k = int(lowest)
        else:  # fraction
            if not 0.0 < float(fraction) <= 1.0:  # type: ignore[arg-type]
                raise ValueError(f"fraction={fraction!r}; expected a number in (0, 1]")
            k = int(math.ceil(float(fraction) * n))  # type: ignore[arg-type]
        order = rank_cases(e, then_by=then_by)
        extra = [i for i in order[: max(k, 0)] if not undefined[i]]
        flags[extra] = True
        extra_set = set(extra)
        for r, i in enumerate(order):
            if i in extra_set:
                reasons[i] = f"rank {r + 1} of {n} (lowest {k})"
    flags = flags.astype(bool)
    if return_reasons:
        return flags, reasons.astype(str)
    return flags

