"""Overlapped stages (issue 15): reading ahead and writing behind change nothing but the time.

The overlapped run writes the store of the sequential one (``PROTOSEG_OVERLAP=0``); an error in
the reading or the writing thread surfaces in the caller with its own message and leaves the
finished parts; SIGINT and SIGKILL during an overlapped run, then a resume, give the same store.
Interruptions happen at a known point (a batch that blocks once N parts are on disk), never
after a guessed sleep.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from engine.errors import CaseError, option
from engine.run import score_dataset
from engine.run.stages import OVERLAP_ENV, ReadAhead, WriteBehind, overlap_enabled
from tests import models

ROOT = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ the stages on their own
def test_read_ahead_keeps_order_and_reads_one_batch_ahead_at_most():
    reads: list[list[int]] = []
    held = threading.Event()

    def read(idx):
        reads.append(list(idx))
        return [i * 10 for i in idx]

    batches = [[0, 1], [2, 3], [4]]
    got = []
    with ReadAhead(read, batches) as ra:
        for idx, cases in ra:
            got.append((idx, cases))
            if idx == [0, 1]:
                deadline = time.monotonic() + 10
                while len(reads) < 2 and time.monotonic() < deadline:  # the next one is read ahead
                    time.sleep(0.01)
                held.wait(0.2)  # ... and no further, however long the caller holds this batch
                assert reads == [[0, 1], [2, 3]]
    assert got == [([0, 1], [0, 10]), ([2, 3], [20, 30]), ([4], [40])]


@pytest.mark.parametrize("threaded", [True, False])
def test_a_read_error_is_raised_at_its_batch_turn_and_nothing_after_is_read(threaded):
    reads: list[int] = []

    def read(idx):
        reads.append(idx[0])
        if idx[0] == 2:
            raise KeyError("case 2 is unreadable")
        return idx

    got = []
    ra = ReadAhead(read, [[0], [1], [2], [3], [4]], threaded=threaded)
    with pytest.raises(KeyError, match="case 2 is unreadable"):
        for idx, _ in ra:
            got.append(idx[0])
    ra.close()
    assert got == [0, 1] and reads == [0, 1, 2]


@pytest.mark.parametrize("threaded", [True, False])
def test_write_behind_writes_in_order_and_stops_at_the_first_failure(threaded):
    written: list[str] = []

    def write(item):
        if item == "c":
            raise OSError(28, "No space left on device")
        written.append(item)

    w: WriteBehind[str] = WriteBehind(write, threaded=threaded)
    with pytest.raises(OSError, match="No space left") as info:
        for item in "abcde":
            w.submit(item, n=2)
        w.drain()
    assert w.error is info.value
    w.close()
    assert written == ["a", "b"] and w.written == 4  # nothing after the failed write


def test_the_threads_name_options_as_the_caller_spells_them():
    from engine.errors import cli_messages

    seen: list[str] = []
    with cli_messages():
        with ReadAhead(lambda idx: [option("batch_size", 2)], [[0]]) as ra:
            seen += [c for _, cases in ra for c in cases]
        with WriteBehind(lambda item: seen.append(option("overwrite"))) as w:
            w.submit(0)
            w.drain()
    assert seen == ["--batch-size 2", "--overwrite"]


def test_the_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "off")
    assert not overlap_enabled()
    monkeypatch.setenv(OVERLAP_ENV, "1")
    assert overlap_enabled()


# ------------------------------------------------------------------ runs
def _npz(path: Path, n: int, size: int = 32) -> Path:
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 2, indexing="ij"))
    images, masks = [], []
    for _ in range(n):
        c, r = rng.uniform(-0.3, 0.3, 2), rng.uniform(0.3, 0.6)
        m = (np.sqrt(((grid - c[:, None, None]) ** 2).sum(0)) < r).astype(np.uint8)
        images.append(m + 0.3 * rng.standard_normal(m.shape).astype(np.float32))
        masks.append(m)
    np.savez(path, images=np.stack(images).astype(np.float32), masks=np.stack(masks),
             ids=np.array([f"c{i:03d}" for i in range(n)]))
    return path


@pytest.fixture()
def unet(tmp_path):
    return models.save(models.unet(batch="N", size=32, metadata=True), tmp_path / "unet.onnx")


def _contents(store: Path) -> dict[str, Any]:
    """Every dataset of a store (values, dtype) and every attribute but the provenance."""
    out: dict[str, Any] = {}
    with h5py.File(store) as f:
        def visit(name, obj):
            attrs = {k: obj.attrs[k] for k in obj.attrs if k != "provenance"}
            out[name + "@attrs"] = repr(sorted((k, repr(v)) for k, v in attrs.items()))
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj[()])
        f.visititems(visit)
        out["/@attrs"] = repr(sorted((k, repr(f.attrs[k])) for k in f.attrs if k != "provenance"))
    return out


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = _contents(a), _contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        va, vb = ca[key], cb[key]
        if isinstance(va, tuple):
            assert va[0] == vb[0], key
            np.testing.assert_array_equal(va[1], vb[1], err_msg=key)
        else:
            assert va == vb, key


def _parts(store: Path) -> list[str]:
    folder = Path(f"{store}.parts")
    return sorted(p.name for p in folder.glob("part-*.h5")) if folder.is_dir() else []


def test_the_overlapped_run_writes_the_store_of_the_sequential_run(tmp_path, unet, monkeypatch):
    data = _npz(tmp_path / "d.npz", 7)
    kw = dict(batch_size=2, level="both", save_maps=["c001", "c006"])
    monkeypatch.setenv(OVERLAP_ENV, "0")
    seq = score_dataset(unet, data, tmp_path / "seq.h5", **kw)
    monkeypatch.setenv(OVERLAP_ENV, "1")
    names: set[str] = set()
    from engine.store import StoreWriter

    real = StoreWriter.write_batch

    def write_batch(self, result):
        names.add(threading.current_thread().name)
        return real(self, result)

    monkeypatch.setattr(StoreWriter, "write_batch", write_batch)
    done: list[tuple[int, int]] = []
    ovl = score_dataset(unet, data, tmp_path / "ovl.h5", progress=lambda d, t: done.append((d, t)), **kw)
    assert names == {"protoseg-write"}  # the parts really were written by the writing thread
    assert (ovl.n_scored, ovl.n_failed, seq.n_scored) == (7, 0, 7)
    assert done[0] == (0, 7) and done[-1] == (7, 7) and [d for d, _ in done] == sorted({d for d, _ in done})
    assert_same_store(ovl.store, seq.store)


def test_a_read_error_surfaces_with_its_message_and_keeps_the_finished_parts(tmp_path, unet, monkeypatch):
    from engine.datasets import Dataset, DatasetError

    data = _npz(tmp_path / "d.npz", 6)
    store = tmp_path / "run.h5"
    real = Dataset.__getitem__

    def getitem(self, i):
        if i == 3:
            raise DatasetError("cannot read case c003 (injected); fix the file")
        return real(self, i)

    monkeypatch.setattr(Dataset, "__getitem__", getitem)
    with pytest.raises(DatasetError, match=r"^cannot read case c003 \(injected\); fix the file$"):
        score_dataset(unet, data, store, batch_size=1)
    assert _parts(store) == ["part-000000.h5", "part-000001.h5", "part-000002.h5"] and not store.exists()
    monkeypatch.setattr(Dataset, "__getitem__", real)
    summary = score_dataset(unet, data, store, batch_size=1)
    assert summary.n_skipped_done == 3
    monkeypatch.setenv(OVERLAP_ENV, "0")
    assert_same_store(store, score_dataset(unet, data, tmp_path / "ref.h5", batch_size=1).store)


def test_a_write_error_surfaces_with_its_message_and_nothing_is_written_after_it(tmp_path, unet, monkeypatch):
    from engine.run import loop
    from engine.store import StoreWriter

    data = _npz(tmp_path / "d.npz", 6)
    store = tmp_path / "run.h5"
    real_write, real_score = StoreWriter.write_batch, loop.score_batch
    writes, scored = [], []

    def write_batch(self, result):
        writes.append(result.case_ids)
        if len(writes) == 3:
            raise OSError(28, "No space left on device (injected)")
        return real_write(self, result)

    def score_batch(plan, cases, index):
        scored.append(list(index))
        if len(scored) == 4:  # a later batch fails too: the earlier write error is the one raised
            raise CaseError("the model failed (injected)", case_id="c003")
        return real_score(plan, cases, index)

    monkeypatch.setattr(StoreWriter, "write_batch", write_batch)
    monkeypatch.setattr(loop, "score_batch", score_batch)
    with pytest.raises(OSError, match=r"No space left on device \(injected\)"):
        score_dataset(unet, data, store, batch_size=1)
    assert len(writes) == 3 and len(scored) <= 4  # nothing handed to the writer after its failure
    assert _parts(store) == ["part-000000.h5", "part-000001.h5"] and not store.exists()
    monkeypatch.undo()
    summary = score_dataset(unet, data, store, batch_size=1)
    assert summary.n_skipped_done == 2
    monkeypatch.setenv(OVERLAP_ENV, "0")
    assert_same_store(store, score_dataset(unet, data, tmp_path / "ref.h5", batch_size=1).store)


def test_a_scoring_error_publishes_the_batch_before_it(tmp_path, unet, monkeypatch):
    from engine.run import loop

    data = _npz(tmp_path / "d.npz", 5)
    store = tmp_path / "run.h5"
    real, calls = loop.score_batch, []

    def score_batch(plan, cases, index):
        calls.append(list(index))
        if len(calls) == 3:
            raise CaseError("tensor 'enc1' holds NaN (injected)", case_id="c004", path="d.npz")
        return real(plan, cases, index)

    monkeypatch.setattr(loop, "score_batch", score_batch)
    with pytest.raises(CaseError, match=r"holds NaN \(injected\)") as info:
        score_dataset(unet, data, store, batch_size=2)
    assert info.value.case_id == "c004"
    assert _parts(store) == ["part-000000.h5", "part-000001.h5"]  # batch 2 was being written


# ------------------------------------------------------------------ real signals, then resume
_WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    import engine.run.loop as loop
    import engine.store.writer as writer_mod
    block, after, flag = os.environ.get("BLOCK", ""), int(os.environ.get("AFTER", "-1")), Path({flag!r})
    real_score, real_publish, n = loop.score_batch, writer_mod.publish, {{"scored": 0, "published": 0}}

    def score_batch(plan, cases, index):  # main thread: blocks before scoring batch AFTER + 1
        if block == "scoring" and n["scored"] == after:
            flag.write_text("scoring")
            time.sleep(120)
        n["scored"] += 1
        return real_score(plan, cases, index)

    def publish(tmp, final):  # writing thread: blocks with part AFTER written, not yet published
        if block == "writing" and n["published"] == after:
            flag.write_text("writing")
            time.sleep(120)
        n["published"] += 1
        return real_publish(tmp, final)

    loop.score_batch, writer_mod.publish = score_batch, publish
    from cli.main import cli
    cli(sys.argv[1:], prog_name="protoseg")
""")


def _run_until_blocked(tmp_path: Path, args: list[str], *, block: str, after: int) -> subprocess.Popen:
    """Start `protoseg score` (overlapped) in a child that blocks at a known point; return it
    once it is blocked there."""
    flag = tmp_path / "flag"
    flag.unlink(missing_ok=True)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=str(ROOT), flag=str(flag)))
    env = {**os.environ, "BLOCK": block, "AFTER": str(after), OVERLAP_ENV: "1"}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert flag.exists(), proc.communicate(timeout=30)
    return proc


def _cli(*args: str, overlap: str = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, OVERLAP_ENV: overlap}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.slow
def test_sigint_during_an_overlapped_run_exits_130_and_the_resume_gives_the_same_store(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 9)
    store = tmp_path / "run.h5"
    args = ["score", str(unet), str(data), "-o", str(store), "-b", "2", "--level", "both", "-q"]
    proc = _run_until_blocked(tmp_path, args, block="scoring", after=3)
    deadline = time.monotonic() + 60  # the writing thread publishes batch 3 while batch 4 waits
    while len(_parts(store)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted") and "resume" in lines[0], err
    assert _parts(store) == ["part-000000.h5", "part-000001.h5", "part-000002.h5"] and not store.exists()
    res = _cli(*args, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["resumed_skipped"] == 6
    ref = _cli("score", str(unet), str(data), "-o", str(tmp_path / "ref.h5"), "-b", "2", "--level", "both",
               "-q", overlap="0")
    assert ref.returncode == 0, ref.stderr
    assert_same_store(store, tmp_path / "ref.h5")


@pytest.mark.slow
@pytest.mark.parametrize("block", ["scoring", "writing"])
def test_sigkill_during_an_overlapped_run_then_resume_gives_the_same_store(tmp_path, unet, block):
    data = _npz(tmp_path / "d.npz", 9)
    store = tmp_path / "run.h5"
    args = ["score", str(unet), str(data), "-o", str(store), "-b", "2", "--level", "both", "-q"]
    proc = _run_until_blocked(tmp_path, args, block=block, after=2)
    deadline = time.monotonic() + 60
    while len(_parts(store)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _parts(store) == ["part-000000.h5", "part-000001.h5"] and not store.exists()
    if block == "writing":  # killed with part 3 written under its temporary name, not published
        assert list(Path(f"{store}.parts").glob(".part-000002.h5.tmp-*"))
    res = _cli(*args)
    assert res.returncode == 0, res.stderr
    ref = _cli("score", str(unet), str(data), "-o", str(tmp_path / "ref.h5"), "-b", "2", "--level", "both",
               "-q", overlap="0")
    assert ref.returncode == 0, ref.stderr
    assert_same_store(store, tmp_path / "ref.h5")
