"""One 3-D volume, channels-last: the resize and kernels of issue 15, before/after in one process.

Run as a module::

    python -m benchmarks.volume [--repeat R]

- ``resize``: Colin27 (181×217×181, float32) to deepbrain's 128³ input, as
  ``ModelCard.preprocess`` does: the axis-by-axis NumPy resize that ``resize_linear`` used to be
  (the twin in tests/engine/test_resize.py) against the Numba kernel.
- ``score``: deepbrain-shaped channels-last tensors (batch 1, float32, random features with a
  separable blob, guide = reference on 128³), ``sa_scores(level="both")`` + ``protoseg`` per
  tensor, through the general kernels (what channels-last features took before: one thread per
  sample) against the channels-last kernels (what they take now). Both paths are called on the
  same prepared arrays.

- ``unit`` (``--units``): the unit-level counts alone, on the same prepared arrays, through
  ``unit_kernel_before`` (the engine's kernel before issue 15, moved here: every target
  position evaluated, parfor) against
  ``engine._kernels.units`` (after: blocks whose source corners agree are counted without
  being evaluated), on the deepbrain shapes (channels-last, batch 1) and on 2-D U-Net layers
  (channels-first, batch 8, 256² mask), each with white-noise features (the worst case: almost
  every block mixed) and smooth features (white noise through a Gaussian filter of 2 source
  voxels, closer to a trained network's activations). The counts are asserted equal.

- ``--cl-baseline FILE``: the channels-last layer-level kernels alone (prototypes, then the
  counts of the decisions, ``sa_scores(level="layer")``'s work) of an older
  ``engine/_kernels/channels_last.py`` (e.g. ``git show HEAD:engine/_kernels/channels_last.py
  > /tmp/cl_head.py``, the ``parallel=True`` kernels ``prototypes_kernel`` and
  ``decide_kernel``) against today's, on the deepbrain shapes and on 2-D channels-last (NHWC)
  U-Net layers (batch 8, 256² mask); results asserted equal. With ``--real``: instead, the
  15 hidden tensors of one deepbrain volume (the shipped model on Colin27 through ONNX Runtime,
  as ``benchmarks/pipeline.py`` runs it), guided by its own hard prediction; with ``--sums``
  (either workload) only the prototype sums kernel ``sums_range`` (per-tile sums asserted
  identical bit for bit); with ``--decide`` only today's ``decide`` (the counts of the
  decisions) counting ``|ref|`` (before) against ``count_ref=False`` (after), counts asserted
  equal; with ``--project`` only the projection kernel ``project_range`` (``z`` asserted equal
  to 1e-12 relative and its signs identical: from eight channels on it adds in its own fixed
  order, ``engine._kernels.simd.project_rows``); with ``--one-pass`` the tensors on the
  guide's grid with at least eight channels: today's projection and ``decide`` against
  ``project_counts`` (counted as projected, no z), counts asserted equal.

- ``--split-baseline FILE``: channels-first features of one 3-D volume (batch 1, the deepbrain
  shapes as (1, C, side, side, side), guide and reference on 128³), layer level, through the
  split kernel of an older ``engine/_kernels/fused.py`` (e.g. ``git show
  5f59962:engine/_kernels/fused.py > /tmp/fused_old.py``: the parfor ``layer_kernel_split``,
  whose guide weights, threshold and counting ran one sample per thread) against today's
  ``layer_split``; prototypes, statuses and counts asserted identical.

- ``--passes``: the two passes over the features that layer-level SA needs, on one deepbrain
  volume's real tensors (channels-last, batch 1): today's prototype sums ``sums_range`` and
  projection ``project_range`` against a plain read pass over the same memory (a vectorised
  float32 sum in the same tiles on the same threads: what the memory gives one pass), in
  ms and GB/s per tensor. Tensors of 32 MiB or less may stay in this VM's L3 between calls.

- ``--baselines FILE``: the label-free baselines' kernel (``engine.quality.baselines``' one
  pass) of an older ``engine/_kernels/baseline.py`` (e.g. ``git show
  7d0754f:engine/_kernels/baseline.py > /tmp/baseline_old.py``: one scalar C library ``log``
  per entropy term) against today's, on the probabilities of one deepbrain volume and of one
  batch of the deep 2-D U-Net (both as ``benchmarks/pipeline.py`` runs them) and on a 128³
  probability with no value at 0 or 1; the six sums asserted equal to 1e-12 relative (the
  counts exactly).

Medians of ``repeat`` interleaved calls after one warm-up; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from engine import resize
from engine._kernels import general, units
from engine._kernels._common import _FM
from engine._kernels._pool import parallel_for
from engine._kernels.counting import _count
from engine.scores import _prepare, _unit_block, protoseg, sa_scores
from engine.status import Status

DEEPBRAIN = [(128, 8), (64, 16), (32, 32), (32, 64), (64, 32), (128, 16)]  # (side, channels)


_UNIT_BLOCK_BEFORE = 16  # channels-last: channels transposed together (one 64-byte line of float32)


@njit(parallel=True, cache=True, fastmath=_FM)
def unit_kernel_before(F, ref, identity, channels_last, block, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                       ix0, ix1, wx0, wx1, P, N, valid, npos, tp):
    """Per (sample, channel): the channel alone thresholded at (P_c+N_c)/2 -> (npos, tp).

    The engine's unit kernel before issue 15 (``engine/_kernels/general.py``), moved here as
    the "before" of ``--units``: :mod:`engine._kernels.units` is the same counting without
    ``parallel=True`` (a shorter cold compile).

    Channels-last input is processed in blocks of ``block`` channels (at most
    ``_UNIT_BLOCK_BEFORE``; fewer when one sample would otherwise leave threads idle): each block is
    first transposed to a small channel-first scratch (contiguous reads), because one channel
    alone would be a stride-C walk through the whole tensor. The counts are integers of
    per-position decisions that do not depend on the blocking, so neither do the results.
    """
    B, C = P.shape
    nblk = (C + block - 1) // block if channels_last else C
    for i in prange(B * nblk):
        b = i // nblk
        j = i % nblk
        c0 = j * block if channels_last else j
        c1 = min(c0 + block, C) if channels_last else j + 1
        for c in range(c0, c1):
            npos[b, c] = 0
            tp[b, c] = 0
        if not valid[b]:
            continue
        if channels_last:
            Zs, Ys, Xs = F.shape[1], F.shape[2], F.shape[3]
            blk = np.empty((c1 - c0, Zs, Ys, Xs), dtype=F.dtype)
            # row by row, channel-major writes: the source row (Xs x C) stays in L1, and the
            # 2^k-strided scratch planes are written sequentially (no cache-set conflicts)
            for z in range(Zs):
                for y in range(Ys):
                    for c in range(c0, c1):
                        for x in range(Xs):
                            blk[c - c0, z, y, x] = F[b, z, y, x, c]
        for c in range(c0, c1):
            d = P[b, c] - N[b, c]
            sign = 1.0 if d > 0.0 else (-1.0 if d < 0.0 else 0.0)
            mid = 0.5 * (P[b, c] + N[b, c])
            if channels_last:
                n, t = _count(blk[c - c0], ref[b], mid, sign, identity,
                              iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            else:
                n, t = _count(F[b, c], ref[b], mid, sign, identity,
                              iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            npos[b, c] = n
            tp[b, c] = t


def _numpy_resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = array.astype(np.float64, copy=False)
    first = array.ndim - len(shape)
    for k, n_out in enumerate(shape):
        axis = first + k
        if out.shape[axis] == n_out:
            continue
        i0, i1, w0, w1 = resize.linear_weights(out.shape[axis], n_out)
        b = [1] * out.ndim
        b[axis] = n_out
        out = np.take(out, i0, axis=axis) * w0.reshape(b) + np.take(out, i1, axis=axis) * w1.reshape(b)
    return np.asarray(out, dtype=np.float32 if array.dtype == np.float32 else np.float64)


def _old_path(f: np.ndarray, g: np.ndarray, y: np.ndarray) -> None:
    """sa_scores(level="both") and protoseg through the general kernels, as before issue 15."""
    p = _prepare(f, g, y, None, resize="upsample", layout="channels_last")
    B, C = f.shape[0], f.shape[-1]
    P, N = np.empty((B, C)), np.empty((B, C))
    st, npos, tp = np.empty(B, np.uint8), np.zeros(B, np.int64), np.zeros(B, np.int64)
    general.layer_kernel(p.F, p.g, p.m, False, p.ref, True, p.identity, True, *p.weights, P, N, st, npos, tp)
    unit_kernel_before(p.F, p.ref, p.identity, True, _UNIT_BLOCK_BEFORE, *p.weights, P, N, st == Status.OK,
                        np.zeros((B, C), np.int64), np.zeros((B, C), np.int64))
    tgt = p.g.shape[1:]
    general.maps_kernel(p.F, p.g, p.m, False, p.identity, True, *p.weights, P, N, st,
                        np.empty((B, *tgt), np.bool_), np.empty((B, *tgt), np.float32))


def _new_path(f: np.ndarray, g: np.ndarray, y: np.ndarray) -> None:
    sa_scores(f, g, y, level="both", layout="channels_last")
    protoseg(f, g, layout="channels_last")


UNET = [(32, 128), (64, 64), (128, 32), (256, 16)]  # (channels, side) of 2-D layers, mask 256²


def _unit_pair(f: np.ndarray, g: np.ndarray, y: np.ndarray, layout: str):
    """The old and the new unit-level counting on one prepared input: two callables."""
    p = _prepare(f, g, y, None, resize="upsample", layout=layout)
    B, C = p.F.shape[0], p.F.shape[4 if p.channels_last else 1]
    P, N = np.empty((B, C)), np.empty((B, C))
    st, npos, tp = np.empty(B, np.uint8), np.zeros(B, np.int64), np.zeros(B, np.int64)
    general.layer_kernel(p.F, p.g, p.m, False, p.ref, False, p.identity, p.channels_last, *p.weights,
                         P, N, st, npos, tp)
    valid = st == Status.OK
    block = _unit_block(B, C)
    out = {k: (np.zeros((B, C), np.int64), np.zeros((B, C), np.int64)) for k in ("before", "after")}

    def before() -> None:
        unit_kernel_before(p.F, p.ref, p.identity, p.channels_last, block, *p.weights, P, N, valid, *out["before"])

    def after() -> None:
        units.unit_counts(p.F, p.ref, p.identity, p.channels_last, block, p.weights, P, N, valid, *out["after"])

    return before, after, out


def _smooth(shape: tuple[int, ...], axes: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = [2.0 if k in axes else 0.0 for k in range(len(shape))]
    a = gaussian_filter(rng.normal(size=shape), sigma)
    return (a / a.std()).astype(np.float32)


def unit_rows(repeat: int, rng: np.random.Generator) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """Unit-level counting, before/after, on deepbrain (3-D, channels-last) and U-Net (2-D) layers."""
    rows = []
    zz, yy, xx = np.mgrid[-1:1:128j, -1:1:128j, -1:1:128j]
    g3 = (zz**2 + yy**2 + xx**2 < 0.4).astype(np.float32)[None]
    yy2, xx2 = np.mgrid[-1:1:256j, -1:1:256j]
    g2 = np.repeat(((yy2**2 + xx2**2) < 0.4).astype(np.float32)[None], 8, axis=0)
    work = [(f"deepbrain {side}³×{C} → 128³", (1, side, side, side, C), (1, 2, 3), g3, "channels_last")
            for side, C in DEEPBRAIN]
    work += [(f"U-Net {C} @ {side}² → 256² (batch 8)", (8, C, side, side), (2, 3), g2, "channels_first")
             for C, side in UNET]
    for label, shape, axes, g, layout in work:
        for kind in ("noise", "smooth"):
            f = rng.normal(size=shape).astype(np.float32) if kind == "noise" else _smooth(shape, axes, rng)
            before, after, out = _unit_pair(f, g, g > 0.5, layout)
            before()
            after()
            assert all(np.array_equal(a, b) for a, b in zip(out["before"], out["after"])), label
            times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            for _ in range(repeat):
                times["before"].append(_timed(before))
                times["after"].append(_timed(after))
            rows.append((f"unit {label}, {kind}", times))
    return rows


def _deepbrain_tensors() -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """The hidden tensors ``[(name, array)]`` of one deepbrain volume (Colin27) and the hard
    guide (1, 128, 128, 128) float32 of its prediction."""
    import tempfile

    from benchmarks.pipeline import build_deepbrain

    with tempfile.TemporaryDirectory() as tmp:
        res, outputs = _first_batch_outputs(build_deepbrain(tmp, volumes=1))
    guide = (res[outputs[-1]][..., 0] > 0.5).astype(np.float32)
    return [(n, res[n]) for n in outputs[:-1]], guide


def _older_module(path: Path, name: str) -> Any:
    """An older version of a kernel module, loaded from ``path`` as the module ``name``; its
    kernels compile here (a module loaded from a file is not in Numba's cache)."""
    import importlib.util

    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    spec = importlib.util.spec_from_file_location(name, path)
    old = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = old
    spec.loader.exec_module(old)
    for obj in vars(old).values():
        if isinstance(obj, Dispatcher):
            obj._cache = NullCache()
    return old


def cl_rows(path: Path, repeat: int, rng: np.random.Generator, *, real: bool = False, sums: bool = False,
            decide: bool = False, project: bool = False,
            one_pass: bool = False) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """Layer level through an older channels_last module (loaded from ``path``) and today's;
    with ``real`` on one deepbrain volume's tensors, with ``sums`` the sums kernel alone, with
    ``decide`` today's ``decide`` with and without counting ``|ref|``, with ``project`` the
    projection kernel alone (``z`` asserted equal to 1e-12 relative, and its signs identical:
    from eight channels on today's adds in another fixed order), with ``one_pass`` the tensors on
    the guide's grid with eight channels or more: today's projection and ``decide`` (before)
    against ``project_counts`` (after), counts asserted equal."""
    from engine._kernels import channels_last as new

    old = _older_module(path, "_cl_baseline")
    zz, yy, xx = np.mgrid[-1:1:128j, -1:1:128j, -1:1:128j]
    g3 = (zz**2 + yy**2 + xx**2 < 0.4).astype(np.float32)[None]
    yy2, xx2 = np.mgrid[-1:1:256j, -1:1:256j]
    g2 = np.repeat(((yy2**2 + xx2**2) < 0.4).astype(np.float32)[None], 8, axis=0)
    work = [(f"layer {side}³×{C} → 128³", (1, side, side, side, C), g3) for side, C in DEEPBRAIN]
    work += [(f"layer NHWC {C} @ {side}² → 256² (batch 8)", (8, side, side, C), g2) for C, side in UNET]
    if real:
        tensors, g3 = _deepbrain_tensors()
        work = [(f"deepbrain {name} {'×'.join(map(str, f.shape[1:]))}", f, g3) for name, f in tensors]
    rows = []
    for label, shape, g in work:
        if isinstance(shape, np.ndarray):
            f = shape
            shape = f.shape
        else:
            f = rng.normal(size=shape).astype(np.float32)
            f[(slice(None),) + (slice(shape[1] // 5, 4 * shape[1] // 5),) * (len(shape) - 2) + (0,)] += 2.0
        p = _prepare(f, g, g > 0.5, None, resize="upsample", layout="channels_last")
        B, C, S = shape[0], shape[-1], p.cl.shape[1]
        res = {}
        if sums:
            nt = (S + new._CL_TILE - 1) // new._CL_TILE
            gw = new.guide_weights(p.g, p.m, False, p.identity, p.src, p.weights)

            def run(which: str) -> None:
                part = np.empty((B, nt, 2, C))
                kernel = old.sums_range if which == "before" else new.sums_range
                parallel_for(kernel, B * nt, p.cl, p.g, p.m, False, gw[2], gw[0], gw[1], part, chunks_per_thread=4)
                res[which] = part.view(np.uint64).tobytes()

            rows.append((label, _before_after(run, res, repeat, label)))
            continue
        if project:
            nt = (S + new._CL_TILE - 1) // new._CL_TILE
            D = rng.standard_normal((B, C))
            ok = np.ones(B, np.bool_)
            zs = {}

            def run(which: str) -> None:
                z = np.empty((B, S))
                kernel = old.project_range if which == "before" else new.project_range
                parallel_for(kernel, B * nt, p.cl, D, ok, z, chunks_per_thread=4)
                zs[which] = z
                res[which] = np.packbits(z > 0).tobytes()

            rows.append((label, _before_after(run, res, repeat, label)))
            np.testing.assert_allclose(zs["after"], zs["before"], rtol=1e-12, atol=1e-12 * np.abs(zs["before"]).max())
            continue
        if one_pass:
            if not p.identity or C < new.LANES:
                continue
            P, N, st, mid = np.empty((B, C)), np.empty((B, C)), np.empty(B, np.uint8), np.empty(B)
            gw = new.guide_weights(p.g, p.m, False, p.identity, p.src, p.weights)
            new.prototypes(p.cl, p.g, p.m, False, gw, False, P, N, st, mid, np.zeros(B, np.int64), np.empty((B, 0)))
            dummy = (np.empty((0, 0, 0, 0), np.bool_), np.empty((0, 0, 0, 0), np.float32))

            def run(which: str) -> None:
                cnt = [np.zeros(B, np.int64) for _ in range(3)]
                if which == "before":
                    z = np.empty((B, S))
                    ok = st == new._OK
                    D, _ = new.threshold(P, N, ok)
                    parallel_for(new.project_range, B * ((S + new._CL_TILE - 1) // new._CL_TILE), p.cl, D, ok, z,
                                 chunks_per_thread=4)
                    new.decide(z, mid, st, p.ref, True, False, p.identity, p.src, p.ref.shape[1:], p.weights, *cnt,
                               *dummy, count_ref=False)
                else:
                    new.project_counts(p.cl, P, N, st, mid, p.ref.reshape(B, -1), cnt[0], cnt[1])
                res[which] = [c.tolist() for c in cnt[:2]]

            rows.append((label, _before_after(run, res, repeat, label)))
            continue
        if decide:
            P, N, st, mid = np.empty((B, C)), np.empty((B, C)), np.empty(B, np.uint8), np.empty(B)
            z = np.empty((B, S))
            new.prototypes(p.cl, p.g, p.m, False, new.guide_weights(p.g, p.m, False, p.identity, p.src, p.weights),
                           True, P, N, st, mid, np.zeros(B, np.int64), z)
            dummy = (np.empty((0, 0, 0, 0), np.bool_), np.empty((0, 0, 0, 0), np.float32))

            def run(which: str) -> None:
                cnt = [np.zeros(B, np.int64) for _ in range(3)]
                new.decide(z, mid, st, p.ref, True, False, p.identity, p.src, p.ref.shape[1:], p.weights, *cnt,
                           *dummy, count_ref=which == "before")
                res[which] = [c.tolist() for c in cnt[:2]]

            rows.append((label, _before_after(run, res, repeat, label)))
            continue

        def run(which: str) -> None:
            P, N, st, mid = np.empty((B, C)), np.empty((B, C)), np.empty(B, np.uint8), np.empty(B)
            bad, z = np.zeros(B, np.int64), np.empty((B, S))
            cnt = [np.zeros(B, np.int64) for _ in range(3)]
            dummy = (np.empty((0, 0, 0, 0), np.bool_), np.empty((0, 0, 0, 0), np.float32))
            if which == "before" and hasattr(old, "prototypes_kernel"):  # the parfor kernels (before 69719e7)
                old.prototypes_kernel(p.cl, p.g, p.m, False, p.identity, *p.src, *p.weights, True, P, N, st, mid, bad, z)
                old.decide_kernel(z, mid, st, p.ref, True, False, p.identity, *p.src, *p.ref.shape[1:], *p.weights,
                                  *cnt, *dummy)
            elif which == "before" and not hasattr(old, "guide_weights"):  # 69719e7 .. d3eba41
                old.prototypes(p.cl, p.g, p.m, False, p.identity, p.src, p.weights, True, P, N, st, mid, bad, z)
                old.decide(z, mid, st, p.ref, True, False, p.identity, p.src, p.ref.shape[1:], p.weights, *cnt, *dummy)
            elif which == "before":
                old.prototypes(p.cl, p.g, p.m, False, old.guide_weights(p.g, p.m, False, p.identity, p.src, p.weights),
                               True, P, N, st, mid, bad, z)
                old.decide(z, mid, st, p.ref, True, False, p.identity, p.src, p.ref.shape[1:], p.weights, *cnt, *dummy)
            else:
                new.prototypes(p.cl, p.g, p.m, False, new.guide_weights(p.g, p.m, False, p.identity, p.src, p.weights),
                               True, P, N, st, mid, bad, z)
                new.decide(z, mid, st, p.ref, True, False, p.identity, p.src, p.ref.shape[1:], p.weights, *cnt, *dummy)
            res[which] = [c.tolist() for c in cnt]

        rows.append((label, _before_after(run, res, repeat, (label, res))))
    return rows


def concat_rows(repeat: int) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """One deepbrain volume's 15 tensors in a ``reuse_guide_weights`` block, as ``score_batch``
    scores them: each alone (before) against the three skip concatenations scored from their
    parts by ``sa_scores_concat`` (after), at layer and layer + unit level; scores asserted equal."""
    from engine.model.graph import concat_blocks, list_hidden_tensors, load_model, select_tensors
    from engine.scores import reuse_guide_weights, sa_scores, sa_scores_concat

    tensors, guide = _deepbrain_tensors()
    feats = dict(tensors)
    ref = guide > 0
    model = load_model(Path(__file__).resolve().parents[1] / "cli" / "data" / "deepbrain" / "deepbrain.onnx")
    groups = concat_blocks(model, select_tensors(list_hidden_tensors(model), "auto"))
    member = {n: w for w, parts in groups.items() for n in (w, *parts)}

    def alone(level: str) -> dict[str, object]:
        with reuse_guide_weights():
            return {n: sa_scores(f, guide, ref, layout="channels_last", level=level) for n, f in tensors}

    def grouped(level: str) -> dict[str, object]:
        out: dict[str, object] = {}
        with reuse_guide_weights():
            for n, f in tensors:
                w = member.get(n)
                if w is None:
                    out[n] = sa_scores(f, guide, ref, layout="channels_last", level=level)
                elif n not in out:
                    each, res = sa_scores_concat([feats[p] for p in groups[w]], guide, ref,
                                                 layout="channels_last", level=level)
                    out.update(zip(groups[w], each))
                    out[w] = res
        return out

    rows = []
    for level in ("layer", "both"):
        a, b = alone(level), grouped(level)
        for n in a:
            for x, y in zip(np.atleast_1d(a[n]), np.atleast_1d(b[n])):
                assert np.array_equal(x.score, y.score, equal_nan=True), n
        times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        for _ in range(repeat):
            times["before"].append(_timed(alone, level))
            times["after"].append(_timed(grouped, level))
        rows.append((f"deepbrain 15 tensors, {level}, concatenations from their parts", times))
    return rows


def split_rows(path: Path, repeat: int, rng: np.random.Generator) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """Layer level of a channels-first batch-1 volume: an older fused module's
    ``layer_kernel_split`` (loaded from ``path``) against today's ``layer_split``."""
    from engine._kernels import fused as new
    from engine.scores import _split_parts

    old = _older_module(path, "_fused_baseline")
    zz, yy, xx = np.mgrid[-1:1:128j, -1:1:128j, -1:1:128j]
    g = (zz**2 + yy**2 + xx**2 < 0.4).astype(np.float32)[None]
    rows = []
    for side, C in DEEPBRAIN:
        f = rng.normal(size=(1, C, side, side, side)).astype(np.float32)
        s = slice(side // 5, 4 * side // 5)
        f[0, 0, s, s, s] += 2.0
        p = _prepare(f, g, g > 0.5, None, resize="upsample", layout="channels_first")
        assert p.flat is not None
        T = _split_parts(1, C)
        res: dict[str, list[list[float]]] = {}

        def run(which: str) -> None:
            out = [np.empty((1, C)), np.empty((1, C)), np.empty(1, np.uint8)] + [np.zeros(1, np.int64) for _ in range(4)]
            kernel = old.layer_kernel_split if which == "before" else new.layer_split
            kernel(p.flat, p.g, p.m, p.has_mask, p.ref, True, p.identity, *p.src, *p.weights, T, *out)
            res[which] = [a.tolist() for a in out]

        rows.append((f"layer (1, {C}, {side}³) → 128³, {T} parts", _before_after(run, res, repeat, side)))
    return rows


@njit(nogil=True, fastmath=True)
def _read_range(lo, hi, flat, out):  # pragma: no cover - compiled
    """Blocks [lo, hi) of ``_READ_BLOCK`` values of ``flat``: their sum (any order), so that
    each value is read once."""
    n = flat.shape[0]
    for i in range(lo, hi):
        s = np.float32(0.0)
        for k in range(i * _READ_BLOCK, min(n, (i + 1) * _READ_BLOCK)):
            s += flat[k]
        out[i] = s


_READ_BLOCK = 1 << 14  # float32 values per work item of the read pass (64 KiB)


def passes_rows(repeat: int) -> list[tuple[str, int, dict[str, float]]]:
    """Per real deepbrain tensor (:func:`_deepbrain_tensors`): its bytes and the median wall
    seconds of a plain read pass, ``sums_range`` and ``project_range``, interleaved."""
    from engine._kernels import channels_last as cl
    from engine._kernels._pool import parallel_for

    tensors, g3 = _deepbrain_tensors()
    rows = []
    for name, f in tensors:
        p = _prepare(f, g3, g3 > 0.5, None, resize="upsample", layout="channels_last")
        assert p.cl is not None, name
        B, S, C = p.cl.shape
        nt = (S + cl._CL_TILE - 1) // cl._CL_TILE
        gw = cl.guide_weights(p.g, p.m, False, p.identity, p.src, p.weights)
        part = np.empty((B, nt, 2, C))
        D = np.random.default_rng(0).standard_normal((B, C))
        ok = np.ones(B, np.bool_)
        z = np.empty((B, S))
        flat = p.cl.reshape(-1)
        nb = (flat.size + _READ_BLOCK - 1) // _READ_BLOCK
        blocks = np.empty(nb, np.float32)
        calls = {
            "read": lambda: parallel_for(_read_range, nb, flat, blocks, chunks_per_thread=4),
            "sums": lambda: parallel_for(cl.sums_range, B * nt, p.cl, p.g, p.m, False, gw[2], gw[0], gw[1], part,
                                         chunks_per_thread=4),
            "project": lambda: parallel_for(cl.project_range, B * nt, p.cl, D, ok, z, chunks_per_thread=4),
        }
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(repeat + 1):
            for k, fn in calls.items():
                times[k].append(_timed(fn)[0])
        rows.append((f"{name} {'×'.join(map(str, f.shape[1:]))}", f.nbytes,
                     {k: statistics.median(v[1:]) for k, v in times.items()}))
    return rows


def _first_batch_outputs(w: Any) -> tuple[dict[str, np.ndarray], list[str]]:
    """The pipeline session's outputs ``{name: array}`` on the first batch of a pipeline
    workload, and the output names (the exposed tensors, then the prediction)."""
    from benchmarks.pipeline import _prepared_batches

    session, batches, outputs = _prepared_batches(w)
    out = session.run(batches[0], outputs=outputs)
    return (out if isinstance(out, dict) else dict(zip(outputs, out))), outputs


def _model_probability(w: Any) -> np.ndarray:
    """The foreground probability (B, *grid) float32 of the first batch of a pipeline workload."""
    from engine.model.card import resolve_model_card
    from engine.model.graph import load_model

    res, outputs = _first_batch_outputs(w)
    card = resolve_model_card(load_model(w.model))
    return card.to_probability({card.prediction_output: res[outputs[-1]]})[:, 0]


def baseline_rows(path: Path, repeat: int, rng: np.random.Generator) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """The baselines' kernel of an older ``baseline.py`` (loaded from ``path``) against today's,
    called as :func:`engine.quality.baselines` calls it (no mask, threshold 0.5); the six sums
    of each call asserted equal to 1e-12 relative."""
    import tempfile

    from benchmarks.pipeline import build_deepbrain, build_workload
    from engine._kernels import baseline as new
    from engine.quality.baseline import _PROB_TOL

    old = _older_module(path, "_baseline_before")
    with tempfile.TemporaryDirectory() as tmp:
        work = [("deepbrain's probability, 1×128³", _model_probability(build_deepbrain(Path(tmp) / "d", volumes=1))),
                ("deep U-Net's probability, 8×256²", _model_probability(build_workload(
                    Path(tmp) / "u", n_cases=8, size=256, base=16, kind="deep", levels=4)))]
    x = rng.normal(0.0, 4.0, (1, 128, 128, 128))
    work.append(("1×128³, no value at 0 or 1", (1.0 / (1.0 + np.exp(-x))).astype(np.float32)))
    rows = []
    for label, prob in work:
        flat = np.ascontiguousarray(prob.reshape(prob.shape[0], 1, -1))
        weight = np.ones((flat.shape[0], flat.shape[2]), dtype=np.uint8)
        n_chunks = -(-flat.shape[2] // new.CHUNK)
        res: dict[str, Any] = {}

        def run(which: str) -> None:
            if which == "before":
                part = np.empty((flat.shape[0], 1, n_chunks, old.N_SUMS))
                old.baseline_sums(flat, weight, 0.5, part)
            else:
                part = np.empty((flat.shape[0], 1, n_chunks, new.N_SUMS))
                new.baseline_sums(flat, weight, 0.5, _PROB_TOL, part)
            res[which] = part[..., :6].sum(axis=2)

        run("before")
        run("after")
        np.testing.assert_allclose(res["after"], res["before"], rtol=1e-12, atol=0, err_msg=label)
        times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        for _ in range(repeat):
            times["before"].append(_timed(run, "before"))
            times["after"].append(_timed(run, "after"))
        rows.append((label, times))
    return rows


def _before_after(run, res: dict[str, Any], repeat: int, what: Any) -> dict[str, list[tuple[float, float]]]:
    """``run("before")`` and ``run("after")`` once each (warm-up), their results in ``res``
    asserted equal (``what`` names the case in the failure), then ``repeat`` interleaved
    timed pairs: the (wall, CPU) seconds of each side."""
    run("before")
    run("after")
    assert res["before"] == res["after"], what
    times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(repeat):
        times["before"].append(_timed(run, "before"))
        times["after"].append(_timed(run, "after"))
    return times


def _timed(fn, *args) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.volume")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--units", action="store_true", help="only the unit-level counting, before/after")
    ap.add_argument("--cl-baseline", type=Path, metavar="FILE",
                    help="only the channels-last layer level: this older channels_last.py against today's")
    ap.add_argument("--real", action="store_true",
                    help="with --cl-baseline: one deepbrain volume's tensors instead of random features")
    ap.add_argument("--sums", action="store_true", help="with --cl-baseline: the prototype sums kernel alone")
    ap.add_argument("--decide", action="store_true",
                    help="with --cl-baseline: today's decide counting |ref| against count_ref=False")
    ap.add_argument("--project", action="store_true", help="with --cl-baseline: the projection kernel alone")
    ap.add_argument("--one-pass", action="store_true",
                    help="with --cl-baseline: on the guide's grid, today's projection + decide against project_counts")
    ap.add_argument("--split-baseline", type=Path, metavar="FILE",
                    help="only a channels-first batch-1 volume's layer level: this older fused.py's "
                         "split kernel against today's")
    ap.add_argument("--concat", action="store_true",
                    help="only one deepbrain volume's tensors scored alone vs. concatenations from their parts")
    ap.add_argument("--baselines", type=Path, metavar="FILE",
                    help="only the baselines' kernel: this older baseline.py against today's")
    ap.add_argument("--passes", action="store_true",
                    help="only the prototype sums and projection passes on one deepbrain volume's tensors, "
                         "against a plain read pass over the same memory")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    if a.passes:
        load = open("/proc/loadavg").read().split()[0]
        print(f"Numba threads {numba.get_num_threads()}; medians of {a.repeat}; load {load}")
        print("| tensor | MiB | read pass ms (GB/s) | sums ms (GB/s) | projection ms (GB/s) | sums / read | projection / read |")
        print("|---|---|---|---|---|---|---|")
        tot = {"read": 0.0, "sums": 0.0, "project": 0.0}
        nbytes = 0
        for label, size, med in passes_rows(a.repeat):
            nbytes += size
            for k in tot:
                tot[k] += med[k]
            cells = [f"{med[k] * 1e3:.2f} ({size / med[k] / 1e9:.0f})" for k in ("read", "sums", "project")]
            print(f"| {label} | {size / 2**20:.0f} | " + " | ".join(cells)
                  + f" | {med['sums'] / med['read']:.2f} | {med['project'] / med['read']:.2f} |")
        cells = [f"{tot[k] * 1e3:.2f} ({nbytes / tot[k] / 1e9:.0f})" for k in ("read", "sums", "project")]
        print(f"| **all** | {nbytes / 2**20:.0f} | " + " | ".join(cells)
              + f" | {tot['sums'] / tot['read']:.2f} | {tot['project'] / tot['read']:.2f} |")
        return 0
    if a.cl_baseline is not None or a.units or a.concat or a.split_baseline is not None or a.baselines:
        load = open("/proc/loadavg").read().split()[0]
        print(f"Numba threads {numba.get_num_threads()}; medians of {a.repeat}; load {load}")
        print("| workload | before wall s | after wall s | before/after | before CPU s | after CPU s |")
        print("|---|---|---|---|---|---|")
        tot = {"before": [0.0, 0.0], "after": [0.0, 0.0]}
        work = (cl_rows(a.cl_baseline, a.repeat, rng, real=a.real, sums=a.sums, decide=a.decide, project=a.project,
                       one_pass=a.one_pass)
                if a.cl_baseline is not None
                else split_rows(a.split_baseline, a.repeat, rng) if a.split_baseline is not None
                else baseline_rows(a.baselines, a.repeat, rng) if a.baselines is not None
                else concat_rows(a.repeat) if a.concat else unit_rows(a.repeat, rng))
        for label, t in work:
            med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in t.items()}
            for k in tot:
                tot[k][0] += med[k][0]
                tot[k][1] += med[k][1]
            print(f"| {label} | {med['before'][0]:.4f} | {med['after'][0]:.4f} | "
                  f"{med['before'][0] / med['after'][0]:.2f}× | {med['before'][1]:.4f} | {med['after'][1]:.4f} |")
        print(f"| **all** | {tot['before'][0]:.3f} | {tot['after'][0]:.3f} | "
              f"{tot['before'][0] / tot['after'][0]:.2f}× | {tot['before'][1]:.3f} | {tot['after'][1]:.3f} |")
        return 0
    colin = Path(__file__).resolve().parents[1] / "cli" / "data" / "colin27" / "colin27.nii.gz"
    try:
        import nibabel

        vol = np.asarray(nibabel.load(str(colin)).dataobj, dtype=np.float32)[None]
    except (ImportError, OSError):
        vol = rng.random((1, 181, 217, 181), dtype=np.float32)
    rows = []
    for name, fn in (("resize NumPy (before)", _numpy_resize), ("resize kernel (after)", resize.resize_linear)):
        fn(vol, (128, 128, 128))
    times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(a.repeat):
        times["before"].append(_timed(_numpy_resize, vol, (128, 128, 128)))
        times["after"].append(_timed(resize.resize_linear, vol, (128, 128, 128)))
    assert np.array_equal(_numpy_resize(vol, (128, 128, 128)), resize.resize_linear(vol, (128, 128, 128)))
    rows.append(("resize Colin27 181×217×181 → 128³", times))
    grid = (128, 128, 128)
    zz, yy, xx = np.mgrid[-1:1:128j, -1:1:128j, -1:1:128j]
    g = (zz**2 + yy**2 + xx**2 < 0.4).astype(np.float32)[None]
    y = g > 0.5
    for side, C in DEEPBRAIN:
        f = rng.normal(size=(1, side, side, side, C)).astype(np.float32)
        s = slice(side // 5, 4 * side // 5)
        f[0, s, s, s, 0] += 2.0
        _old_path(f, g, y)
        _new_path(f, g, y)
        times = {"before": [], "after": []}
        for _ in range(a.repeat):
            times["before"].append(_timed(_old_path, f, g, y))
            times["after"].append(_timed(_new_path, f, g, y))
        rows.append((f"score {side}³×{C} → {grid[0]}³ (both + maps)", times))
    print(f"Numba threads {numba.get_num_threads()}; medians of {a.repeat}; unit block {_unit_block(1, 8)}")
    print("| workload | before wall s | after wall s | before/after | before CPU s | after CPU s |")
    print("|---|---|---|---|---|---|")
    tot = {"before": [0.0, 0.0], "after": [0.0, 0.0]}
    for label, t in rows:
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in t.items()}
        if label.startswith("score"):
            for k in tot:
                tot[k][0] += med[k][0]
                tot[k][1] += med[k][1]
        print(f"| {label} | {med['before'][0]:.3f} | {med['after'][0]:.3f} | {med['before'][0] / med['after'][0]:.1f}× "
              f"| {med['before'][1]:.3f} | {med['after'][1]:.3f} |")
    print(f"| **score, all six tensors** | {tot['before'][0]:.3f} | {tot['after'][0]:.3f} | "
          f"{tot['before'][0] / tot['after'][0]:.1f}× | {tot['before'][1]:.3f} | {tot['after'][1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
