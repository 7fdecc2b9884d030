"""Tests for engine.store.merge: shards merged into one store, refusals."""
from __future__ import annotations

import pytest

from engine.store import StoreConfigError, merge_parts, open_store, parts_dir
from tests.engine.store import _worker as worker
from tests.engine.store._common import N, all_cases, assert_store_equals_batch, expected


def test_merge_of_two_shards_equals_one_run(tmp_path):
    worker.run(tmp_path / "w0.h5", N, 2, shard=(0, 2), finalize=False)
    worker.run(tmp_path / "w1.h5", N, 2, shard=(1, 2), finalize=False)
    out = merge_parts([parts_dir(tmp_path / "w0.h5"), parts_dir(tmp_path / "w1.h5")],
                      tmp_path / "all.h5", expected_ids=worker.case_ids(N))
    store = open_store(out)
    assert_store_equals_batch(store, expected(all_cases()))
    assert "merged_from" in store.provenance


def test_merge_of_finished_shards(tmp_path):
    a = worker.run(tmp_path / "w0.h5", N, 2, shard=(0, 2))
    b = worker.run(tmp_path / "w1.h5", N, 2, shard=(1, 2))
    worker.annotate(a, 1)  # estimates of a shard are not part of its rows
    assert_store_equals_batch(open_store(merge_parts([b, a], tmp_path / "all.h5")),
                              expected(all_cases()))


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
