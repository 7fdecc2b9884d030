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

Medians of ``repeat`` interleaved calls after one warm-up; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numba
import numpy as np

from engine import resize
from engine._kernels import general
from engine.scores import _prepare, _unit_block, protoseg, sa_scores
from engine.status import Status

DEEPBRAIN = [(128, 8), (64, 16), (32, 32), (32, 64), (64, 32), (128, 16)]  # (side, channels)


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
    general.unit_kernel(p.F, p.ref, p.identity, True, general._UNIT_BLOCK, *p.weights, P, N, st == Status.OK,
                        np.zeros((B, C), np.int64), np.zeros((B, C), np.int64))
    tgt = p.g.shape[1:]
    general.maps_kernel(p.F, p.g, p.m, False, p.identity, True, *p.weights, P, N, st,
                        np.empty((B, *tgt), np.bool_), np.empty((B, *tgt), np.float32))


def _new_path(f: np.ndarray, g: np.ndarray, y: np.ndarray) -> None:
    sa_scores(f, g, y, level="both", layout="channels_last")
    protoseg(f, g, layout="channels_last")


def _timed(fn, *args) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.volume")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
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
