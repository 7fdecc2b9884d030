"""The scoring run: an ONNX model and a dataset in, a resumable HDF5 store out.

:func:`score_dataset` is the public wrapper: it turns its keywords into a
:class:`~engine.run.options.ScoreOptions`, builds the :class:`~engine.run.plan.Plan`
once, opens the store writer (which resumes or refuses), then feeds batches of cases to
:func:`~engine.run.batch.score_batch` and publishes each result as a part file. Reading,
scoring and writing overlap (:mod:`engine.run.stages`: batch k+1 is read and batch k-1
written while batch k is scored; ``PROTOSEG_OVERLAP=0`` runs them one after the other).
Memory is bounded by the batch: at most two batches are alive, and nothing accumulates
across batches except per-case scalars held by the store writer's parts on disk.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine._version import __version__
from engine.datasets import DatasetError
from engine.errors import CaseError, OutOfMemoryError, option
from engine.memory import format_size
from engine.model.graph import activation_bytes, load_model
from engine.run.batch import score_batch
from engine.run.manifest import dataset_manifest
from engine.run.options import ScoreOptions, dataset_label
from engine.run.plan import Plan, build_plan, open_data, resolve_card, spatial_hidden
from engine.run.stages import Gate, ReadAhead, WriteBehind, gated, overlap_enabled
from engine.store import StoreWriter

__all__ = ["score_dataset", "run_plan", "RunSummary"]

log = logging.getLogger("protoseg")


@dataclass
class RunSummary:
    """What a finished (or resumed) run did; returned by :func:`score_dataset`."""

    store: Path
    provider: str
    n_cases: int
    n_scored: int
    n_skipped_done: int
    n_failed: int
    passes: int
    seconds: float
    assumed: list[str] = field(default_factory=list)
    n_no_reference: int = 0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def score_dataset(
    model: str | os.PathLike[str] | Any,
    data: str | os.PathLike[str] | Any,
    store: str | os.PathLike[str],
    *,
    layers: str | Sequence[str] = "auto",
    level: str = "layer",
    guide: str = "prediction",
    guide_kind: str = "hard",
    reference: str = "auto",
    resize: str = "upsample",
    threshold: float | None = None,
    batch_size: int = 8,
    provider: str = "auto",
    optimization: str = "all",
    card: Any = None,
    save_maps: Iterable[str] | int = (),
    input_sa: bool = True,
    empty: str = "nan",
    nonfinite: str = "raise",
    resume: bool = True,
    overwrite: bool = False,
    strict: bool = False,
    groups: Any = None,
    max_activation_memory: int | None = None,
    max_memory: int | str | None = None,
    max_cases: int | None = None,
    shard: str | tuple[int, int] | None = None,
    volume: int | None = None,
    reorient: bool | str | None = None,
    deterministic: bool = False,
    progress: Callable[[int, int], None] | None = None,
    extra_config: dict[str, Any] | None = None,
    client: Any = None,
    chunk_size: int | None = None,
) -> RunSummary:
    """Score every hidden layer of an ONNX segmentation model on a dataset.

    Parameters
    ----------
    model : path or onnx.ModelProto
        The ONNX model (ideally exported by :mod:`exporters`, whose metadata names the
        layers and describes the prediction; otherwise what is inferred is reported).
    data : path or Dataset
        A dataset accepted by :func:`engine.open_dataset` (folder of image/mask pairs,
        one HDF5/NPZ file, or a single image).
    store : path
        The HDF5 store to write. Work in progress lives in ``<store>.parts/``.
    layers : str or list of str, optional
        Hidden tensors to score: ``"auto"`` (the layers an exporter exposed and named,
        else every hidden tensor), ``"all"``, names, layer names, globs, ``re:`` or ``op:``
        selectors (see :func:`engine.select_tensors`).
    level : {"layer", "unit", "both"}
        Layer-level SA (all channels of a tensor), unit-level SA (each channel), or both.
    guide : {"prediction", "ground_truth"}
        Where the prototypes come from. The default, the network's own prediction, needs
        no ground truth (SPEC §2).
    guide_kind : {"hard", "soft"}
        With ``guide="prediction"``: the thresholded prediction (default) or the
        foreground probability itself as soft weights.
    reference : {"auto", "ground_truth", "prediction"}
        What the ProtoSeg map is scored against. ``"auto"``: ground truth when the dataset
        has masks, else the thresholded prediction.
    resize : {"upsample", "downsample"}
        SPEC §3: features to the input grid (default) or guide/reference to each tensor's grid.
    threshold : float, optional
        Probability threshold for the prediction (default: the model card's, else 0.5).
    batch_size : int
        Cases per model run; bounds memory.
    provider : {"auto", "cpu", "cuda"}
        onnxruntime execution provider; ``auto`` takes CUDA only when it can really load.
    optimization : {"disable", "basic", "extended", "all"}
        onnxruntime graph optimisation level (recorded).
    card : dict, path or ModelCard, optional
        Model-card overrides (a dict of fields, a TOML file path, or a ready ModelCard).
    save_maps : list of case ids or int
        Cases whose SA and probability maps are stored (an int n: the first n cases).
    input_sa : bool
        Also score the raw input channels (SPEC §5).
    empty : {"nan", "one"}
        Dice when map and reference are both empty.
    nonfinite : {"raise", "skip"}
        NaN/Inf in a hidden tensor: stop with an error naming tensor and case, or score NaN
        with status NONFINITE and go on.
    resume : bool
        Continue an interrupted run made with the same settings (default): the same call
        after a crash or a kill picks up where it stopped, and on a finished store it
        does nothing. ``False`` refuses an existing store or unfinished run.
    overwrite : bool
        Replace an existing store (or unfinished run), whatever its settings.
    strict : bool
        Unreadable cases stop the run instead of being skipped with a status.
    groups : mapping or path, optional
        Case id → group (subject, site), passed to the dataset reader.
    max_activation_memory : int, optional
        Bytes of hidden tensors per batch before the selection is split into passes (the
        low-level override; default a quarter of the memory budget).
    max_memory : int or str, optional
        The memory the run may use, in bytes or as ``"4GiB"``/``"512MB"``; a quarter of it
        bounds the hidden tensors one pass exposes. Default: what this process can still
        use — the smallest of ``MemAvailable``, the cgroup (v1/v2) limit less its usage,
        and ``RLIMIT_AS``/``RLIMIT_DATA`` less this process's size
        (:func:`engine.memory.memory_limit`). Provenance, not configuration.
    max_cases : int, optional
        Score only the first ``max_cases`` cases.
    shard : "I/N" or (I, N), optional
        Score only the cases whose dataset index ``i`` has ``i % N == I``: N workers (or
        machines) each write their own store, and :func:`engine.merge_parts` joins them
        in dataset order. The shard is provenance, not configuration, so shards merge.
    volume : int, optional
        The volume (time point, from 0) to score from files that are time series (4-D
        NIfTI with a time unit...; see :func:`engine.open_dataset`). Default: such cases
        are skipped with status ``time-series``.
    reorient : bool, str or None
        The orientation 3-D cases with an affine (NIfTI, NRRD) are brought to before the
        model, by axis flips and permutations only (see :func:`engine.open_dataset`). None
        (default): what the model card's ``orientation`` says (anatomical codes such as
        ``"RAS"``, or a permutation of the file's own axes such as nnU-Net's ``"zyx"``), file
        order when it says nothing; True: the card's, else RAS; False: file order; a string:
        those codes. The codes used are recorded in the configuration and per case.
    deterministic : bool
        onnxruntime's deterministic compute, and on CUDA no TF32 and a fixed cuDNN algorithm
        (:func:`engine.model.session.cuda_provider_options`); recorded in the configuration.
    progress : callable, optional
        ``progress(done, total)`` after each batch.
    extra_config : dict, optional
        Extra settings recorded (and compared on resume) with the configuration.
    client : distributed.Client or str, optional
        Score on a Dask cluster (:mod:`engine.run.distributed`): a connected client,
        ``"tcp://host:port"`` of a running scheduler, or ``"local:N"`` for N worker
        processes on this machine. Model and data must then be paths the workers can
        read. The store is the one a single-process run writes (provenance aside); the
        summary is a :class:`~engine.run.distributed.DistributedSummary`.
    chunk_size : int, optional
        With ``client``: cases per task (a multiple of ``batch_size``; default about four
        chunks per worker, at most 8 batches).

    Returns
    -------
    RunSummary
        The store path, the provider that ran, and case counts.

    Raises
    ------
    ValueError
        Bad options, a model without spatial hidden tensors, a store made with other
        settings (unless ``overwrite``).
    engine.errors.CaseError
        Non-finite inputs or features with ``nonfinite="raise"``, or a failed model run:
        names the case id and its file.
    engine.errors.OutOfMemoryError
        A batch could not be allocated: names the batch, its size and the budget, and what to
        lower (``batch_size``, ``max_memory``, ``layers``); finished batches are kept.
    FileNotFoundError
        Model or data missing.

    Examples
    --------
    >>> summary = score_dataset("model.onnx", "cases/", "run.h5", level="both")  # doctest: +SKIP
    >>> engine.open_store(summary.store).layer_table()  # doctest: +SKIP
    """
    options = ScoreOptions(
        layers=layers if isinstance(layers, str) else tuple(layers), level=level, guide=guide,
        guide_kind=guide_kind, reference=reference, resize=resize, threshold=threshold,
        batch_size=batch_size, provider=provider, optimization=optimization, card=card,
        save_maps=save_maps if isinstance(save_maps, int) else tuple(save_maps),
        input_sa=input_sa, empty=empty, nonfinite=nonfinite, resume=resume, overwrite=overwrite,
        strict=strict, groups=groups, max_activation_memory=max_activation_memory,
        max_memory=max_memory, max_cases=max_cases, shard=shard, volume=volume,
        reorient=reorient, deterministic=deterministic, extra_config=dict(extra_config or {}))
    t_start = time.perf_counter()
    if client is not None:  # scale-out (issue 16): same plan, batches and store, on Dask workers
        from engine.run.distributed import score_distributed

        return score_distributed(model, data, store, options, client=client, chunk_size=chunk_size,
                                 progress=progress, t_start=t_start)
    if chunk_size is not None:
        raise ValueError(f"chunk_size={chunk_size!r} applies to a cluster run; pass client= too")
    proto = load_model(model)
    spatial_hidden(proto)  # a model with nothing to score is refused before anything else
    mcard = resolve_card(proto, options.card)
    for msg in mcard.assumed:
        log.warning("assumed: %s", msg)
    dataset = open_data(data, mcard, options)
    plan = build_plan(model, dataset, options, card=mcard, proto=proto)
    return run_plan(plan, dataset, data, store, progress=progress, t_start=t_start)


def run_plan(plan: Plan, dataset: Any, data: Any, store: str | os.PathLike[str], *,
             progress: Callable[[int, int], None] | None = None,
             t_start: float | None = None) -> RunSummary:
    """Score ``dataset`` with a built plan into ``store`` (resume, shards, provenance).

    The loop of :func:`score_dataset`: open the writer (it resumes or refuses), skip the
    cases already published, score the rest batch by batch, finalise the store.
    """
    o = plan.options
    t_start = time.perf_counter() if t_start is None else t_start
    started = _now()
    n_total = len(dataset) if o.max_cases is None else min(len(dataset), int(o.max_cases))
    if len(dataset) == 0:  # before the writer: no empty store is left to block the next run
        raise DatasetError(f"the dataset {dataset_label(data)} holds no cases; check the path, "
                           "or the 'images' array of an HDF5/NPZ file")
    manifest = dataset_manifest(dataset, n_total)  # resume compares data by content
    writer = StoreWriter(store, config=plan.config(manifest, n_total), layers=list(plan.layers),
                         classes=list(plan.classes), resume=o.resume and not o.overwrite,
                         overwrite=o.overwrite, manifest=manifest.as_json())
    try:  # whatever stops the run (an error, Ctrl-C), the lock goes and the parts stay
        done = set(writer.done_ids())
        mine = range(n_total) if o.shard is None else range(o.shard[0], n_total, o.shard[1])
        todo = [i for i in mine if str(dataset.ids[i]) not in done]
        n_skipped = len(mine) - len(todo)
        if n_skipped:
            log.info("resuming: %d of %d cases already scored", n_skipped, n_total)
        if progress:
            progress(n_skipped, len(mine))
        n_failed, n_no_ref = _score_all(plan, dataset, writer, todo, n_skipped=n_skipped,
                                        n_mine=len(mine), progress=progress)
        if n_no_ref:
            log.warning("%d of %d cases have no mask: their scores against the ground truth are NaN "
                        "(status NO_REFERENCE); their label-free results are kept%s", n_no_ref, len(todo),
                        " (their SA against the prediction: Store.label_free_scores())"
                        if plan.reference == "ground_truth" and o.guide == "prediction" else "")
        path = writer.finalize(dict(_provenance(plan, started, t_start),
                                     dataset=manifest.path or dataset_label(data)))
    except BaseException:
        writer.close()
        raise
    return RunSummary(
        store=Path(path), provider=plan.provider, n_cases=len(mine), n_scored=len(todo),
        n_skipped_done=n_skipped, n_failed=n_failed, passes=len(plan.passes),
        seconds=time.perf_counter() - t_start, assumed=list(plan.card.assumed),
        n_no_reference=n_no_ref,
    )


def _score_all(plan: Plan, dataset: Any, writer: StoreWriter, todo: Sequence[int], *, n_skipped: int,
               n_mine: int, progress: Callable[[int, int], None] | None) -> tuple[int, int]:
    """Score the cases ``todo`` batch by batch and publish each batch; (failed, without mask).

    The stages overlap (:mod:`engine.run.stages`, unless ``PROTOSEG_OVERLAP=0``): the cases
    of batch k+1 are read in one thread and the part of batch k-1 is written in another
    while batch k is scored here, at most one batch ahead and one behind. Errors surface
    here in batch order, as in a sequential run: a read error when its batch's turn comes,
    a write error at the next hand-over, and a write error wins over a later batch's
    scoring error (sequentially, that batch would never have been scored). On any exit the
    batches handed to the writer are published first (a Ctrl-C loses no finished batch),
    then both threads are joined.
    """
    o = plan.options
    threaded = overlap_enabled()
    batches = [list(todo[s:s + o.batch_size]) for s in range(0, len(todo), o.batch_size)]
    budget = o.memory_budget()  # before any batch: at an allocation failure little is left
    read = getattr(dataset, "read_cases", None)  # a Dataset reads a batch's file once
    gate = Gate() if threaded else None  # reads and writes while the model runs (stages.py)
    reader = ReadAhead(read if callable(read) else (lambda idx: [dataset[i] for i in idx]), batches,
                       threaded=threaded, gate=gate)
    behind: WriteBehind[Any] = WriteBehind(writer.write_batch, threaded=threaded, gate=gate)
    with gated(gate):
        return _batches(plan, dataset, writer, batches, reader, behind, budget=budget,
                        n_skipped=n_skipped, n_mine=n_mine, progress=progress)


def _batches(plan: Plan, dataset: Any, writer: StoreWriter, batches: list[list[int]], reader: ReadAhead,
             behind: WriteBehind[Any], *, budget: tuple[int, str], n_skipped: int, n_mine: int,
             progress: Callable[[int, int], None] | None) -> tuple[int, int]:
    """The loop of :func:`_score_all` over its stages."""
    n_failed, n_no_ref, noted, shown = 0, 0, set(), n_skipped
    try:
        for batch_no, idx in enumerate(batches, start=1):
            behind.check()  # a failed write stops the run before the next batch is scored
            try:
                _, cases = next(reader)  # a read error is raised here, at its batch's turn
                result = score_batch(plan, cases, idx)
            except (MemoryError, CaseError) as exc:
                if not _allocation_failure(exc):
                    raise
                behind.drain()  # the batches handed over are kept (a failed write wins)
                writer.close()  # the parts written so far stay: the same call resumes
                raise _out_of_memory(plan, dataset, idx, exc, budget, n_kept=n_skipped + behind.written,
                                     batch_no=batch_no, n_batches=len(batches)) from exc
            del cases
            n_failed += sum(s != "ok" for s in result.case_status)
            n_no_ref += len(result.no_reference)
            for note in set(result.notes) - noted:
                log.warning("%s", note)
                noted.add(note)
            behind.submit(result, n=len(idx))
            del result
            if progress and n_skipped + behind.written != shown:
                shown = n_skipped + behind.written
                progress(shown, n_mine)
        behind.drain()
    except BaseException as exc:
        reader.close()
        try:
            behind.drain()  # publish what was handed over; its failure is the earlier one
        except BaseException as first:
            if first is not behind.error or first is exc or not isinstance(exc, KeyboardInterrupt):
                raise  # the earlier write error, a second Ctrl-C, or the error on its way
            log.warning("a batch could not be written before the interrupt: %s", first)
        finally:
            behind.close()
        raise
    reader.close()
    behind.close()
    if progress and n_skipped + behind.written != shown:
        progress(n_skipped + behind.written, n_mine)
    return n_failed, n_no_ref


#: What onnxruntime says when an allocation fails (CPU arena, std::bad_alloc, CUDA).
_ORT_ALLOC_MARKERS = ("failed to allocate memory", "bad_alloc", "bad allocation", "out of memory",
                      "alloc_failed")


def _allocation_failure(exc: BaseException) -> bool:
    """A MemoryError (numpy's ``_ArrayMemoryError`` included), or onnxruntime's allocation
    failure (raised as its own RuntimeException, which the batch wraps in a CaseError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError):
            return True
        if type(e).__module__.startswith("onnxruntime") and any(
                m in str(e).lower() for m in _ORT_ALLOC_MARKERS):
            return True
        e = e.__cause__
    return False


def _out_of_memory(plan: Plan, dataset: Any, idx: Sequence[int], exc: BaseException,
                   budget: tuple[int, str], *, n_kept: int, batch_no: int,
                   n_batches: int) -> OutOfMemoryError:
    """One line: which batch, what it needed, the budget, and what to lower."""
    o = plan.options
    ids = [str(dataset.ids[i]) for i in idx]
    cases = (f"case {ids[0]!r}" if len(ids) == 1 else
             f"cases {', '.join(repr(c) for c in ids)}" if len(ids) <= 4 else
             f"cases {ids[0]!r} ... {ids[-1]!r} ({len(ids)})")
    what = [cases, f"batch size {o.batch_size}"]
    try:
        needed: int | None = max(
            sum(activation_bytes(t, len(idx), input_size=plan.card.input_size) for t in p.tensors)
            for p in plan.passes)
    except (ValueError, TypeError):
        needed = None
    if needed is not None:
        n_pass = len(plan.passes)
        what.append(f"up to {format_size(needed)} of hidden tensors exposed per model run"
                    + (f" in {n_pass} passes" if n_pass > 1 else ""))
    shape, total_size = getattr(exc, "shape", None), getattr(exc, "_total_size", None)
    if shape is not None and total_size is not None:  # numpy's _ArrayMemoryError
        what.append(f"allocating a {tuple(shape)} {getattr(exc, 'dtype', '')} array of "
                    f"{format_size(total_size)}")
    elif not isinstance(exc, MemoryError):
        what.append("onnxruntime could not allocate its buffers")
    total, source = budget
    rerun = ([f"{option('batch_size', max(1, o.batch_size // 2))}"] if o.batch_size > 1 else [])
    rerun.append(f"{option('max_memory', format_size(max(1, total // 2)))} for more, smaller passes")
    kept = (f"the {n_kept} cases already scored are kept and the rerun resumes from them" if n_kept
            else "no batch had finished")
    return OutOfMemoryError(
        f"out of memory in batch {batch_no} of {n_batches} ({', '.join(what)}) within a memory "
        f"budget of {format_size(total)} ({source}). Rerun with {', or '.join(rerun)}; {kept}. "
        f"Fewer {option('layers').split('=')[0]} also helps, in a new store",
        case_ids=tuple(ids), batch_size=o.batch_size, needed=needed, budget=total)


def _provenance(plan: Plan, started: str, t_start: float) -> dict[str, Any]:
    o = plan.options
    return {
        "protoseg_version": __version__,
        "model": str(plan.model_path) if plan.model_path else "<in-memory model>",
        "model_sha256": plan.model_sha256,
        "provider": plan.provider,
        "backend": plan.backend,  # where hidden tensors were scored (issue 19: "cuda" or "cpu")
        "optimization": o.optimization,
        "passes": len(plan.passes),
        "batch_size": o.batch_size,
        "max_memory": o.max_memory,
        "shard": None if o.shard is None else f"{o.shard[0]}/{o.shard[1]}",
        "started": started,
        "finished": _now(),
        "seconds": round(time.perf_counter() - t_start, 3),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "assumed": list(plan.card.assumed),
    }
