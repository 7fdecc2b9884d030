"""ProtoSeg maps and SA scores: the public drivers of the Numba kernels (SPEC §1-3).

:func:`protoseg` computes the ProtoSeg map of a feature tensor given a guide,
:func:`sa_scores` its SA score (Dice against a reference) at layer and/or unit level, and
:func:`dice` the plain Dice coefficient. The drivers validate, normalise the layout to a
``(B, C, Z, Y, X)`` view (never a copy of the features), allocate and call the private kernels
in :mod:`engine._kernels`.

References
----------
S. He, Y. Feng, P. E. Grant, Y. Ou, "Segmentation Ability Map: Interpret deep features for
medical image segmentation", Medical Image Analysis 84 (2023), arXiv:2212.09206.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from engine import resize as _resize
from engine._checks import as_array, as_binary_uint8, check_choice, check_not_empty, check_unit_interval
from engine._kernels import channels_last as _cl
from engine._kernels import counting, fused, general, units
from engine.errors import NonFiniteFeaturesError
from engine.status import Status

__all__ = ["protoseg", "sa_scores", "sa_scores_concat", "dice", "reuse_guide_weights", "ProtoSegResult", "SAScores"]

_LAYOUTS = ("channels_first", "channels_last")
_RESIZES = ("upsample", "downsample")
_NONFINITE = ("raise", "skip")
_EMPTY = ("nan", "one")
_LEVELS = ("layer", "unit", "both")
_NONFINITE_CODE = int(Status.NONFINITE)


@dataclass(frozen=True)
class ProtoSegResult:
    """Result of :func:`protoseg`.

    Attributes
    ----------
    binary : numpy.ndarray of bool, shape (B, *spatial)
        ``d⁺ > d⁻`` per position (all False for samples whose status is not OK).
    probability : numpy.ndarray of float32, shape (B, *spatial)
        ``sigmoid(d⁺ - d⁻)`` (NaN for samples whose status is not OK).
    foreground, background : numpy.ndarray of float64, shape (B, C)
        Prototypes ``P`` and ``N`` (NaN when undefined).
    status : numpy.ndarray of uint8, shape (B,)
        :class:`engine.status.Status` per sample.
    """

    binary: np.ndarray
    probability: np.ndarray
    foreground: np.ndarray
    background: np.ndarray
    status: np.ndarray


@dataclass(frozen=True)
class SAScores:
    """Result of :func:`sa_scores` at one level.

    Attributes
    ----------
    score : numpy.ndarray of float64
        SA (Dice) per sample, shape (B,) at layer level or (B, C) at unit level; NaN where
        undefined (``status != OK``; ``1.0`` for ``EMPTY_DICE`` with ``empty="one"``).
    status : numpy.ndarray of uint8
        :class:`engine.status.Status`, same shape.
    tp, fp, fn : numpy.ndarray of int64
        Confusion counts of the binary map against the reference, same shape. Samples whose
        prototypes are undefined count as an all-background map (``tp = fp = 0``, ``fn = |y|``).
    level : str
        ``"layer"`` or ``"unit"``.
    """

    score: np.ndarray
    status: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    level: str


@dataclass
class _Prepared:
    F: np.ndarray  # (B, C, Zs, Ys, Xs) or channels-last (B, Zs, Ys, Xs, C) view
    g: np.ndarray  # (B, Zt, Yt, Xt) float32/float64, C-contiguous
    m: np.ndarray  # same, or (1, 1, 1, 1) dummy
    has_mask: bool
    ref: np.ndarray | None  # (B, Zt, Yt, Xt) uint8
    target: tuple[int, ...]  # spatial shape of the maps (unpadded)
    identity: bool
    channels_last: bool
    weights: tuple[np.ndarray, ...]
    flat: np.ndarray | None  # (B, C, S) view when the features are C-contiguous channels-first
    cl: np.ndarray | None  # (B, S, C) view when the features are stored channels-last contiguously
    src: tuple[int, int, int]  # source grid padded to 3-D
    deferred: tuple[tuple[np.ndarray, str], ...]  # [0, 1] checks left to the flat kernels
    key: tuple[Any, ...]  # ids of the caller's guide and mask objects, and the grids (guide weights' cache key)
    held: tuple[Any, Any, Any]  # the caller's guide, mask and reference objects themselves


# guide weights computed in the current reuse_guide_weights() block: key -> (guide, mask, weights)
_GUIDE_WEIGHTS: contextvars.ContextVar[dict[tuple[Any, ...], tuple[Any, ...]] | None] = \
    contextvars.ContextVar("protoseg_guide_weights", default=None)


@contextlib.contextmanager
def reuse_guide_weights() -> Iterator[None]:
    """Within the block, features on the same grid scored with the same guide (and mask)
    share the guide's side of the prototypes.

    The prototypes' guide weights (on a resized grid, the adjoint of the resize applied to
    ``guide·mask``; their sums; the count of values outside [0, 1]) depend only on the guide,
    the mask and the grids, not on the features. Inside the block, :func:`sa_scores` and
    :func:`protoseg` compute them once per (guide object, mask object, grids) for
    channels-last features and reuse them for every further tensor on that grid: a 3-D
    U-Net's 15 tensors on 3 grids pay for 3; the reference's size ``|ref|`` is likewise
    counted once per reference object and grid. The caller promises not to modify the guide,
    mask or reference arrays inside the block (they are recognised by identity, and held
    until it ends); results are identical to computing them each time.

    Examples
    --------
    >>> import numpy as np
    >>> f = np.random.default_rng(0).random((1, 4, 4, 2), dtype=np.float32)
    >>> g = np.zeros((1, 8, 8), np.float32); g[0, 2:6, 2:6] = 1
    >>> with reuse_guide_weights():
    ...     a = sa_scores(f, g, g > 0, layout="channels_last")
    ...     b = sa_scores(f[..., :1], g, g > 0, layout="channels_last")
    >>> bool(np.array_equal(a.score, sa_scores(f, g, g > 0, layout="channels_last").score))
    True
    """
    token = _GUIDE_WEIGHTS.set({})
    try:
        yield
    finally:
        _GUIDE_WEIGHTS.reset(token)


def _guide_weights(p: _Prepared) -> tuple[Any, ...]:
    """:func:`engine._kernels.channels_last.guide_weights` for ``p``, from the current
    :func:`reuse_guide_weights` block when it has them."""
    cache = _GUIDE_WEIGHTS.get()
    if cache is not None:
        hit = cache.get(p.key)
        if hit is not None:
            return hit[2]
    gw = _cl.guide_weights(p.g, p.m, p.has_mask, p.identity, p.src, p.weights)
    if cache is not None:  # the objects are held, so their ids stay theirs while cached
        cache[p.key] = (*p.held[:2], gw)
    return gw


# --------------------------------------------------------------------------- validation
def _features(features: Any, layout: str) -> tuple[np.ndarray, tuple[int, ...], int]:
    F = as_array(features, "features")
    if F.dtype.kind != "f":
        raise TypeError(
            f"features must be float32 or float64; received dtype {F.dtype}; "
            "cast with features.astype(np.float32)"
        )
    if F.dtype == np.float16:
        F = F.astype(np.float32)
    elif F.dtype not in (np.float32, np.float64):
        raise TypeError(f"features must be float32 or float64; received dtype {F.dtype}")
    if F.ndim not in (3, 4, 5):
        raise ValueError(
            f"features must have 3, 4 or 5 axes (B, C, *spatial) or (B, *spatial, C) with 1-3 "
            f"spatial axes; received shape {F.shape}"
        )
    cax = 1 if layout == "channels_first" else F.ndim - 1
    if F.shape[cax] == 0:
        raise ValueError(
            f"features have zero channels (shape {F.shape}, layout={layout!r}); expected at least 1"
        )
    check_not_empty(F, "features")
    spatial = F.shape[2:] if layout == "channels_first" else F.shape[1:-1]
    return F, tuple(int(s) for s in spatial), int(F.shape[cax])


def _spatial_map(value: Any, name: str, batch: int, nsp: int, spatial: tuple[int, ...] | None) -> np.ndarray:
    """Bring guide/mask/reference to (B, *spatial); accepts (B, *spatial) or (B, 1, *spatial)."""
    arr = as_array(value, name)
    if arr.ndim == nsp + 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != nsp + 1:
        raise ValueError(
            f"{name} must have shape (B, *spatial) or (B, 1, *spatial) with {nsp} spatial axes "
            f"(as the features); received shape {arr.shape}"
        )
    check_not_empty(arr, name)
    if arr.shape[0] != batch:
        raise ValueError(
            f"{name} has batch size {arr.shape[0]} but features have {batch}; pass one map per sample"
        )
    if spatial is not None and tuple(arr.shape[1:]) != tuple(spatial):
        raise ValueError(
            f"{name} has spatial shape {tuple(arr.shape[1:])} but the guide has {tuple(spatial)}; "
            "guide, mask and reference must share one grid"
        )
    return arr


def _as_weight(arr: np.ndarray, name: str, check: bool = True) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be boolean or numeric; received dtype {arr.dtype}")
    if check:
        check_unit_interval(arr, name)
    if arr.dtype == np.float64:
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_layout(F: np.ndarray, layout: str, spatial: tuple[int, ...], grid: tuple[int, ...]) -> None:
    """Raise when the other layout matches the grid exactly and the given one is implausible.

    Implausible: the per-axis ratios grid/spatial differ by more than 1.5× (hidden layers of a
    segmentation network keep the input's aspect ratio), so a genuine 1-D or isotropic layer is
    never refused.
    """
    if spatial == grid:
        return
    other = F.shape[1:-1] if layout == "channels_first" else F.shape[2:]
    ratios = [g / s for g, s in zip(grid, spatial)]
    if tuple(other) == tuple(grid) and max(ratios) > 1.5 * min(ratios):
        want = "channels_last" if layout == "channels_first" else "channels_first"
        raise ValueError(
            f"layout={layout!r} contradicts the shapes: features {F.shape} read as {layout} have "
            f"spatial shape {spatial}, but as {want} they match the guide's grid {grid}; "
            f"pass layout={want!r}"
        )


@lru_cache(maxsize=256)
def _kernel_weights(n_in: int, n_out: int, n_cover: int | None = None) -> tuple[np.ndarray, ...]:
    """linear_weights with uint32 indices (unsigned: no wrap-around checks in the kernels).

    With ``n_cover`` (>= ``n_out``) the features cover ``n_cover`` positions of which the
    target is the first ``n_out`` (an input padded at its end): the weights resize to
    ``n_cover`` and keep the first ``n_out`` rows, which is the crop of that resize.
    """
    n_cover = n_out if n_cover is None else n_cover
    i0, i1, w0, w1 = (np.ascontiguousarray(a[:n_out]) for a in _resize.linear_weights(n_in, n_cover))
    out = (i0.astype(np.uint32), i1.astype(np.uint32), w0, w1)
    for a in out:
        a.setflags(write=False)
    return out


def _pad3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return (1,) * (3 - len(shape)) + tuple(shape)  # type: ignore[return-value]


def _prepare(features: Any, guide: Any, reference: Any, mask: Any, *, resize: str, layout: str,
             extent: Any = None) -> _Prepared:
    check_choice(layout, "layout", _LAYOUTS)
    check_choice(resize, "resize", _RESIZES)
    F, fsp, n_channels = _features(features, layout)
    nsp = len(fsp)
    B = F.shape[0]
    g = _spatial_map(guide, "guide", B, nsp, None)
    grid = tuple(int(s) for s in g.shape[1:])
    cover = _extent(extent, grid, resize)
    _check_layout(F, layout, fsp, cover)
    # Features stored channels-last (NDHWC / NHWC, or a channels-first view of such memory, as
    # Model cards give for tf2onnx models) take the channels-last kernels, which read each
    # position's channels contiguously and split one sample's positions over the threads; so
    # does a single channel (its one copy is a few MB at most: the unit maps of a report).
    # C-contiguous channels-first features take the fused kernels. Both count guide and mask
    # values outside [0, 1] as they read them: the check costs no pass of its own there
    # (unless the guide is resized here first).
    last = F if layout == "channels_last" else np.moveaxis(F, 1, -1)
    if n_channels == 1 and not last.flags.c_contiguous:
        last = np.ascontiguousarray(last)
    cl_ok = last.flags.c_contiguous and (layout == "channels_last" or n_channels == 1 or not F.flags.c_contiguous)
    flat_ok = not cl_ok and layout == "channels_first" and F.flags.c_contiguous
    defer = (flat_ok or cl_ok) and not (resize == "downsample" and fsp != grid)
    g = _as_weight(g, "guide", check=not defer)
    deferred = [(g, "guide")] if defer else []
    m = None
    if mask is not None:
        m = _as_weight(_spatial_map(mask, "mask", B, nsp, grid), "mask", check=not defer)
        if defer:
            deferred.append((m, "mask"))
    ref = None
    if reference is not None:
        ref = as_binary_uint8(_spatial_map(reference, "reference", B, nsp, grid), "reference")

    if resize == "downsample" and fsp != grid:
        g = _resize.resize_area(g, fsp)
        np.clip(g, 0.0, 1.0, out=g)
        if m is not None:
            m = _resize.resize_area(m, fsp)
            np.clip(m, 0.0, 1.0, out=m)
        if ref is not None:
            ref = np.ascontiguousarray(_resize.resize_area(ref, fsp) >= 0.5 - 1e-12).view(np.uint8)
        target = fsp
    else:
        target = grid

    # 5-D view of the features (unit axes added), never a copy; channels-last stays in its
    # own order so that contiguous inputs keep contiguous inner loops
    channels_last = layout == "channels_last" or cl_ok
    if cl_ok:
        F = last
    F5 = F[(slice(None),) * (1 if channels_last else 2) + (None,) * (3 - nsp)]
    # the grid the weights resize to: the target, or the padded grid it is the corner of
    src3, tgt3, cov3 = _pad3(fsp), _pad3(target), _pad3(target if extent is None else cover)
    weights: tuple[np.ndarray, ...] = ()
    for n_in, n_out, n_cov in zip(src3, tgt3, cov3):
        weights += _kernel_weights(n_in, n_out, n_cov)
    g4 = g.reshape((B,) + tgt3)
    if m is None:
        m4, has_mask = np.ones((1, 1, 1, 1), dtype=g4.dtype), False
    else:
        m4, has_mask = np.ascontiguousarray(m, dtype=g4.dtype).reshape((B,) + tgt3), True
    ref4 = None if ref is None else ref.reshape((B,) + tgt3)
    flat = F5.reshape(B, F5.shape[1], -1) if flat_ok else None  # a view: no copy
    cl = F5.reshape(B, -1, F5.shape[4]) if cl_ok else None  # a view: no copy
    key = (id(guide), id(mask), resize, nsp, src3, tgt3, cov3, g4.dtype.str, B)
    return _Prepared(F5, g4, m4, has_mask, ref4, tuple(target), src3 == tgt3 == cov3, channels_last, weights,
                     flat, cl, src3, tuple(deferred), key, (guide, mask, reference))


def _extent(extent: Any, grid: tuple[int, ...], resize: str) -> tuple[int, ...]:
    """The grid the features cover: ``grid`` itself, or a larger one whose leading corner the
    guide's grid is (an input padded at the end of each axis)."""
    if extent is None:
        return grid
    cover = tuple(int(e) for e in extent)
    if len(cover) != len(grid) or any(c < g for c, g in zip(cover, grid)):
        raise ValueError(f"extent={tuple(extent)!r}: expected {len(grid)} sizes, each at least the "
                         f"guide's grid {grid} (the padded grid the features cover)")
    if cover != grid and resize != "upsample":
        raise ValueError("extent (a padded input) needs resize='upsample': the maps are computed "
                         "on the padded grid's resolution and cropped to the guide's grid")
    return cover


def _check_deferred(p: _Prepared, bad: np.ndarray) -> None:
    """Raise the [0, 1] error of the guide or mask when the kernel counted bad values."""
    if not bad.any():
        return
    for arr, name in p.deferred:
        check_unit_interval(arr, name)
    raise ValueError("guide or mask has values outside [0, 1]; expected a probability or a binary map")


def _raise_nonfinite(status: np.ndarray) -> None:
    if not (status == _NONFINITE_CODE).any():
        return
    bad = np.flatnonzero(status == _NONFINITE_CODE)
    if bad.size:
        raise NonFiniteFeaturesError(
            f"features contain NaN or Inf in sample {int(bad[0])} ({bad.size} sample(s) affected); "
            "fix the input or pass nonfinite='skip' to score such samples as NaN",
            sample=int(bad[0]), n_samples=int(bad.size))


#: Channel parts per batch of the channels-first split kernel. A constant, not the thread count:
#: the parts' shares of z are added in part order, so the rounding (and a near-tie decision)
#: would otherwise change with the number of threads. 2 keeps the results this 2-core machine
#: gave before; more parts would use more cores on one volume at (parts × S × 8) bytes of
#: partial maps.
_SPLIT_PARTS = 2


def _split_parts(batch: int, channels: int) -> int:
    """Parts to split each sample's channels into: 1 unless the batch is smaller than
    ``_SPLIT_PARTS`` (then that many per batch, at least four channels per part); never
    dependent on the thread count, so neither are the scores."""
    if batch >= _SPLIT_PARTS:
        return 1
    return max(1, min(_SPLIT_PARTS // batch, channels // 4))


_UNIT_BLOCK = 16  # channels per work item at most (channels-last: one 64-byte line of float32)


def _unit_block(batch: int, channels: int) -> int:
    """Channels per work item of the unit kernel (:mod:`engine._kernels.units`): up to 16, fewer
    when the batch would leave threads idle (the counts do not depend on it)."""
    import numba

    per_sample = -(-numba.get_num_threads() // batch)  # work items wanted per sample
    return max(1, min(_UNIT_BLOCK, -(-channels // per_sample)))


def _cl_layer(p: _Prepared, want_z: bool) -> tuple[np.ndarray, ...]:
    """Channels-last prototypes ``(P, N, status, mid, z)``: ``mid`` the decision threshold and,
    with ``want_z``, ``z = F·(P-N)`` on the source grid, (B, S) float64 (else (B, 0))."""
    assert p.cl is not None
    B, S, C = p.cl.shape
    P = np.empty((B, C))
    N = np.empty((B, C))
    status = np.empty(B, dtype=np.uint8)
    bad = np.zeros(B, dtype=np.int64)
    mid = np.empty(B)
    z = np.empty((B, S if want_z else 0))
    _cl.prototypes(p.cl, p.g, p.m, p.has_mask, _guide_weights(p), want_z, P, N, status, mid, bad, z)
    _check_deferred(p, bad)
    return P, N, status, mid, z


def _cl_counts(p: _Prepared, ref: np.ndarray, z: np.ndarray, mid: np.ndarray,
               status: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer-level counts ``(npos, tp, ny)`` of the decisions ``R z > mid`` against ``ref``.

    Inside :func:`reuse_guide_weights`, ``|ref|`` is counted once per reference object and
    grid and reused for the batch's other tensors (10-20 % of the decisions' time)."""
    B = z.shape[0]
    npos = np.zeros(B, dtype=np.int64)
    tp = np.zeros(B, dtype=np.int64)
    ny = np.zeros(B, dtype=np.int64)
    hit = _ref_cached(p, ref)
    if hit is not None:
        ny[:] = hit
    _cl.decide(z, mid, status, ref, True, False, p.identity, p.src, ref.shape[1:], p.weights,
               npos, tp, ny, np.empty((0, 0, 0, 0), np.bool_), np.empty((0, 0, 0, 0), np.float32),
               count_ref=hit is None)
    if hit is None:
        _ref_keep(p, ref, ny)
    return npos, tp, ny


def _ref_key(p: _Prepared, ref: np.ndarray) -> tuple[dict[tuple[Any, ...], tuple[Any, ...]] | None, tuple[Any, ...]]:
    """The current :func:`reuse_guide_weights` cache and the key of ``|ref|`` for this
    reference object and grid; ``(None, ())`` outside a block or for a reference made here."""
    cache = _GUIDE_WEIGHTS.get()
    if cache is None or p.held[2] is None:
        return None, ()
    return cache, ("|ref|", id(p.held[2]), p.key[2], ref.shape)


def _ref_cached(p: _Prepared, ref: np.ndarray) -> np.ndarray | None:
    """``|ref|`` (B,) as counted earlier in this :func:`reuse_guide_weights` block for this
    reference object and grid, or None."""
    cache, key = _ref_key(p, ref)
    hit = cache.get(key) if cache is not None else None
    return None if hit is None else np.array(hit[1], dtype=np.int64)


def _ref_keep(p: _Prepared, ref: np.ndarray, ny: np.ndarray) -> None:
    """Remember ``|ref|`` = ``ny`` for this reference object and grid (inside a block only)."""
    cache, key = _ref_key(p, ref)
    if cache is not None:
        cache[key] = (p.held[2], ny.copy())  # the object is held, so its id stays its own


def _count_ref(ref: np.ndarray) -> np.ndarray:
    """``|ref|`` per sample (B,) int64: the nonzero positions of each sample's reference (binary,
    so also its sum)."""
    return np.count_nonzero(ref.reshape(ref.shape[0], -1), axis=1).astype(np.int64)


def _ref_size(p: _Prepared, ref: np.ndarray) -> np.ndarray:
    """``|ref|`` per sample (B,) int64, counted once per reference object and grid inside
    :func:`reuse_guide_weights` (the cache :func:`_cl_counts` fills too)."""
    hit = _ref_cached(p, ref)
    if hit is not None:
        return hit
    ny = _count_ref(ref)
    _ref_keep(p, ref, ny)
    return ny


def _prototypes(p: _Prepared, ref: np.ndarray, do_counts: bool) -> tuple[np.ndarray, ...]:
    """Prototypes, status and (with ``do_counts``) layer-level counts; also ``|ref|`` per sample."""
    B, C = p.F.shape[0], p.F.shape[4 if p.channels_last else 1]
    P = np.empty((B, C))
    N = np.empty((B, C))
    status = np.empty(B, dtype=np.uint8)
    npos = np.zeros(B, dtype=np.int64)
    tp = np.zeros(B, dtype=np.int64)
    ny = np.zeros(B, dtype=np.int64)
    if p.cl is not None:
        # from eight channels on, counted as projected: no source-grid map written and read back
        one_pass = do_counts and p.identity and p.cl.shape[2] >= _cl.LANES
        P, N, status, mid, z = _cl_layer(p, do_counts and not one_pass)
        if one_pass:
            ny = _ref_size(p, ref)
            _cl.project_counts(p.cl, P, N, status, mid, ref.reshape(B, -1), npos, tp)
        elif do_counts:
            npos, tp, ny = _cl_counts(p, ref, z, mid, status)
        else:
            ny = _count_ref(ref)
    elif p.flat is not None:
        bad = np.zeros(B, dtype=np.int64)
        parts = _split_parts(B, C)
        if parts > 1:  # fewer samples than threads: each sample's channels in parallel parts
            fused.layer_split(p.flat, p.g, p.m, p.has_mask, ref, do_counts, p.identity, *p.src,
                              *p.weights, parts, P, N, status, npos, tp, ny, bad)
        else:
            fused.layer_kernel_flat(p.flat, p.g, p.m, p.has_mask, ref, do_counts, p.identity, *p.src,
                                       *p.weights, P, N, status, npos, tp, ny, bad)
        _check_deferred(p, bad)
    else:
        general.layer_kernel(p.F, p.g, p.m, p.has_mask, ref, do_counts, p.identity, p.channels_last,
                              *p.weights, P, N, status, npos, tp)
        ny = _count_ref(ref)
    return P, N, status, npos, tp, ny


def _finish(status: np.ndarray, npos: np.ndarray, tp: np.ndarray, ny: np.ndarray, empty: str, level: str) -> SAScores:
    """Scores from counts; ``npos``/``tp`` (B,) or (B, C), ``status`` and ``ny`` (B,)."""
    shape = npos.shape
    per = 1 if npos.ndim == 1 else shape[1]
    n = npos.size
    score = np.empty(n)
    status_out = np.empty(n, dtype=np.uint8)
    tp_out = np.empty(n, dtype=np.int64)
    fp = np.empty(n, dtype=np.int64)
    fn = np.empty(n, dtype=np.int64)
    counting.dice_counts(status, npos.reshape(-1), tp.reshape(-1), ny, per,
                         empty == "one", score, status_out, tp_out, fp, fn)
    return SAScores(score.reshape(shape), status_out.reshape(shape), tp_out.reshape(shape),
                    fp.reshape(shape), fn.reshape(shape), level)


# --------------------------------------------------------------------------- public API
def protoseg(
    features: Any,
    guide: Any,
    *,
    mask: Any = None,
    resize: str = "upsample",
    layout: str = "channels_first",
    nonfinite: str = "raise",
    extent: Any = None,
) -> ProtoSegResult:
    """ProtoSeg map of a feature tensor given a foreground guide (SPEC §1, §3).

    Parameters
    ----------
    features : array_like, float32 or float64
        ``(B, C, *spatial)`` (``layout="channels_first"``) or ``(B, *spatial, C)``
        (``"channels_last"``), 1 to 3 spatial axes, any strides (never copied).
    guide : array_like
        Foreground map in [0, 1] (soft or hard), ``(B, *grid)`` or ``(B, 1, *grid)``, on the
        reference grid (usually the model's input grid); bool, integer or float.
    mask : array_like, optional
        Tissue mask in [0, 1] on the guide's grid; restricts the prototypes only.
    resize : {"upsample", "downsample"}
        ``"upsample"`` (default): features are linearly resized to the guide's grid
        (``interpolate(align_corners=False)``, never materialised). ``"downsample"``: guide and
        mask are area-averaged to the features' grid and the maps are returned on that grid.
    layout : {"channels_first", "channels_last"}
    nonfinite : {"raise", "skip"}
        What to do with samples whose features hold NaN or Inf.
    extent : sequence of int, optional
        The grid the features cover when it is larger than the guide's: the model's input
        was padded at the end of each axis to this size, and the guide's grid is its leading
        corner. The map is the crop of the one computed on ``extent`` (``resize="upsample"``
        only). Default: the features cover the guide's grid.

    Returns
    -------
    ProtoSegResult
        ``binary`` (bool) and ``probability`` (float32) of shape ``(B, *grid)`` (the features'
        grid with ``resize="downsample"``), prototypes ``foreground``/``background`` (B, C)
        and ``status`` (B,) uint8 (:class:`engine.status.Status`).

    Raises
    ------
    TypeError
        Non-float features or non-numeric maps.
    ValueError
        Bad shapes, ranks, options, a guide or mask outside [0, 1], or (with
        ``nonfinite="raise"``) NaN/Inf in the features, naming the sample.

    Notes
    -----
    Per sample, with ``g`` the guide and ``m`` the mask on the reference grid and ``F`` the
    (resized) features::

        P = Σ F·g·m / Σ g·m,   N = Σ F·(1-g)·m / Σ (1-g)·m
        d⁺ = -‖F - P‖²,  d⁻ = -‖F - N‖²,  binary = d⁺ > d⁻,  probability = sigmoid(d⁺ - d⁻)

    computed as ``d⁺ - d⁻ = 2·F·(P - N) - ‖P‖² + ‖N‖²``; with ``F = R f`` (``R`` the linear
    resize) the prototypes are ``f·Rᵀ(g·m)/Σ g·m`` and only the scalar map ``f·(P - N)`` is
    resized. Ties go to background. An empty foreground, background or mask gives NaN
    prototypes, an all-background map and the matching status.

    References
    ----------
    S. He, Y. Feng, P. E. Grant, Y. Ou, "Segmentation Ability Map: Interpret deep features for
    medical image segmentation", Medical Image Analysis 84 (2023), arXiv:2212.09206.

    Examples
    --------
    >>> import numpy as np
    >>> f = np.zeros((1, 1, 4), np.float32); f[0, 0, 2:] = 1.0
    >>> g = np.array([[0, 0, 1, 1]])
    >>> r = protoseg(f, g)
    >>> r.binary.tolist(), r.foreground.tolist(), r.status.tolist()
    ([[False, False, True, True]], [[1.0]], [0])
    """
    check_choice(nonfinite, "nonfinite", _NONFINITE)
    p = _prepare(features, guide, None, mask, resize=resize, layout=layout, extent=extent)
    B, C = p.F.shape[0], p.F.shape[4 if p.channels_last else 1]
    tgt3 = p.g.shape[1:]
    P = np.empty((B, C))
    N = np.empty((B, C))
    status = np.empty(B, dtype=np.uint8)
    binary = np.empty((B,) + tuple(tgt3), dtype=np.bool_)
    prob = np.empty((B,) + tuple(tgt3), dtype=np.float32)
    if p.cl is not None:
        bad = np.zeros(B, dtype=np.int64)
        mid = np.empty(B)
        z = np.empty((B, p.cl.shape[1]))
        _cl.prototypes(p.cl, p.g, p.m, p.has_mask, _guide_weights(p), True,
                       P, N, status, mid, bad, z)
        _check_deferred(p, bad)
        none = np.zeros(1, dtype=np.int64)
        _cl.decide(z, mid, status, np.zeros((1, 1, 1, 1), np.uint8), False, True, p.identity, p.src,
                   tgt3, p.weights, none, none, none, binary, prob)
    elif p.flat is not None:
        bad = np.zeros(B, dtype=np.int64)
        fused.maps_kernel_flat(p.flat, p.g, p.m, p.has_mask, p.identity, *p.src, *p.weights,
                                  P, N, status, binary, prob, bad)
        _check_deferred(p, bad)
    else:
        general.maps_kernel(p.F, p.g, p.m, p.has_mask, p.identity, p.channels_last, *p.weights,
                             P, N, status, binary, prob)
    if nonfinite == "raise":
        _raise_nonfinite(status)
    shape = (B,) + p.target
    return ProtoSegResult(binary.reshape(shape), prob.reshape(shape), P, N, status)


def sa_scores(
    features: Any,
    guide: Any,
    reference: Any,
    *,
    mask: Any = None,
    level: str = "layer",
    resize: str = "upsample",
    layout: str = "channels_first",
    empty: str = "nan",
    nonfinite: str = "raise",
    extent: Any = None,
) -> SAScores | tuple[SAScores, SAScores]:
    """SA scores: Dice of the ProtoSeg map against a reference, per layer and/or unit (SPEC §2).

    Parameters
    ----------
    features, guide, mask, resize, layout, nonfinite
        As in :func:`protoseg`.
    reference : array_like
        Binary reference map (bool or 0/1), ``(B, *grid)`` or ``(B, 1, *grid)`` on the guide's
        grid. With ``resize="downsample"`` it is area-averaged to the features' grid, then ``≥ 0.5``.
    level : {"layer", "unit", "both"}
        ``"layer"``: all channels together, scores (B,). ``"unit"``: each channel alone,
        scores (B, C). ``"both"``: a ``(layer, unit)`` pair from one pass (prototypes once).
    empty : {"nan", "one"}
        Score when map and reference are both empty (status ``EMPTY_DICE`` either way).

    Returns
    -------
    SAScores or tuple of SAScores
        ``score`` (float64), ``status`` (uint8), ``tp``, ``fp``, ``fn`` (int64), ``level``.

    Raises
    ------
    TypeError, ValueError
        As :func:`protoseg`; also a reference that is not binary.

    Notes on ``extent``: as in :func:`protoseg` (scores of the map cropped to the guide's grid).

    Notes
    -----
    ``SA = 2·tp / (2·tp + fp + fn)`` with ``b`` the ProtoSeg map of :func:`protoseg` (layer)
    or of the single channel ``c`` (unit), where the map reduces to
    ``sign(P_c - N_c)·(F_c - (P_c + N_c)/2) > 0`` (all background when ``P_c = N_c``).
    Upsampled features are evaluated on the fly and only the counts are kept.

    References
    ----------
    S. He, Y. Feng, P. E. Grant, Y. Ou, "Segmentation Ability Map: Interpret deep features for
    medical image segmentation", Medical Image Analysis 84 (2023), arXiv:2212.09206.

    Examples
    --------
    >>> import numpy as np
    >>> f = np.zeros((1, 2, 4)); f[0, 0, 2:] = 1.0
    >>> g = np.array([[0, 0, 1, 1]])
    >>> sa_scores(f, g, g).score.tolist()
    [1.0]
    >>> unit = sa_scores(f, g, g, level="unit")
    >>> unit.score.tolist(), unit.status.tolist()
    ([[1.0, 0.0]], [[0, 0]])
    """
    check_choice(level, "level", _LEVELS)
    check_choice(empty, "empty", _EMPTY)
    check_choice(nonfinite, "nonfinite", _NONFINITE)
    if reference is None:
        raise TypeError("reference is required; received None; pass the binary reference map")
    p = _prepare(features, guide, reference, mask, resize=resize, layout=layout, extent=extent)
    assert p.ref is not None
    B, C = p.F.shape[0], p.F.shape[4 if p.channels_last else 1]
    P, N, status, npos, tp, ny = _prototypes(p, p.ref, level in ("layer", "both"))
    if nonfinite == "raise":
        _raise_nonfinite(status)
    layer = _finish(status, npos, tp, ny, empty, "layer")
    if level == "layer":
        return layer
    upos, utp = _unit_counts(p, P, N, status)
    unit = _finish(status, upos, utp, ny, empty, "unit")
    return unit if level == "unit" else (layer, unit)


def _unit_counts(p: _Prepared, P: np.ndarray, N: np.ndarray, status: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-level (positives, positives in the reference), (B, C) each."""
    B, C = P.shape
    upos = np.zeros((B, C), dtype=np.int64)
    utp = np.zeros((B, C), dtype=np.int64)
    units.unit_counts(p.F, p.ref, p.identity, p.channels_last, _unit_block(B, C), p.weights, P, N,
                      status == Status.OK, upos, utp)
    return upos, utp


def sa_scores_concat(
    blocks: Sequence[Any],
    guide: Any,
    reference: Any,
    *,
    whole: Any = None,
    mask: Any = None,
    level: str = "layer",
    resize: str = "upsample",
    layout: str = "channels_first",
    empty: str = "nan",
    nonfinite: str = "raise",
    extent: Any = None,
) -> tuple[list[Any], Any]:
    """SA scores of several tensors and of their concatenation along the channels, for the
    price of the tensors alone.

    A U-Net's skip connection concatenates two tensors that are scored on their own too. The
    concatenation's prototypes are the blocks' prototypes side by side and its scalar map
    ``F·(P-N)`` is the sum of the blocks' maps, so it is scored without reading its features
    again: for the deepbrain 3-D U-Net a third of the hidden bytes (``benchmarks/RESULTS.md``,
    "Concatenations scored from their parts").

    Parameters
    ----------
    blocks : sequence of array_like
        The tensors, in the concatenation's channel order; one batch and grid.
    guide, reference, mask, level, resize, layout, empty, nonfinite, extent
        As in :func:`sa_scores`, shared by every block.
    whole : array_like, optional
        The concatenation itself when the caller has it: scored directly where the blocks
        are not stored channels-last (their maps are not kept there), instead of a copy made
        by ``np.concatenate``.

    Returns
    -------
    (list, result)
        One :func:`sa_scores` result per block, and the concatenation's.

    Raises
    ------
    ValueError, TypeError
        As :func:`sa_scores`; blocks of different batch or spatial shapes, an empty list, or
        a ``whole`` whose shape is not the blocks' side by side.
    NonFiniteFeaturesError
        As :func:`sa_scores` (``nonfinite="raise"``), with ``block`` set to the index of the
        first block holding the NaN or Inf.

    Notes
    -----
    The blocks' results are :func:`sa_scores`' own. The concatenation's prototypes, threshold
    and unit scores are bit for bit those of ``sa_scores(np.concatenate(blocks, axis))``;
    its layer map sums the same products in another order, so a position whose two distances
    tie to the last bit of float64 may fall on the other side (the direct computation's
    rounding decides those too).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = rng.random((1, 8, 8, 2), dtype=np.float32)
    >>> b = rng.random((1, 8, 8, 3), dtype=np.float32)
    >>> g = np.zeros((1, 8, 8), np.float32); g[0, 2:6, 2:6] = 1
    >>> each, both = sa_scores_concat([a, b], g, g > 0, layout="channels_last")
    >>> direct = sa_scores(np.concatenate([a, b], axis=-1), g, g > 0, layout="channels_last")
    >>> bool(np.array_equal(both.score, direct.score)), len(each)
    (True, 2)
    """
    check_choice(level, "level", _LEVELS)
    check_choice(empty, "empty", _EMPTY)
    check_choice(nonfinite, "nonfinite", _NONFINITE)
    check_choice(layout, "layout", _LAYOUTS)
    if reference is None:
        raise TypeError("reference is required; received None; pass the binary reference map")
    arrays = [as_array(b, f"blocks[{i}]") for i, b in enumerate(blocks)]
    if not arrays:
        raise ValueError("blocks is empty; pass the tensors that were concatenated, in channel order")
    cax = 1 if layout == "channels_first" else -1
    shapes = {a.shape[:cax] + (a.shape[cax + 1:] if cax == 1 else ()) for a in arrays}
    if len(shapes) != 1 or len({a.ndim for a in arrays}) != 1:
        raise ValueError(f"blocks must share their batch and spatial shape ({layout}); received shapes "
                         f"{[a.shape for a in arrays]}")
    kw: dict[str, Any] = {"mask": mask, "level": level, "resize": resize, "layout": layout, "empty": empty,
                          "nonfinite": nonfinite, "extent": extent}
    cat_shape = list(arrays[0].shape)
    cat_shape[cax] = sum(a.shape[cax] for a in arrays)
    if whole is not None and tuple(as_array(whole, "whole").shape) != tuple(cat_shape):
        raise ValueError(f"whole has shape {as_array(whole, 'whole').shape}, but the blocks side by side "
                         f"have {tuple(cat_shape)}; pass their concatenation along the channels or None")
    ps = [_prepare(a, guide, reference, mask, resize=resize, layout=layout, extent=extent) for a in arrays]
    if not all(p.cl is not None for p in ps):  # no source-grid map to add: score the whole directly
        each = []
        for i, a in enumerate(arrays):
            try:
                each.append(sa_scores(a, guide, reference, **kw))
            except NonFiniteFeaturesError as exc:
                exc.block = i  # type: ignore[attr-defined]
                raise
        cat = whole if whole is not None else np.concatenate(arrays, axis=cax)
        return each, sa_scores(cat, guide, reference, **kw)

    do_layer = level in ("layer", "both")
    do_unit = level in ("unit", "both")
    each = []
    kept = []
    ny = None
    for i, p in enumerate(ps):
        assert p.ref is not None
        P, N, status, mid, z = _cl_layer(p, do_layer)
        if nonfinite == "raise":
            try:
                _raise_nonfinite(status)
            except NonFiniteFeaturesError as exc:
                exc.block = i  # type: ignore[attr-defined]
                raise
        if do_layer:
            npos, tp, ny = _cl_counts(p, p.ref, z, mid, status)
        elif ny is None:
            ny = _count_ref(p.ref)
        layer = _finish(status, npos, tp, ny, empty, "layer") if do_layer else None
        upos = utp = None
        if do_unit:
            upos, utp = _unit_counts(p, P, N, status)
        unit = _finish(status, upos, utp, ny, empty, "unit") if do_unit else None
        each.append(_by_level(level, layer, unit))
        kept.append((P, N, status, z, upos, utp))

    # the concatenation: a sample is NONFINITE when any block is; otherwise every block has
    # the guide's own status (its sums are shared), which block 0 gives
    status = kept[0][2].copy()
    for _, _, st, _, _, _ in kept[1:]:
        status[st == _NONFINITE_CODE] = _NONFINITE_CODE
    ok = status == Status.OK
    assert ny is not None
    layer = unit = None
    if do_layer:
        P = np.concatenate([k[0] for k in kept], axis=1)
        N = np.concatenate([k[1] for k in kept], axis=1)
        _, mid = _cl.threshold(P, N, ok)
        z = kept[0][3]  # block 0's map, already counted: the sum is made in place
        for k in kept[1:]:
            z += k[3]
        npos, tp, ny_ = _cl_counts(ps[0], ps[0].ref, z, mid, status)
        layer = _finish(status, npos, tp, ny_, empty, "layer")
    if do_unit:
        upos = np.concatenate([k[4] for k in kept], axis=1)
        utp = np.concatenate([k[5] for k in kept], axis=1)
        upos[~ok] = 0
        utp[~ok] = 0
        unit = _finish(status, upos, utp, ny, empty, "unit")
    # nonfinite="raise" has raised already: a NONFINITE sample here comes from a block
    return each, _by_level(level, layer, unit)


def _by_level(level: str, layer: Any, unit: Any) -> Any:
    """What :func:`sa_scores` returns for ``level``: the layer or unit result, or both."""
    return layer if level == "layer" else (unit if level == "unit" else (layer, unit))


def dice(binary: Any, reference: Any, *, empty: str = "nan", batch: bool = False) -> float | np.ndarray:
    """Dice coefficient ``2|b ∧ y| / (|b| + |y|)``.

    Parameters
    ----------
    binary, reference : array_like
        Binary maps (bool or 0/1) of the same shape.
    empty : {"nan", "one"}
        Value when both maps are empty.
    batch : bool
        If True the first axis is the batch: one score per sample.

    Returns
    -------
    float or numpy.ndarray
        The score, or an array of shape (B,) with ``batch=True``.

    Raises
    ------
    ValueError
        Shapes differ, maps are empty arrays or not binary, or a bad option.

    Examples
    --------
    >>> dice([1, 1, 0, 0], [1, 0, 0, 0])
    0.6666666666666666
    >>> dice([[0, 0]], [[0, 0]], batch=True).tolist()
    [nan]
    """
    check_choice(empty, "empty", _EMPTY)
    b = as_binary_uint8(as_array(binary, "binary"), "binary")
    y = as_binary_uint8(as_array(reference, "reference"), "reference")
    if b.shape != y.shape:
        raise ValueError(f"binary has shape {b.shape} but reference has {y.shape}; they must match")
    check_not_empty(b, "binary")
    if batch:
        if b.ndim < 1:
            raise ValueError("batch=True needs at least one axis (the batch); received a scalar")
        b = b.reshape(b.shape[0], -1)
        y = y.reshape(y.shape[0], -1)
        inter = (b & y).sum(axis=1, dtype=np.int64)
        den = b.sum(axis=1, dtype=np.int64) + y.sum(axis=1, dtype=np.int64)
        fill = np.nan if empty == "nan" else 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, 2.0 * inter / np.maximum(den, 1), fill)
    inter = int((b & y).sum(dtype=np.int64))
    den = int(b.sum(dtype=np.int64)) + int(y.sum(dtype=np.int64))
    if den == 0:
        return float("nan") if empty == "nan" else 1.0
    return 2.0 * inter / den
