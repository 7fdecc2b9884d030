"""Tests for engine.store: round trip, resume, crash safety (SIGKILL), merge, versions."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.store import (
    Store,
    StoreConfigError,
    StoreExistsError,
    StoreVersionError,
    StoreWriteError,
    StoreWriter,
    merge_parts,
    open_store,
    parts_dir,
)
from tests.engine import _store_worker as worker

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
N, BATCH = 11, 3


def _writer(path, **kw) -> StoreWriter:
    kw.setdefault("config", worker.CONFIG)
    return StoreWriter(path, layers=worker.LAYERS, classes=worker.CLASSES, **kw)


def _expected(ids_index: list[tuple[int, str]]) -> dict:
    """The batch of these cases written in one piece: what a store must hold."""
    return worker.make_batch([c for _, c in ids_index], [i for i, _ in ids_index])


def _assert_store_equals_batch(store: Store, batch: dict) -> None:
    """Compare every table of a store with the arrays of one reference batch."""
    assert list(store.cases["id"]) == list(batch["case_ids"])
    assert list(store.cases["index"]) == list(batch["case_index"])
    assert list(store.cases["status"]) == list(batch["case_status"])
    assert list(store.cases["group"]) == list(batch["case_group"])
    ls = store.layer_scores()
    np.testing.assert_array_equal(ls["score"], batch["layer_score"])
    np.testing.assert_array_equal(ls["status"], batch["layer_status"].astype(np.uint8))
    for f in ("tp", "fp", "fn"):
        np.testing.assert_array_equal(ls[f], batch[f"layer_{f}"])
    assert ls["score"].dtype == np.float64 and ls["status"].dtype == np.uint8
    assert ls["tp"].dtype == np.int64
    for li in range(len(worker.LAYERS)):
        us = store.unit_scores(li)
        for f in ("score", "status", "tp", "fp", "fn"):
            np.testing.assert_array_equal(us[f], batch[f"unit/{li}/{f}"].astype(us[f].dtype))
    ins = store.input_scores()
    np.testing.assert_array_equal(ins["score"], batch["input_score"])
    np.testing.assert_array_equal(store.output_dice(), batch["output_dice"])
    np.testing.assert_array_equal(store.cases["output_dice"], batch["output_dice"][:, 0])
    base = store.baselines()
    assert set(base) == set(batch["baselines"])
    for k, v in batch["baselines"].items():
        np.testing.assert_array_equal(base[k], v)
    np.testing.assert_array_equal(store.cases["predicted_fraction"],
                                  batch["baselines"]["predicted_fraction"][:, 0])
    assert sorted(store.map_case_ids) == sorted(batch["maps"])
    for cid, entries in batch["maps"].items():
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


def _all_cases(n: int = N) -> list[tuple[int, str]]:
    return list(enumerate(worker.case_ids(n)))


# ------------------------------------------------------------------ round trip

def test_round_trip_equals_written_arrays(tmp_path):
    path = worker.run(tmp_path / "s.h5", N, BATCH)
    assert not parts_dir(path).exists()
    store = open_store(path)
    _assert_store_equals_batch(store, _expected(_all_cases()))
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
        for obj in [f] + [f[name] for name in _all_names(f)]:
            if "encoding-type" not in obj.attrs or "encoding-version" not in obj.attrs:
                missing.append(obj.name)
        assert f["cases/id"].dtype.kind == "O"  # variable-length UTF-8 strings
        assert h5py.check_string_dtype(f["cases/id"].dtype).encoding == "utf-8"
        ls = f["layer_scores/score"]
        assert ls.compression == "gzip" and ls.chunks is not None
        assert ls.maxshape[0] is None
        assert isinstance(f.attrs["config"], str)
    assert missing == []


def _all_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visit(names.append)
    return names


def test_layer_table_long_form_and_class_selection(tmp_path):
    store = open_store(worker.run(tmp_path / "s.h5", 4, 2))
    t = store.layer_table()
    n, k, L = 4, 2, 3
    assert t.shape == (n * k * L,)
    ls = store.layer_scores()
    row = t[(t["case"] == store.cases["id"][2]) & (t["class"] == 2) & (t["layer_index"] == 1)]
    assert row["score"][0] == ls["score"][2, 1, 1] and row["name"][0] == worker.LAYERS[1]["name"]
    np.testing.assert_array_equal(store.layer_scores(cls=2)["score"], ls["score"][:, 1])
    with pytest.raises(KeyError, match=r"classes are \[1, 2\]"):
        store.layer_scores(cls=5)
    np.testing.assert_array_equal(store.unit_scores("enc.conv2")["score"],
                                  store.unit_scores(1)["score"])
    with pytest.raises(KeyError, match="enc.conv"):
        store.unit_scores("enc.conv3")


def test_pandas_tables(tmp_path):
    pd = pytest.importorskip("pandas")
    store = open_store(worker.run(tmp_path / "s.h5", 3, 2))
    df = store.layer_table(pandas=True)
    assert isinstance(df, pd.DataFrame) and len(df) == 3 * 2 * 3


def test_pandas_absent_gives_clear_error(tmp_path, monkeypatch):
    store = open_store(worker.run(tmp_path / "s.h5", 2, 2))
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pandas=True needs pandas"):
        store.layer_table(pandas=True)


def test_estimates_round_trip(tmp_path):
    path = worker.run(tmp_path / "s.h5", 4, 2)
    store = open_store(path)
    assert store.estimates() is None and store.validation() is None
    paper = np.array([0.1, np.nan, 0.3, 0.4])
    store.write_estimates({"paper": paper}, validation={"spearman": 0.7, "n": 4},
                          info={"layers": ["a", "b"]})
    again = open_store(path)
    est = again.estimates()
    np.testing.assert_array_equal(est["paper"], paper)
    assert est["info"] == {"layers": ["a", "b"]}
    assert again.validation() == {"spearman": 0.7, "n": 4}
    _assert_store_equals_batch(again, _expected(_all_cases(4)))  # rest untouched
    with pytest.raises(ValueError, match="expected 4 rows"):
        again.write_estimates({"paper": np.zeros(3)})


def test_batches_out_of_order_are_stored_in_case_order(tmp_path):
    w = _writer(tmp_path / "s.h5")
    cases = _all_cases(6)
    for chunk in (cases[4:], cases[:2], cases[2:4]):
        w.write_batch(_expected(chunk))
    store = open_store(w.finalize({}))
    _assert_store_equals_batch(store, _expected(cases))


@settings(max_examples=6, deadline=None)
@given(st.permutations(range(7)), st.integers(1, 4))
def test_any_batching_gives_the_same_store(tmp_path_factory, order, size):
    tmp = tmp_path_factory.mktemp("perm")
    w = _writer(tmp / "s.h5")
    cases = _all_cases(7)
    shuffled = [cases[i] for i in order]
    for start in range(0, 7, size):
        w.write_batch(_expected(shuffled[start:start + size]))
    _assert_store_equals_batch(open_store(w.finalize({})), _expected(cases))


# ------------------------------------------------------------------ resume and config

def test_resume_skips_done_cases(tmp_path):
    path = tmp_path / "s.h5"
    w = _writer(path)
    cases = _all_cases(8)
    w.write_batch(_expected(cases[:3]))
    w.write_batch(_expected(cases[3:5]))
    with pytest.raises(StoreExistsError, match="resume=True"):
        _writer(path)  # takes the lock over from w, then refuses
    with pytest.raises(ValueError, match="closed"):
        w.write_batch(_expected(cases[5:]))  # w was closed by the newer writer
    w2 = _writer(path, resume=True)
    assert w2.done_ids() == {c for _, c in cases[:5]}
    with pytest.raises(ValueError, match="already in store"):
        w2.write_batch(_expected(cases[4:6]))
    w2.write_batch(_expected(cases[5:]))
    _assert_store_equals_batch(open_store(w2.finalize({})), _expected(cases))


def test_config_mismatch_names_each_key(tmp_path):
    path = tmp_path / "s.h5"
    with _writer(path) as w:
        w.write_batch(_expected(_all_cases(2)))
    other = dict(worker.CONFIG, resize="downsample", threshold=0.3)
    with pytest.raises(StoreConfigError) as info:
        _writer(path, config=other, resume=True)
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
    w = _writer(path, resume=True)
    assert w.done_ids() == set(worker.case_ids(5))
    assert w.finalize({"other": 1}) == path and path.stat().st_mtime_ns == before
    with pytest.raises(StoreConfigError, match="level='both'.*level='layer'"):
        _writer(path, config=dict(worker.CONFIG, level="layer"), resume=True)
    with pytest.raises(StoreExistsError, match="overwrite"):
        _writer(path)


def test_finished_store_extended_with_new_cases(tmp_path):
    path = worker.run(tmp_path / "s.h5", 5, 2)
    worker.run(path, 9, 2)  # resume with a larger dataset: only the 4 new cases are scored
    _assert_store_equals_batch(open_store(path), _expected(_all_cases(9)))


def test_overwrite_starts_over(tmp_path):
    path = worker.run(tmp_path / "s.h5", 5, 2)
    other = dict(worker.CONFIG, resize="downsample")
    w = _writer(path, config=other, overwrite=True)
    assert w.done_ids() == set()
    w.write_batch(_expected(_all_cases(2)))
    store = open_store(w.finalize({}))
    assert store.config["resize"] == "downsample" and len(store.cases) == 2


def test_damaged_part_is_discarded_and_redone(tmp_path):
    path = tmp_path / "s.h5"
    w = _writer(path)
    cases = _all_cases(6)
    w.write_batch(_expected(cases[:3]))
    part = w.write_batch(_expected(cases[3:]))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 3])
    w.close()
    with pytest.warns(UserWarning, match="discarding damaged part"):
        w2 = _writer(path, resume=True)
    assert w2.done_ids() == {c for _, c in cases[:3]}
    w2.write_batch(_expected(cases[3:]))
    _assert_store_equals_batch(open_store(w2.finalize({})), _expected(cases))


def test_bad_batches_are_refused(tmp_path):
    w = _writer(tmp_path / "s.h5")
    good = _expected(_all_cases(2))
    with pytest.raises(ValueError, match="unknown key 'layer_scor'.*layer_score"):
        w.write_batch(dict(good, layer_scor=good["layer_score"]))
    with pytest.raises(ValueError, match=r"layer_score.*expected \(2, 2, 3\)"):
        w.write_batch(dict(good, layer_score=np.zeros((2, 2, 4))))
    with pytest.raises(ValueError, match="more than once"):
        w.write_batch(dict(good, case_ids=["a", "a"]))
    with pytest.raises(ValueError, match="not in this batch"):
        w.write_batch(dict(good, maps={"zzz": {}}))
    with pytest.raises(ValueError, match="expected 2 cases"):
        w.write_batch(dict(good, output_dice=np.zeros((3, 2))))
    with pytest.raises(ValueError, match="layer_tp.*NaN"):
        w.write_batch(dict(good, layer_tp=np.full((2, 2, 3), np.nan)))
    with pytest.raises(ValueError, match="layer_status.*out-of-range"):
        w.write_batch(dict(good, layer_status=np.full((2, 2, 3), -1.0)))
    with pytest.raises(ValueError, match="unknown key 'unit/x/score'"):
        w.write_batch(dict(good, **{"unit/x/score": np.zeros((2, 2, 2))}))
    assert w.done_ids() == set() and list(parts_dir(w.path).glob("part-*")) == []
    w.write_batch(good)
    later = _expected(_all_cases(4)[2:])
    del later["output_dice"]
    with pytest.raises(ValueError, match=r"missing arrays \['output_dice'\]"):
        w.write_batch(later)
    w.close()
    w2 = _writer(w.path, resume=True)  # the schema is known again after resume
    with pytest.raises(ValueError, match="same arrays"):
        w2.write_batch(later)


# ------------------------------------------------------------------ crash safety

def _kill_at(store: Path, point: str, n: int = N, batch: int = BATCH) -> None:
    sig = store.parent / f"signal-{point.replace(':', '-')}"
    sig.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.engine._store_worker", str(store), str(n), str(batch),
         "--kill-point", point, "--signal", str(sig)], cwd=REPO, env=env,
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


@pytest.mark.parametrize("points", [
    ["after-parts:0"], ["after-parts:2"], ["mid-part:0"], ["mid-part:1", "mid-part:1"],
    ["after-parts:1", "mid-part:1"], ["finalize-before-publish"], ["finalize-after-publish"],
])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, points):
    store = tmp_path / "s.h5"
    for point in points:
        _kill_at(store, point)
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
    _assert_store_equals_batch(result, _expected(_all_cases()))
    assert len(set(result.cases["id"])) == N
    with h5py.File(store, "r") as a, h5py.File(reference, "r") as b:
        assert sorted(_all_names(a)) == sorted(_all_names(b))


# ------------------------------------------------------------------ merge

def test_merge_of_two_shards_equals_one_run(tmp_path):
    worker.run(tmp_path / "w0.h5", N, 2, shard=(0, 2), finalize=False)
    worker.run(tmp_path / "w1.h5", N, 2, shard=(1, 2), finalize=False)
    out = merge_parts([parts_dir(tmp_path / "w0.h5"), parts_dir(tmp_path / "w1.h5")],
                      tmp_path / "all.h5", expected_ids=worker.case_ids(N))
    store = open_store(out)
    _assert_store_equals_batch(store, _expected(_all_cases()))
    assert "merged_from" in store.provenance


def test_merge_of_finished_shards(tmp_path):
    a = worker.run(tmp_path / "w0.h5", N, 2, shard=(0, 2))
    b = worker.run(tmp_path / "w1.h5", N, 2, shard=(1, 2))
    _assert_store_equals_batch(open_store(merge_parts([b, a], tmp_path / "all.h5")),
                               _expected(_all_cases()))


def test_merge_refuses_overlap_mismatch_and_missing(tmp_path):
    worker.run(tmp_path / "w0.h5", 6, 2, shard=(0, 1), finalize=False)
    worker.run(tmp_path / "w1.h5", 6, 2, shard=(1, 2), finalize=False)
    worker.run(tmp_path / "w2.h5", 6, 2, shard=(0, 2), finalize=False,
               config=dict(worker.CONFIG, guide="ground_truth"))
    p = [parts_dir(tmp_path / f"w{i}.h5") for i in range(3)]
    with pytest.raises(ValueError, match="is in both"):
        merge_parts([p[0], p[1]], tmp_path / "m.h5")
    with pytest.raises(StoreConfigError, match="guide='prediction'.*guide='ground_truth'"):
        merge_parts([p[1], p[2]], tmp_path / "m.h5")
    with pytest.raises(ValueError, match="3 expected case"):
        merge_parts([p[1]], tmp_path / "m.h5", expected_ids=worker.case_ids(6))
    part = sorted(p[1].glob("part-*.h5"))[0]
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read part"):
        merge_parts([p[1]], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


# ------------------------------------------------------------------ versions

def test_newer_store_version_is_refused_with_advice(tmp_path):
    path = worker.run(tmp_path / "s.h5", 2, 2)
    with h5py.File(path, "r+") as f:
        f.attrs["encoding-version"] = "2"
    with pytest.raises(StoreVersionError, match=r"newer protoseg \(store version 2.*upgrade"):
        open_store(path)


def test_newer_dataset_version_and_unknown_type_refused(tmp_path):
    path = worker.run(tmp_path / "s.h5", 2, 2)
    with h5py.File(path, "r+") as f:
        f["layer_scores/score"].attrs["encoding-version"] = "3"
        f["baselines/mean_entropy"].attrs["encoding-type"] = "sparse-array"
    store = open_store(path)
    with pytest.raises(StoreVersionError, match="store version 3.*upgrade protoseg"):
        store.layer_scores()
    with pytest.raises(StoreVersionError, match="sparse-array"):
        store.baselines()


def test_not_a_store(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["a"] = 1
    with pytest.raises(StoreVersionError, match="not written by protoseg"):
        open_store(tmp_path / "x.h5")
    (tmp_path / "y.h5").write_text("nope")
    with pytest.raises(ValueError, match="not a readable HDF5 store"):
        open_store(tmp_path / "y.h5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store(tmp_path / "z.h5")


def test_unfinished_run_is_named_when_opening(tmp_path):
    worker.run(tmp_path / "s.h5", 4, 2, finalize=False)
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        open_store(tmp_path / "s.h5")


def test_version_1_fixture_still_reads():
    """tests/data/store-v1.h5 was written by protoseg 0.1.0 (tests/data/make_store_v1.py)."""
    store = open_store(DATA / "store-v1.h5")
    assert store.version == "1" and store.classes == [1]
    n = len(store.cases)
    assert n == 4 and list(store.cases["id"]) == ["a", "b", "c", "d"]
    ls = store.layer_scores()
    # values defined by the fixture script: score = case / 10 + layer / 100
    expected = np.arange(n)[:, None, None] / 10 + np.arange(2)[None, None, :] / 100
    np.testing.assert_allclose(ls["score"], expected)
    assert store.maps("b")["conv1"]["binary"].sum() == 8


# ------------------------------------------------------------------ write errors

def test_disk_full_keeps_published_parts_and_names_file_and_key(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    w = _writer(path)
    cases = _all_cases(6)
    w.write_batch(_expected(cases[:3]))
    calls = {"n": 0}
    orig = h5py.Group.create_dataset

    def full(self, name, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    with pytest.raises(StoreWriteError) as info:
        w.write_batch(_expected(cases[3:]))
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and "\n" not in msg
    assert "part-000001.h5" in msg and "No space left" in msg
    assert "key 'cases/" in msg or "key 'input_scores/" in msg or "key 'baselines/" in msg
    monkeypatch.setattr(h5py.Group, "create_dataset", orig)
    w.close()
    parts = sorted(p.name for p in parts_dir(path).iterdir())
    assert parts == ["part-000000.h5", "run.json"]  # no half-written file left
    w2 = _writer(path, resume=True)
    assert w2.done_ids() == {c for _, c in cases[:3]}
    w2.write_batch(_expected(cases[3:]))
    _assert_store_equals_batch(open_store(w2.finalize({})), _expected(cases))


def test_disk_full_during_finalize_keeps_parts(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    w = _writer(path)
    w.write_batch(_expected(_all_cases(3)))
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
    _assert_store_equals_batch(open_store(_writer(path, resume=True).finalize({})),
                               _expected(_all_cases(3)))


def test_existing_non_store_file_is_not_clobbered(tmp_path):
    path = tmp_path / "s.h5"
    path.write_text("my notes")
    with pytest.raises(StoreExistsError, match="not a readable protoseg store"):
        _writer(path, resume=True)
    with pytest.raises(StoreExistsError, match="exists"):
        _writer(path)
    assert path.read_text() == "my notes"


def test_writer_in_another_process_is_refused(tmp_path):
    store = tmp_path / "s.h5"
    sig = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.engine._store_worker", str(store), "4", "2",
         "--kill-point", "after-parts:1", "--signal", str(sig)], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sig.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sig.exists(), "worker did not start"
        with pytest.raises(StoreExistsError, match="another writer holds"):
            _writer(store, resume=True)
    finally:
        proc.kill()
        proc.wait(30)
    w = _writer(store, resume=True)  # the dead process's lock is gone
    assert len(w.done_ids()) == 2
    w.close()
