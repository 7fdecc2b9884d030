"""Tests for engine.store.reader: tables, versions, refusals, the version-1 fixture."""
from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest

from engine.store import StoreVersionError, open_store
from tests.engine.store import _worker as worker
from tests.engine.store._common import DATA


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
    assert store.estimates() is None and store.validation() is None
