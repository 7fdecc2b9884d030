"""Slow, literal NumPy twins of the engine's kernels (SPEC §1-3).

Nothing here imports ``engine.resize`` or ``engine._kernels``: each function applies the
formula as written, materialising the resized tensor, in float64. Tests compare the engine
against these on random inputs; ``benchmarks/kernels.py`` times them as its NumPy column and
checks them against the published module.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = [
    "linear_source",
    "resize_linear",
    "resize_nearest",
    "resize_area",
    "protoseg_one",
    "dice",
    "sa_one",
]


def linear_source(j: int, n_in: int, n_out: int) -> tuple[int, int, float, float]:
    """torch ``align_corners=False`` linear rule for one output position: (i0, i1, w0, w1)."""
    if n_in == n_out:
        return j, j, 1.0, 0.0
    src = (j + 0.5) * n_in / n_out - 0.5
    if src < 0:
        src = 0.0
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = i0 + 1 if i0 < n_in - 1 else i0
    lam = min(max(src - i0, 0.0), 1.0)
    return i0, i1, 1.0 - lam, lam


def resize_linear(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize the trailing ``len(shape)`` axes of ``x`` with :func:`linear_source` (float64).

    Multilinear interpolation is the 1-D rule applied along one axis after the other (the
    weight of each corner is the product of its per-axis weights), so each axis is resized in
    turn, every output position taking the two sources and weights :func:`linear_source` gives.
    The whole resized tensor is materialised.
    """
    out = np.asarray(x, dtype=np.float64)
    first = out.ndim - len(shape)
    for axis, n_out in enumerate(shape, start=first):
        i0, i1, w0, w1 = (np.array(v) for v in zip(*(linear_source(j, out.shape[axis], n_out)
                                                      for j in range(n_out))))
        along = (n_out,) + (1,) * (out.ndim - axis - 1)  # weights broadcast along ``axis``
        out = np.take(out, i0, axis) * w0.reshape(along) + np.take(out, i1, axis) * w1.reshape(along)
    return out


def resize_nearest(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """torch ``mode="nearest"`` on the trailing axes, position by position (float32 scale)."""
    x = np.asarray(x)
    nd = len(shape)
    src_shape = x.shape[x.ndim - nd:]
    out = np.empty(x.shape[: x.ndim - nd] + tuple(shape), dtype=x.dtype)

    def src(j: int, n_in: int, n_out: int) -> int:
        if n_in == n_out:
            return j
        if n_out == 2 * n_in:
            return j // 2
        scale = np.float32(n_in) / np.float32(n_out)
        return min(int(np.floor(np.float32(j) * scale)), n_in - 1)

    for pos in itertools.product(*(range(n) for n in shape)):
        idx = tuple(src(j, a, b) for j, a, b in zip(pos, src_shape, shape))
        out[(...,) + pos] = x[(...,) + idx]
    return out


def resize_area(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Exact area average: each output cell is the mean of the input over its footprint."""
    x = np.asarray(x, dtype=np.float64)
    nd = len(shape)
    src_shape = x.shape[x.ndim - nd:]
    out = np.empty(x.shape[: x.ndim - nd] + tuple(shape))

    def overlaps(j: int, n_in: int, n_out: int) -> list[tuple[int, float]]:
        lo, hi = j * n_in / n_out, (j + 1) * n_in / n_out
        res = []
        for i in range(n_in):
            ov = min(hi, i + 1) - max(lo, i)
            if ov > 1e-12:
                res.append((i, ov / (hi - lo)))
        return res

    for pos in itertools.product(*(range(n) for n in shape)):
        lists = [overlaps(j, a, b) for j, a, b in zip(pos, src_shape, shape)]
        acc = np.zeros(x.shape[: x.ndim - nd])
        for combo in itertools.product(*lists):
            w = np.prod([c[1] for c in combo])
            acc = acc + w * x[(...,) + tuple(c[0] for c in combo)]
        out[(...,) + pos] = acc
    return out


def protoseg_one(features: np.ndarray, guide: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """ProtoSeg on one sample whose features already live on the guide's grid.

    Parameters: ``features`` (C, *spatial), ``guide`` and ``mask`` (*spatial).
    Returns a dict with ``P``, ``N`` (NaN when undefined), ``d_plus``, ``d_minus``,
    ``margin = d⁺ - d⁻``, ``binary`` (d⁺ > d⁻), ``probability`` (softmax over (d⁻, d⁺)),
    and ``status``: "ok", "empty_mask", "empty_foreground", "empty_background".
    """
    f = np.asarray(features, dtype=np.float64).reshape(features.shape[0], -1)
    g = np.asarray(guide, dtype=np.float64).reshape(-1)
    m = np.ones_like(g) if mask is None else np.asarray(mask, dtype=np.float64).reshape(-1)
    wf, wb = g * m, (1.0 - g) * m
    status = "ok"
    if m.sum() == 0:
        status = "empty_mask"
    elif wf.sum() == 0:
        status = "empty_foreground"
    elif wb.sum() == 0:
        status = "empty_background"
    c = f.shape[0]
    if status != "ok":
        nan = np.full(c, np.nan)
        return {"P": nan, "N": nan, "status": status,
                "binary": np.zeros(guide.shape, bool), "margin": np.full(guide.shape, np.nan)}
    P = (f * wf).sum(axis=1) / wf.sum()
    N = (f * wb).sum(axis=1) / wb.sum()
    d_plus = -((f - P[:, None]) ** 2).sum(axis=0)
    d_minus = -((f - N[:, None]) ** 2).sum(axis=0)
    margin = d_plus - d_minus
    e = np.exp(np.stack([d_minus, d_plus]) - np.maximum(d_minus, d_plus))
    prob = e[1] / e.sum(axis=0)
    shp = guide.shape
    return {"P": P, "N": N, "status": status, "d_plus": d_plus.reshape(shp),
            "d_minus": d_minus.reshape(shp), "margin": margin.reshape(shp),
            "binary": (d_plus > d_minus).reshape(shp), "probability": prob.reshape(shp)}


def dice(binary: np.ndarray, reference: np.ndarray) -> float:
    """2|b∧y| / (|b|+|y|); NaN when both are empty."""
    b = np.asarray(binary, bool)
    y = np.asarray(reference, bool)
    den = b.sum() + y.sum()
    return float("nan") if den == 0 else 2.0 * (b & y).sum() / den


def sa_one(features: np.ndarray, guide: np.ndarray, reference: np.ndarray,
           mask: np.ndarray | None = None) -> dict:
    """Layer-level SA of one sample (features on the guide's grid): protoseg + dice + counts."""
    r = protoseg_one(features, guide, mask)
    y = np.asarray(reference, bool)
    b = r["binary"]
    r.update(score=dice(b, y) if r["status"] == "ok" else float("nan"),
             tp=int((b & y).sum()), fp=int((b & ~y).sum()), fn=int((~b & y).sum()))
    return r
