"""Scale-out on Dask distributed: the same store from a cluster as from one process.

:func:`score_distributed` (what ``score_dataset(..., client=...)`` and ``protoseg score
--cluster`` call) scores a dataset on the workers of a Dask cluster:

1. The client opens the store writer exactly as a single-process run does (it resumes or
   refuses, naming every differing setting), builds the dataset manifest once and cuts the
   cases not yet published into *chunks* of consecutive cases on a fixed grid
   (``[k * chunk_size, (k + 1) * chunk_size)``, ``chunk_size`` a multiple of the batch size,
   so every batch is the batch a single-process run scores).
2. A :class:`~distributed.WorkerPlugin` builds the :class:`~engine.run.plan.Plan` once per
   worker process from the model *path* (sessions with the worker's share of the cores,
   Numba kernels warmed) and checks that it describes the client's run. A task gets only
   the chunk's bounds and case positions; it reads its cases and runs
   :func:`~engine.run.batch.score_batch`, the one scoring function of every run.
3. Each chunk is written as its own shard (``<store>.parts/part-chunk-<start>-<stop>.h5``,
   :class:`~engine.store.merge.ShardWriter`): temporary name, fingerprint and completion
   flag written last, ``os.replace``. A complete shard with the expected fingerprint is
   skipped (resume); one with another fingerprint stops the run, naming the difference.
4. A worker that dies is replaced by its nanny and its chunk rescheduled (the scheduler's
   ``allowed-failures``); a chunk that fails that way is tried once more on its own, and a
   chunk that keeps killing workers (a poison case) ends *failed*: its cases are stored
   with status ``worker-died``, the rest of the run completes, and the next run (resume)
   scores that chunk again.
5. The client alone writes the store: it checks every shard's fingerprint and that every
   case is there exactly once, then assembles the parts in case order through the store
   writer (temporary file, ``os.replace``), removing orphaned temporary shards.

``local:N`` starts a :class:`~distributed.LocalCluster` of ``N`` single-threaded worker
processes on 127.0.0.1 (no dashboard) for the run; ``tcp://host:port`` connects to a
running scheduler. See ``docs/distributed.md``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine._json import dumps
from engine._version import __version__
from engine.datasets import DatasetError
from engine.errors import option
from engine.model.graph import load_model
from engine.quality.baseline import BASELINE_NAMES
from engine.run.batch import _input_columns, _label_free_wanted, score_batch
from engine.run.loop import RunSummary, _now, _provenance
from engine.run.manifest import DatasetManifest, dataset_manifest
from engine.run.options import ScoreOptions, dataset_label
from engine.run.plan import Plan, build_plan, open_data, resolve_card, spatial_hidden
from engine.store import BatchResult, ScoreBlock, StoreConfigError, StoreWriter
from engine.store.atomic import StoreLock
from engine.store.merge import (
    SHARD_GLOB,
    ShardWriter,
    assemble,
    list_part_files,
    read_part_ids,
    read_shard,
    remove_temp_files,
    shard_path,
)
from engine.store.runinfo import RunInfo, make_run, parts_dir

__all__ = ["score_distributed", "DistributedSummary", "Chunk", "plan_chunks",
           "default_chunk_size", "open_client", "parse_cluster", "FAILED_STATUS",
           "ClusterError"]

log = logging.getLogger("protoseg")

#: Case status of the cases of a chunk that kept killing its workers.
FAILED_STATUS = "worker-died"
#: Failed chunks' rows, kept in ``<store>.parts/`` until a later run scores them again.
_FAILED_GLOB = "failed-chunk-*.h5"
#: Test hooks (read in the worker): exit the worker process when a batch holds this case id.
TEST_EXIT_ENV = "PROTOSEG_TEST_EXIT_ON_CASE"
#: Test hooks: ``DIR:PHASE`` — the first task to reach PHASE (``score``: before its first
#: batch; ``write``: its shard written, before it is published) writes its pid to
#: ``DIR/paused`` and sleeps (:data:`_PAUSE_SECONDS`) so that a test can kill it there.
TEST_PAUSE_ENV = "PROTOSEG_TEST_PAUSE"
_PAUSE_SECONDS = 60.0
#: Chunks of at most this many batches by default.
_MAX_DEFAULT_BATCHES = 8


class ClusterError(RuntimeError):
    """The cluster could not be started or reached, or a worker cannot run this plan."""


# ---------------------------------------------------------------- chunks
@dataclass(frozen=True)
class Chunk:
    """Consecutive cases scored by one task.

    Attributes
    ----------
    start, stop : int
        Dataset positions ``[start, stop)`` of the chunk on the run's grid.
    indices : tuple of int
        The positions to score (all of ``[start, stop)`` unless a resumed run had some).
    ids : tuple of str
        Their case ids (the worker checks that its dataset has the same).
    """

    start: int
    stop: int
    indices: tuple[int, ...]
    ids: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"chunk [{self.start}, {self.stop})"


def default_chunk_size(batch_size: int, n_cases: int, n_workers: int) -> int:
    """Cases per chunk: about four chunks per worker (load balance, little lost with a
    worker), at most :data:`_MAX_DEFAULT_BATCHES` batches (tasks of tens of seconds on 3-D
    volumes), a multiple of ``batch_size``."""
    want = math.ceil(n_cases / max(1, 4 * n_workers))
    batches = min(_MAX_DEFAULT_BATCHES, max(1, math.ceil(want / batch_size)))
    return batches * batch_size


def plan_chunks(ids: Sequence[str], n_total: int, chunk_size: int,
                done: set[str] | frozenset[str] = frozenset()) -> tuple[list[Chunk], int]:
    """The chunks still to score, and how many grid chunks were already done.

    Parameters
    ----------
    ids : sequence of str
        The dataset's case ids (at least ``n_total``).
    n_total : int
        Cases of the run.
    chunk_size : int
        Cases per chunk.
    done : set of str
        Case ids already published (resume).
    """
    chunks, n_done = [], 0
    for start in range(0, n_total, chunk_size):
        stop = min(start + chunk_size, n_total)
        todo = tuple(i for i in range(start, stop) if str(ids[i]) not in done)
        if not todo:
            n_done += 1
            continue
        chunks.append(Chunk(start, stop, todo, tuple(str(ids[i]) for i in todo)))
    return chunks, n_done


def _digest(obj: Any) -> str:
    return hashlib.sha256(dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def chunk_description(chunk: Chunk | Mapping[str, Any], ids: Sequence[str] | None = None
                      ) -> dict[str, Any]:
    """What a shard records about its chunk (part of its fingerprint)."""
    if isinstance(chunk, Chunk):
        start, stop, ids = chunk.start, chunk.stop, chunk.ids
    else:
        start, stop = int(chunk["start"]), int(chunk["stop"])
    return {"start": int(start), "stop": int(stop), "protoseg_version": __version__,
            "ids_sha256": _digest([str(c) for c in ids or ()])}


def shard_fingerprint(run: RunInfo, chunk: Mapping[str, Any]) -> str:
    """Digest of the run description (settings, model sha256, data, layers, classes), the
    protoseg version and the chunk's bounds and ids."""
    return _digest({"run": run.as_json(), "chunk": dict(chunk)})


def _run_difference(expected: RunInfo, got: RunInfo) -> list[str]:
    """``key: a vs b`` for every setting, layer list or class list that differs."""
    a = dict(expected.config, layers=[r.get("name") for r in expected.layers],
             classes=expected.classes)
    b = dict(got.config, layers=[r.get("name") for r in got.layers], classes=got.classes)
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, "<unset>"), b.get(key, "<unset>")
        if x != y:
            xs, ys = repr(x), repr(y)
            out.append(f"{key}={xs if len(xs) <= 60 else xs[:57] + '...'} vs "
                       f"{ys if len(ys) <= 60 else ys[:57] + '...'}")
    if not out and expected.layers != got.layers:
        out.append("the layer table (shapes/channels)")
    return out


def shard_mismatch(info: Any, run: RunInfo) -> str | None:
    """Why a published shard does not belong to this run, in one line; None when it does."""
    if not info.complete:
        return f"shard {info.path.name} is not marked complete"
    said = []
    chunk = info.chunk or {}
    if chunk.get("protoseg_version") != __version__:
        said.append(f"protoseg {chunk.get('protoseg_version')!r} wrote it, this is {__version__!r}")
    if info.run is None:
        said.append("it holds no run description")
    else:
        said += _run_difference(run, info.run)
    if not said:
        expected = chunk_description(chunk, info.ids)
        if {k: chunk.get(k) for k in expected} != expected:
            said.append(f"its chunk {chunk} does not list the cases it holds")
        elif info.fingerprint != shard_fingerprint(run, chunk):
            said.append("its fingerprint does not match its content")
    if not said:
        return None
    return f"shard {info.path} does not belong to this run: {'; '.join(said)}"


# ---------------------------------------------------------------- the cluster
def parse_cluster(address: str) -> tuple[str, int | str]:
    """``"local:N"`` → ``("local", N)``; ``"tcp://host:port"`` (any Dask address) → as is.

    Raises
    ------
    ValueError
        Neither form.
    """
    text = str(address).strip()
    if text.startswith("local:"):
        try:
            n = int(text[len("local:"):])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"cluster {address!r}: expected local:N with N >= 1 worker "
                             "processes, e.g. local:2")
        return "local", n
    if "://" in text and text.split("://", 1)[1]:
        return "address", text
    raise ValueError(f"cluster {address!r}: expected tcp://HOST:PORT (a running Dask scheduler) or "
                     "local:N (N worker processes on this machine)")


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ImportError("scoring on a Dask cluster needs Dask distributed; install the extra: "
                          "pip install 'protoseg[dask]'") from None
    return distributed


@contextlib.contextmanager
def open_client(cluster: str, *, timeout: float = 30.0) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``local:N`` or a scheduler address, closed after.

    ``local:N`` starts ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True,
    host="127.0.0.1", dashboard_address=None)`` — with ``NUMBA_NUM_THREADS`` set to each
    worker's share of the cores before a worker process starts, and one task per worker
    at a time (``worker-saturation`` 1.0), so that a worker that dies takes only its own
    chunk with it — and stops it when the block ends.

    Raises
    ------
    ClusterError
        The scheduler cannot be reached or the cluster cannot start.
    """
    kind, value = parse_cluster(cluster)
    distributed = _import_distributed()
    import dask

    if kind == "address":
        try:
            client = distributed.Client(value, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {value} ({exc}); start it "
                               "(`dask scheduler`) or check the address") from None
        with client:
            yield client
        return
    n = int(value)
    share = max(1, _usable_cpus() // n)
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    environ["NUMBA_NUM_THREADS"] = str(share)
    settings = {"distributed.nanny.pre-spawn-environ": environ,
                "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(settings):
        try:
            cluster_obj = distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None)
        except Exception as exc:  # noqa: BLE001 - say what failed, in one line
            raise ClusterError(f"cannot start a local Dask cluster of {n} workers ({exc})") from None
    with cluster_obj, distributed.Client(cluster_obj) as client:
        yield client


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- the worker side
def _test_exit(cases: Sequence[Any]) -> None:
    """Test hook: the worker process exits when a batch holds the case named in the env."""
    target = os.environ.get(TEST_EXIT_ENV)
    if target and any(str(c.id) == target for c in cases):
        os._exit(70)


def _test_pause(phase: str) -> None:
    """Test hook: the first task to reach ``phase`` records its pid and waits to be killed."""
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec or not spec.endswith(":" + phase):
        return
    folder = Path(spec[: -len(phase) - 1])
    try:
        fd = os.open(folder / "paused", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(_PAUSE_SECONDS)


def _with_threads(plan: Plan, threads: int) -> Plan:
    """The plan with every session rebuilt for ``threads`` intra-op threads.

    ``build_plan`` takes onnxruntime's default (one thread per physical core), which
    oversubscribes a machine running several workers.
    """
    import dataclasses

    from engine.model.graph import expose
    from engine.model.session import make_session
    from engine.run.plan import Pass

    cuda = plan.device.ort_options() if plan.device is not None else None
    passes = tuple(Pass(p.tensors, make_session(expose(plan.model, list(p.tensors)),
                                                provider=plan.options.provider,
                                                optimization=plan.options.optimization,
                                                threads=threads, cuda_options=cuda,
                                                deterministic=plan.options.deterministic))
                   for p in plan.passes)
    return dataclasses.replace(plan, passes=passes)


def _warm(plan: Plan, dataset: Any, n_total: int) -> None:
    """Compile (or load from Numba's cache) the kernels on a synthetic case shaped like the
    first readable one: the first chunk's time is then scoring time. Never the real case
    (a case that crashes the process must fail its chunk, not every worker's set-up)."""
    from engine.datasets import Case

    for i in range(min(n_total, 8)):
        case = dataset[i]
        if case.ok:
            rng = np.random.default_rng(0)
            image = rng.standard_normal(np.shape(case.image)).astype(np.float32)
            mask = None if case.mask is None else np.zeros_like(case.mask)
            with contextlib.suppress(Exception):
                score_batch(plan, [Case(id="warm-up", image=image, mask=mask, path="warm-up")], [0])
            return


@dataclass
class _WorkerState:
    plan: Plan | None = None
    dataset: Any = None
    threads: int = 1
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _plugin_class() -> type:
    distributed = _import_distributed()

    class PlanPlugin(distributed.WorkerPlugin):
        """Builds the run's plan once per worker process (also on workers that join or
        are restarted later) and keeps it for the run's tasks."""

        def __init__(self, name: str, spec: dict[str, Any]) -> None:
            self.name = name
            self.spec = spec
            self.state: _WorkerState | None = None

        def setup(self, worker: Any) -> None:
            self.state = _setup_worker(self.spec, worker)

        def teardown(self, worker: Any) -> None:
            self.state = None

    return PlanPlugin


def _setup_worker(spec: dict[str, Any], worker: Any) -> _WorkerState:
    """Build and check the plan in a worker; an error is kept and raised by its tasks."""
    state = _WorkerState()
    host = _host_of(worker.address)
    try:
        on_host = int(spec["threads_by_host"].get(host, 0)) or int(worker.state.nthreads)
        state.threads = max(1, _usable_cpus() // max(1, on_host))
        try:
            import numba

            os.environ.setdefault("NUMBA_NUM_THREADS", str(numba.config.NUMBA_NUM_THREADS))
        except ImportError:  # pragma: no cover - numba is a dependency
            pass
        options: ScoreOptions = spec["options"]
        dataset = open_data(spec["data"], spec["card"], options)
        plan = build_plan(spec["model"], dataset, options, card=spec["card"])
        plan = _with_threads(plan, state.threads)
        manifest: DatasetManifest = spec["manifest"]
        expected: RunInfo = spec["run"]
        got = make_run(plan.config(manifest, spec["n_total"]), list(plan.layers), list(plan.classes))
        diff = _run_difference(expected, got)
        if diff:
            raise ValueError("its plan differs from the client's: " + "; ".join(diff))
        _set_numba_threads(state.threads)
        _warm(plan, dataset, spec["n_total"])
        state.plan, state.dataset = plan, dataset
    except Exception as exc:  # noqa: BLE001 - kept: every task of this worker says it
        state.error = (f"worker {worker.name} on {host} cannot score this run: "
                       f"{' '.join(str(exc).split()) or type(exc).__name__}")
    return state


def _set_numba_threads(n: int) -> None:
    """Numba's thread count is per calling thread: set in every task."""
    try:
        import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    except (ImportError, ValueError):  # pragma: no cover
        pass


def _host_of(address: str) -> str:
    text = str(address).split("://", 1)[-1]
    return text.rsplit(":", 1)[0].strip("[]")


def _picklable(exc: BaseException) -> BaseException:
    """Exceptions whose constructor takes keywords (CaseError) do not unpickle on the
    client; send their one-line message with the nearest builtin type instead."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        for base in (MemoryError, FileNotFoundError, OSError, KeyError, TypeError, ValueError):
            if isinstance(exc, base):
                return base(str(exc))
        return RuntimeError(str(exc))


def _score_chunk(plugin_name: str, spec: Mapping[str, Any], chunk: Chunk) -> dict[str, Any]:
    """The task: score one chunk into its shard (or find it already there)."""
    distributed = _import_distributed()
    worker = distributed.get_worker()
    plugin = worker.plugins.get(plugin_name)
    state = getattr(plugin, "state", None)
    if state is None:
        raise ClusterError(f"worker {worker.name} has no plan for this run (plugin "
                           f"{plugin_name} missing); is protoseg installed on the workers?")
    if state.error:
        raise ClusterError(state.error)
    try:
        return _score_chunk_with(state, spec, chunk, str(worker.name), _host_of(worker.address))
    except BaseException as exc:
        raise _picklable(exc) from None


def _score_chunk_with(state: _WorkerState, spec: Mapping[str, Any], chunk: Chunk,
                      worker: str, host: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan, dataset = state.plan, state.dataset
    assert plan is not None
    run: RunInfo = spec["run"]
    final = shard_path(spec["parts"], chunk.start, chunk.stop)
    described = chunk_description(chunk)
    fingerprint = shard_fingerprint(run, described)
    out = {"start": chunk.start, "stop": chunk.stop, "worker": worker, "host": host,
           "provider": plan.provider, "backend": plan.backend, "n_failed": 0, "notes": [],
           "no_reference": 0, "io_retries": 0}
    if final.exists():  # a finished attempt whose report was lost (its worker died)
        info = read_shard(final)
        why = shard_mismatch(info, run)
        if why is None and info.fingerprint == fingerprint:
            return dict(out, status="skipped", seconds=time.perf_counter() - t0)
        raise StoreConfigError(why or f"shard {final} holds other cases than {chunk.label}; "
                               f"remove it, or {option('overwrite')} to start over")
    have = [str(dataset.ids[i]) for i in chunk.indices]
    if have != list(chunk.ids):
        bad = next(j for j, (a, b) in enumerate(zip(have, chunk.ids)) if a != b)
        raise DatasetError(f"worker {worker} on {host} reads case {have[bad]!r} at position "
                           f"{chunk.indices[bad]}, the client {chunk.ids[bad]!r}; the workers must "
                           "see the same dataset as the client (shared storage)")
    _set_numba_threads(state.threads)
    bs = plan.options.batch_size
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    notes: list[str] = []
    with state.lock, ShardWriter(final, run, tag=tag) as w:
        _test_pause("score")
        for b in range(0, len(chunk.indices), bs):
            idx = list(chunk.indices[b:b + bs])
            cases = [dataset[i] for i in idx]
            _test_exit(cases)
            result = score_batch(plan, cases, idx)
            out["n_failed"] += sum(s != "ok" for s in result.case_status)
            out["no_reference"] += len(result.no_reference)
            notes += [n for n in result.notes if n not in notes]
            w.add(result)
            del result
        w.finish(fingerprint, described)
        _test_pause("write")
        for attempt in range(3):  # transient I/O (shared storage): a few tries
            try:
                w.publish()
                break
            except OSError as exc:
                if attempt == 2 or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                    raise
                out["io_retries"] += 1
                time.sleep(0.5 * (attempt + 1))
    out["notes"] = notes
    return dict(out, status="done", seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------- the client side
@dataclass
class DistributedSummary(RunSummary):
    """A :class:`~engine.run.loop.RunSummary` with what the cluster did.

    Attributes
    ----------
    chunks, chunks_done, chunks_skipped, chunks_retried, chunks_failed : int
        Chunks of the run; scored now; already published (resumed); scored after a worker
        died under them (or a transient I/O error); failed (their cases have status
        :data:`FAILED_STATUS`).
    failed_chunks : list of dict
        ``start``, ``stop``, ``ids`` and ``error`` of each failed chunk.
    worker_seconds : dict
        Seconds each worker spent in this run's tasks (by worker name).
    workers : int
        Workers of the cluster when the run started.
    chunk_size : int
    """

    chunks: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0
    chunks_retried: int = 0
    chunks_failed: int = 0
    failed_chunks: list[dict[str, Any]] = field(default_factory=list)
    worker_seconds: dict[str, float] = field(default_factory=dict)
    workers: int = 0
    chunk_size: int = 0

    def cluster_json(self) -> dict[str, Any]:
        """The cluster part of the summary, JSON-ready."""
        return {"chunks": self.chunks, "chunk_size": self.chunk_size, "done": self.chunks_done,
                "skipped": self.chunks_skipped, "retried": self.chunks_retried,
                "failed": self.chunks_failed, "failed_chunks": self.failed_chunks,
                "workers": self.workers,
                "worker_seconds": {k: round(v, 3) for k, v in sorted(self.worker_seconds.items())}}


def _failed_result(plan: Plan, chunk: Chunk, groups: Sequence[str]) -> BatchResult:
    """The rows of a failed chunk: status :data:`FAILED_STATUS`, nothing scored."""
    n, nk = len(chunk.indices), len(plan.classes)
    units = {}
    if plan.options.want_unit:
        units = {li: ScoreBlock.empty((n, nk, max(0, int(row["channels"]))))
                 for li, row in enumerate(plan.layers)}
    return BatchResult(
        case_ids=chunk.ids, case_index=np.asarray(chunk.indices, dtype=np.int64),
        case_status=(FAILED_STATUS,) * n, case_group=tuple(groups),
        layer=ScoreBlock.empty((n, nk, len(plan.layers))), units=units,
        input=ScoreBlock.empty((n, nk, _input_columns(plan))) if plan.options.input_sa else None,
        output_dice=np.full((n, nk), np.nan),
        baselines={name: np.full((n, nk), np.nan) for name in BASELINE_NAMES}, maps={},
        label_free=ScoreBlock.empty((n, nk, len(plan.layers))) if _label_free_wanted(plan) else None)


def _case_groups(dataset: Any, indices: Sequence[int]) -> list[str]:
    """Groups of cases without reading them (the dataset's table), else ``""``."""
    table = getattr(dataset, "groups", None)
    out = []
    for i in indices:
        g = None
        if isinstance(table, Mapping):
            g = table.get(str(dataset.ids[i]))
        out.append("" if g is None else str(g))
    return out


def _clear_failed(store: Path, parts: Path) -> bool:
    """A store written with failed chunks is rebuilt: its successful shards are still in
    the parts folder; drop the store and the failed rows so that those cases are scored."""
    failed = sorted(parts.glob(_FAILED_GLOB)) if parts.is_dir() else []
    if not failed:
        return False
    lock = StoreLock(store)
    lock.acquire(advice="wait for it to finish")
    try:
        store.unlink(missing_ok=True)
        for f in failed:
            f.unlink(missing_ok=True)
    finally:
        lock.release()
    log.info("rescoring %d failed chunk(s) of %s", len(failed), store)
    return True


def _check_published(parts: Path, run: RunInfo) -> None:
    """Every published shard must belong to this run (fingerprint)."""
    for path in sorted(parts.glob(SHARD_GLOB)):
        try:
            info = read_shard(path)
        except Exception as exc:  # noqa: BLE001 - the writer discards damaged parts itself
            log.warning("cannot read shard %s (%s)", path, exc)
            continue
        why = shard_mismatch(info, run)
        if why:
            raise StoreConfigError(
                f"{why}; remove it to score its cases again, or {option('overwrite')} to delete "
                "the finished work and start over")


def _suspicious(keys: list[str], dask_scheduler: Any = None) -> dict[str, int]:
    """On the scheduler: how many workers died while running each task."""
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks.get(k)
        if ts is not None:
            out[k] = int(getattr(ts, "suspicious", 0))
    return out


def _lost_workers(client: Any, key: str) -> int:
    """How many workers died while running task ``key`` (0 when the scheduler won't say)."""
    try:
        return int(client.run_on_scheduler(_suspicious, [key]).get(key, 0))
    except Exception:  # noqa: BLE001 - a scheduler that refuses run_on_scheduler
        return 0


def _is_killed_worker(exc: BaseException) -> bool:
    distributed = _import_distributed()
    return isinstance(exc, distributed.scheduler.KilledWorker)


def score_distributed(model: str | os.PathLike[str], data: str | os.PathLike[str],
                      store: str | os.PathLike[str], options: ScoreOptions, *, client: Any,
                      chunk_size: int | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      t_start: float | None = None) -> DistributedSummary:
    """Score ``data`` with ``model`` on a Dask cluster into ``store``.

    Parameters
    ----------
    model, data, store
        As in :func:`engine.score_dataset`; model and data must be paths that every worker
        can read (shared storage), and ``store``'s folder must be writable by every worker
        (each chunk's shard is written there).
    options : ScoreOptions
        The run's settings (``shard`` is not allowed: chunks are the cluster's shards).
    client : distributed.Client or str
        A connected client, or ``"local:N"`` / ``"tcp://host:port"`` (see
        :func:`open_client`).
    chunk_size : int, optional
        Cases per task, rounded up to a multiple of ``batch_size`` (default:
        :func:`default_chunk_size`).
    progress : callable, optional
        ``progress(done, total)`` in cases, after each finished chunk.

    Returns
    -------
    DistributedSummary

    Raises
    ------
    ValueError
        Model or data not a path, ``shard`` given, bad ``chunk_size``; the errors of
        :func:`engine.score_dataset` (settings, resume refused...).
    StoreConfigError
        A published shard belongs to another run (the message names the difference).
    ClusterError
        A worker cannot build this run's plan (e.g. another model file at the same path).

    Notes
    -----
    A task that raises (a case with non-finite features, a model that fails) stops the
    run as in a single process; the chunks already published stay and the same call
    resumes. A chunk that kills its worker is not an error: see the module's notes.
    """
    if isinstance(client, str):
        with open_client(client) as c:
            return score_distributed(model, data, store, options, client=c,
                                     chunk_size=chunk_size, progress=progress, t_start=t_start)
    t_start = time.perf_counter() if t_start is None else t_start
    started = _now()
    for what, value in (("model", model), ("data", data)):
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"scoring on a cluster needs the {what} as a path the workers can "
                            f"read, got {type(value).__name__}; save it to a file first")
    if options.shard is not None:
        raise ValueError(f"{option('shard', 'I/N')} and a cluster exclude each other: the "
                         "cluster cuts the dataset into chunks itself")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size={chunk_size!r}; expected a positive number of cases")
    model, data = Path(os.path.abspath(model)), Path(os.path.abspath(data))
    store = Path(os.path.abspath(store))

    proto = load_model(model)
    spatial_hidden(proto)
    card = resolve_card(proto, options.card)
    for msg in card.assumed:
        log.warning("assumed: %s", msg)
    dataset = open_data(data, card, options)
    # the client's plan gives the run description; the workers build their own (on the
    # CPU here: the client needs no GPU)
    plan = build_plan(model, dataset, options.with_(provider="cpu"), card=card, proto=proto)
    n_total = len(dataset) if options.max_cases is None else min(len(dataset), int(options.max_cases))
    if len(dataset) == 0:
        raise DatasetError(f"the dataset {dataset_label(data)} holds no cases; check the path")
    manifest = dataset_manifest(dataset, n_total)
    parts = parts_dir(store)
    if options.resume and not options.overwrite:
        _clear_failed(store, parts)
    writer = StoreWriter(store, config=plan.config(manifest, n_total), layers=list(plan.layers),
                         classes=list(plan.classes), resume=options.resume and not options.overwrite,
                         overwrite=options.overwrite, manifest=manifest.as_json())
    plugin_name = None
    try:
        run = writer.run
        _check_published(parts, run)
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        bs = options.batch_size
        size = default_chunk_size(bs, n_total, n_workers) if chunk_size is None else \
            math.ceil(int(chunk_size) / bs) * bs
        if chunk_size is not None and size != int(chunk_size):
            log.info("chunk size %d rounded up to %d, a multiple of the batch size %d (a cluster "
                     "run scores the batches a single-process run scores)", chunk_size, size, bs)
        done = writer.done_ids()
        chunks, n_skipped = plan_chunks(dataset.ids, n_total, size, done)
        summary = DistributedSummary(
            store=store, provider=plan.provider, n_cases=n_total,
            n_scored=sum(len(c.indices) for c in chunks), n_skipped_done=len(done),
            n_failed=0, passes=len(plan.passes), seconds=0.0, assumed=list(card.assumed),
            chunks=len(chunks) + n_skipped, chunks_skipped=n_skipped, workers=n_workers,
            chunk_size=size)
        if progress:
            progress(n_total - summary.n_scored, n_total)
        results: list[dict[str, Any]] = []
        failed: list[tuple[Chunk, str]] = []
        if chunks:
            fp = _digest(run.as_json())[:12]
            plugin_name = f"protoseg-plan-{fp}-{uuid.uuid4().hex[:6]}"
            spec = {"model": str(model), "data": str(data), "options": options, "card": card,
                    "manifest": manifest, "n_total": n_total, "run": run,
                    "parts": str(parts), "threads_by_host": _threads_by_host(client)}
            plugin = _plugin_class()(plugin_name, spec)
            client.register_plugin(plugin, name=plugin_name)
            task_spec = {"run": run, "parts": str(parts)}
            results, failed, retried = _run_chunks(client, plugin_name, task_spec, chunks, fp,
                                                   progress, n_total - summary.n_scored, n_total)
            summary.chunks_retried = retried
        provider = sorted({r["provider"] for r in results}) or [plan.provider]
        for r in results:
            summary.n_failed += r["n_failed"]
            summary.n_no_reference += r["no_reference"]
            # "skipped" by the task: an earlier attempt of this run published the shard
            # and its worker died before reporting
            summary.chunks_done += 1
            summary.worker_seconds[r["worker"]] = summary.worker_seconds.get(r["worker"], 0.0) \
                + r["seconds"]
        for note in dict.fromkeys(n for r in results for n in r["notes"]):
            log.warning("%s", note)
        if summary.n_no_reference:
            log.warning("%d of %d cases have no mask: their scores against the ground truth are "
                        "NaN (status NO_REFERENCE); their label-free results are kept",
                        summary.n_no_reference, summary.n_scored)
        failed_files = []
        for chunk, error in failed:
            path = parts / f"failed-chunk-{chunk.start:09d}-{chunk.stop:09d}.h5"
            with ShardWriter(path, run, tag=f"client-{os.getpid()}") as w:
                w.add(_failed_result(plan, chunk, _case_groups(dataset, chunk.indices)))
                w.finish(shard_fingerprint(run, chunk_description(chunk)), chunk_description(chunk))
                w.publish()
            failed_files.append(path)
            summary.failed_chunks.append({"start": chunk.start, "stop": chunk.stop,
                                          "ids": list(chunk.ids), "error": error})
            summary.n_failed += len(chunk.indices)
        summary.chunks_failed = len(failed)
        remove_temp_files(parts)  # orphans of workers killed while writing
        _check_complete(store, parts, run, [str(c) for c in dataset.ids[:n_total]], failed_files)
        summary.provider = ",".join(provider)
        prov = dict(_provenance(plan, started, t_start), dataset=manifest.path or dataset_label(data),
                    provider=summary.provider,
                    backend=",".join(sorted({r["backend"] for r in results})) or plan.backend,
                    cluster={"workers": n_workers, "chunk_size": size,
                             "hosts": sorted({r["host"] for r in results}),
                             "chunks": summary.chunks, "failed_chunks": summary.chunks_failed})
        if failed_files:
            # the store with the failed cases; the parts stay so that the next run (resume)
            # scores only the failed chunks and rebuilds the store
            sources = ([store] if store.exists() else []) + list_part_files(parts) + failed_files
            assemble(sources, writer.run, store, prov)
            writer.close()
            log.warning("%d chunk(s) kept killing their workers: their %d case(s) have status "
                        "%r; run the same command again to score them again",
                        len(failed), sum(len(c.indices) for c, _ in failed), FAILED_STATUS)
        else:
            writer.finalize(prov)
    except BaseException:
        writer.close()
        raise
    finally:
        if plugin_name is not None:
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(plugin_name)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _threads_by_host(client: Any) -> dict[str, int]:
    """Worker threads per host (each worker takes cores / threads on its host)."""
    out: dict[str, int] = {}
    for addr, w in client.scheduler_info().get("workers", {}).items():
        host = _host_of(addr)
        out[host] = out.get(host, 0) + int(w.get("nthreads", 1) or 1)
    return out


def _run_chunks(client: Any, plugin_name: str, spec: Mapping[str, Any], chunks: list[Chunk],
                fp: str, progress: Callable[[int, int], None] | None, done0: int, total: int
                ) -> tuple[list[dict[str, Any]], list[tuple[Chunk, str]], int]:
    """Submit every chunk; chunks lost with their workers are tried once more, one at a
    time (a worker that dies then takes only that chunk with it)."""
    distributed = _import_distributed()
    gpu = any("GPU" in (w.get("resources") or {})
              for w in client.scheduler_info().get("workers", {}).values())
    extra = {"resources": {"GPU": 1}} if gpu else {}

    def submit(chunk: Chunk, round_: int) -> Any:
        key = f"protoseg-chunk-{fp}-{chunk.start}-{chunk.stop}-{round_}-{uuid.uuid4().hex[:6]}"
        return client.submit(_score_chunk, plugin_name, spec, chunk, key=key, pure=False, **extra)

    results: list[dict[str, Any]] = []
    lost: list[tuple[Chunk, str]] = []
    done, retried = done0, set()
    pending = {submit(c, 1): c for c in chunks}
    try:
        # results are fetched as tasks finish, and each future dropped once read: a result
        # lost with a worker afterwards is not recomputed
        for future, value in distributed.as_completed(list(pending), with_results=True,
                                                      raise_errors=False):
            chunk = pending.pop(future)
            if future.status == "finished":
                results.append(value)
                if _lost_workers(client, future.key) or value["io_retries"]:
                    retried.add(chunk.start)
                done += len(chunk.indices)
                if progress:
                    progress(done, total)
                continue
            exc = future.exception()
            if _is_killed_worker(exc):
                lost.append((chunk, " ".join(str(exc).split())))
            else:
                raise exc
    except BaseException:
        for f in pending:
            f.cancel()
        raise
    failed: list[tuple[Chunk, str]] = []
    for chunk, error in lost:
        log.warning("%s was lost with its worker(s) (%s); trying it once more on its own",
                    chunk.label, error)
        future = submit(chunk, 2)
        exc = future.exception()
        if exc is None:
            results.append(future.result())
            retried.add(chunk.start)
            done += len(chunk.indices)
            if progress:
                progress(done, total)
        elif _is_killed_worker(exc):
            failed.append((chunk, f"{chunk.label} ({', '.join(chunk.ids[:3])}"
                                  f"{' ...' if len(chunk.ids) > 3 else ''}) killed its workers: {error}"))
            done += len(chunk.indices)
            if progress:
                progress(done, total)
        else:
            raise exc
    return results, failed, len(retried)


def _check_complete(store: Path, parts: Path, run: RunInfo, expected: list[str],
                    failed_files: list[Path]) -> None:
    """Every case of the run exactly once in the parts (and a finished store), every shard
    with this run's fingerprint."""
    _check_published(parts, run)
    seen: dict[str, Path] = {}
    sources = ([store] if store.exists() else []) + list_part_files(parts) + failed_files
    for src in sources:
        ids, _ = read_part_ids(src)
        for c in ids:
            if c in seen and src != store:
                if seen[c] == store:
                    continue  # a part already copied into a finished store (finalize drops it)
                raise ValueError(f"case {c!r} is in both {seen[c]} and {src}; each case must be "
                                 f"scored once: remove one, or {option('overwrite')}")
            seen.setdefault(c, src)
    missing = [c for c in expected if c not in seen]
    if missing:
        raise ValueError(f"{len(missing)} case(s) of the run are in no shard "
                         f"({', '.join(repr(c) for c in missing[:3])}); run the same command again "
                         "to score them")
