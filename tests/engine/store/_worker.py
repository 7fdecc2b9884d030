"""Subprocess helper for the store's crash tests: a deterministic synthetic scoring run.

Scoring: ``python -m tests.engine.store._worker STORE N_CASES BATCH [--kill-point P]
[--signal FILE] [--shard I/K] [--no-finalize]``. With ``--kill-point`` the worker
reaches that point, creates ``--signal`` and sleeps, so that the test can SIGKILL it
there. Kill points:

* ``after-parts:K`` — after publishing K parts in this process;
* ``mid-part:K`` — inside the writing of part K (after some datasets, before publish);
* ``finalize-before-publish`` — the final store is fully written under its temp name;
* ``finalize-after-publish`` — the final store is in place, the parts not yet removed.

Annotating: ``python -m tests.engine.store._worker annotate STORE VERSION [--kill-at P]
[--mark-syncs]`` writes :func:`estimates` ``VERSION`` into a finished store with
:func:`engine.store.annotate_estimates`; with ``--kill-at`` the process SIGKILLs itself
at that point (see :data:`ANNOTATE_KILL_POINTS`); with ``--mark-syncs`` it writes
:data:`SYNC_MARK` to stderr after each flush (a marker in a system-call trace).

The arrays of a case depend only on its id, so any interrupted-and-resumed run must
end with exactly the store of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import os
import signal as signals
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from engine.store import BatchResult, ScoreBlock, StoreWriter, annotate_estimates
from engine.store import annotate as annotate_mod
from engine.store import merge as merge_mod
from engine.store import writer as writer_mod

__all__ = ["CLASSES", "CONFIG", "LAYERS", "ANNOTATE_KILL_POINTS", "case_ids", "make_batch",
           "estimates", "run", "annotate", "ANNOTATE_NEW_FROM", "SYNC_MARK"]

CLASSES = [1, 2]
LAYERS = [
    {"index": 0, "name": "/enc/conv1/Relu_output_0", "layer": "enc.conv1", "op": "Relu",
     "channels": 2, "depth": 3, "shape": ["N", 2, 8, 8]},
    {"index": 1, "name": "/enc/conv2/Relu_output_0", "layer": "enc.conv2", "op": "Relu",
     "channels": 3, "depth": 6, "shape": ["N", 3, 4, 4]},
    {"index": 2, "name": "/dec/conv/Relu_output_0", "layer": "dec.conv", "op": "Relu",
     "channels": 4, "depth": 9, "shape": ["N", 4, 8, 8]},
]
CONFIG = {"guide": "prediction", "reference": "prediction", "resize": "upsample",
          "threshold": 0.5, "level": "both"}
N_INPUTS = 2  # input SA columns: all channels together + one channel
N_ESTIMATES = 6  # arrays per synthetic annotation

#: Where ``annotate`` SIGKILLs itself: what has happened by then.
ANNOTATE_KILL_POINTS = {
    "created": "anonymous staging group created, nothing in it yet",
    "half": "half of the estimate datasets written (in HDF5's cache)",
    "staged": "estimates and validation staged, not flushed",
    "synced": "staged objects flushed and fsync'ed, commit not started",
    "mid-commit": "previous /validation (or placeholder) unlinked, new one not linked "
                  "(in the cache)",
    "committed": "root links replaced in the cache, not flushed",
    "released": "commit flushed, previous objects freed in the cache, file not closed",
    "closed": "after annotate_estimates returned (the control)",
}
#: Kill points after which the store holds the new estimates (before them: the previous).
ANNOTATE_NEW_FROM = ("released", "closed")


def case_ids(n: int) -> list[str]:
    """Ids of a synthetic dataset of n cases (some with characters HDF5 dislikes)."""
    return [f"sub/{i:03d}" if i % 5 == 0 else f"case.{i:03d}" for i in range(n)]


def _case_rng(case_id: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(case_id.encode()))


def make_batch(ids: list[str], index: list[int], *, maps_every: int = 3) -> BatchResult:
    """Deterministic synthetic batch: every array of a case depends only on its id."""
    nb, k, n_layers = len(ids), len(CLASSES), len(LAYERS)
    layer = ScoreBlock.empty((nb, k, n_layers))
    units = {li: ScoreBlock.empty((nb, k, lay["channels"])) for li, lay in enumerate(LAYERS)}
    inp = ScoreBlock.empty((nb, k, N_INPUTS))
    dice = np.empty((nb, k))
    base = {"predicted_fraction": np.empty((nb, k)), "mean_entropy": np.empty((nb, k))}
    maps: dict[str, Any] = {}
    for b, (cid, idx) in enumerate(zip(ids, index)):
        r = _case_rng(cid)
        layer.score[b] = r.random((k, n_layers))
        layer.score[b, 0, 0] = np.nan if idx % 4 == 0 else layer.score[b, 0, 0]
        layer.status[b] = r.integers(0, 7, (k, n_layers))
        for f in (layer.tp, layer.fp, layer.fn):
            f[b] = r.integers(0, 1000, (k, n_layers))
        inp.score[b] = r.random((k, N_INPUTS))
        inp.status[b] = r.integers(0, 7, (k, N_INPUTS))
        dice[b] = r.random(k)
        for name in base:
            base[name][b] = r.random(k)
        for li, lay in enumerate(LAYERS):
            shape = (k, lay["channels"])
            units[li].score[b] = r.random(shape)
            units[li].status[b] = r.integers(0, 7, shape)
            for f in (units[li].tp, units[li].fp, units[li].fn):
                f[b] = r.integers(0, 100, shape)
        if idx % maps_every == 0:
            maps[cid] = {
                lay["name"]: {"binary": r.random((8, 8)) > 0.5,
                              "probability": r.random((8, 8)).astype(np.float16)}
                for lay in LAYERS[:2]}
            maps[cid]["_image"] = r.random((1, 8, 8)).astype(np.float32)
            maps[cid]["_prediction"] = r.random((8, 8)).astype(np.float32)
    return BatchResult(
        case_ids=tuple(ids), case_index=np.asarray(index, dtype=np.int64),
        case_status=tuple("ok" if i % 7 else "unreadable" for i in index),
        case_group=tuple(f"site{i % 2}" for i in index),
        layer=layer, units=units, input=inp, output_dice=dice, baselines=base, maps=maps)


def estimates(version: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, Any],
                                             dict[str, Any]]:
    """Synthetic annotation number ``version`` for n cases: (estimates, validation, info)."""
    r = np.random.default_rng(1000 + version)
    est = {f"est{j}": r.random(n) for j in range(N_ESTIMATES - 1)}
    est["flag"] = (r.random(n) > 0.5).astype(np.uint8)
    return est, {"version": version, "spearman": float(r.random())}, {"version": version}


def _hang(signal: Path | None) -> None:
    if signal is not None:
        signal.write_text("ready")
    while True:  # the test kills us here
        time.sleep(0.05)


def _install_kill_point(point: str | None, signal: Path | None) -> dict[str, int]:
    state = {"parts": 0, "writes": 0}
    if point is None:
        return state
    kind, _, arg = point.partition(":")
    if kind == "mid-part":
        target = int(arg)
        orig = writer_mod.write_array

        def slow_write(group: Any, key: str, data: Any, **kw: Any) -> Any:
            out = orig(group, key, data, **kw)
            if state["parts"] == target and group.file.attrs.get("encoding-type") == \
                    "protoseg-store-part":
                state["writes"] += 1
                if state["writes"] == 4:
                    group.file.flush()
                    _hang(signal)
            return out

        writer_mod.write_array = slow_write  # type: ignore[assignment]
    elif kind == "finalize-before-publish":
        orig_publish = merge_mod.publish

        def held_publish(tmp: Path, final: Path) -> None:
            if not final.parent.name.endswith(".parts"):
                _hang(signal)
            orig_publish(tmp, final)

        merge_mod.publish = held_publish  # type: ignore[assignment]
    elif kind == "finalize-after-publish":
        orig_assemble = writer_mod.assemble

        def held_assemble(*args: Any, **kw: Any) -> Path:
            out = orig_assemble(*args, **kw)
            _hang(signal)
            return out

        writer_mod.assemble = held_assemble  # type: ignore[assignment]
    elif kind != "after-parts":
        raise ValueError(f"unknown kill point {point!r}")
    return state


def run(path: str | Path, n_cases: int, batch_size: int, *, kill_point: str | None = None,
        signal: Path | None = None, shard: tuple[int, int] = (0, 1),
        finalize: bool = True, config: dict[str, Any] | None = None) -> Path:
    """Score (synthetically) every case of shard ``shard`` not yet done; finalize."""
    state = _install_kill_point(kill_point, signal)
    after = int(kill_point.split(":")[1]) if kill_point and kill_point.startswith(
        "after-parts") else None
    writer = StoreWriter(path, config=config or CONFIG, layers=LAYERS, classes=CLASSES,
                         resume=True)
    if after == 0:
        _hang(signal)  # killed after run.json, before any part
    done = writer.done_ids()
    todo = [(i, c) for i, c in enumerate(case_ids(n_cases))
            if i % shard[1] == shard[0] and c not in done]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        writer.write_batch(make_batch([c for _, c in chunk], [i for i, _ in chunk]))
        state["parts"] += 1
        if after is not None and state["parts"] == after:
            _hang(signal)
    if finalize:
        return writer.finalize({"worker": "synthetic"})
    writer.close()
    return Path(path)


# --------------------------------------------------------------------------- annotate

def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signals.SIGKILL)


def _install_annotate_kill(point: str) -> None:
    """Patch the annotate module so that the process SIGKILLs itself at ``point``."""
    if point not in ANNOTATE_KILL_POINTS:
        raise ValueError(f"unknown kill point {point!r}; expected {list(ANNOTATE_KILL_POINTS)}")
    m = annotate_mod
    calls = {"write": 0, "sync": 0}
    if point in ("created", "half"):
        orig_write = m.write_array
        stop = 0 if point == "created" else N_ESTIMATES // 2

        def write(*a: Any, **k: Any) -> Any:
            if calls["write"] == stop:
                _die()
            calls["write"] += 1
            return orig_write(*a, **k)

        m.write_array = write  # type: ignore[assignment]
    elif point == "staged":
        m._sync = lambda f: _die()  # type: ignore[assignment]
    elif point in ("synced", "committed"):
        orig_commit = m._commit

        def commit(*a: Any, **k: Any) -> None:
            if point == "synced":
                _die()
            orig_commit(*a, **k)
            _die()

        m._commit = commit  # type: ignore[assignment]
    elif point == "mid-commit":
        orig_del = h5py.Group.__delitem__

        def delitem(self: Any, name: Any) -> None:
            orig_del(self, name)
            _die()

        h5py.Group.__delitem__ = delitem  # type: ignore[method-assign]
    elif point == "released":
        orig_release = m._release

        def release(staging: Any) -> None:
            orig_release(staging)
            _die()

        m._release = release  # type: ignore[assignment]


#: Written to stderr after each flush of an annotation with ``mark_syncs`` (so that a
#: system-call trace shows where each flush ends).
SYNC_MARK = b"protoseg-annotate-synced\n"


def annotate(path: str | Path, version: int, *, kill_at: str | None = None,
             mark_syncs: bool = False) -> None:
    """Write synthetic annotation ``version`` into the store; die at ``kill_at``."""
    if kill_at is not None:
        _install_annotate_kill(kill_at)
    if mark_syncs:
        orig_sync = annotate_mod._sync

        def sync(f: Any) -> None:
            orig_sync(f)
            os.write(2, SYNC_MARK)

        annotate_mod._sync = sync  # type: ignore[assignment]
    with h5py.File(path, "r") as f:
        n = int(f["cases/id"].shape[0])
    est, val, info = estimates(version, n)
    annotate_estimates(path, est, validation=val, info=info)
    if kill_at == "closed":
        _die()


def main() -> None:
    if sys.argv[1:2] == ["annotate"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("store")
        parser.add_argument("version", type=int)
        parser.add_argument("--kill-at")
        parser.add_argument("--mark-syncs", action="store_true")
        args = parser.parse_args(sys.argv[2:])
        annotate(args.store, args.version, kill_at=args.kill_at, mark_syncs=args.mark_syncs)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("n_cases", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--kill-point")
    parser.add_argument("--signal", type=Path)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--no-finalize", action="store_true")
    args = parser.parse_args()
    i, k = (int(v) for v in args.shard.split("/"))
    run(args.store, args.n_cases, args.batch, kill_point=args.kill_point, signal=args.signal,
        shard=(i, k), finalize=not args.no_finalize)


if __name__ == "__main__":
    main()
