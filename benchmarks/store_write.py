"""Store benchmark (issue 15): CPU of writing the parts and finalizing, before vs after.

Run as a module::

    python -m benchmarks.store_write [--workload unet|deepbrain] [--cases N] [--volumes V]
        [--copies K] [--repeat R]

The batches of one real run are captured first (:func:`engine.run.score_dataset` at level
``both`` on a workload of :mod:`benchmarks.pipeline`: the deep 2-D U-Net, batch 8, 9 tensors, or
deepbrain, batch 1, 15 tensors; no saved maps, as in the pipeline benchmark). ``--copies K``
repeats them K times under new case ids (more parts, the same rows). Then, interleaved in one
process, R rounds after a warm-up round of:

- ``plain``: the writes as they were before this change — h5py's ``attrs`` for every encoding
  attribute, every parent group looked up again, and the previous ``assemble`` (each part
  opened three times, one write per part and dataset): the twins of
  ``tests/engine/store/test_write_speed.py``, patched in;
- ``fast``: the code as it is.

Each writes every batch with :meth:`StoreWriter.write_batch` (one part each) into a fresh
store and finalizes it; process CPU seconds of the writes and of ``finalize`` are reported
(medians), with their ratio. Both variants write the same store (the test checks it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import engine.store.encoding as encoding
import engine.store.merge as merge
import engine.store.writer as writer_mod
from benchmarks.pipeline import build_deepbrain, build_workload
from engine.run import score_dataset
from engine.store import BatchResult, StoreWriter
from tests.engine.store import test_write_speed as twins


def capture(workload: str, folder: Path, *, cases: int, volumes: int) -> tuple[list[BatchResult], Any]:
    """The batches a ``level="both"`` run of the workload writes, and the run's description."""
    if workload == "deepbrain":
        w = build_deepbrain(folder, volumes=volumes)
    else:
        w = build_workload(folder, n_cases=cases, size=256, base=16, kind="deep", levels=4)
    got: list[BatchResult] = []
    original = StoreWriter.write_batch
    run: list[Any] = []

    def record(self: StoreWriter, result: BatchResult) -> Path:
        got.append(result)
        run[:] = [self.run]
        return original(self, result)

    StoreWriter.write_batch = record  # type: ignore[method-assign]
    try:
        score_dataset(w.model, w.data, folder / "capture.h5", level="both", batch_size=w.batch,
                      provider="cpu", input_sa=True, overwrite=True, resume=False)
    finally:
        StoreWriter.write_batch = original  # type: ignore[method-assign]
    return got, run[0]


def copies(batches: Sequence[BatchResult], k: int) -> list[BatchResult]:
    """The batches ``k`` times, each copy under new case ids and dataset indices."""
    if k <= 1:
        return list(batches)
    step = 1 + max(int(i) for b in batches for i in b.case_index)
    out = []
    for c in range(k):
        for b in batches:
            out.append(dataclasses.replace(
                b, case_ids=tuple(f"{i}~{c}" for i in b.case_ids), case_index=b.case_index + c * step,
                grids={f"{i}~{c}": g for i, g in b.grids.items()}, maps={}, no_reference=()))
    return out


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """The writes as they were before (the twins of the test), patched in for the block."""
    patches = [(encoding, "set_encoding", twins._set_encoding_plain),
               (writer_mod, "set_encoding", twins._set_encoding_plain),
               (merge, "set_encoding", twins._set_encoding_plain),
               (writer_mod, "require_parent", twins._require_parent_plain),
               (writer_mod, "write_run_attrs", twins._write_run_attrs_plain),
               (writer_mod, "assemble", lambda sources, run, out, prov, **_: twins._assemble_plain(
                   list(sources), run, Path(out), dict(prov)))]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    try:
        for m, name, value in patches:
            setattr(m, name, value)
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def write_store(batches: Sequence[BatchResult], run: Any, folder: Path) -> tuple[float, float]:
    """Process CPU seconds of writing every batch as a part, and of finalizing the store."""
    w = StoreWriter(folder / "s.h5", config=run.config, layers=run.layers, classes=run.classes)
    c0 = time.process_time()
    for b in batches:
        w.write_batch(b)
    c1 = time.process_time()
    w.finalize({"benchmark": "store_write"})
    return c1 - c0, time.process_time() - c1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.store_write``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.store_write", description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=("unet", "deepbrain"), default="unet")
    p.add_argument("--cases", type=int, default=64, help="cases of the deep 2-D U-Net (default 64)")
    p.add_argument("--volumes", type=int, default=4, help="deepbrain volumes (default 4)")
    p.add_argument("--copies", type=int, default=1, help="the batches K times (default 1)")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="protoseg-store-bench-") as tmp:
        batches, run = capture(a.workload, Path(tmp) / "w", cases=a.cases, volumes=a.volumes)
        batches = copies(batches, a.copies)
        n = sum(b.n_cases for b in batches)
        print(f"{a.workload}: {len(batches)} parts, {n} cases, {len(run.layers)} tensors; "
              f"load {os.getloadavg()[0]:.2f}")
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "fast": []}
        for r in range(a.repeat + 1):
            for name in times:
                with tempfile.TemporaryDirectory(dir=tmp) as out, (plain() if name == "plain"
                                                                   else contextlib.nullcontext()):
                    t = write_store(batches, run, Path(out))
                if r:
                    times[name].append(t)
                print(f"round {r}{' (warm-up)' if not r else ''} {name:5s} write {t[0]:.3f} s "
                      f"finalize {t[1]:.3f} s CPU")
        med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
               for k, v in times.items()}
        for i, what in enumerate(("write", "finalize")):
            print(f"{what}: plain {med['plain'][i]:.3f} s, fast {med['fast'][i]:.3f} s CPU "
                  f"(x{med['plain'][i] / med['fast'][i]:.2f})")
        total = [sum(med[k]) for k in ("plain", "fast")]
        print(f"both: plain {total[0]:.3f} s, fast {total[1]:.3f} s CPU (x{total[0] / total[1]:.2f}); "
              f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
