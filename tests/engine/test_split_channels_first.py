"""One channels-first volume scored on every thread (issue 15, "every core in every kernel").

``engine._kernels.fused.layer_split`` replaced the parfor kernel ``layer_kernel_split``, whose
guide weights, threshold, sum of the parts' z and counting ran one sample per thread (a batch-1
3-D volume on one thread). Its prototypes, statuses, counts and bad-value counts must be the
bits of that kernel, kept below as the twin (``_twin_layer_kernel_split``), on one thread and
two, on resized (up and down) and identity grids, 3-D and 2-D, with and without a mask,
whatever the number of channel parts, with counts and without, and with a sample whose
prototypes are undefined.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit, prange

from engine._kernels import fused
from engine._kernels._common import _FM, _OK
from engine._kernels.counting import _layer_counts, _ref_count
from engine._kernels.fused import _flat_channels, _flat_weights
from engine._kernels.general import _finalize
from engine.scores import _prepare
from tests.engine.test_guide_weights_parallel import _threads


@njit(parallel=True, fastmath=_FM)
def _twin_layer_kernel_split(F, g, m, has_mask, ref, do_counts, identity, Zs, Ys, Xs,
                             iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1, T,
                             P, N, status, npos, tp, ny, bad):  # pragma: no cover - compiled
    """The engine's ``fused.layer_kernel_split`` before issue 15's split path, as it was."""
    B, C, S = F.shape
    Wf = np.empty((B, 0 if identity else S))
    Wb = np.empty((B, 0 if identity else S))
    modes = np.empty(B, dtype=np.int64)
    sums = np.empty((B, 3))
    for b in prange(B):
        mb = m[b] if has_mask else m[0]
        w3 = (0, 0, 0) if identity else (Zs, Ys, Xs)
        mode, sm, sf, sb, nbad = _flat_weights(g[b], mb, has_mask, identity, Zs, Ys, Xs, iz0, iz1, wz0, wz1,
                                               iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1,
                                               Wf[b].reshape(w3), Wb[b].reshape(w3))
        modes[b] = mode
        sums[b, 0] = sm
        sums[b, 1] = sf
        sums[b, 2] = sb
        bad[b] = nbad
    zpart = np.zeros((B, T, S if do_counts else 0))
    kpart = np.zeros((B, T))
    for i in prange(B * T):
        b = i // T
        t = i % T
        c_lo = (C * t) // T
        c_hi = (C * (t + 1)) // T
        sm = sums[b, 0]
        sf = sums[b, 1]
        sb = sums[b, 2]
        do_z = do_counts and sm != 0.0 and sf != 0.0 and sb != 0.0
        mb = m[b] if has_mask else m[0]
        kpart[b, t] = _flat_channels(F[b], c_lo, c_hi, modes[b], g[b].reshape(g[b].size), mb.reshape(mb.size),
                                     Wf[b], Wb[b], sf, sb, do_z, P[b], N[b], zpart[b, t])
    for b in prange(B):
        sm = sums[b, 0]
        sf = sums[b, 1]
        sb = sums[b, 2]
        code = _finalize(P[b], N[b], sm, sf, sb)
        status[b] = code
        npos[b] = 0
        tp[b] = 0
        refb = ref[b]
        if do_counts and code == _OK:
            z = zpart[b, 0]
            k = kpart[b, 0]
            for t in range(1, T):
                zt = zpart[b, t]
                for s in range(S):
                    z[s] += zt[s]
                k += kpart[b, t]
            n, t_, y = _layer_counts(z, refb, 0.5 * k, identity, Zs, Ys, Xs,
                                     iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1)
            npos[b] = n
            tp[b] = t_
            ny[b] = y
        else:
            ny[b] = _ref_count(refb.reshape(refb.size))


TARGET3 = (12, 10, 9)
# (features' grid, guide's grid): resized up, resized down, identity; 3-D and 2-D
GRIDS = [((5, 6, 4), TARGET3), ((16, 13, 11), TARGET3), (TARGET3, TARGET3), ((7, 5), (15, 11)),
         ((11, 9), (11, 9))]


def _case(src: tuple[int, ...], tgt: tuple[int, ...], batch: int, channels: int, with_mask: bool,
          empty_second: bool, seed: int):
    """Prepared channels-first inputs (``engine.scores._prepare``) of a random case whose
    first channel carries the guide's object, so that the counts are neither 0 nor all."""
    rng = np.random.default_rng(seed)
    g = (rng.random((batch,) + tgt) > 0.55).astype(np.float32)
    g[:, :2] = 0.0  # some structure: an empty slab
    g[0, ..., -3:] = rng.random(g[0, ..., -3:].shape).astype(np.float32)  # soft values
    if empty_second and batch > 1:
        g[1] = 0.0  # no foreground: the prototypes are undefined
    f = rng.normal(size=(batch, channels) + src).astype(np.float32)
    f[:, 0] += 2.0 * (rng.random((batch,) + src) > 0.5)
    ref = rng.random((batch,) + tgt) > 0.5
    mask = (rng.random((batch,) + tgt) > 0.2).astype(np.float32) if with_mask else None
    return _prepare(f, g, ref, mask, resize="upsample", layout="channels_first")


def _run(kernel, p, ref, do_counts: bool, T: int):
    B, C = p.flat.shape[:2]
    out = dict(P=np.empty((B, C)), N=np.empty((B, C)), status=np.empty(B, dtype=np.uint8),
               npos=np.zeros(B, dtype=np.int64), tp=np.zeros(B, dtype=np.int64),
               ny=np.zeros(B, dtype=np.int64), bad=np.zeros(B, dtype=np.int64))
    kernel(p.flat, p.g, p.m, p.has_mask, ref, do_counts, p.identity, *p.src, *p.weights, T, *out.values())
    return out


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}->{g[1]}")
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("batch,T", [(1, 1), (1, 2), (1, 3), (1, 4), (2, 2)])
def test_split_path_gives_the_bits_of_the_parfor_kernel(grid, with_mask, batch, T) -> None:
    src, tgt = grid
    p = _case(src, tgt, batch, 12, with_mask, empty_second=True, seed=len(src) * 100 + batch * 10 + T)
    assert p.flat is not None  # the fused (channels-first, C-contiguous) path
    ref = p.ref
    for do_counts in (True, False):
        twin = _run(_twin_layer_kernel_split, p, ref, do_counts, T)
        for n in (1, 2):
            with _threads(n):
                got = _run(fused.layer_split, p, ref, do_counts, T)
            for name, want in twin.items():
                np.testing.assert_array_equal(got[name], want, err_msg=f"{name}, {n} thread(s)")
    # the comparison is not vacuous: the first sample is scored, with counts strictly inside
    # the grid, and the second (when there is one) has undefined prototypes
    assert twin["status"][0] == _OK
    tw = _run(_twin_layer_kernel_split, p, ref, True, T)
    assert 0 < tw["tp"][0] < tw["npos"][0] < int(np.prod(tgt))
    assert 0 < tw["ny"][0] < int(np.prod(tgt))
    if batch > 1:
        assert tw["status"][1] != _OK and tw["npos"][1] == 0


def test_a_3d_volume_with_few_samples_takes_the_split_path(monkeypatch) -> None:
    # sa_scores routes a batch smaller than the split threshold to layer_split (not the
    # one-sample-per-thread kernel), and its scores are those of the twin
    from engine import scores

    calls = []
    real = fused.layer_split

    def spy(*args):
        calls.append(args[-8])  # T
        return real(*args)

    monkeypatch.setattr(fused, "layer_split", spy)
    rng = np.random.default_rng(5)
    f = rng.normal(size=(1, 16, 6, 6, 5)).astype(np.float32)
    f[:, 0] += 2.0 * (rng.random((1, 6, 6, 5)) > 0.5)
    g = (rng.random((1, 12, 11, 10)) > 0.5).astype(np.float32)
    got = scores.sa_scores(f, g, g > 0.5, level="layer")
    assert calls and calls[0] > 1
    p = _prepare(f, g, g > 0.5, None, resize="upsample", layout="channels_first")
    twin = _run(_twin_layer_kernel_split, p, p.ref, True, calls[0])
    assert got.tp.tolist() == twin["tp"].tolist()
    assert got.fp.tolist() == (twin["npos"] - twin["tp"]).tolist()
