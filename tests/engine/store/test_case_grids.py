"""Every case's affine and orientations in the store (issue 17): written from BatchResult.grids,
carried by parts, resume, shards and merge, read back by Store.case_grids/case_affine, and used
by Store.map_grid when a case's maps carry no grid of their own."""
from __future__ import annotations

import dataclasses
import shutil

import h5py
import numpy as np
import pytest

from engine.store import merge_parts, open_store
from engine.store.batch import CaseGrid
from tests.engine.store import _worker as worker
from tests.engine.store._common import DATA, writer

_GRID_KEYS = ("cases/affine", "cases/orientation", "cases/file_orientation")


def _affine(i: int) -> np.ndarray:
    a = np.diag([-1.0 - i, -1.0, 2.0, 1.0])  # LPS-like, a different spacing per case
    a[:3, 3] = (i, 2.0 * i, -3.0)
    return a


def _batch(ids: list[str], index: list[int], *, with_grids: bool = True):
    """The synthetic batch, every case on its own grid except the third (an image without one)."""
    batch = worker.make_batch(ids, index)
    grids = {}
    for cid, i in zip(ids, index):
        if i % 3 == 2:
            grids[cid] = CaseGrid(None, (8, 8), "", "", "png")
        else:
            grids[cid] = CaseGrid(_affine(i), (8, 8, 8), "RAS", "LPS", "nifti")
    return dataclasses.replace(batch, grids=grids if with_grids else {})


def _check(store, ids_index) -> None:
    grids = store.case_grids()
    assert grids["affine"].shape == (len(ids_index), 4, 4) and grids["affine"].dtype == np.float64
    for row, (i, cid) in enumerate(ids_index):
        assert store.cases["id"][row] == cid
        if i % 3 == 2:
            assert np.isnan(grids["affine"][row]).all() and store.case_affine(cid) is None
            assert grids["orientation"][row] == grids["file_orientation"][row] == ""
        else:
            np.testing.assert_array_equal(grids["affine"][row], _affine(i))
            np.testing.assert_array_equal(store.case_affine(cid), _affine(i))
            assert (grids["orientation"][row], grids["file_orientation"][row]) == ("RAS", "LPS")


def test_every_case_grid_is_stored_in_case_order(tmp_path):
    ids = worker.case_ids(7)
    w = writer(tmp_path / "s.h5")
    w.write_batch(_batch(ids[4:], [4, 5, 6]))  # out of order: the store keeps dataset order
    w.write_batch(_batch(ids[:4], [0, 1, 2, 3]))
    st = open_store(w.finalize({}))
    _check(st, list(enumerate(ids)))
    with pytest.raises(KeyError, match="closest"):
        st.case_affine("nope")


def test_a_batch_without_grids_stores_nan(tmp_path):
    ids = worker.case_ids(3)
    w = writer(tmp_path / "s.h5")
    w.write_batch(_batch(ids, [0, 1, 2], with_grids=False))
    grids = open_store(w.finalize({})).case_grids()
    assert np.isnan(grids["affine"]).all() and list(grids["orientation"]) == [""] * 3


def test_resuming_parts_of_an_older_protoseg_leaves_the_grids_out(tmp_path):
    """Parts written before the per-case grids: a resumed run still writes and finalizes."""
    ids = worker.case_ids(6)
    w = writer(tmp_path / "s.h5")
    part = w.write_batch(_batch(ids[:3], [0, 1, 2]))
    w.close()
    with h5py.File(part, "a") as f:
        for key in _GRID_KEYS:
            del f[key]
    w = writer(tmp_path / "s.h5", resume=True)
    w.write_batch(_batch(ids[3:], [3, 4, 5]))
    st = open_store(w.finalize({}))
    assert list(st.cases["id"]) == ids
    assert np.isnan(st.case_grids()["affine"]).all()  # not recorded: NaN, not a crash


def test_an_older_finished_store_extended_gets_nan_rows(tmp_path):
    ids = worker.case_ids(6)
    w = writer(tmp_path / "s.h5")
    w.write_batch(_batch(ids[:3], [0, 1, 2]))
    path = w.finalize({})
    with h5py.File(path, "a") as f:  # as an older protoseg wrote it
        for key in _GRID_KEYS:
            del f[key]
    w = writer(tmp_path / "s.h5", resume=True)
    w.write_batch(_batch(ids[3:], [3, 4, 5]))
    st = open_store(w.finalize({}))
    grids = st.case_grids()
    assert np.isnan(grids["affine"][:3]).all() and list(grids["orientation"][:3]) == [""] * 3
    for row in (3, 4):
        np.testing.assert_array_equal(grids["affine"][row], _affine(row))
    assert np.isnan(grids["affine"][5]).all()


def test_shards_merge_with_their_grids(tmp_path):
    ids = worker.case_ids(6)
    parts = []
    for k, rows in enumerate(([0, 2, 4], [1, 3, 5])):
        w = writer(tmp_path / f"w{k}.h5")
        w.write_batch(_batch([ids[i] for i in rows], rows))
        w.close()
        parts.append(tmp_path / f"w{k}.h5.parts")
    st = open_store(merge_parts(parts, tmp_path / "all.h5"))
    _check(st, list(enumerate(ids)))


def test_map_grid_falls_back_on_the_stored_affine(tmp_path):
    ids = worker.case_ids(4)
    w = writer(tmp_path / "s.h5")
    w.write_batch(_batch(ids, [0, 1, 2, 3]))  # cases 0 and 3 have maps (every third)
    path = w.finalize({})
    st = open_store(path)
    assert st.map_grid(ids[3]).shape == (8, 8, 8)  # the grid saved with the maps
    with h5py.File(path, "a") as f:  # maps without their own grid
        for name in f["maps"]:
            del f["maps"][name].attrs["grid"]
    st = open_store(path)
    grid = st.map_grid(ids[3])
    np.testing.assert_array_equal(grid.affine, _affine(3))
    assert grid.shape == (1, 8, 8) and (grid.orientation, grid.file_orientation) == ("RAS", "LPS")


def test_store_v1_reads_without_grids(tmp_path):
    shutil.copy(DATA / "store-v1.h5", tmp_path / "v1.h5")
    st = open_store(tmp_path / "v1.h5")
    grids = st.case_grids()
    assert grids["affine"].shape == (4, 4, 4) and np.isnan(grids["affine"]).all()
    assert st.case_affine("a") is None and st.map_grid("b") is None
