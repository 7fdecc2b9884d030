"""Device kernels (numba-cuda) for the GPU data path, and their CPU twins (Numba ``njit``).

The twins are not the production CPU kernels of :mod:`.fused` / :mod:`.general` (those use
``reassoc``/``contract`` fast-math and float64 weights, so their rounding depends on the
vector width): they are written here, beside the device kernels, and follow the device's
arithmetic operation for operation. A device run and its twin give **bitwise** equal
guide weights, partial sums and counts; :mod:`engine.gpu` compares them in its self-check.

Why the results can be bit-identical across CPU and GPU (see ``docs/gpu.md``):

- every product has two float32 factors (features, guide weights, resize weights, the
  prototype difference ``D``, and the two float32 halves of the scalar map ``z``), evaluated
  in float64, where it is exact (24 + 24 significant bits < 53). A contracted multiply-add
  ``fma(a, b, acc)`` then rounds exactly as ``acc + a*b`` does, so NVVM's contraction (which
  numba-cuda cannot switch off) changes nothing;
- every product of three factors is rounded to float32 in between (``float32(wz*wy)``,
  then ``float32(·*wx)``): a rounding of an exact product, never fused with an addition;
- every float sum runs in one documented order (below); integer counts use atomics (integer
  addition is associative, so their order does not matter); no float atomics;
  ``fastmath=False`` on both sides.

Summation orders (``TPB`` threads per block, ``items`` positions per thread):

- guide weights on the target grid (host): ``wf = float32(g·m)``, ``wb = float32((1-g)·m)``
  (``g`` itself and ``float32(1-g)`` without a mask); ``Σm``, ``Σwf``, ``Σwb`` in position order.
- resize adjoint (:func:`adjoint_twin`): per source position, the taps along z, then y,
  then x (each axis: the targets reading it through ``w0`` in ascending order, then those
  reading it through ``w1``; zero weights dropped), ``c = float32(float32(wz·wy)·wx)``,
  ``acc += c·wf[t]`` in float64, stored as float32.
- prototype partial sums (:func:`partials_twin`): one block per (sample, channel, chunk of
  ``TPB·items`` positions); lane ``l`` sums positions ``chunk_start + l + i·TPB`` for
  ``i = 0 … items-1`` in order, then a stride-halving tree in shared memory
  (``lane[l] += lane[l + stride]``, stride ``TPB/2 … 1``). The host adds the chunks in order.
- ``z = F·D`` (:func:`project_twin`): channels in ascending order per position.
- the upsampled decision (:func:`layer_counts_twin`): per target position the corners in
  order (z0, z1) × (y0, y1) × (x0, x1) (one corner along an identity axis), weight
  ``c = float32(float32(wz·wy)·wx)``, ``acc += c·zh; acc += c·zl`` with
  ``zh = float32(z)``, ``zl = float32(z - zh)`` (48 significant bits of ``z``). On an
  identity grid ``z`` itself is compared.
- unit level (:func:`unit_counts_twin`): ``acc += c·F[corner]`` in the same corner order.

Device kernels are built on first use by :func:`device_kernels` (``numba.cuda`` is imported
there, never at module import, so ``import engine`` stays fast and CPU-only machines never
touch it). Everything here is private; :mod:`engine.gpu` is the driver.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import njit

__all__: list[str] = []  # private module

#: Threads per block of every reduction kernel (a power of two; the shared-memory tree halves it).
TPB = 128
#: Positions per thread in one prototype block: a chunk is ``TPB * ITEMS`` positions.
ITEMS = 8


# --------------------------------------------------------------------------- host-only steps
# (run on the CPU for both backends: their inputs are small, or on the host anyway)
@njit(cache=True)
def guide_weights(g, m, has_mask, wf, wb, sums):
    """wf = float32(g·m), wb = float32((1-g)·m) per target position; sums[b] = (Σm, Σwf, Σwb).

    ``g``, ``m`` (B, T) float32 or float64 (``m`` ignored without a mask); outputs float32 (B, T)
    and float64 (B, 3). Sums in position order.
    """
    B, T = g.shape
    for b in range(B):
        sm = 0.0
        sf = 0.0
        sb = 0.0
        for t in range(T):
            gv = np.float64(g[b, t])
            if has_mask:
                mv = np.float64(m[b, t])
                f = np.float32(gv * mv)
                k = np.float32((1.0 - gv) * mv)
                sm += mv
            else:
                f = np.float32(gv)
                k = np.float32(1.0 - gv)
            wf[b, t] = f
            wb[b, t] = k
            sf += np.float64(f)
            sb += np.float64(k)
        if not has_mask:
            sm = float(T)
        sums[b, 0] = sm
        sums[b, 1] = sf
        sums[b, 2] = sb


@njit(cache=True)
def reduce_partials(partials, sums_f, sums_b):
    """sums_f[b, c] = Σ_k partials[b, c, k, 0] (k ascending), sums_b likewise with [..., 1]."""
    B, C, K, _ = partials.shape
    for b in range(B):
        for c in range(C):
            af = 0.0
            ab = 0.0
            for k in range(K):
                af += partials[b, c, k, 0]
                ab += partials[b, c, k, 1]
            sums_f[b, c] = af
            sums_b[b, c] = ab


@njit(cache=True)
def finalize(sums_f, sums_b, sums, ok_code, codes, P, N, status):
    """Status per sample (non-finite, empty mask/foreground/background, ok) and prototypes.

    ``codes`` = (NONFINITE, EMPTY_MASK, EMPTY_FOREGROUND, EMPTY_BACKGROUND), as in
    :func:`engine._kernels.general._finalize`; P, N are NaN when undefined.
    """
    B, C = sums_f.shape
    for b in range(B):
        total = 0.0
        for c in range(C):
            total += sums_f[b, c] + sums_b[b, c]
        sm = sums[b, 0]
        sf = sums[b, 1]
        sb = sums[b, 2]
        if not np.isfinite(total):
            code = codes[0]
        elif sm == 0.0:
            code = codes[1]
        elif sf == 0.0:
            code = codes[2]
        elif sb == 0.0:
            code = codes[3]
        else:
            code = ok_code
        status[b] = code
        for c in range(C):
            if code == ok_code:
                P[b, c] = sums_f[b, c] / sf
                N[b, c] = sums_b[b, c] / sb
            else:
                P[b, c] = np.nan
                N[b, c] = np.nan


@njit(cache=True)
def layer_threshold(P, N, ok, D, mid):
    """D = float32(P - N) (the multiplicand of the features) and the threshold
    mid = ½·Σ_c D_c·(P_c + N_c) (channels in order): the decision ``F·D > mid`` is the
    hyperplane normal to D through (P + N)/2, i.e. ``d⁺ > d⁻`` with D rounded to float32."""
    B, C = P.shape
    for b in range(B):
        if not ok[b]:
            for c in range(C):
                D[b, c] = 0.0
            mid[b] = 0.0
            continue
        k = 0.0
        for c in range(C):
            d = np.float32(P[b, c] - N[b, c])
            D[b, c] = d
            k += np.float64(d) * (P[b, c] + N[b, c])
        mid[b] = 0.5 * k


def adjoint_taps(i0: np.ndarray, i1: np.ndarray, w0: np.ndarray, w1: np.ndarray,
                 n_src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis of the resize adjoint as CSR taps: for source index j, ``ptr[j]:ptr[j+1]``
    index ``(target, float32 weight)`` pairs — the targets reading j through ``w0`` in
    ascending order, then those reading it through ``w1``; zero weights dropped (they add
    exactly +0 to a sum of non-negative terms)."""
    w0f = np.asarray(w0, dtype=np.float32)
    w1f = np.asarray(w1, dtype=np.float32)
    ptr = np.zeros(n_src + 1, dtype=np.int64)
    tt: list[int] = []
    ww: list[float] = []
    for j in range(n_src):
        for t in np.flatnonzero((i0 == j) & (w0f != 0)):
            tt.append(int(t))
            ww.append(float(w0f[t]))
        for t in np.flatnonzero((i1 == j) & (w1f != 0)):
            tt.append(int(t))
            ww.append(float(w1f[t]))
        ptr[j + 1] = len(tt)
    return ptr, np.asarray(tt, dtype=np.int64), np.asarray(ww, dtype=np.float32)


# --------------------------------------------------------------------------- CPU twins
@njit(cache=True)
def adjoint_twin(wf, wb, tgt, src, zp, zt, zw, yp, yt, yw, xp, xt, xw, Wf, Wb):
    """Wf[b, s] = float32(Σ c·wf[b, t]) over the taps of s (order: module docstring)."""
    B = wf.shape[0]
    Yt = tgt[1]
    Xt = tgt[2]
    Ys = src[1]
    Xs = src[2]
    S = src[0] * Ys * Xs
    for b in range(B):
        for s in range(S):
            zs = s // (Ys * Xs)
            r = s - zs * (Ys * Xs)
            ys = r // Xs
            xs = r - ys * Xs
            af = 0.0
            ab = 0.0
            for kz in range(zp[zs], zp[zs + 1]):
                tz = zt[kz]
                wz = np.float64(zw[kz])
                for ky in range(yp[ys], yp[ys + 1]):
                    ty = yt[ky]
                    czy = np.float32(wz * np.float64(yw[ky]))
                    row = (tz * Yt + ty) * Xt
                    for kx in range(xp[xs], xp[xs + 1]):
                        c = np.float64(np.float32(np.float64(czy) * np.float64(xw[kx])))
                        t = row + xt[kx]
                        af += c * np.float64(wf[b, t])
                        ab += c * np.float64(wb[b, t])
            Wf[b, s] = np.float32(af)
            Wb[b, s] = np.float32(ab)


@njit(cache=True)
def partials_twin(F, channels_last, Wf, Wb, items, tpb, out):
    """out[b, c, k] = (Σ F·Wf, Σ F·Wb) over chunk k: lanes, then the shared-memory tree."""
    B = F.shape[0]
    if channels_last:
        S = F.shape[1]
        C = F.shape[2]
    else:
        C = F.shape[1]
        S = F.shape[2]
    K = out.shape[2]
    chunk = tpb * items
    lf = np.empty(tpb)
    lb = np.empty(tpb)
    for b in range(B):
        for c in range(C):
            for k in range(K):
                base = k * chunk
                for lane in range(tpb):
                    af = 0.0
                    ab = 0.0
                    for i in range(items):
                        s = base + lane + i * tpb
                        if s < S:
                            f = np.float64(F[b, s, c]) if channels_last else np.float64(F[b, c, s])
                            af += f * np.float64(Wf[b, s])
                            ab += f * np.float64(Wb[b, s])
                    lf[lane] = af
                    lb[lane] = ab
                stride = tpb // 2
                while stride > 0:
                    for lane in range(stride):
                        lf[lane] = lf[lane] + lf[lane + stride]
                        lb[lane] = lb[lane] + lb[lane + stride]
                    stride //= 2
                out[b, c, k, 0] = lf[0]
                out[b, c, k, 1] = lb[0]


@njit(cache=True)
def project_twin(F, channels_last, D, ok, z):
    """z[b, s] = Σ_c F[b, c, s]·D[b, c] (channels ascending), float64; skipped samples untouched."""
    B = F.shape[0]
    if channels_last:
        S = F.shape[1]
        C = F.shape[2]
    else:
        C = F.shape[1]
        S = F.shape[2]
    for b in range(B):
        if not ok[b]:
            continue
        for s in range(S):
            acc = 0.0
            for c in range(C):
                f = np.float64(F[b, s, c]) if channels_last else np.float64(F[b, c, s])
                acc += f * np.float64(D[b, c])
            z[b, s] = acc


@njit(cache=True)
def _corner_value(a, b, row0, t, tgt, src, identity, split, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                  ix0, ix1, wx0, wx1, nz, ny, nx):
    """R a at target position t of sample row ``row0`` of the flat (rows, S) array ``a``."""
    Yt = tgt[1]
    Xt = tgt[2]
    Ys = src[1]
    Xs = src[2]
    zt = t // (Yt * Xt)
    r = t - zt * (Yt * Xt)
    yt = r // Xt
    xt = r - yt * Xt
    if identity:
        return np.float64(a[row0, t])
    acc = 0.0
    for i in range(nz):
        iz = iz0[zt] if i == 0 else iz1[zt]
        wz = np.float64(wz0[zt] if i == 0 else wz1[zt])
        for j in range(ny):
            iy = iy0[yt] if j == 0 else iy1[yt]
            czy = np.float32(wz * np.float64(wy0[yt] if j == 0 else wy1[yt]))
            for k in range(nx):
                ix = ix0[xt] if k == 0 else ix1[xt]
                c = np.float64(np.float32(np.float64(czy) * np.float64(wx0[xt] if k == 0 else wx1[xt])))
                v = np.float64(a[row0, (iz * Ys + iy) * Xs + ix])
                if split:
                    vh = np.float32(v)
                    vl = np.float32(v - np.float64(vh))
                    acc += c * np.float64(vh)
                    acc += c * np.float64(vl)
                else:
                    acc += c * v
    return acc


@njit(cache=True)
def layer_counts_twin(z, mid, ok, ref, tgt, src, identity, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                      ix0, ix1, wx0, wx1, nz, ny, nx, npos, tp):
    """npos[b] += #(R z > mid[b]), tp[b] += those inside ref[b] (target grid), ok samples only."""
    B, T = ref.shape
    for b in range(B):
        if not ok[b]:
            continue
        n = 0
        t_ = 0
        for t in range(T):
            v = _corner_value(z, b, b, t, tgt, src, identity, True, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                              ix0, ix1, wx0, wx1, nz, ny, nx)
            if v > mid[b]:
                n += 1
                t_ += ref[b, t]
        npos[b] += n
        tp[b] += t_


@njit(cache=True)
def unit_counts_twin(F, channels_last, sign, mid, ref, tgt, src, identity, iz0, iz1, wz0, wz1, iy0, iy1,
                     wy0, wy1, ix0, ix1, wx0, wx1, nz, ny, nx, npos, tp):
    """Per (b, c) with sign[b, c] != 0: count sign·(R F_c - mid[b, c]) > 0 and those in ref[b]."""
    B, T = ref.shape
    C = sign.shape[1]
    S = src[0] * src[1] * src[2]
    row = np.empty((1, S), dtype=np.float32)
    for b in range(B):
        for c in range(C):
            sg = sign[b, c]
            if sg == 0:
                continue
            for s in range(S):
                row[0, s] = F[b, s, c] if channels_last else F[b, c, s]
            n = 0
            t_ = 0
            m = mid[b, c]
            for t in range(T):
                v = _corner_value(row, 0, 0, t, tgt, src, identity, False, iz0, iz1, wz0, wz1, iy0, iy1,
                                  wy0, wy1, ix0, ix1, wx0, wx1, nz, ny, nx)
                p = v > m if sg > 0 else v < m
                if p:
                    n += 1
                    t_ += ref[b, t]
            npos[b, c] += n
            tp[b, c] += t_


# --------------------------------------------------------------------------- device kernels
@functools.lru_cache(maxsize=1)
def device_kernels() -> dict[str, Any]:
    """The numba-cuda kernels of :mod:`.device` (imported, hence compiled, on first use).

    Under ``NUMBA_ENABLE_CUDASIM=1`` these are simulator kernels (bit-identical arithmetic,
    no FMA effects, very slow).
    """
    from engine._kernels.cuda import device

    return {"adjoint": device.adjoint, "partials": device.partials, "project": device.project,
            "layer_counts": device.layer_counts, "unit_counts": device.unit_counts}
