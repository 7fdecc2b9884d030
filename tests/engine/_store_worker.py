"""Subprocess helper for the store's crash tests: a deterministic synthetic scoring run.

Run as ``python -m tests.engine._store_worker STORE N_CASES BATCH [--kill-point P]
[--signal FILE] [--shard I/K] [--no-finalize]``. With ``--kill-point`` the worker
reaches that point, creates ``--signal`` and sleeps, so that the test can SIGKILL it
there. Kill points:

* ``after-parts:K`` — after publishing K parts in this process;
* ``mid-part:K`` — inside the writing of part K (after some datasets, before publish);
* ``finalize-before-publish`` — the final store is fully written under its temp name;
* ``finalize-after-publish`` — the final store is in place, the parts not yet removed.

The arrays of a case depend only on its id, so any interrupted-and-resumed run must
end with exactly the store of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from engine import store as store_mod
from engine.store import StoreWriter

__all__ = ["CLASSES", "CONFIG", "LAYERS", "case_ids", "make_batch", "run"]

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


def case_ids(n: int) -> list[str]:
    """Ids of a synthetic dataset of n cases (some with characters HDF5 dislikes)."""
    return [f"sub/{i:03d}" if i % 5 == 0 else f"case.{i:03d}" for i in range(n)]


def _case_rng(case_id: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(case_id.encode()))


def make_batch(ids: list[str], index: list[int], *, maps_every: int = 3) -> dict[str, Any]:
    """Deterministic synthetic batch: every array of a case depends only on its id."""
    nb, k, n_layers = len(ids), len(CLASSES), len(LAYERS)
    batch: dict[str, Any] = {
        "case_ids": ids, "case_index": index,
        "case_status": ["ok" if i % 7 else "unreadable" for i in index],
        "case_group": [f"site{i % 2}" for i in index],
        "layer_score": np.empty((nb, k, n_layers)), "layer_status": np.empty((nb, k, n_layers)),
        "layer_tp": np.empty((nb, k, n_layers)), "layer_fp": np.empty((nb, k, n_layers)),
        "layer_fn": np.empty((nb, k, n_layers)),
        "input_score": np.empty((nb, k, N_INPUTS)), "input_status": np.empty((nb, k, N_INPUTS)),
        "output_dice": np.empty((nb, k)),
        "baselines": {"predicted_fraction": np.empty((nb, k)), "mean_entropy": np.empty((nb, k))},
        "maps": {},
    }
    for li, layer in enumerate(LAYERS):
        for field in ("score", "status", "tp", "fp", "fn"):
            batch[f"unit/{li}/{field}"] = np.empty((nb, k, layer["channels"]))
    for b, (cid, idx) in enumerate(zip(ids, index)):
        r = _case_rng(cid)
        batch["layer_score"][b] = r.random((k, n_layers))
        batch["layer_score"][b, 0, 0] = np.nan if idx % 4 == 0 else batch["layer_score"][b, 0, 0]
        batch["layer_status"][b] = r.integers(0, 7, (k, n_layers))
        for f in ("tp", "fp", "fn"):
            batch[f"layer_{f}"][b] = r.integers(0, 1000, (k, n_layers))
        batch["input_score"][b] = r.random((k, N_INPUTS))
        batch["input_status"][b] = r.integers(0, 7, (k, N_INPUTS))
        batch["output_dice"][b] = r.random(k)
        for name in batch["baselines"]:
            batch["baselines"][name][b] = r.random(k)
        for li, layer in enumerate(LAYERS):
            shape = (k, layer["channels"])
            batch[f"unit/{li}/score"][b] = r.random(shape)
            batch[f"unit/{li}/status"][b] = r.integers(0, 7, shape)
            for f in ("tp", "fp", "fn"):
                batch[f"unit/{li}/{f}"][b] = r.integers(0, 100, shape)
        if idx % maps_every == 0:
            batch["maps"][cid] = {
                layer["name"]: {"binary": r.random((8, 8)) > 0.5,
                                "probability": r.random((8, 8)).astype(np.float16)}
                for layer in LAYERS[:2]}
            batch["maps"][cid]["_image"] = r.random((1, 8, 8)).astype(np.float32)
            batch["maps"][cid]["_prediction"] = r.random((8, 8)).astype(np.float32)
    return batch


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
        orig = store_mod._write_array

        def slow_write(group: Any, key: str, data: Any, **kw: Any) -> Any:
            out = orig(group, key, data, **kw)
            if state["parts"] == target and group.file.attrs.get("encoding-type") == \
                    "protoseg-store-part":
                state["writes"] += 1
                if state["writes"] == 4:
                    group.file.flush()
                    _hang(signal)
            return out

        store_mod._write_array = slow_write  # type: ignore[assignment]
    elif kind == "finalize-before-publish":
        orig_publish = store_mod._publish

        def held_publish(tmp: Path, final: Path) -> None:
            if not final.parent.name.endswith(".parts"):
                _hang(signal)
            orig_publish(tmp, final)

        store_mod._publish = held_publish  # type: ignore[assignment]
    elif kind == "finalize-after-publish":
        orig_assemble = store_mod._assemble

        def held_assemble(*args: Any, **kw: Any) -> Path:
            out = orig_assemble(*args, **kw)
            _hang(signal)
            return out

        store_mod._assemble = held_assemble  # type: ignore[assignment]
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


def main() -> None:
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
