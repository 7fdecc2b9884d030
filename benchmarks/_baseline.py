"""The two baselines the kernel benchmark compares the engine with.

(a) ``reference_sa``: the published ProtoSeg module (He et al. 2023, the ``EnhanceNet`` class of
    shengfly/ProtoSeg) used as its README prescribes -- hidden features first upsampled to the
    mask with ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
    prototypes as masked means, negative squared distances, softmax, argmax -- plus Dice. This is
    what a user of the reference does today.
(b) ``naive_sa``: the same formulas written literally in NumPy, on a materialised upsampled
    tensor (SPEC §1-3).

Neither is part of the engine; both exist to time it and to check it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "reference_protoseg",
    "reference_sa",
    "linear_weights_naive",
    "upsample_naive",
    "naive_sa",
]

_LEVELS = ("layer", "unit")


def _check_level(level: str) -> None:
    if level not in _LEVELS:
        raise ValueError(f"level={level!r} is not supported; expected one of {_LEVELS}")


def _check_inputs(features: np.ndarray, guide: np.ndarray, reference: np.ndarray) -> None:
    if features.ndim != 4:
        raise ValueError(
            f"features has shape {features.shape}; expected (B, C, Y, X) channels-first 2-D "
            "features -- the benchmark baselines are 2-D only"
        )
    if guide.ndim != 3 or reference.shape != guide.shape or guide.shape[0] != features.shape[0]:
        raise ValueError(
            f"guide {guide.shape} and reference {reference.shape} must both be (B, Y, X) with "
            f"B = {features.shape[0]} as in features {features.shape}; pass one mask per sample"
        )


# --------------------------------------------------------------------------------------------
# (a) the published module, in PyTorch
# --------------------------------------------------------------------------------------------
def reference_protoseg(xfeat: Any, pred: Any, mask: Any = None, *, dims: tuple[int, ...] = (2, 3)) -> Any:
    """Probability map of the published ProtoSeg module, formulas as published.

    Parameters
    ----------
    xfeat : torch.Tensor
        Features already on the mask's grid, channels on axis 1, spatial axes ``dims``.
    pred : torch.Tensor
        Guide in [0, 1], broadcastable to ``xfeat`` with a size-1 channel axis.
    mask : torch.Tensor, optional
        Tissue mask, broadcastable like ``pred``; ``None`` means all ones.
    dims : tuple of int, keyword-only
        Spatial axes summed for the prototypes -- the module's ``self.dims`` ((2, 3) in 2-D,
        (2, 3, 4) in 3-D). An extra batch-like axis that is neither 1 nor in ``dims`` is carried
        along untouched; the unit-level baseline uses one for the channels.

    Returns
    -------
    torch.Tensor
        ``softmax([d⁻, d⁺])`` along axis 1: index 1 is the foreground probability.

    Notes
    -----
    ``P = Σ F·g·m / Σ g·m``, ``N = Σ F·(1-g)·m / Σ (1-g)·m``, ``d± = -Σ_c (F - P|N)²``,
    output ``softmax(cat(d⁻, d⁺))``. Empty foreground or background gives NaN, as published.

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> g = (x > 1.5).float()
    >>> reference_protoseg(x, g).argmax(1).tolist()
    [[[0, 0], [1, 1]]]
    """
    import torch

    weight = pred if mask is None else pred * mask
    rweight = (1 - pred) if mask is None else (1 - pred) * mask
    pos_prototype = torch.sum(xfeat * weight, dim=dims, keepdim=True) / torch.sum(
        weight, dim=dims, keepdim=True
    )
    neg_prototype = torch.sum(xfeat * rweight, dim=dims, keepdim=True) / torch.sum(
        rweight, dim=dims, keepdim=True
    )
    pfeat = -torch.pow(xfeat - pos_prototype, 2).sum(1, keepdim=True)
    nfeat = -torch.pow(xfeat - neg_prototype, 2).sum(1, keepdim=True)
    return torch.softmax(torch.cat([nfeat, pfeat], dim=1), dim=1)


def reference_sa(
    features: np.ndarray,
    guide: np.ndarray,
    reference: np.ndarray,
    *,
    level: str = "layer",
    decision: str = "argmax",
    max_chunk_bytes: int = 256 * 2**20,
) -> np.ndarray:
    """SA scores the way a user of the published module computes them today (PyTorch).

    Parameters
    ----------
    features : numpy.ndarray
        (B, C, y, x) float32 hidden features on their native grid.
    guide, reference : numpy.ndarray
        (B, Y, X) guide in [0, 1] and reference mask on the mask grid.
    level : {"layer", "unit"}, keyword-only
        ``"layer"``: all channels together. ``"unit"``: every channel as its own C = 1 run,
        batched by carrying the channels on an extra axis (no copy of the guide).
    decision : {"argmax", "compare"}, keyword-only
        ``"argmax"``: ``prob.argmax(1) == 1`` as users write it. ``"compare"``:
        ``prob[:, 1] > prob[:, 0]`` -- the same labels (ties to background in both), without
        torch's CPU ``argmax`` over a size-2 axis, which is ~100 ms per (8, 2, 256, 256)
        tensor on this machine and dominates the unit-level baseline.
    max_chunk_bytes : int, keyword-only
        The batch is processed in chunks of whole samples whose upsampled features stay under
        this size (memory only; the operations are the same).

    Returns
    -------
    numpy.ndarray
        float64 Dice of ``argmax`` with ``reference``: (B,) for ``"layer"``, (B, C) for
        ``"unit"``. Without foreground or background in the guide the published module
        silently gives NaN probabilities and an all-background map (Dice 0, or NaN when the
        reference is empty too); it is kept that way here.

    Raises
    ------
    ValueError
        If the shapes are not (B, C, y, x) and (B, Y, X) or ``level`` is unknown.

    Notes
    -----
    Features are resized with ``F.interpolate(mode="bilinear", align_corners=False)`` (the
    reference README's instruction); ties of the softmax go to background (``argmax`` returns
    the first index). ``Dice = 2|b ∧ y| / (|b| + |y|)``.

    Examples
    --------
    >>> f = np.repeat(np.arange(4, dtype=np.float32), 4).reshape(1, 1, 4, 4)  # rows 0..3
    >>> g = np.zeros((1, 8, 8), np.float32); g[:, 4:] = 1
    >>> float(reference_sa(f, g, g)[0])
    1.0
    """
    import torch
    import torch.nn.functional as F

    _check_level(level)
    _check_inputs(features, guide, reference)
    if decision not in ("argmax", "compare"):
        raise ValueError(f"decision={decision!r} is not supported; expected 'argmax' or 'compare'")
    b, c = features.shape[:2]
    size = guide.shape[1:]
    per_sample = c * size[0] * size[1] * 4
    step = max(1, min(b, max_chunk_bytes // max(per_sample, 1)))
    feat_t = torch.from_numpy(features)
    guide_t = torch.from_numpy(np.ascontiguousarray(guide, dtype=np.float32))
    ref_t = torch.from_numpy(np.ascontiguousarray(reference).astype(bool, copy=False))
    out = np.empty((b,) if level == "layer" else (b, c), np.float64)
    with torch.inference_mode():
        for s in range(0, b, step):
            e = min(b, s + step)
            up = F.interpolate(feat_t[s:e], size=size, mode="bilinear", align_corners=False)
            if level == "layer":
                pred = guide_t[s:e, None]  # (n, 1, Y, X)
                prob = reference_protoseg(up, pred, dims=(2, 3))
                binary = prob.argmax(1) == 1 if decision == "argmax" else prob[:, 1] > prob[:, 0]
                y = ref_t[s:e]
                sp = (1, 2)
            else:
                # channels as an extra axis: (n, 1, C, Y, X); the module's channel axis is 1.
                up = up.unsqueeze(1)
                pred = guide_t[s:e, None, None]  # (n, 1, 1, Y, X)
                prob = reference_protoseg(up, pred, dims=(3, 4))
                binary = prob.argmax(1) == 1 if decision == "argmax" else prob[:, 1] > prob[:, 0]
                y = ref_t[s:e, None]
                sp = (2, 3)
            tp = (binary & y).sum(sp).double()
            denom = binary.sum(sp).double() + y.sum(sp).double()
            out[s:e] = (2 * tp / denom).numpy()
    return out


# --------------------------------------------------------------------------------------------
# (b) naive NumPy: materialise the upsampled tensor, apply the formulas literally
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def linear_weights_naive(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel linear resize weights with edge clamp, one output position at a time.

    Parameters
    ----------
    n_in, n_out : int
        Input and output lengths (>= 1).

    Returns
    -------
    tuple of numpy.ndarray
        ``(i0, i1, w0, w1)``: output ``o`` is ``w0[o]·x[i0[o]] + w1[o]·x[i1[o]]``.

    Notes
    -----
    ``src = max((o + 0.5)·n_in/n_out - 0.5, 0)``, ``i0 = floor(src)``,
    ``i1 = min(i0 + 1, n_in - 1)``, ``w1 = src - i0``, ``w0 = 1 - w1`` -- the rule of
    ``interpolate(align_corners=False)`` with a target size.

    Examples
    --------
    >>> [w.tolist() for w in linear_weights_naive(2, 4)]
    [[0, 0, 0, 1], [1, 1, 1, 1], [1.0, 0.75, 0.25, 0.75], [0.0, 0.25, 0.75, 0.25]]
    """
    i0 = np.empty(n_out, np.int64)
    i1 = np.empty(n_out, np.int64)
    w0 = np.empty(n_out, np.float64)
    w1 = np.empty(n_out, np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        i0[o] = lo
        i1[o] = min(lo + 1, n_in - 1)
        w1[o] = src - lo
        w0[o] = 1.0 - w1[o]
    return i0, i1, w0, w1


def upsample_naive(features: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Materialised bilinear resize of (..., y, x) to (..., *size), half-pixel centres.

    Parameters
    ----------
    features : numpy.ndarray
        Array whose last two axes are spatial.
    size : tuple of int
        Target (Y, X).

    Returns
    -------
    numpy.ndarray
        Resized array, same dtype as ``features``.

    Examples
    --------
    >>> upsample_naive(np.array([[0.0, 4.0]]), (1, 4)).tolist()
    [[0.0, 1.0, 3.0, 4.0]]
    """
    dt = features.dtype
    i0, i1, w0, w1 = linear_weights_naive(features.shape[-2], size[0])
    tmp = features[..., i0, :] * w0.astype(dt)[:, None] + features[..., i1, :] * w1.astype(dt)[:, None]
    j0, j1, v0, v1 = linear_weights_naive(features.shape[-1], size[1])
    return tmp[..., j0] * v0.astype(dt) + tmp[..., j1] * v1.astype(dt)


def naive_sa(
    features: np.ndarray, guide: np.ndarray, reference: np.ndarray, *, level: str = "layer"
) -> np.ndarray:
    """SA scores from the formulas of SPEC §1-2 applied literally in NumPy, sample by sample.

    Parameters
    ----------
    features : numpy.ndarray
        (B, C, y, x) features on their native grid.
    guide, reference : numpy.ndarray
        (B, Y, X) guide in [0, 1] and reference mask.
    level : {"layer", "unit"}, keyword-only
        All channels together, or each channel alone (C = 1).

    Returns
    -------
    numpy.ndarray
        float64 Dice of the binary map with ``reference``, (B,) or (B, C); NaN where a
        prototype or the Dice is undefined.

    Raises
    ------
    ValueError
        If the shapes are not (B, C, y, x) and (B, Y, X) or ``level`` is unknown.

    Notes
    -----
    ``P = Σ F·g / Σ g``, ``N = Σ F·(1-g) / Σ (1-g)`` on the upsampled features;
    ``b = [-‖F - P‖² > -‖F - N‖²]``; ``SA = 2|b ∧ y| / (|b| + |y|)``.

    Examples
    --------
    >>> f = np.repeat(np.arange(4, dtype=np.float32), 4).reshape(1, 1, 4, 4)  # rows 0..3
    >>> g = np.zeros((1, 8, 8), np.float32); g[:, 4:] = 1
    >>> float(naive_sa(f, g, g)[0])
    1.0
    """
    _check_level(level)
    _check_inputs(features, guide, reference)
    b, c = features.shape[:2]
    size = guide.shape[1:]
    out = np.empty((b,) if level == "layer" else (b, c), np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(b):
            up = upsample_naive(features[i], size).reshape(c, -1)  # (C, S)
            g = guide[i].reshape(-1).astype(up.dtype)
            y = reference[i].reshape(-1).astype(bool)
            if g.sum() == 0 or (1 - g).sum() == 0:  # a prototype does not exist
                out[i] = np.nan
                continue
            pos = (up * g).sum(axis=1) / g.sum()
            neg = (up * (1 - g)).sum(axis=1) / (1 - g).sum()
            if level == "layer":
                dpos = -((up - pos[:, None]) ** 2).sum(axis=0)
                dneg = -((up - neg[:, None]) ** 2).sum(axis=0)
                binary = dpos > dneg
                out[i] = 2.0 * np.sum(binary & y) / (np.sum(binary) + np.sum(y))
            else:
                dpos = -((up - pos[:, None]) ** 2)
                dneg = -((up - neg[:, None]) ** 2)
                binary = dpos > dneg  # (C, S)
                tp = np.sum(binary & y, axis=1)
                out[i] = 2.0 * tp / (np.sum(binary, axis=1) + np.sum(y))
    return out
