"""Trivial label-free quality baselines, reported beside every estimate (SPEC §4).

An estimator is worth its cost only where it beats these: the predicted-volume fraction,
the soft Dice of the probability with its thresholded map, the fraction of uncertain
positions and the mean binary entropy. One pass of a Numba kernel
(:mod:`engine._kernels.baseline`) sums everything per case and class.

The module is named ``baseline`` (singular) so that the function
:func:`engine.quality.baselines` does not shadow a submodule of the same name.
"""
from __future__ import annotations

import numpy as np

from engine._kernels.baseline import CHUNK, N_SUMS, baseline_sums

__all__ = ["BASELINE_NAMES", "baselines"]

BASELINE_NAMES = ("predicted_fraction", "soft_dice", "uncertain_fraction", "mean_entropy")
#: Rounding tolerated on probabilities (float32 resizing can overshoot [0, 1] by an ulp or two).
_PROB_TOL = 1e-5


def _mask_weights(mask: np.ndarray | None, batch: int, spatial: tuple[int, ...], size: int) -> np.ndarray:
    """``(batch, size)`` uint8, 1 where a position counts (all ones without a mask)."""
    if mask is None:
        return np.ones((batch, size), dtype=np.uint8)
    m = np.asarray(mask)
    if m.shape == spatial:
        m = np.broadcast_to(m, (batch, *spatial))
    if m.shape != (batch, *spatial):
        raise ValueError(f"mask has shape {m.shape}; expected {spatial} or {(batch, *spatial)} to match probability")
    return np.ascontiguousarray((m.reshape(batch, -1) != 0).astype(np.uint8))


def baselines(
    probability: np.ndarray,
    *,
    threshold: float = 0.5,
    mask: np.ndarray | None = None,
    class_axis: bool = False,
) -> dict[str, np.ndarray]:
    """Trivial label-free quality baselines per case (and class).

    Parameters
    ----------
    probability : ndarray
        Foreground probabilities in [0, 1] of one class, shape ``(B, *spatial)`` (the
        pipeline calls this per class), or ``(B, n_classes, *spatial)`` with
        ``class_axis=True``.
    threshold : float, optional
        The prediction is ``probability > threshold`` (strict, as ties go to background in
        SPEC §1).
    mask : ndarray, optional
        Tissue mask ``(B, *spatial)`` or ``(*spatial)``; positions outside are ignored.
    class_axis : bool, optional
        Whether axis 1 of ``probability`` is the class axis (default False).

    Returns
    -------
    dict of str to ndarray
        ``predicted_fraction``, ``soft_dice``, ``uncertain_fraction``, ``mean_entropy``, each
        float64 of shape ``(B,)`` (``(B, n_classes)`` with ``class_axis=True``). NaN where the
        mask is empty; ``soft_dice`` is NaN when the probability and the prediction are both
        zero everywhere (0/0).

    Raises
    ------
    TypeError
        On a probability that is not numeric.
    ValueError
        On a probability outside [0, 1] or non-finite, a bad threshold, or a mask that does
        not match the spatial shape.

    Notes
    -----
    With ``b = p > threshold`` and means over the masked positions:
    predicted fraction ``mean(b)``; soft Dice ``2 Σ p·b / (Σ p + Σ b)``; uncertain fraction
    ``mean(0.1 < p < 0.9)``; mean binary entropy in bits
    ``mean(-p log2 p - (1-p) log2 (1-p))`` (0 at p ∈ {0, 1}, 1 at p = 0.5). For the uncertainty
    baselines a *high* value means a worse output (see
    :data:`engine.quality.validation.LOWER_IS_BETTER`).

    Examples
    --------
    >>> p = np.array([[0.0, 1.0, 0.5, 0.95]])
    >>> round(float(baselines(p)["predicted_fraction"][0]), 3)
    0.5
    """
    p = np.asarray(probability)
    if not np.issubdtype(p.dtype, np.floating) and not np.issubdtype(p.dtype, np.integer):
        raise TypeError(f"probability has dtype {p.dtype}; expected a float array of probabilities in [0, 1]")
    min_ndim = 3 if class_axis else 2
    if p.ndim < min_ndim:
        raise ValueError(
            f"probability has shape {p.shape}; expected (B, *spatial) with at least one spatial axis "
            "((B, n_classes, *spatial) with class_axis=True)"
        )
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold={threshold!r}; expected a number strictly between 0 and 1")
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float64)
    if not class_axis:
        p = p[:, None]
    batch, n_cls = p.shape[:2]
    spatial = p.shape[2:]
    flat = np.ascontiguousarray(p.reshape(batch, n_cls, -1))
    w = _mask_weights(mask, batch, spatial, flat.shape[-1])
    n_chunks = max(1, -(-flat.shape[-1] // CHUNK))
    part = np.empty((batch, n_cls, n_chunks, N_SUMS))
    baseline_sums(flat, w, float(threshold), _PROB_TOL, part)
    if part[..., 6:].sum() > 0:
        finite = flat[np.isfinite(flat)]  # the error's range only: the kernel counted the values
        lo, hi = float(finite.min(initial=np.inf)), float(finite.max(initial=-np.inf))
        raise ValueError(
            f"probability holds values outside [0, 1] or NaN/Inf (range {lo:g} to {hi:g}); pass foreground "
            "probabilities (apply the sigmoid/softmax first)"
        )
    sums = part[..., :6].sum(axis=2)  # (B, K, 6)
    n, sb, su, se, sp, spb = (sums[..., i] for i in range(6))
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = sb / n
        uncertain = su / n
        entropy = se / n
        den = sp + sb
        soft = np.where(den > 0, 2.0 * spb / np.where(den > 0, den, 1.0), np.nan)
    empty = np.broadcast_to(n == 0, predicted.shape)
    out = dict(zip(BASELINE_NAMES, (predicted, np.where(empty, np.nan, soft), uncertain, entropy)))
    if not class_axis:
        out = {k: v[:, 0] for k, v in out.items()}
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
