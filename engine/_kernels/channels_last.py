"""Kernels for C-contiguous channels-last features seen as (B, S, C): each position's channel
vector is read contiguously, and one sample's positions are split into fixed tiles that run in
parallel, so a single 3-D volume uses every core.

Results do not depend on the thread count: the work is cut into tiles of a fixed size
(``_CL_TILE`` positions, or ``_ROWS`` target rows), each tile is computed by the same code
whichever thread runs it, the per-tile prototype sums are added in tile order after the
parallel loop, and counts are integers.

The kernels are serial functions of a range of work items, compiled with ``nogil=True`` and
run over the threads by :func:`engine._kernels._pool.parallel_for` (Numba's ``parallel=True``
cost 1.5-2.3x their compile time; see ``benchmarks/RESULTS.md``, "Cold start, unit level and
channels-last re-measured"). The drivers :func:`prototypes` and :func:`decide` chain them:

- :func:`weights_range` (per sample) on an identity grid, or
  :func:`engine._kernels.adjoint.guide_adjoint` (per block of source z planes) on a resized
  one: the guide weights on the source grid, their sums and the count of guide/mask values
  outside [0, 1];
- :func:`sums_range` (per position tile): each tile's prototype sums, added in tile order
  afterwards (blocks of eight channels in vector registers, :mod:`engine._kernels.simd`);
- :func:`project_range` (per position tile): the source-grid scalar map ``z = F·(P-N)`` (from
  eight channels on eight positions at a time, in the fixed order of
  :func:`engine._kernels.simd.project_rows`); on the guide's grid, from eight channels on,
  :func:`project_counts` counts the decisions as it projects, without storing z;
- :func:`interp_range` (per source row) and :func:`decide_range` (per block of target rows):
  the decisions ``R z > mid`` on the target grid, counted against the reference and/or written
  as the binary and probability maps.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from engine._kernels._common import _EMPTY_BACKGROUND, _EMPTY_FOREGROUND, _EMPTY_MASK, _FM, _NONFINITE, _OK
from engine._kernels._pool import parallel_for
from engine._kernels.adjoint import guide_adjoint
from engine._kernels.fused import _MODE_GUIDE, _MODE_GUIDE_MASK, _MODE_WEIGHTS, _guide_sums
from engine._kernels.simd import LANES, fmuladd_rows8, fmuladd_rows16, fmuladd_rows32, project_count_rows, project_rows

__all__: list[str] = []  # private module

_CL_TILE = 1024  # positions per parallel work item (fixed: the reduction order never changes)


_ROWS = 8  # target rows per work item of decide_range


@njit(nogil=True, cache=True, fastmath=_FM)
def weights_range(lo, hi, g, m, has_mask, modes, sums, bad):
    """Samples [lo, hi) on an identity grid (the guide and mask are read directly by
    :func:`sums_range`): their mode, ``sums`` = (Σm, Σg·m, Σ(1-g)·m) and ``bad``, the count of
    guide or mask values outside [0, 1] or NaN."""
    for b in range(lo, hi):
        mb = m[b] if has_mask else m[0]
        gb = g[b]
        sm, sf, sb, nbad = _guide_sums(gb.reshape(gb.size), mb.reshape(mb.size), has_mask)
        modes[b] = _MODE_GUIDE_MASK if has_mask else _MODE_GUIDE
        sums[b, 0] = sm
        sums[b, 1] = sf
        sums[b, 2] = sb
        bad[b] = nbad


@njit(nogil=True, cache=True, fastmath={"contract"})  # no reassoc: each sum keeps its order
def sums_range(lo, hi, F, g, m, has_mask, modes, Wf, Wb, part):
    """Work items [lo, hi) = (sample, tile of ``_CL_TILE`` positions): the tile's prototype
    sums ``part[b, t, 0, c] = Σ F[s, c]·wf[s]`` and ``part[b, t, 1, c] = Σ F[s, c]·wb[s]``."""
    B, S, C = F.shape
    nt = part.shape[1]
    wf = np.empty(_CL_TILE)
    wb = np.empty(_CL_TILE)
    C8 = C - C % LANES
    for i in range(lo, hi):
        b = i // nt
        t = i - b * nt
        t0 = t * _CL_TILE
        n = min(t0 + _CL_TILE, S) - t0
        mode = modes[b]
        if mode == _MODE_GUIDE:
            gg = g[b].reshape(g[b].size)[t0:t0 + n]
            for k in range(n):
                u = np.float64(gg[k])
                wf[k] = u
                wb[k] = 1.0 - u
        elif mode == _MODE_GUIDE_MASK:
            gg = g[b].reshape(g[b].size)[t0:t0 + n]
            mm = m[b].reshape(m[b].size)[t0:t0 + n]
            for k in range(n):
                gv = np.float64(gg[k])
                mv = np.float64(mm[k])
                wf[k] = gv * mv
                wb[k] = (1.0 - gv) * mv
        else:
            af = Wf[b, t0:t0 + n]
            ab = Wb[b, t0:t0 + n]
            for k in range(n):
                wf[k] = af[k]
                wb[k] = ab[k]
        a = part[b, t, 0]
        bb = part[b, t, 1]
        for c in range(C):
            a[c] = 0.0
            bb[c] = 0.0
        Ft = F[b, t0:t0 + n]
        # blocks of eight channels: their sums in vector registers over the whole tile
        # (engine._kernels.simd; the same chain of terms per channel, so the same bits)
        c0 = 0
        while c0 + 4 * LANES <= C8:
            fmuladd_rows32(Ft, n, c0, wf, wb, a, bb)
            c0 += 4 * LANES
        if c0 + 2 * LANES <= C8:
            fmuladd_rows16(Ft, n, c0, wf, wb, a, bb)
            c0 += 2 * LANES
        if c0 < C8:
            fmuladd_rows8(Ft, n, c0, wf, wb, a, bb)
        if C8 == C:
            continue
        # the other channels (every channel below eight): four positions per step, each
        # channel's sums in registers across them (one load and store per four terms), the
        # terms in position order. The tile is indexed in two dimensions (Ft[k, c]), not through
        # a view of each row: the four views cost more per step than eight channels' arithmetic
        # (tests/engine/test_cl_sums_twin.py: same bits)
        k = 0
        while k + 4 <= n:
            u0 = wf[k]
            u1 = wf[k + 1]
            u2 = wf[k + 2]
            u3 = wf[k + 3]
            v0 = wb[k]
            v1 = wb[k + 1]
            v2 = wb[k + 2]
            v3 = wb[k + 3]
            for c in range(C8, C):
                f0 = np.float64(Ft[k, c])
                f1 = np.float64(Ft[k + 1, c])
                f2 = np.float64(Ft[k + 2, c])
                f3 = np.float64(Ft[k + 3, c])
                x = a[c]
                x += f0 * u0
                x += f1 * u1
                x += f2 * u2
                x += f3 * u3
                a[c] = x
                y = bb[c]
                y += f0 * v0
                y += f1 * v1
                y += f2 * v2
                y += f3 * v3
                bb[c] = y
            k += 4
        while k < n:
            u = wf[k]
            v = wb[k]
            for c in range(C8, C):
                f = np.float64(Ft[k, c])
                a[c] += f * u
                bb[c] += f * v
            k += 1


@njit(nogil=True, cache=True, fastmath=_FM)
def project_range(lo, hi, F, D, ok, z):
    """Work items [lo, hi) = (sample, tile): ``z[b, s] = Σ_c F[b, s, c]·D[b, c]`` for the samples
    with ``ok[b]``."""
    B, S, C = F.shape
    nt = (S + _CL_TILE - 1) // _CL_TILE
    for i in range(lo, hi):
        b = i // nt
        if not ok[b]:
            continue
        t0 = (i - b * nt) * _CL_TILE
        t1 = min(t0 + _CL_TILE, S)
        if C >= LANES:  # eight positions at a time, a fixed order (engine._kernels.simd)
            project_rows(F[b, t0:t1], t1 - t0, D[b], z[b, t0:t1])
            continue
        Fb = F[b]
        Db = D[b]
        zb = z[b]
        for s in range(t0, t1):
            r = Fb[s]
            acc = 0.0
            for c in range(C):
                acc += np.float64(r[c]) * Db[c]
            zb[s] = acc


@njit(nogil=True, cache=True)
def project_count_range(lo, hi, F, D, mid, ok, ref, cnt):
    """Work items [lo, hi) = (sample, tile) on an identity grid, at least eight channels: the
    decisions ``z > mid[b]`` with ``z = Σ_c F[b, s, c]·D[b, c]`` the sums of
    :func:`project_range` (the same :mod:`engine._kernels.simd` emitter), counted without
    storing z: ``cnt[b, tile]`` = (positives, positives in ``ref``) (``ref`` (B, S) uint8). A
    sample without ``ok[b]`` has no positives."""
    B, S, C = F.shape
    nt = cnt.shape[1]
    for i in range(lo, hi):
        b = i // nt
        t = i - b * nt
        cnt[b, t, 0] = 0
        cnt[b, t, 1] = 0
        if ok[b]:
            t0 = t * _CL_TILE
            t1 = min(t0 + _CL_TILE, S)
            project_count_rows(F[b, t0:t1], t1 - t0, D[b], mid[b], ref[b, t0:t1], cnt[b, t])


def project_counts(F, P, N, status, mid, ref, npos, tp):
    """Layer-level counts on an identity grid in one pass over channels-last ``F`` (B, S, C):
    ``npos``/``tp`` = positives / positives in ``ref`` (B, S) of the decisions ``F·(P-N) > mid``,
    the same decisions as :func:`prototypes` (``want_z``) then :func:`decide`, without writing
    and reading back the (B, S) float64 map (a third of the bytes of a 128³×8 tensor's two
    passes, and the page faults of a fresh 16 MiB buffer). Counts are added per tile after
    the parallel part: they do not depend on the thread count.

    At least eight channels (``ValueError`` otherwise): the decisions are compared and counted
    eight positions at a time there; with fewer, storing z and :func:`decide` is faster."""
    B, S, C = F.shape
    if C < LANES:
        raise ValueError(f"project_counts needs at least {LANES} channels; received {C}; "
                         "use prototypes(want_z=True) and decide()")
    ok = status == _OK
    D, _ = threshold(P, N, ok)  # the D that prototypes() projected with
    nt = (S + _CL_TILE - 1) // _CL_TILE
    cnt = np.empty((B, nt, 2), dtype=np.int64)
    parallel_for(project_count_range, B * nt, F, D, mid, ok, ref, cnt, chunks_per_thread=4)
    tot = cnt.sum(axis=1)
    npos[:] = tot[:, 0]
    tp[:] = tot[:, 1]


def guide_weights(g, m, has_mask, identity, src, weights):
    """The guide's side of :func:`prototypes`, which depends on the guide, mask and grids only:
    ``(Wf, Wb, modes, sums, bad)``: on an identity grid the guide is read directly
    (:func:`weights_range`; ``Wf``/``Wb`` are empty), on a resized grid ``Wf``/``Wb`` =
    Rᵀ(g·m), Rᵀ((1-g)·m) on the source grid (:func:`engine._kernels.adjoint.guide_adjoint`,
    whose work items are blocks of source z planes: a single 3-D volume uses every thread);
    ``sums`` = (Σm, Σg·m, Σ(1-g)·m) and ``bad`` the count of guide or mask values outside
    [0, 1] or NaN, per sample. Tensors of one batch on the same grid can share it
    (:func:`engine.scores.reuse_guide_weights`)."""
    B = g.shape[0]
    Zs, Ys, Xs = src
    S = Zs * Ys * Xs
    Wf = np.empty((B, 0 if identity else S))
    Wb = np.empty((B, 0 if identity else S))
    modes = np.empty(B, dtype=np.int64)
    sums = np.empty((B, 3))
    bad = np.zeros(B, dtype=np.int64)
    if identity:
        parallel_for(weights_range, B, g, m, has_mask, modes, sums, bad)
    else:
        guide_adjoint(g, m, has_mask, src, weights, Wf.reshape((B, Zs, Ys, Xs)), Wb.reshape((B, Zs, Ys, Xs)), sums,
                      bad)
        modes[:] = _MODE_WEIGHTS
    return Wf, Wb, modes, sums, bad


def threshold(P, N, ok):
    """``(D, mid)``: ``D = P - N`` (B, C) and the decision threshold ``mid = (‖P‖² - ‖N‖²)/2``
    (B,), both zero for the samples without ``ok``."""
    D = np.where(ok[:, None], P - N, 0.0)
    return D, 0.5 * np.where(ok, (D * np.where(ok[:, None], P + N, 0.0)).sum(axis=1), 0.0)


def prototypes(F, g, m, has_mask, gw, want_z, P, N, status, mid, bad, z):
    """Per sample of channels-last ``F`` (B, S, C): prototypes into P, N (NaN when undefined),
    ``status``, the threshold ``mid = (‖P‖² - ‖N‖²)/2``, the count of guide/mask values
    outside [0, 1] (``bad``) and, with ``want_z``, ``z[b] = F[b]·(P-N)`` (B, S) for the samples
    whose status is OK. ``gw`` is :func:`guide_weights`'s result for this guide, mask and grid.

    The per-tile sums are added in tile order (NumPy), so the prototypes do not depend on the
    thread count.
    """
    B, S, C = F.shape
    nt = (S + _CL_TILE - 1) // _CL_TILE
    Wf, Wb, modes, sums, gbad = gw
    bad[:] = gbad
    part = np.empty((B, nt, 2, C))
    parallel_for(sums_range, B * nt, F, g, m, has_mask, modes, Wf, Wb, part, chunks_per_thread=4)
    tot = np.add.reduce(part, axis=1)  # (B, 2, C): tile by tile, in tile order
    P[:] = tot[:, 0]
    N[:] = tot[:, 1]
    sm, sf, sb = sums[:, 0], sums[:, 1], sums[:, 2]
    finite = np.isfinite(tot).all(axis=(1, 2))
    code = np.where(~finite, _NONFINITE, np.where(sm == 0.0, _EMPTY_MASK, np.where(
        sf == 0.0, _EMPTY_FOREGROUND, np.where(sb == 0.0, _EMPTY_BACKGROUND, _OK))))
    status[:] = code
    ok = code == _OK
    with np.errstate(invalid="ignore", divide="ignore"):
        P /= np.where(ok, sf, 1.0)[:, None]
        N /= np.where(ok, sb, 1.0)[:, None]
    P[~ok] = np.nan
    N[~ok] = np.nan
    D, mid[:] = threshold(P, N, ok)
    if want_z:
        parallel_for(project_range, B * nt, F, D, ok, z, chunks_per_thread=4)


@njit(nogil=True, cache=True, fastmath=_FM)
def interp_range(lo, hi, z, ok, Xs, ix0, wx1, A):
    """Work items [lo, hi) = (sample, source row): the row of ``z`` (B, Zs·Ys·Xs) interpolated
    along x into ``A[b, row]`` (Xt): ``base[i0] + w1·(base[i0 + 1] - base[i0])``."""
    nsr = A.shape[1]
    Xt = A.shape[2]
    diff = np.empty(Xs)
    for i in range(lo, hi):
        b = i // nsr
        if not ok[b]:
            continue
        r = i - b * nsr
        base = z[b, r * Xs:(r + 1) * Xs]
        for k in range(Xs - 1):
            diff[k] = base[k + 1] - base[k]
        diff[Xs - 1] = 0.0
        out = A[b, r]
        for x in range(Xt):
            j = ix0[x]
            out[x] = base[j] + wx1[x] * diff[j]


@njit(nogil=True, cache=True, fastmath=_FM)
def _target_row(A, b, Ys, zt, yt, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1):
    """Target row (zt, yt) of sample ``b``: its four coefficients ``wz·wy`` and the four rows of
    ``A`` (z interpolated along x) they weigh: (c00, c01, c10, c11, a0, a1, a2, a3)."""
    z0 = iz0[zt]
    z1 = iz1[zt]
    y0 = iy0[yt]
    y1 = iy1[yt]
    return (wz0[zt] * wy0[yt], wz0[zt] * wy1[yt], wz1[zt] * wy0[yt], wz1[zt] * wy1[yt],
            A[b, z0 * Ys + y0], A[b, z0 * Ys + y1], A[b, z1 * Ys + y0], A[b, z1 * Ys + y1])


@njit(nogil=True, cache=True, fastmath=_FM)
def decide_range(lo, hi, z, A, mid, ok, ref, do_counts, count_ref, do_maps, identity, Ys, Zt, Yt, Xt,
                 iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, cnt, binary, prob):
    """Work items [lo, hi) = (sample, block of ``_ROWS`` target rows): the decisions
    ``R z[b] > mid[b]``; with ``do_counts`` the block's (positives, positives in ``ref``,
    ``|ref|``) into ``cnt[b, block]`` (``|ref|`` counted only with ``count_ref``, else 0), with
    ``do_maps`` the binary and probability maps. ``A`` holds z interpolated along x (unused on
    an identity grid). Counts are taken on the identity grid only (``do_counts`` is for it; on a
    resized grid :func:`decide` counts with :func:`decide_counts_range`); ``cnt`` is written only
    with ``do_counts``."""
    nch = cnt.shape[1]
    rows = Zt * Yt
    for i in range(lo, hi):
        b = i // nch
        ch = i - b * nch
        okb = ok[b]
        m = mid[b]
        zb = z[b]
        n_p = 0
        n_t = 0
        n_y = 0
        for r in range(ch * _ROWS, min((ch + 1) * _ROWS, rows)):
            zt = r // Yt
            yt = r - zt * Yt
            rr = ref[b, zt, yt] if do_counts else ref[0, 0, 0]
            if do_counts and count_ref:
                ry = np.int32(0)
                for x in range(Xt):
                    ry += np.int32(rr[x] != 0)
                n_y += ry
            if not okb:
                if do_maps:
                    for x in range(Xt):
                        binary[b, zt, yt, x] = False
                        prob[b, zt, yt, x] = np.nan
                continue
            if identity:
                a0 = zb[r * Xt:(r + 1) * Xt]
                if do_counts:
                    rn = np.int32(0)
                    rt = np.int32(0)
                    for x in range(Xt):
                        p = np.int32(a0[x] > m)
                        rn += p
                        rt += p & np.int32(rr[x] != 0)
                    n_p += rn
                    n_t += rt
                if do_maps:
                    for x in range(Xt):
                        v = a0[x]
                        binary[b, zt, yt, x] = v > m
                        prob[b, zt, yt, x] = 1.0 / (1.0 + np.exp(2.0 * m - 2.0 * v))
                continue
            c00, c01, c10, c11, a0, a1, a2, a3 = _target_row(A, b, Ys, zt, yt, iz0, iz1, wz0, wz1, iy0, iy1,
                                                             wy0, wy1)
            if do_maps:
                for x in range(Xt):
                    v = c00 * a0[x] + c01 * a1[x] + c10 * a2[x] + c11 * a3[x]
                    binary[b, zt, yt, x] = v > m
                    prob[b, zt, yt, x] = 1.0 / (1.0 + np.exp(2.0 * m - 2.0 * v))
        if do_counts:
            cnt[b, ch, 0] = n_p
            cnt[b, ch, 1] = n_t
            cnt[b, ch, 2] = n_y


@njit(nogil=True, cache=True, fastmath=_FM)
def decide_counts_range(lo, hi, A, mid, ok, ref, count_ref, Ys, Zt, Yt, Xt, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                        cnt):
    """Work items [lo, hi) = (sample, block of ``_ROWS`` target rows) on a resized grid: the
    block's (positives, positives in ``ref``, ``|ref|``) of ``R z[b] > mid[b]`` into
    ``cnt[b, block]`` (``|ref|`` only with ``count_ref``, else 0), from the rows of ``A`` (z
    interpolated along x). A kernel of its own: the same loop inside :func:`decide_range`, next
    to the maps' and the identity grid's loops, ran at about half the speed (64³ → 128³, one
    thread: 1.6-1.9 ms against 0.97 ms here)."""
    nch = cnt.shape[1]
    rows = Zt * Yt
    for i in range(lo, hi):
        b = i // nch
        ch = i - b * nch
        m = mid[b]
        okb = ok[b]
        n_p = 0
        n_t = 0
        n_y = 0
        r0 = ch * _ROWS
        r1 = min((ch + 1) * _ROWS, rows)
        if count_ref:
            for r in range(r0, r1):
                zt = r // Yt
                rr = ref[b, zt, r - zt * Yt]
                ry = np.int32(0)
                for x in range(Xt):
                    ry += np.int32(rr[x] != 0)
                n_y += ry
        for r in range(r0, r1 if okb else r0):
            zt = r // Yt
            yt = r - zt * Yt
            rr = ref[b, zt, yt]
            c00, c01, c10, c11, a0, a1, a2, a3 = _target_row(A, b, Ys, zt, yt, iz0, iz1, wz0, wz1, iy0, iy1,
                                                             wy0, wy1)
            rn = np.int32(0)
            rt = np.int32(0)
            for x in range(Xt):
                p = np.int32(c00 * a0[x] + c01 * a1[x] + c10 * a2[x] + c11 * a3[x] > m)
                rn += p
                rt += p & np.int32(rr[x] != 0)
            n_p += rn
            n_t += rt
        cnt[b, ch, 0] = n_p
        cnt[b, ch, 1] = n_t
        cnt[b, ch, 2] = n_y


def decide(z, mid, status, ref, do_counts, do_maps, identity, src, tgt, weights, npos, tp, ny, binary, prob,
           count_ref=True):
    """Decisions ``R z[b] > mid[b]`` on the (Zt, Yt, Xt) target grid.

    With ``do_counts``: positives, positives in ``ref`` and ``|ref|`` per sample (a sample whose
    status is not OK has no positives); ``count_ref=False`` leaves ``ny`` as it is, for a caller
    that already has ``|ref|`` (the tensors of one batch share their reference: counting it
    again cost 10-20 % of this function, ``benchmarks/volume.py --decide``). With ``do_maps``:
    ``binary`` and ``prob`` = sigmoid(2·(R z - mid)) (False and NaN for such samples). ``z`` is
    (B, Zs·Ys·Xs) float64; ``ref`` (B, Zt, Yt, Xt) uint8 is read only with ``do_counts``, the
    maps only written with ``do_maps`` (the others may be empty dummies). Counts are integers,
    added per block after the parallel part: they do not depend on the thread count.
    """
    B = z.shape[0]
    Zs, Ys, Xs = src
    Zt, Yt, Xt = tgt
    iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, ix0, ix1, wx0, wx1 = weights
    ok = status == _OK
    A = np.empty((B, 0 if identity else Zs * Ys, Xt))
    if not identity:
        parallel_for(interp_range, B * Zs * Ys, z, ok, Xs, ix0, wx1, A, chunks_per_thread=2)
    nch = (Zt * Yt + _ROWS - 1) // _ROWS
    cnt = np.zeros((B, nch, 3), dtype=np.int64)
    if do_counts and not identity:
        parallel_for(decide_counts_range, B * nch, A, mid, ok, ref, count_ref, Ys, Zt, Yt, Xt, iz0, iz1, wz0, wz1,
                     iy0, iy1, wy0, wy1, cnt, chunks_per_thread=4)
    if identity or do_maps:  # on a resized grid, the maps alone
        parallel_for(decide_range, B * nch, z, A, mid, ok, ref, do_counts and identity, count_ref, do_maps, identity,
                     Ys, Zt, Yt, Xt, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1, cnt, binary, prob, chunks_per_thread=4)
    if do_counts:
        tot = cnt.sum(axis=1)
        npos[:] = tot[:, 0]
        tp[:] = tot[:, 1]
        if count_ref:
            ny[:] = tot[:, 2]
