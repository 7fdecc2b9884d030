"""The baseline the kernel benchmark compares the engine with: the published module in PyTorch.

``reference_sa``: the published ProtoSeg module (He et al. 2023, the ``EnhanceNet`` class of
shengfly/ProtoSeg) used as its README prescribes -- hidden features first upsampled to the
mask with ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
prototypes as masked means, negative squared distances, softmax, argmax -- plus Dice. This is
what a user of the reference does today. It is not part of the engine; it exists to time it
and to check it. (The benchmark's other comparison, the formulas literally in NumPy, is the
tests' twin set, ``tests/naive.py``.)
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["reference_protoseg", "reference_sa"]

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
    A channel that grows with the row segments a guide of the lower rows perfectly:

    >>> f = np.repeat(np.arange(4, dtype=np.float32), 4).reshape(1, 1, 4, 4)  # rows 0..3
    >>> g = np.zeros((1, 8, 8), np.float32); g[:, 4:] = 1
    >>> float(reference_sa(f, g, g)[0])
    1.0

    The unit level is every channel run alone at layer level, and comparing the two
    probabilities gives the labels of ``argmax``:

    >>> rng = np.random.default_rng(0)
    >>> f = rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
    >>> g = np.zeros((2, 8, 8), np.float32); g[:, 2:6, 1:5] = 1
    >>> units = reference_sa(f, g, g > 0, level="unit")
    >>> alone = [reference_sa(f[:, c:c + 1].copy(), g, g > 0) for c in range(3)]
    >>> bool(np.allclose(units, np.stack(alone, axis=1), rtol=0, atol=1e-12))
    True
    >>> bool(np.array_equal(reference_sa(f, g, g > 0, level="unit", decision="compare"), units))
    True

    Without background the published module maps everything to background (the twins of
    ``tests/naive.py`` and the engine say the score is undefined instead):

    >>> reference_sa(f, np.ones_like(g), g > 0, level="unit").tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
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
