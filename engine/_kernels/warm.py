"""Compile a run's kernels on two cores before its first batch (a cold Numba cache).

Numba compiles a kernel the first time it meets a signature, one kernel after the other, on
one core. On a cold cache (a fresh install, a new ``NUMBA_CACHE_DIR``) that serial compile
was most of a first ``protoseg demo``'s extra time (about 12 s on 2 cores, led by the
channels-last guide weights, see ``benchmarks/RESULTS.md``). :func:`precompile` splits the
kernels a channels-last 3-D run meets into two groups of about the same compile time: a child
process compiles one (the guide weights, the resize, the baselines, the float16 maps, the
reversed-axes copy of the volumes read) while this process compiles the other (prototype
sums, projection, decisions, unit counts, Dice); both write Numba's on-disk cache, so the run
then loads every kernel from it.

Each group calls the kernels through the same preparation as the engine (``scores._prepare``
on tiny arrays of the run's dtype and layout), so the compiled signatures are the run's; a
test runs the demo's calls in a fresh process after :func:`precompile` and checks that every
kernel came from the cache. Nothing here changes a result: at worst (a signature not met, the
child failing or too slow) a kernel is compiled lazily, as without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np

__all__ = ["precompile", "cache_is_cold"]

#: Seconds to wait for the child's group before going on without it.
_CHILD_TIMEOUT = 300.0


def _tiny(identity: bool, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A tiny channels-last 3-D case: features float32 (1, 3, 3, 3, C) to be resized to a
    (6, 6, 6) guide (float32, binary), or on the guide's grid with ``identity``."""
    side = 6 if identity else 3
    rng = np.random.default_rng(0)
    f = rng.standard_normal((1, side, side, side, channels)).astype(np.float32)
    g = np.zeros((1, 6, 6, 6), np.float32)
    g[0, 1:4, 1:5, 2:5] = 1.0
    return f, g


def _group_child() -> None:
    """The child's kernels: guide weights (resized and identity grids), the linear resize of
    images, the label-free baselines, the float16 maps, the mask label check (uint8), the copy of
    a uint8 NIfTI image and mask to C order."""
    from engine._kernels import channels_last as cl
    from engine.datasets import _c_order
    from engine.quality import baselines
    from engine.resize import resize_linear
    from engine.run.batch import _labels_in, _map16
    from engine.scores import _prepare

    for identity in (False, True):
        f, g = _tiny(identity)
        p = _prepare(f, g, g > 0.5, None, resize="upsample", layout="channels_last")
        cl.guide_weights(p.g, p.m, p.has_mask, p.identity, p.src, p.weights)
    resize_linear(np.zeros((1, 5, 6, 7), np.float32), (4, 4, 4))  # (C, Z, Y, X) image to the input size
    prob = np.full((1, 1, 4, 4, 4), 0.25, np.float32)  # (B, classes, Z, Y, X), one class taken
    baselines(prob[:, 0], threshold=0.5)
    _map16(np.full((1, 2, 2, 2), 0.25, np.float32))
    _labels_in(np.zeros((2, 2, 2), np.uint8))
    # a NIfTI volume's copy to C order (uint8 image to float32, uint8 mask), as the reader makes it
    vol = np.asfortranarray(np.zeros((2, 3, 4), np.uint8))
    _c_order(vol[None], np.float32)
    _c_order(vol, np.uint8)


def _group_main() -> None:
    """This process's kernels: everything ``sa_scores(level="both")`` runs on a resized and an
    identity grid but the guide weights (the child's), which are handed to it as a
    :func:`engine.scores.reuse_guide_weights` entry of the right types."""
    from engine._kernels.fused import _MODE_GUIDE, _MODE_WEIGHTS
    from engine.scores import _GUIDE_WEIGHTS, _prepare, reuse_guide_weights, sa_scores

    # on the identity grid, eight channels are counted as projected (channels_last.
    # project_count_range) and one (the input's SA) through decide_range; a resized grid's
    # counts are decide_counts_range's
    for identity, channels in ((False, 3), (True, 8), (True, 1)):
        f, g = _tiny(identity, channels)
        ref = g > 0.5
        with reuse_guide_weights():
            p = _prepare(f, g, ref, None, resize="upsample", layout="channels_last")
            B = p.g.shape[0]
            n = 0 if p.identity else int(np.prod(p.src))
            gw = (np.full((B, n), 0.5), np.full((B, n), 0.5),
                  np.full(B, _MODE_GUIDE if p.identity else _MODE_WEIGHTS, dtype=np.int64),
                  np.ones((B, 3)), np.zeros(B, dtype=np.int64))
            cache = _GUIDE_WEIGHTS.get()
            assert cache is not None
            cache[p.key] = (*p.held[:2], gw)
            sa_scores(f, g, ref, level="both", layout="channels_last")


def _child_main() -> None:  # pragma: no cover - runs in the child process
    try:
        _group_child()
    except Exception:  # noqa: BLE001 - the run compiles lazily what this did not
        pass


def cache_is_cold() -> bool:
    """True when the heaviest kernel of a channels-last run (the guide weights) has nothing
    usable in the on-disk cache: Numba's cache folder was never filled for this install, or
    it was filled before a kernel source changed (a stale stamp, :mod:`engine._kernels._cache`,
    after which every kernel recompiles)."""
    from engine._kernels import channels_last as cl

    try:
        cache_file = cl.weights_range._cache._cache_file  # Numba's cache of the kernel
        index = cache_file._index_path
        if not os.path.exists(index):
            return True
        return not cache_file._load_index()  # {} when the stamp is not this source's
    except Exception:  # noqa: BLE001 - another Numba's internals, an unreadable index: say warm
        return False


def precompile(*, force: bool = False) -> bool:
    """Compile the kernels of a channels-last 3-D float32 run on two processes at once.

    Parameters
    ----------
    force : bool, default False
        Compile even when :func:`cache_is_cold` says the cache is filled.

    Returns
    -------
    bool
        True when the two groups were compiled here (the cache was cold, or ``force``).

    Notes
    -----
    With one CPU, or a warm cache, it returns False at once. The child is a fresh
    interpreter (``python -c``: it shares nothing but the environment, hence
    ``NUMBA_CACHE_DIR``, and never re-runs the caller's ``__main__``); its failure or a
    timeout (``_CHILD_TIMEOUT``) only leaves its kernels to be compiled lazily.
    """
    if (os.cpu_count() or 1) < 2 or not (force or cache_is_cold()):
        return False
    try:
        child: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-c", "from engine._kernels.warm import _child_main; _child_main()"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:  # no interpreter to start: this process's group only
        child = None
    try:
        _group_main()
    finally:
        if child is not None:
            try:
                child.wait(_CHILD_TIMEOUT)
            except subprocess.TimeoutExpired:  # pragma: no cover - a stuck compile: go on without it
                child.kill()
                child.wait()
    return True
