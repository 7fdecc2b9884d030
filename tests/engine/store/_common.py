"""Helpers shared by the store tests: a writer on the synthetic run, the expected store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from engine.store import BatchResult, Store, StoreWriter
from tests.engine.store import _worker as worker

__all__ = ["REPO", "DATA", "N", "BATCH", "writer", "expected", "assert_store_equals_batch",
           "all_cases", "all_names", "kill_at", "worker_env"]

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "tests" / "data"
N, BATCH = 11, 3


def worker_env() -> dict[str, str]:
    """Environment for a ``python -m tests.engine.store._worker`` subprocess."""
    return dict(os.environ, PYTHONPATH=str(REPO))


def writer(path: Path, **kw: Any) -> StoreWriter:
    """A StoreWriter for the synthetic run's layers and classes."""
    kw.setdefault("config", worker.CONFIG)
    return StoreWriter(path, layers=worker.LAYERS, classes=worker.CLASSES, **kw)


def expected(ids_index: list[tuple[int, str]]) -> BatchResult:
    """The batch of these cases written in one piece: what a store must hold."""
    return worker.make_batch([c for _, c in ids_index], [i for i, _ in ids_index])


def all_cases(n: int = N) -> list[tuple[int, str]]:
    """(dataset index, case id) of the synthetic dataset's n cases."""
    return list(enumerate(worker.case_ids(n)))


def all_names(f: h5py.File) -> list[str]:
    """Every group and dataset path in an open file."""
    names: list[str] = []
    f.visit(names.append)
    return names


def assert_store_equals_batch(store: Store, batch: BatchResult) -> None:
    """Compare every table of a store with the arrays of one reference batch."""
    assert list(store.cases["id"]) == list(batch.case_ids)
    assert list(store.cases["index"]) == list(batch.case_index)
    assert list(store.cases["status"]) == list(batch.case_status)
    assert list(store.cases["group"]) == list(batch.case_group)
    ls = store.layer_scores()
    for field, arr in batch.layer.items():
        np.testing.assert_array_equal(ls[field], arr)
    assert ls["score"].dtype == np.float64 and ls["status"].dtype == np.uint8
    assert ls["tp"].dtype == np.int64
    for li, block in batch.units.items():
        us = store.unit_scores(li)
        for field, arr in block.items():
            np.testing.assert_array_equal(us[field], arr)
            assert us[field].dtype == arr.dtype
    assert batch.input is not None
    ins = store.input_scores()
    for field, arr in batch.input.items():
        np.testing.assert_array_equal(ins[field], arr)
    np.testing.assert_array_equal(store.output_dice(), batch.output_dice)
    np.testing.assert_array_equal(store.cases["output_dice"], batch.output_dice[:, 0])
    base = store.baselines()
    assert set(base) == set(batch.baselines)
    for k, v in batch.baselines.items():
        np.testing.assert_array_equal(base[k], v)
    np.testing.assert_array_equal(store.cases["predicted_fraction"],
                                  batch.baselines["predicted_fraction"][:, 0])
    assert sorted(store.map_case_ids) == sorted(batch.maps)
    for cid, entries in batch.maps.items():
        got = store.maps(cid)
        assert set(got) == set(entries)
        for name, value in entries.items():
            if isinstance(value, dict):
                np.testing.assert_array_equal(got[name]["binary"], value["binary"])
                assert got[name]["binary"].dtype == bool
                np.testing.assert_array_equal(got[name]["probability"], value["probability"])
                assert got[name]["probability"].dtype == np.float16
            else:
                np.testing.assert_array_equal(got[name], value)


def kill_at(store: Path, point: str, n: int = N, batch: int = BATCH) -> None:
    """Run the scoring worker up to ``point`` and SIGKILL it there."""
    sig = store.parent / f"signal-{point.replace(':', '-')}"
    sig.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.engine.store._worker", str(store), str(n), str(batch),
         "--kill-point", point, "--signal", str(sig)], cwd=REPO, env=worker_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sig.exists():
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("worker never reached the kill point")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
