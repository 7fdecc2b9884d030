"""Pipeline benchmark: end-to-end cases/s of scoring against inference alone (issue 3, item 7).

Run as a module::

    python -m benchmarks.pipeline [--cases N] [--size S] [--base B ...] [--deep B ...]
        [--levels L] [--repeat R] [--methods M ...] [--quick] [--write [--results PATH]] [--json PATH]
    python -m benchmarks.pipeline --workload deepbrain [--volumes V] [--repeat R] [--methods M ...]

Workloads (batch 8, images of ``size``×``size`` with one smooth blob each and a mask of that
blob, in one HDF5 file read lazily, one case at a time, as users' data is):

- the two-level test U-Net of :func:`tests.models.unet` (2-D, NCHW, sigmoid head, dynamic
  batch, protoseg metadata, ``base``/``2*base`` channels, one conv per block), with every
  tensor its model card names exposed (11: ``enc1_conv`` … ``head``, pre-activations, the
  pooled map and the concatenation included) — little compute per exposed byte;
- :func:`tests.models.deep_unet`, a more typical U-Net (``levels`` levels, two convs per
  block), with its block outputs exposed as an exporter names them (``layers="auto"``);
- ``--workload deepbrain`` (issue 15): the shipped deepbrain 3-D U-Net
  (``cli/data/deepbrain/deepbrain.onnx``, 15 hidden tensors, channels-last) on ``volumes``
  copies of the shipped Colin27 T1 volume and its mask (``cli/data/colin27/``, 181×217×181,
  NIfTI, resized to 128³ by the model card), batch 1, read from a folder as users' data is.

Up to six methods on the same data, in one process, interleaved (a, b, c, …, a, b, c, …)
because the machine is shared; each figure is the median over repeats after one untimed
warm-up round (``--methods`` picks some):

(a) ``inference``: ``Session.run`` on preprocessed batches (prepared once, outside the timing)
    with the same exposed outputs as the pipeline's session: the targets' baseline;
(a') ``files``: a plain loop that reads each batch from the dataset (the pipeline's reader),
    preprocesses it with the model card and runs it (same session and outputs), one step after
    the other: what running the network on the files costs before any scoring. Not a target's
    baseline; the report also gives the overheads of (b) and (c) against it, which leave out
    the input handling that (a) does not include;
(b) ``layer``: :func:`engine.run.score_dataset` with ``level="layer"``;
(c) ``both``: :func:`engine.run.score_dataset` with ``level="both"`` (layer and unit SA);
(b') ``layer_seq`` and (c') ``both_seq``: the same with the stages run one after the other
    (``PROTOSEG_OVERLAP=0``: no read-ahead and no write-behind thread), the A/B of the
    overlapped stages of :mod:`engine.run.stages`;
(a'') ``sweeps`` (only when asked for; features stored channels-last, as deepbrain's): (a') plus,
    after each batch's run, the two passes over the features that exact layer-level SA cannot
    do without, with today's kernels: the prototype sums and the projection ``z = F·(P-N)``
    (``engine._kernels.channels_last.prototypes``) of every tensor the pipeline reads (a skip
    concatenation scored from its parts is not read). The guide (the first batch's reference)
    and its weights are prepared once, outside the timing; no decisions, counts, baselines,
    input SA, guides or store. A floor under (b): what the input handling and the two
    memory-bound passes cost before anything else of the scoring.

(b) and (c) run with ``input_sa=True`` (the default) and a fresh store each time
(``overwrite=True``): they include reading the data, preprocessing, building the session,
scoring, and writing and finalising the store. During (b) and (c) the phases are timed by
wrapping the functions the pipeline calls (dataset reads, ``ModelCard.preprocess``,
``Session.run``, ``sa_scores``, the baselines, ``StoreWriter.write_batch`` / ``finalize``), so
that a missed target can be attributed to a phase. The main thread's waits on the stages are
timed too (``ReadAhead.__next__``, ``WriteBehind.submit`` / ``drain``): with the overlap, the
reads and writes run in their own threads and only these waits are exposed; the reads' and
writes' own time is reported apart as background time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numba
import numpy as np
import onnxruntime as ort

import engine.quality
import engine.scores
from engine.datasets import Dataset, open_dataset
from engine.model.card import ModelCard, resolve_model_card
from engine._kernels import channels_last as _cl
from engine.model.graph import concat_blocks, expose, list_hidden_tensors, load_model, select_tensors
from engine.model.session import Session, make_session
from engine.resize import resize_nearest
from engine.run import score_dataset
from engine.run.stages import OVERLAP_ENV, ReadAhead, WriteBehind
from engine.store import StoreWriter
from tests.models import deep_unet, save, tiny_conv, unet

__all__ = [
    "Workload",
    "make_images",
    "write_hdf5_dataset",
    "build_workload",
    "build_deepbrain",
    "PhaseTimer",
    "prepare_sweeps",
    "time_files",
    "time_inference",
    "time_pipeline",
    "machine",
    "run",
    "format_section",
    "write_section",
    "main",
]

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Pipeline"
BATCH = 8
METHODS = ("inference", "files", "layer", "both", "layer_seq", "both_seq", "sweeps")
#: Methods timed by default (``sweeps`` only when asked for).
DEFAULT_METHODS = METHODS[1:6]
#: Methods timed without phases (no scoring run): (a), (a') and (a'').
BASELINES = ("inference", "files", "sweeps")
#: Overhead targets over inference alone, per workload kind: issue 3 for the two-level U-Net,
#: issue 15 for the deep 2-D U-Net and deepbrain (wall and CPU both).
TARGETS = {"unet": {"layer": 0.15, "both": 0.60}, "deep": {"layer": 0.10, "both": 0.40},
           "deepbrain": {"layer": 0.15, "both": 0.50}}
GENERATED = ("U-Net base ", "deepbrain ")  # titles of the ### subsections this module writes
DATA = Path(__file__).resolve().parents[1] / "cli" / "data"


# --------------------------------------------------------------------------------------------
# workload
# --------------------------------------------------------------------------------------------
def make_images(n_cases: int, size: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic cases: one smooth bright blob on a noisy background, and its mask.

    Parameters
    ----------
    n_cases, size : int
        Number of cases and the side of the square images.
    seed : int
        Random seed.

    Returns
    -------
    images : numpy.ndarray
        float32 (n_cases, 1, size, size).
    masks : numpy.ndarray
        uint8 (n_cases, size, size), 1 inside the blob (never empty, never full).

    Raises
    ------
    ValueError
        ``n_cases < 1`` or ``size < 8``.

    Examples
    --------
    >>> images, masks = make_images(3, 16, seed=2)
    >>> images.shape, images.dtype, masks.shape, masks.dtype
    ((3, 1, 16, 16), dtype('float32'), (3, 16, 16), dtype('uint8'))
    >>> [bool(0 < m.sum() < m.size) for m in masks]  # both prototypes exist
    [True, True, True]
    >>> [bool(i[0][m == 1].mean() > i[0][m == 0].mean() + 0.3) for i, m in zip(images, masks)]
    [True, True, True]
    >>> bool(np.array_equal(make_images(3, 16, seed=2)[0], images))  # the seed fixes them
    True
    >>> make_images(2, 4)
    Traceback (most recent call last):
    ...
    ValueError: n_cases=2, size=4; expected n_cases >= 1 and size >= 8
    """
    if int(n_cases) < 1 or int(size) < 8:
        raise ValueError(f"n_cases={n_cases!r}, size={size!r}; expected n_cases >= 1 and size >= 8")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n_cases, 1, size, size), np.float32)
    masks = np.empty((n_cases, size, size), np.uint8)
    for i in range(n_cases):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        r = rng.uniform(0.12, 0.25)
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2
        blob = np.exp(-d2)
        images[i, 0] = blob + rng.normal(0.0, 0.1, (size, size)).astype(np.float32)
        masks[i] = d2 < 1.0
    return images, masks


def write_hdf5_dataset(path: str | os.PathLike[str], images: np.ndarray, masks: np.ndarray) -> Path:
    """Write ``images`` and ``masks`` into one HDF5 file (one chunk per case) for lazy reading.

    Parameters
    ----------
    path : path
        Output file (``.h5``).
    images, masks : numpy.ndarray
        (N, C, *spatial) and (N, *spatial).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(1,) + images.shape[1:])
        f.create_dataset("masks", data=masks, chunks=(1,) + masks.shape[1:])
    return path


@dataclass
class Workload:
    """Files of one benchmark run.

    Attributes
    ----------
    model, data : pathlib.Path
        The ONNX U-Net (with metadata) and the HDF5 dataset.
    n_cases, size, base : int
        Cases, image side, first-level channels of the U-Net.
    tensors : list of str
        The hidden tensors the pipeline exposes (``layers="auto"``).
    """

    model: Path
    data: Path
    n_cases: int
    size: int
    base: int
    tensors: list[str] = field(default_factory=list)
    kind: str = "unet"
    levels: int = 2
    batch: int = BATCH


def build_workload(folder: str | os.PathLike[str], *, n_cases: int = 64, size: int = 256,
                   base: int = 16, seed: int = 0, kind: str = "unet", levels: int = 4) -> Workload:
    """Write the U-Net and the dataset into ``folder``.

    Parameters
    ----------
    folder : path
        Where ``unet.onnx`` and ``data.h5`` go.
    n_cases, size, base : int
        Cases, image side (even), first-level channels.
    seed : int
        Seed of the weights and the images.
    kind : {"unet", "deep"}
        ``"unet"``: :func:`tests.models.unet` (two levels, one conv per block, 11 named
        tensors including pre-activations, the pooled map and the concatenation);
        ``"deep"``: :func:`tests.models.deep_unet` with ``levels`` levels (block outputs only).
    levels : int
        Depth of the ``"deep"`` model.

    Returns
    -------
    Workload

    Raises
    ------
    ValueError
        A size that is odd or below 8, ``base < 1``, or ``n_cases < 1``.

    Examples
    --------
    The U-Net exposes every tensor its model card names, and the dataset reads back the
    images and masks of :func:`make_images`:

    >>> import tempfile
    >>> from tests.models import HIDDEN_NCHW
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     w = build_workload(tmp, n_cases=5, size=16, base=2)
    ...     ds = open_dataset(w.data)
    ...     images, masks = make_images(5, 16)
    ...     (w.tensors == list(HIDDEN_NCHW), len(ds), ds.has_masks,
    ...      bool(np.array_equal(ds[4].image, images[4])), bool(np.array_equal(ds[4].mask, masks[4])))
    (True, 5, True, True, True)
    >>> build_workload(".", n_cases=2, size=15, base=2)
    Traceback (most recent call last):
    ...
    ValueError: size=15, base=2; expected an even size >= 8 and base >= 1
    """
    if int(size) % 2 or int(size) < 8 or int(base) < 1:
        raise ValueError(f"size={size!r}, base={base!r}; expected an even size >= 8 and base >= 1")
    if kind not in ("unet", "deep"):
        raise ValueError(f"kind={kind!r}; expected 'unet' or 'deep'")
    folder = Path(folder)
    if kind == "deep":
        proto = deep_unet(levels=levels, base=base, size=size, seed=seed)
    else:
        proto = unet(ndim=2, batch="N", size=int(size), base=int(base), seed=seed, metadata=True)
    model = save(proto, folder / "unet.onnx")
    images, masks = make_images(n_cases, size, seed=seed)
    data = write_hdf5_dataset(folder / "data.h5", images, masks)
    tensors = [t.name for t in select_tensors(list_hidden_tensors(proto), "auto")]
    return Workload(model=model, data=data, n_cases=int(n_cases), size=int(size), base=int(base),
                    tensors=tensors, kind=kind, levels=int(levels) if kind == "deep" else 2)


def build_deepbrain(folder: str | os.PathLike[str], *, volumes: int = 8) -> Workload:
    """The deepbrain workload: the shipped model and ``volumes`` copies of Colin27 in ``folder``.

    The copies are hard links where the file system allows (else copies) named
    ``vol000.nii.gz``, ``vol000_mask.nii.gz``, ...: a folder of image/mask pairs, read one
    NIfTI case at a time as a user's folder is. Building again into the same folder keeps
    the links already there (and replaces any other file of those names).

    Parameters
    ----------
    folder : path
        Where the ``data/`` folder goes.
    volumes : int
        Cases (volumes) in the dataset.

    Returns
    -------
    Workload
        ``kind="deepbrain"``, batch 1, the tensors ``layers="auto"`` selects.

    Raises
    ------
    ValueError
        ``volumes < 1``.
    """
    if int(volumes) < 1:
        raise ValueError(f"volumes={volumes!r}; expected at least 1 volume")
    model = DATA / "deepbrain" / "deepbrain.onnx"
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(int(volumes)):
        for src, suffix in (("colin27.nii.gz", ""), ("colin27_mask.nii.gz", "_mask")):
            dst = data / f"vol{i:03d}{suffix}.nii.gz"
            if dst.exists() and os.path.samefile(DATA / "colin27" / src, dst):
                continue  # built before in this folder (a hard link)
            dst.unlink(missing_ok=True)
            try:
                os.link(DATA / "colin27" / src, dst)
            except OSError:
                shutil.copyfile(DATA / "colin27" / src, dst)
    tensors = [t.name for t in select_tensors(list_hidden_tensors(load_model(model)), "auto")]
    return Workload(model=model, data=data, n_cases=int(volumes), size=128, base=8, tensors=tensors,
                    kind="deepbrain", levels=4, batch=1)


# --------------------------------------------------------------------------------------------
# phase timing
# --------------------------------------------------------------------------------------------
class PhaseTimer:
    """Wall time spent inside named functions, accumulated while :meth:`patched` is active.

    Wrapping replaces a function object on its owner (a class or a module) for the duration
    of the ``with`` block and restores it afterwards; nested calls of timed functions are
    counted in each (an outer phase includes its inner ones), except a call of a phase inside
    the same phase, counted once (``read_cases`` reading through ``__getitem__``,
    ``sa_scores_concat`` falling back to ``sa_scores``). Calls made in the main thread
    count in :attr:`seconds` and :attr:`cpu` (process CPU: every thread's, during the call);
    calls made in other threads (the stages' reading and writing threads) count apart, in
    :attr:`background` (wall) and :attr:`background_cpu` (that thread's own CPU time), since
    they overlap the main thread's work.

    Examples
    --------
    >>> class Owner:
    ...     def f(self, x):
    ...         return x + 1
    >>> original = Owner.__dict__["f"]
    >>> timer = PhaseTimer()
    >>> with timer.patched([("f", Owner, "f")]):
    ...     Owner().f(1) + Owner().f(2), Owner.__dict__["f"] is original
    (5, False)
    >>> timer.calls["f"], timer.seconds["f"] >= 0.0, Owner.__dict__["f"] is original
    (2, True, True)
    >>> dict(timer.background)  # nothing ran outside the main thread
    {}
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.background: dict[str, float] = defaultdict(float)
        self.background_cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._active = threading.local()  # phases being timed in this thread

    def _wrap(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            active = self._active.__dict__.setdefault("names", set())
            if name in active:  # a call of the same phase inside it (read_cases → __getitem__): once
                return func(*args, **kwargs)
            active.add(name)
            try:
                return self._timed(name, func, args, kwargs)
            finally:
                active.discard(name)

        return timed

    def _timed(self, name: str, func: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        main = threading.current_thread() is threading.main_thread()
        clock = time.process_time if main else time.thread_time
        t0, c0 = time.perf_counter(), clock()
        try:
            return func(*args, **kwargs)
        finally:
            wall, cpu = time.perf_counter() - t0, clock() - c0
            with self._lock:
                (self.seconds if main else self.background)[name] += wall
                (self.cpu if main else self.background_cpu)[name] += cpu
                self.calls[name] += 1

    @contextlib.contextmanager
    def patched(self, targets: Sequence[tuple[str, Any, str]]) -> Iterator[PhaseTimer]:
        """Time ``owner.attr`` under ``name`` for each ``(name, owner, attr)`` in ``targets``."""
        saved = []
        try:
            for name, owner, attr in targets:
                original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
                saved.append((owner, attr, original))
                setattr(owner, attr, self._wrap(name, getattr(owner, attr)))
            yield self
        finally:
            for owner, attr, original in reversed(saved):
                setattr(owner, attr, original)


def _bindings(func: Callable[..., Any]) -> list[tuple[Any, str]]:
    """Every loaded ``engine`` module attribute bound to ``func``: the module that defines it and
    each one that imported it by name, so that its calls are timed however the pipeline
    looks it up (``from engine.scores import sa_scores`` copies the binding)."""
    modules = [m for name, m in sorted(sys.modules.items()) if name == "engine" or name.startswith("engine.")]
    return [(m, attr) for m in modules for attr, value in list(vars(m).items()) if value is func]


def _pipeline_targets() -> list[tuple[str, Any, str]]:
    return [
        ("read", Dataset, "__getitem__"),
        ("read", Dataset, "read_cases"),
        ("read_wait", ReadAhead, "__next__"),
        ("preprocess", ModelCard, "preprocess"),
        ("inference", Session, "run"),
        *[("sa_scores", m, attr) for m, attr in _bindings(engine.scores.sa_scores)],
        # a concatenation and its parts in one call (counted once with the sa_scores it may make)
        *[("sa_scores", m, attr) for m, attr in _bindings(engine.scores.sa_scores_concat)],
        *[("baselines", m, attr) for m, attr in _bindings(engine.quality.baselines)],
        ("write_batch", StoreWriter, "write_batch"),
        ("store_wait", WriteBehind, "submit"),
        ("store_wait", WriteBehind, "drain"),
        ("finalize", StoreWriter, "finalize"),
    ]


#: Rows of the phase table: (row, main-thread phases summed, background phases summed). The
#: main thread's waits on the stages hold the reads and writes of a sequential run (nested),
#: and only the waits of an overlapped one; ``other`` is the run's wall time less the rows.
PHASE_ROWS = (
    ("read", ("read_wait",), ("read",)),
    ("preprocess", ("preprocess",), ()),
    ("inference", ("inference",), ()),
    ("kernels", ("sa_scores", "baselines"), ()),
    ("store", ("store_wait",), ("write_batch",)),
    ("finalize", ("finalize",), ()),
)


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
def _exposed(proto: Any, w: Workload) -> list[Any]:
    """The hidden tensors of ``proto`` that the workload exposes, as the pipeline lists them."""
    return select_tensors([t for t in list_hidden_tensors(proto) if t.name in set(w.tensors)], "all")


def _prepared_batches(w: Workload) -> tuple[Any, list[dict[str, np.ndarray]], list[str]]:
    """The pipeline's session (same exposed outputs) and the preprocessed input batches."""
    proto = load_model(w.model)
    card = resolve_model_card(proto)
    tensors = _exposed(proto, w)
    session = make_session(expose(proto, tensors), provider="cpu")
    ds = open_dataset(w.data, spatial_ndim=card.spatial_ndim)
    batches = [{card.input_name: _model_batch(card, [ds[i].image for i in idx])} for idx in _batch_indices(w)]
    outputs = [t.name for t in tensors] + [card.prediction_output]
    return session, batches, outputs


def _batch_indices(w: Workload) -> list[list[int]]:
    """The dataset indices of each batch of ``w``, in order."""
    return [list(range(s, min(s + w.batch, w.n_cases))) for s in range(0, w.n_cases, w.batch)]


def _model_batch(card: Any, images: Sequence[np.ndarray]) -> np.ndarray:
    """The model's float32 input for a batch of images, each preprocessed by ``card``."""
    return np.stack([card.preprocess(image) for image in images]).astype(np.float32, copy=False)


@dataclass
class _Sweep:
    """What (a'') ``sweeps`` prepares once per tensor it reads: the prepared guide and its weights."""

    name: str
    prepared: Any  # engine.scores._Prepared of the first batch (guide, mask, grids)
    weights: tuple[Any, ...]  # engine._kernels.channels_last.guide_weights for it


def prepare_sweeps(w: Workload, session: Any, outputs: Sequence[str]) -> list[_Sweep]:
    """The tensors (a'') reads, each with its guide (the first batch's reference on the input
    grid, nearest-resized as the pipeline does) and guide weights, prepared outside the timing.

    Raises
    ------
    ValueError
        A tensor the pipeline reads is not stored channels-last (the sweeps are timed with the
        channels-last kernels only, whose two passes are separate calls), or the batches differ
        in size (the guide is the first batch's).
    """
    from engine import scores

    proto = load_model(w.model)
    card = resolve_model_card(proto)
    tensors = _exposed(proto, w)
    grouped = concat_blocks(proto, tensors)
    read = [t.name for t in tensors if t.name not in grouped]  # a concatenation is scored from its parts
    batches = _batch_indices(w)
    if len({len(b) for b in batches}) > 1:
        raise ValueError(f"{w.n_cases} cases in batches of {w.batch} leave a smaller last batch; the sweeps "
                         "method reuses the first batch's guide: use a multiple of the batch size")
    ds = open_dataset(w.data, spatial_ndim=card.spatial_ndim)
    cases = ds.read_cases(batches[0])
    x = _model_batch(card, [c.image for c in cases])
    out = session.run({card.input_name: x}, outputs=list(outputs))
    grid = tuple(card.to_channels_first(x, card.input_name).shape[2:])
    guide = np.stack([resize_nearest(c.mask, grid) > 0 for c in cases]).astype(np.float32)
    sweeps = []
    for name in read:
        p = scores._prepare(card.to_channels_first(out[name], name), guide, None, None,
                            resize="upsample", layout="channels_first")
        if p.cl is None:
            raise ValueError(f"tensor {name!r} is not stored channels-last; the sweeps method times the "
                             "channels-last kernels only (use --workload deepbrain)")
        sweeps.append(_Sweep(name, p, _cl.guide_weights(p.g, p.m, p.has_mask, p.identity, p.src, p.weights)))
    return sweeps


def _sweep(F: np.ndarray, sw: _Sweep) -> None:
    """The prototype sums and the projection of one channels-last batch ``F`` (B, *spatial, C)
    with ``sw``'s guide (results dropped)."""
    p = sw.prepared
    B, C = F.shape[0], F.shape[-1]
    P, N, mid, z = np.empty((B, C)), np.empty((B, C)), np.empty(B), np.empty((B, F.size // (B * C)))
    status, bad = np.empty(B, dtype=np.uint8), np.zeros(B, dtype=np.int64)
    _cl.prototypes(F.reshape(B, -1, C), p.g, p.m, p.has_mask, sw.weights, True, P, N, status, mid, bad, z)


def time_files(w: Workload, session: Any, outputs: Sequence[str],
               sweeps: Sequence[_Sweep] = ()) -> tuple[float, float]:
    """Wall and process CPU seconds of (a'): read each batch from the dataset as the pipeline's
    reader does (``Dataset.read_cases``), preprocess it with the model card and run it through
    ``session`` (results dropped), one step after the other, no scoring and no store. With
    ``sweeps`` (:func:`prepare_sweeps`), (a''): after each run, also the prototype sums and the
    projection of each of those tensors."""
    card = resolve_model_card(load_model(w.model))
    ds = open_dataset(w.data, spatial_ndim=card.spatial_ndim)
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in _batch_indices(w):
        x = _model_batch(card, [c.image for c in ds.read_cases(idx)])
        out = session.run({card.input_name: x}, outputs=list(outputs))
        for sw in sweeps:
            _sweep(out[sw.name], sw)
        del out, x
    return time.perf_counter() - t0, time.process_time() - c0


def time_inference(session: Any, batches: Sequence[dict[str, np.ndarray]],
                   outputs: Sequence[str]) -> tuple[float, float]:
    """Wall and process CPU seconds to run every batch through ``session`` (results dropped)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for feeds in batches:
        out = session.run(feeds, outputs=list(outputs))
        del out
    return time.perf_counter() - t0, time.process_time() - c0


@contextlib.contextmanager
def _overlap(on: bool) -> Iterator[None]:
    """``PROTOSEG_OVERLAP`` set to ``1``/``0`` for the block, restored afterwards."""
    old = os.environ.get(OVERLAP_ENV)
    os.environ[OVERLAP_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(OVERLAP_ENV, None)
        else:
            os.environ[OVERLAP_ENV] = old


def time_pipeline(w: Workload, store: Path, *, level: str, timer: PhaseTimer | None = None,
                  overlap: bool = True) -> tuple[float, float]:
    """Wall and process CPU seconds of one :func:`engine.run.score_dataset` run (fresh store),
    with the stages overlapped (the default) or one after the other (``overlap=False``)."""
    ctx = timer.patched(_pipeline_targets()) if timer is not None else contextlib.nullcontext()
    with ctx, _overlap(overlap):
        t0, c0 = time.perf_counter(), time.process_time()
        summary = score_dataset(w.model, w.data, store, level=level, batch_size=w.batch, provider="cpu",
                                input_sa=True, overwrite=True, resume=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if summary.n_scored != w.n_cases or summary.n_failed:
        raise RuntimeError(f"pipeline scored {summary.n_scored} of {w.n_cases} cases "
                           f"({summary.n_failed} failed); the benchmark needs every case scored")
    return seconds, cpu


def machine() -> dict[str, Any]:
    """CPU model, cores and thread settings of this process."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _ort_threads() -> int:
    """Threads an onnxruntime CPU session built as the pipeline builds it adds to this process.

    The pipeline leaves ``intra_op_num_threads`` at onnxruntime's default (one per physical
    core); the pool has that many threads minus one (the caller's thread works too).
    """

    def count() -> int:
        try:
            return len(os.listdir("/proc/self/task"))
        except OSError:  # pragma: no cover - not Linux
            return -1

    before = count()
    sess = make_session(tiny_conv(), provider="cpu")
    sess.run({"x": np.zeros((1, 1, 8, 8), np.float32)})
    return count() - before + 1


# --------------------------------------------------------------------------------------------
# run and report
# --------------------------------------------------------------------------------------------
def run(w: Workload, *, repeat: int, folder: Path, log: Callable[[str], None] = print,
        methods: Sequence[str] = DEFAULT_METHODS) -> dict[str, Any]:
    """Interleaved repeats of the methods; medians, ratios and phase shares.

    Returns a dict with, per method, the median wall seconds (``seconds``), median process CPU
    seconds (``cpu``; all threads, less sensitive to other jobs on a shared machine), cases/s,
    overheads against inference alone (from medians, and the median of per-round ratios), per
    phase the median main-thread wall and CPU seconds (``phases``, ``phases_cpu``) and the
    median background wall and thread CPU seconds (``background``, ``background_cpu``), and
    the calls of each phase in the last round (``calls``; the same in every round).
    """
    methods = list(dict.fromkeys(["inference", *methods]))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"methods {unknown}; expected some of {list(METHODS)}")
    session, batches, outputs = _prepared_batches(w)
    sweeps = prepare_sweeps(w, session, outputs) if "sweeps" in methods else []
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    scored = [m for m in methods if m not in BASELINES]
    phases: dict[str, list[tuple[dict[str, float], ...]]] = {m: [] for m in scored}
    calls: dict[str, dict[str, int]] = {}
    for r in range(repeat + 1):  # round 0 warms up (Numba cache load, ORT first run, page cache)
        for m in methods:
            if m == "inference":
                sec, cs = time_inference(session, batches, outputs)
                ph = None
            elif m == "files":
                sec, cs = time_files(w, session, outputs)
                ph = None
            elif m == "sweeps":
                sec, cs = time_files(w, session, outputs, sweeps)
                ph = None
            else:
                timer = PhaseTimer()
                sec, cs = time_pipeline(w, folder / f"store_{m}.h5", level=m.split("_")[0], timer=timer,
                                        overlap=not m.endswith("_seq"))
                ph = (dict(timer.seconds), dict(timer.cpu), dict(timer.background), dict(timer.background_cpu))
                calls[m] = {k: timer.calls.get(k, 0) for k in _phase_names()}
            if r:
                wall[m].append(sec)
                cpu[m].append(cs)
                if ph is not None:
                    phases[m].append(ph)
            log(f"round {r}{' (warm-up)' if not r else ''} {m:9s} wall {sec:7.3f} s cpu {cs:7.3f} s "
                f"({w.n_cases / sec:6.1f} cases/s)")
    med = {m: statistics.median(v) for m, v in wall.items()}
    mcpu = {m: statistics.median(v) for m, v in cpu.items()}
    names = _phase_names()

    def per_phase(j: int) -> dict[str, dict[str, float]]:
        return {m: {k: statistics.median(p[j].get(k, 0.0) for p in v) for k in names}
                for m, v in phases.items()}

    return {
        "methods": methods,
        "seconds": med, "cpu": mcpu, "all_seconds": wall, "all_cpu": cpu,
        "cases_per_s": {m: w.n_cases / s for m, s in med.items()},
        "overhead": {m: med[m] / med["inference"] - 1.0 for m in methods[1:]},
        "cpu_overhead": {m: mcpu[m] / mcpu["inference"] - 1.0 for m in methods[1:]},
        # paired ratios (same round, adjacent in time) are less sensitive to drift
        "paired_overhead": {m: statistics.median(b / a - 1.0 for a, b in zip(wall["inference"], wall[m]))
                            for m in methods[1:]},
        # against (a') reading + preprocessing + inference, when it was timed
        "files_overhead": ({m: med[m] / med["files"] - 1.0 for m in scored} if "files" in methods else {}),
        "files_cpu_overhead": ({m: mcpu[m] / mcpu["files"] - 1.0 for m in scored} if "files" in methods else {}),
        "phases": per_phase(0), "phases_cpu": per_phase(1),
        "background": per_phase(2), "background_cpu": per_phase(3),
        "calls": calls,
    }


def _phase_names() -> list[str]:
    return list(dict.fromkeys(name for name, _, _ in _pipeline_targets()))


_LABELS = {"layer": "(b) inference + layer SA", "both": "(c) inference + layer + unit SA",
           "layer_seq": "(b') layer SA, stages sequential", "both_seq": "(c') layer + unit SA, stages sequential"}


def _title(w: Workload) -> tuple[str, str]:
    """(### title, what was run) of a workload's subsection."""
    if w.kind == "deepbrain":
        return (f"### deepbrain 3-D U-Net, Colin27 181×217×181 → 128³, {w.n_cases} "
                f"volume{'s' if w.n_cases != 1 else ''}",
                "the shipped deepbrain 3-D U-Net (`cli/data/deepbrain/deepbrain.onnx`, NDHWC) on "
                f"{w.n_cases} copies of the shipped Colin27 T1 volume and its mask (NIfTI, read from a "
                "folder one case at a time, resized to 128³ and min-max scaled by the model card)")
    if w.kind == "deep":
        return (f"### U-Net base {w.base}, {w.levels} levels (`deep_unet`), {w.size}×{w.size}, {w.n_cases} cases",
                f"`tests.models.deep_unet` ({w.levels} levels, two 3×3 convs per block, "
                f"{w.base}…{w.base * 2 ** w.levels} channels), cases read from one HDF5 file")
    return (f"### U-Net base {w.base}, {w.size}×{w.size}, {w.n_cases} cases",
            f"`tests.models.unet` 2-D ({w.base}/{2 * w.base} channels), cases read from one HDF5 file")


def format_section(results: Sequence[tuple[Workload, dict[str, Any]]], info: dict[str, Any],
                   command: str, repeat: int) -> str:
    """The ``## Pipeline`` section of RESULTS.md: one subsection per workload.

    Each subsection carries its own command, date and machine line, so that subsections
    from different runs can stand side by side (see :func:`write_section`).
    """
    lines = [
        SECTION, "",
        "Methods, on the same data in one process, interleaved (a, b, c, …, a, b, c, …): (a) "
        "`Session.run` on preprocessed batches with the pipeline's exposed outputs (the targets' "
        "baseline); (a') when timed, a plain loop reading, preprocessing and running the same "
        "cases one step after the other (no scoring); (b) "
        "`score_dataset(level=\"layer\")`; (c) `score_dataset(level=\"both\")`; (b) and (c) "
        "include reading, preprocessing, session build, baselines and the store, with the stages "
        "overlapped (cases read ahead and parts written behind in their own threads, "
        "`engine/run/stages.py`); (b') and (c') are the same with `PROTOSEG_OVERLAP=0` (one stage "
        "after the other). Wall time is what a user waits; CPU time (all threads of the process) is "
        "less disturbed by the other jobs on this shared machine. Phases are timed by wrapping the "
        "functions the pipeline calls, in the main thread: `read` and `store` are what the main "
        "thread waits for the stages (the reads and writes themselves when sequential; their own "
        "time in the background threads follows `bg`); `kernels` = `sa_scores` and the baselines; "
        "`other` = the run's wall time less the rows above: model load and session build, "
        "prediction, guides, Python glue.", "",
    ]
    for w, res in results:
        med, cpu, cps = res["seconds"], res["cpu"], res["cases_per_s"]
        ov, pov, cov = res["overhead"], res["paired_overhead"], res["cpu_overhead"]
        methods = res.get("methods", ["inference", *DEFAULT_METHODS])
        scored = [m for m in methods if m not in BASELINES]
        title, what = _title(w)
        targets = TARGETS[w.kind]
        lines += [
            title, "",
            f"Command: `{command}`  ",
            f"{info['date']}; {info['cpu']}, {info['cores']} cores, **shared with other jobs** "
            f"(load average ≈ {info.get('load', '?')}); medians of {repeat} interleaved repeats "
            f"after a warm-up round; onnxruntime {info['onnxruntime']} on CPU, intra-op threads "
            f"{info['ort_threads']} (its default, spinning off), Numba threads "
            f"{info['numba_threads']}, OMP_WAIT_POLICY={info['omp_wait_policy']}.", "",
            f"{what}, batch {w.batch}, {len(w.tensors)} exposed tensors ({', '.join(w.tensors)}); "
            "`input_sa=True`; a fresh store per run.", "",
            "| method | wall s/run | cases/s | overhead (wall) | paired | CPU s/run | overhead (CPU) | target |",
            "|---|---|---|---|---|---|---|---|",
            f"| (a) inference alone | {med['inference']:.2f} | "
            f"{cps['inference']:.2f} | — | — | {cpu['inference']:.2f} | — | — |",
        ]
        if "files" in methods:
            lines.append(f"| (a') reading + preprocessing + inference | {med['files']:.2f} | {cps['files']:.2f} | "
                         f"{ov['files']:+.0%} | {pov['files']:+.0%} | {cpu['files']:.2f} | "
                         f"{cov['files']:+.0%} | — (not scoring) |")
        if "sweeps" in methods:
            lines.append(f"| (a'') (a') + the sums and projection passes | {med['sweeps']:.2f} | "
                         f"{cps['sweeps']:.2f} | {ov['sweeps']:+.0%} | {pov['sweeps']:+.0%} | "
                         f"{cpu['sweeps']:.2f} | {cov['sweeps']:+.0%} | — (a floor under (b)) |")
        for m in scored:
            t = targets[m.split("_")[0]]
            ok = ("met" if max(ov[m], cov[m]) <= t else
                  "**missed** (CPU met)" if cov[m] <= t else
                  "**missed** (wall met)" if ov[m] <= t else "**missed**")
            lines.append(f"| {_LABELS[m]} | {med[m]:.2f} | {cps[m]:.2f} | {ov[m]:+.0%} | {pov[m]:+.0%} | "
                         f"{cpu[m]:.2f} | {cov[m]:+.0%} | ≤ {t:.0%} ({ok}) |")
        if res.get("files_overhead"):
            fo, fc = res["files_overhead"], res["files_cpu_overhead"]
            lines += ["", "Against (a'), which reads and preprocesses the same files without scoring: " + "; ".join(
                f"{_LABELS[m].split(' ')[0]} {fo[m]:+.0%} wall, {fc[m]:+.0%} CPU" for m in scored) + "."]
        lines += ["", "| phase, s per run wall (CPU) | " + " | ".join(
                      f"{m} | share" for m in scored) + " |",
                  "|---|" + "---|---|" * len(scored)]
        for row, fore, back in PHASE_ROWS + (("other", (), ()),):
            cells = [row]
            for m in scored:
                ph, pc = res["phases"][m], res["phases_cpu"][m]
                bg, bc = res.get("background", {}).get(m, {}), res.get("background_cpu", {}).get(m, {})
                if row == "other":
                    keys = [k for _, f, _ in PHASE_ROWS for k in f]
                    v = med[m] - sum(ph.get(k, 0.0) for k in keys)
                    c = cpu[m] - sum(pc.get(k, 0.0) for k in keys)
                else:
                    v, c = sum(ph.get(k, 0.0) for k in fore), sum(pc.get(k, 0.0) for k in fore)
                text = f"{v:.2f} ({c:.2f})"
                b = sum(bg.get(k, 0.0) for k in back)
                if b > 0:
                    text += f"; bg {b:.2f} ({sum(bc.get(k, 0.0) for k in back):.2f})"
                cells += [text, f"{v / med[m]:.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Merge a new ``## Pipeline`` section into ``path``, keeping every other section.

    Within the section, a ``###`` subsection of the new text replaces the old one with the
    same title; old subsections with other titles (other workloads, the memory table of
    :mod:`benchmarks.memory`, hand-written analysis) are kept, generated ones first.
    """
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        body = old[start:nxt + 1] if nxt >= 0 else old[start:]
        tail = old[nxt + 1:] if nxt >= 0 else ""
        head, *fresh = text.split("\n### ")
        fresh_by_title = {part.split("\n", 1)[0]: part for part in fresh}
        merged: list[str] = []
        for part in body.split("\n### ")[1:]:
            merged.append(fresh_by_title.pop(part.split("\n", 1)[0], part))
        n_gen = sum(1 for part in merged if part.startswith(GENERATED))
        merged[n_gen:n_gen] = list(fresh_by_title.values())
        merged.sort(key=lambda part: not part.startswith(GENERATED))  # stable: generated first
        text = head.rstrip("\n") + "\n\n" + "\n".join(
            "### " + part.rstrip("\n") + "\n" for part in merged)
        new = old[:start] + text + ("\n" + tail if tail else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=64, help="cases per run (default 64 = 8 batches)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--base", type=int, nargs="*", default=[16, 32],
                   help="first-level channels; one workload per value (default 16 32)")
    p.add_argument("--deep", type=int, nargs="*", default=[16],
                   help="first-level channels of deep_unet workloads (default 16; none: skip)")
    p.add_argument("--levels", type=int, default=4, help="levels of deep_unet (default 4)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workload", choices=("unet", "deepbrain"), default="unet",
                   help="unet: the --base and --deep 2-D U-Nets (default); deepbrain: the shipped 3-D "
                        "U-Net on --volumes copies of Colin27, batch 1")
    p.add_argument("--volumes", type=int, default=8, help="volumes of the deepbrain workload (default 8)")
    p.add_argument("--methods", nargs="+", choices=METHODS[1:], default=list(DEFAULT_METHODS),
                   help="methods timed besides inference alone (default: files layer both layer_seq both_seq; "
                        "sweeps only when named)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (a smoke run)")
    p.add_argument("--write", action="store_true", help="write the tables into the --results file")
    p.add_argument("--results", type=Path, default=RESULTS, metavar="PATH",
                   help=f"the Markdown file --write updates (default {RESULTS.relative_to(RESULTS.parents[1])})")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="also write the figures, the exposed tensors and the phase calls as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.cases, a.size, a.base, a.deep, a.levels, a.repeat = 16, 32, [4], [2], 2, 1
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    info = machine()
    info["ort_threads"] = _ort_threads()
    print(info)
    results = []
    jobs = ([("deepbrain", 0)] if a.workload == "deepbrain" else
            [("unet", b) for b in a.base] + [("deep", b) for b in a.deep])
    for kind, base in jobs:
        folder = Path(tempfile.mkdtemp(prefix="protoseg-bench-"))
        try:
            if kind == "deepbrain":
                w = build_deepbrain(folder, volumes=a.volumes)
            else:
                w = build_workload(folder, n_cases=a.cases, size=a.size, base=base, kind=kind, levels=a.levels)
            results.append((w, run(w, repeat=a.repeat, folder=folder, methods=a.methods)))
        except ValueError as exc:  # a method this workload cannot take (sweeps on NCHW tensors)
            p.error(str(exc))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        info["load"] = Path("/proc/loadavg").read_text().split()[1]
    methods = [] if a.methods == list(DEFAULT_METHODS) else ["--methods " + " ".join(a.methods)]
    if a.workload == "deepbrain":
        command = " ".join(["python -m benchmarks.pipeline --workload deepbrain", f"--volumes {a.volumes}",
                            f"--repeat {a.repeat}", *methods] + (["--write"] if a.write else []))
    else:
        command = " ".join(["python -m benchmarks.pipeline", f"--cases {a.cases}", f"--size {a.size}",
                            "--base " + " ".join(map(str, a.base)), "--deep " + " ".join(map(str, a.deep)),
                            f"--levels {a.levels}", f"--repeat {a.repeat}", *methods]
                           + (["--write"] if a.write else []))
    command = command.replace("  ", " ")  # an empty --base or --deep list
    text = format_section(results, info, command, a.repeat)
    print(text)
    if a.write:
        write_section(text, a.results)
    if a.json:
        workloads = [{"kind": w.kind, "base": w.base, "size": w.size, "n_cases": w.n_cases, "levels": w.levels,
                      "batch": w.batch, "tensors": w.tensors, **res} for w, res in results]
        a.json.write_text(json.dumps({"command": command, "info": info, "workloads": workloads}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
