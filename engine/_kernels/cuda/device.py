"""numba-cuda kernels of the GPU data path; their CPU twins and the summation orders are in
:mod:`engine._kernels.cuda` (the package), which imports this module only on first use.

Each kernel is its twin with the loops over samples/positions replaced by the grid. ``cuda``
is a module global on purpose: the simulator (``NUMBA_ENABLE_CUDASIM=1``) swaps it for its
own module in the kernels' globals.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float64, int64

from engine._kernels.cuda import TPB

__all__: list[str] = []  # private module


@cuda.jit(device=True)
def corner_value(a, row0, t, tgt, src, identity, split, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                 ix0, ix1, wx0, wx1, nz, ny, nx):
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

@cuda.jit(fastmath=False)
def adjoint(wf, wb, tgt, src, zp, zt, zw, yp, yt, yw, xp, xt, xw, Wf, Wb):
    B = wf.shape[0]
    Yt = tgt[1]
    Xt = tgt[2]
    Ys = src[1]
    Xs = src[2]
    S = src[0] * Ys * Xs
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, B * S, step):
        b = i // S
        s = i - b * S
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

@cuda.jit(fastmath=False)
def partials(F, channels_last, Wf, Wb, items, out):
    # one block per (b, c, k): blockIdx.x = (b·C + c)·K + k
    if channels_last:
        S = F.shape[1]
        C = F.shape[2]
    else:
        C = F.shape[1]
        S = F.shape[2]
    K = out.shape[2]
    blk = cuda.blockIdx.x
    b = blk // (C * K)
    rem = blk - b * (C * K)
    c = rem // K
    k = rem - c * K
    lane = cuda.threadIdx.x
    lf = cuda.shared.array(TPB, dtype=float64)
    lb = cuda.shared.array(TPB, dtype=float64)
    base = k * (TPB * items)
    af = 0.0
    ab = 0.0
    for i in range(items):
        s = base + lane + i * TPB
        if s < S:
            f = np.float64(F[b, s, c]) if channels_last else np.float64(F[b, c, s])
            af += f * np.float64(Wf[b, s])
            ab += f * np.float64(Wb[b, s])
    lf[lane] = af
    lb[lane] = ab
    cuda.syncthreads()
    stride = TPB // 2
    while stride > 0:
        if lane < stride:
            lf[lane] = lf[lane] + lf[lane + stride]
            lb[lane] = lb[lane] + lb[lane + stride]
        cuda.syncthreads()
        stride //= 2
    if lane == 0:
        out[b, c, k, 0] = lf[0]
        out[b, c, k, 1] = lb[0]

@cuda.jit(fastmath=False)
def project(F, channels_last, D, ok, z):
    B = F.shape[0]
    if channels_last:
        S = F.shape[1]
        C = F.shape[2]
    else:
        C = F.shape[1]
        S = F.shape[2]
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, B * S, step):
        b = i // S
        s = i - b * S
        if not ok[b]:
            continue
        acc = 0.0
        for c in range(C):
            f = np.float64(F[b, s, c]) if channels_last else np.float64(F[b, c, s])
            acc += f * np.float64(D[b, c])
        z[b, s] = acc

@cuda.jit(device=True)
def block_add(n, t_, sn, st, out_n, out_t, idx):
    # integer tree (order-free) then one integer atomic per block and counter
    lane = cuda.threadIdx.x
    sn[lane] = n
    st[lane] = t_
    cuda.syncthreads()
    stride = TPB // 2
    while stride > 0:
        if lane < stride:
            sn[lane] += sn[lane + stride]
            st[lane] += st[lane + stride]
        cuda.syncthreads()
        stride //= 2
    if lane == 0:
        cuda.atomic.add(out_n, idx, sn[0])
        cuda.atomic.add(out_t, idx, st[0])

@cuda.jit(fastmath=False)
def layer_counts(z, mid, ok, ref, tgt, src, identity, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                 ix0, ix1, wx0, wx1, nz, ny, nx, npos, tp):
    # grid (x: chunks of the target grid, y: sample)
    b = cuda.blockIdx.y
    if not ok[b]:
        return  # the whole block: b is uniform within it
    T = ref.shape[1]
    sn = cuda.shared.array(TPB, dtype=int64)
    st = cuda.shared.array(TPB, dtype=int64)
    n = 0
    t_ = 0
    for t in range(cuda.blockIdx.x * TPB + cuda.threadIdx.x, T, cuda.gridDim.x * TPB):
        v = corner_value(z, b, t, tgt, src, identity, True, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                         ix0, ix1, wx0, wx1, nz, ny, nx)
        if v > mid[b]:
            n += 1
            t_ += ref[b, t]
    block_add(n, t_, sn, st, npos, tp, b)

@cuda.jit(device=True)
def corner_value1(row, t, tgt, src, identity, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                  ix0, ix1, wx0, wx1, nz, ny, nx):
    # corner_value for a 1-D row (one channel): same order, no z split
    Yt = tgt[1]
    Xt = tgt[2]
    Ys = src[1]
    Xs = src[2]
    zt = t // (Yt * Xt)
    r = t - zt * (Yt * Xt)
    yt = r // Xt
    xt = r - yt * Xt
    if identity:
        return np.float64(row[t])
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
                acc += c * np.float64(row[(iz * Ys + iy) * Xs + ix])
    return acc

@cuda.jit(fastmath=False)
def unit_counts(F, channels_last, sign, mid, ref, tgt, src, identity, iz0, iz1, wz0, wz1, iy0, iy1,
                wy0, wy1, ix0, ix1, wx0, wx1, nz, ny, nx, offset, npos, tp):
    # grid (x: chunks of the target grid, y: (sample, channel) pairs from ``offset``)
    C = sign.shape[1]
    bc = offset + cuda.blockIdx.y
    b = bc // C
    c = bc - b * C
    sg = sign[b, c]
    if sg == 0:
        return
    T = ref.shape[1]
    sn = cuda.shared.array(TPB, dtype=int64)
    st = cuda.shared.array(TPB, dtype=int64)
    m = mid[b, c]
    n = 0
    t_ = 0
    # the channel as a (1, S)-shaped row: F[b, c] (channels-first) or F[b, :, c]
    row = F[b, :, c] if channels_last else F[b, c]
    for t in range(cuda.blockIdx.x * TPB + cuda.threadIdx.x, T, cuda.gridDim.x * TPB):
        v = corner_value1(row, t, tgt, src, identity, iz0, iz1, wz0, wz1, iy0, iy1, wy0, wy1,
                          ix0, ix1, wx0, wx1, nz, ny, nx)
        p = v > m if sg > 0 else v < m
        if p:
            n += 1
            t_ += ref[b, t]
    block_add(n, t_, sn, st, npos, tp, (b, c))
