"""Tests for engine.store.writer: round trip, resume, crash safety (SIGKILL), write errors."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.store.encoding as encoding
from engine.store import (
    StoreConfigError,
    StoreExistsError,
    StoreWriteError,
    StoreWriter,
    open_store,
    parts_dir,
)
from tests.engine.store import _worker as worker
from tests.engine.store._common import (
    BATCH,
    N,
    REPO,
    all_cases,
    all_names,
    assert_store_equals_batch,
    expected,
    kill_at,
    worker_env,
    writer,
)

# ------------------------------------------------------------------ round trip


def test_round_trip_equals_written_arrays(tmp_path):
    path = worker.run(tmp_path / "s.h5", N, BATCH)
    assert not parts_dir(path).exists()
    store = open_store(path)
    assert_store_equals_batch(store, expected(all_cases()))
    assert store.version == "1" and store.classes == worker.CLASSES
    assert store.config == worker.CONFIG and store.provenance == {"worker": "synthetic"}
    assert list(store.layers["name"]) == [x["name"] for x in worker.LAYERS]
    assert list(store.layers["channels"]) == [2, 3, 4]
    assert json.loads(store.layers["shape"][0]) == worker.LAYERS[0]["shape"]
    assert store.has_units


def test_every_group_and_dataset_is_versioned(tmp_path):
    path = worker.run(tmp_path / "s.h5", 4, 2)
    missing = []
    with h5py.File(path, "r") as f:
        for obj in [f] + [f[name] for name in all_names(f)]:
            if "encoding-type" not in obj.attrs or "encoding-version" not in obj.attrs:
                missing.append(obj.name)
        assert f["cases/id"].dtype.kind == "O"  # variable-length UTF-8 strings
        assert h5py.check_string_dtype(f["cases/id"].dtype).encoding == "utf-8"
        ls = f["layer_scores/score"]
        assert ls.compression == "gzip" and ls.chunks is not None
        assert ls.maxshape[0] is None
        assert isinstance(f.attrs["config"], str)
    assert missing == []


def test_batches_out_of_order_are_stored_in_case_order(tmp_path):
    w = writer(tmp_path / "s.h5")
    cases = all_cases(6)
    for chunk in (cases[4:], cases[:2], cases[2:4]):
        w.write_batch(expected(chunk))
    store = open_store(w.finalize({}))
    assert_store_equals_batch(store, expected(cases))


@settings(max_examples=6, deadline=None)
@given(st.permutations(range(7)), st.integers(1, 4))
def test_any_batching_gives_the_same_store(tmp_path_factory, order, size):
    tmp = tmp_path_factory.mktemp("perm")
    w = writer(tmp / "s.h5")
    cases = all_cases(7)
    shuffled = [cases[i] for i in order]
    for start in range(0, 7, size):
        w.write_batch(expected(shuffled[start:start + size]))
    assert_store_equals_batch(open_store(w.finalize({})), expected(cases))


# ------------------------------------------------------------------ resume and config

def test_resume_skips_done_cases(tmp_path):
    path = tmp_path / "s.h5"
    w = writer(path)
    cases = all_cases(8)
    w.write_batch(expected(cases[:3]))
    w.write_batch(expected(cases[3:5]))
    with pytest.raises(StoreExistsError, match="resume=True"):
        writer(path)  # takes the lock over from w, then refuses
    with pytest.raises(ValueError, match="closed"):
        w.write_batch(expected(cases[5:]))  # w was closed by the newer writer
    w2 = writer(path, resume=True)
    assert w2.done_ids() == {c for _, c in cases[:5]}
    with pytest.raises(ValueError, match="already in store"):
        w2.write_batch(expected(cases[4:6]))
    w2.write_batch(expected(cases[5:]))
    assert_store_equals_batch(open_store(w2.finalize({})), expected(cases))


def test_config_mismatch_names_each_key(tmp_path):
    path = tmp_path / "s.h5"
    with writer(path) as w:
        w.write_batch(expected(all_cases(2)))
    other = dict(worker.CONFIG, resize="downsample", threshold=0.3)
    with pytest.raises(StoreConfigError) as info:
        writer(path, config=other, resume=True)
    msg = str(info.value)
    assert "resize='upsample'" in msg and "resize='downsample'" in msg
    assert "threshold=0.5" in msg and "threshold=0.3" in msg and "guide" not in msg
    assert "\n" not in msg and "overwrite" in msg
    with pytest.raises(StoreConfigError, match="classes"):
        StoreWriter(path, config=worker.CONFIG, layers=worker.LAYERS, classes=[1],
                    resume=True)


def test_finished_store_resume_and_mismatch(tmp_path):
    path = worker.run(tmp_path / "s.h5", 5, 2)
    before = path.stat().st_mtime_ns
    w = writer(path, resume=True)
    assert w.done_ids() == set(worker.case_ids(5))
    assert w.finalize({"other": 1}) == path and path.stat().st_mtime_ns == before
    with pytest.raises(StoreConfigError, match="level='both'.*level='layer'"):
        writer(path, config=dict(worker.CONFIG, level="layer"), resume=True)
    with pytest.raises(StoreExistsError, match="overwrite"):
        writer(path)


def test_finished_store_extended_with_new_cases(tmp_path):
    path = worker.run(tmp_path / "s.h5", 5, 2)
    worker.run(path, 9, 2)  # resume with a larger dataset: only the 4 new cases are scored
    assert_store_equals_batch(open_store(path), expected(all_cases(9)))


def test_overwrite_starts_over(tmp_path):
    path = worker.run(tmp_path / "s.h5", 5, 2)
    other = dict(worker.CONFIG, resize="downsample")
    w = writer(path, config=other, overwrite=True)
    assert w.done_ids() == set()
    w.write_batch(expected(all_cases(2)))
    store = open_store(w.finalize({}))
    assert store.config["resize"] == "downsample" and len(store.cases) == 2


def test_damaged_part_is_discarded_and_redone(tmp_path):
    path = tmp_path / "s.h5"
    w = writer(path)
    cases = all_cases(6)
    w.write_batch(expected(cases[:3]))
    part = w.write_batch(expected(cases[3:]))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 3])
    w.close()
    with pytest.warns(UserWarning, match="discarding damaged part"):
        w2 = writer(path, resume=True)
    assert w2.done_ids() == {c for _, c in cases[:3]}
    w2.write_batch(expected(cases[3:]))
    assert_store_equals_batch(open_store(w2.finalize({})), expected(cases))


# ------------------------------------------------------------------ crash safety

@pytest.mark.parametrize("points", [
    ["after-parts:0"], ["after-parts:2"], ["mid-part:0"], ["mid-part:1", "mid-part:1"],
    ["after-parts:1", "mid-part:1"], ["finalize-before-publish"], ["finalize-after-publish"],
])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, points):
    store = tmp_path / "s.h5"
    for point in points:
        kill_at(store, point)
        if point.startswith("mid-part"):  # killed with a half-written part on disk
            assert list(parts_dir(store).glob(".part-*.tmp-*"))
    if points[-1].startswith("finalize-after"):
        assert store.exists()
    else:
        assert not store.exists() and parts_dir(store).exists()
    worker.run(store, N, BATCH)
    assert not parts_dir(store).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".lock" in p.name]
    reference = worker.run(tmp_path / "ref.h5", N, BATCH)
    result = open_store(store)
    assert_store_equals_batch(result, expected(all_cases()))
    assert len(set(result.cases["id"])) == N
    with h5py.File(store, "r") as a, h5py.File(reference, "r") as b:
        assert sorted(all_names(a)) == sorted(all_names(b))


# ------------------------------------------------------------------ write errors

def test_disk_full_keeps_published_parts_and_names_file_and_key(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    w = writer(path)
    cases = all_cases(6)
    w.write_batch(expected(cases[:3]))
    calls = {"n": 0}
    orig = h5py.Group.create_dataset
    orig_raw = encoding._create_raw  # contiguous datasets are made with low-level calls

    def full(self, name, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, name, *args, **kwargs)

    def full_raw(group, name, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig_raw(group, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    monkeypatch.setattr(encoding, "_create_raw", full_raw)
    with pytest.raises(StoreWriteError) as info:
        w.write_batch(expected(cases[3:]))
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and "\n" not in msg
    assert "part-000001.h5" in msg and "No space left" in msg
    assert "key 'cases/" in msg or "key 'input_scores/" in msg or "key 'baselines/" in msg
    monkeypatch.setattr(h5py.Group, "create_dataset", orig)
    monkeypatch.setattr(encoding, "_create_raw", orig_raw)
    w.close()
    parts = sorted(p.name for p in parts_dir(path).iterdir())
    assert parts == ["part-000000.h5", "run.json"]  # no half-written file left
    w2 = writer(path, resume=True)
    assert w2.done_ids() == {c for _, c in cases[:3]}
    w2.write_batch(expected(cases[3:]))
    assert_store_equals_batch(open_store(w2.finalize({})), expected(cases))


def test_disk_full_during_finalize_keeps_parts(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    w = writer(path)
    w.write_batch(expected(all_cases(3)))
    orig = h5py.Group.create_dataset

    def full(self, name, *args, **kwargs):
        if name == "score" and "unit_scores" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    with pytest.raises(StoreWriteError, match=r"key 'unit_scores/0/score'.*s\.h5"):
        w.finalize({})
    monkeypatch.setattr(h5py.Group, "create_dataset", orig)
    w.close()
    assert not path.exists() and len(list(parts_dir(path).glob("part-*"))) == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert_store_equals_batch(open_store(writer(path, resume=True).finalize({})),
                              expected(all_cases(3)))


def test_existing_non_store_file_is_not_clobbered(tmp_path):
    path = tmp_path / "s.h5"
    path.write_text("my notes")
    with pytest.raises(StoreExistsError, match="not a readable protoseg store"):
        writer(path, resume=True)
    with pytest.raises(StoreExistsError, match="exists"):
        writer(path)
    assert path.read_text() == "my notes"


def test_writer_in_another_process_is_refused(tmp_path):
    store = tmp_path / "s.h5"
    sig = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.engine.store._worker", str(store), "4", "2",
         "--kill-point", "after-parts:1", "--signal", str(sig)], cwd=REPO,
        env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sig.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sig.exists(), "worker did not start"
        with pytest.raises(StoreExistsError, match="another writer holds"):
            writer(store, resume=True)
    finally:
        proc.kill()
        proc.wait(30)
    w = writer(store, resume=True)  # the dead process's lock is gone
    assert len(w.done_ids()) == 2
    w.close()


def test_finalize_of_an_annotated_store_keeps_scores_and_drops_old_estimates(tmp_path):
    """Extending a finished, annotated store rebuilds it from its rows: estimates of the
    old case set do not fit the new one and are left out (as before the split)."""
    path = worker.run(tmp_path / "s.h5", 5, 2)
    worker.annotate(path, 1)
    worker.run(path, 7, 2)
    store = open_store(path)
    assert_store_equals_batch(store, expected(all_cases(7)))
    assert store.estimates() is None
    np.testing.assert_array_equal(store.cases["index"], np.arange(7))
