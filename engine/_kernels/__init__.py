"""Private Numba kernels behind :mod:`engine.scores` (SPEC §1-3). Pure functions, no I/O.

Modules: :mod:`.adjoint` (the resize adjoint for the guide weights), :mod:`.general` (any
strides), :mod:`.fused` (C-contiguous channels-first, one read of the features),
:mod:`.channels_last` (channels-last storage, one sample's positions split over the threads in
fixed tiles), :mod:`.units` (unit-level counts, any layout), :mod:`.counting` (decisions,
confusion counts, Dice), :mod:`.baseline` (the label-free baselines), :mod:`.resize` (the
materialising linear resize), :mod:`.half` (saved probability maps to float16, NumPy's bits),
:mod:`.labels` (which labels a mask holds), :mod:`.simd` (explicit vector loops as Numba intrinsics:
the channels-last passes, the transposes of :mod:`.layout`, which copies volumes stored with their
axes reversed to C order).
Importing this package first settles the process set-up once: where Numba caches compiled code
and how idle OpenMP threads wait (:mod:`._env`), and that a cached kernel is stale when any
kernel source changed, not only its own file (:mod:`._cache`).

Compile time: nothing is compiled eagerly; a kernel is compiled (or loaded from the cache) the
first time it meets a dtype/layout. The kernels a cold ``protoseg demo`` meets (channels-last,
units, resize, baselines) are serial ``nogil`` functions of a range of work items, run over
the threads by :func:`._pool.parallel_for`, not ``parallel=True`` parfor kernels, which cost
1.5-2.3x more to compile (``benchmarks/RESULTS.md``, "Cold start, unit level and
channels-last re-measured"). The fused and general channels-first kernels keep
``parallel=True``.

Conventions (the driver in :mod:`engine.scores` guarantees them; nothing is checked here):

- ``F`` features ``(B, C, Zs, Ys, Xs)`` or, with ``channels_last=True``, ``(B, Zs, Ys, Xs, C)``,
  float32 or float64, any strides (1-D and 2-D inputs are padded with unit axes). Channels-last
  arrays are indexed in their own order, so a contiguous one keeps contiguous inner loops
  (3-5x faster than a strided ``moveaxis`` view, measured).
- ``g`` guide and ``m`` tissue mask ``(B, Zt, Yt, Xt)`` on the reference (target) grid,
  float32 or float64 (``m`` is a ``(1, 1, 1, 1)`` dummy when ``has_mask`` is False);
  ``ref`` reference ``(B, Zt, Yt, Xt)`` uint8 in {0, 1}.
- Per axis linear weights ``(i0, i1, w0, w1)`` from :func:`engine.resize.linear_weights`
  (source length → target length); ``identity`` is True when the grids are equal.
- Outputs are preallocated by the caller; each ``prange`` worker writes only its own
  sample (or sample × channel) slice.

Arithmetic is float64. The fast-math flags are limited to ``reassoc`` and ``contract`` so that
sums vectorise while NaN and Inf keep their IEEE meaning: a non-finite feature anywhere makes
the unnormalised prototype sums non-finite (``0 * NaN`` stays NaN), which is how non-finite
samples are detected without a separate pass.

Upsample mode never materialises the upsampled features. With ``R`` the separable linear
resize: prototypes ``P = F · Rᵀ(g·m) / Σ g·m`` and ``N = F · Rᵀ((1-g)·m) / Σ (1-g)·m``;
the decision ``d⁺ - d⁻ = 2·R(F·(P-N)) - (‖P‖² - ‖N‖²) > 0`` needs only the upsampled scalar map
``z = F·(P-N)``; per unit the decision is ``sign(P_c - N_c)·(R F_c - (P_c + N_c)/2) > 0``.
Resizing is evaluated row by row: each source row is first interpolated along x (once), then
every target row combines two (2-D) or four (3-D) of those rows.
"""
from __future__ import annotations

import os

from engine._kernels._cache import install as _stamp_cache
from engine._kernels._env import ensure_cache_dir, prefer_passive_waiting

ensure_cache_dir(os.path.dirname(os.path.abspath(__file__)))
prefer_passive_waiting()
_stamp_cache()  # a change to any kernel source recompiles every kernel (see _cache)

__all__: list[str] = []  # private package
