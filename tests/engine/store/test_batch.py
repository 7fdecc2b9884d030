"""Tests for engine.store.batch: the BatchResult contract and its checks."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from engine.status import Status
from engine.store import BatchResult, ScoreBlock, StoreWriter, open_store, parts_dir
from tests.engine.store import _worker as worker
from tests.engine.store._common import all_cases, expected, writer

RUN = {"classes": worker.CLASSES, "layers": worker.LAYERS}


def test_empty_block_is_not_computed_in_stored_dtypes():
    block = ScoreBlock.empty((3, 2, 4))
    assert block.shape == (3, 2, 4)
    assert np.isnan(block.score).all() and block.score.dtype == np.float64
    assert (block.status == Status.NOT_COMPUTED).all() and block.status.dtype == np.uint8
    for arr in (block.tp, block.fp, block.fn):
        assert arr.dtype == np.int64 and not arr.any()
    assert [name for name, _ in block.items()] == ["score", "status", "tp", "fp", "fn"]


def test_put_copies_every_field_of_a_result():
    block = ScoreBlock.empty((4, 2, 3))
    res = SimpleNamespace(score=np.array([0.5, 0.25]), status=np.array([0, 4], np.uint8),
                          tp=np.array([1, 2]), fp=np.array([3, 4]), fn=np.array([5, 6]))
    block.put(([1, 3], 1, 2), res)
    np.testing.assert_array_equal(block.score[[1, 3], 1, 2], [0.5, 0.25])
    np.testing.assert_array_equal(block.status[[1, 3], 1, 2], [0, 4])
    np.testing.assert_array_equal(block.fn[[1, 3], 1, 2], [5, 6])
    assert np.isnan(block.score[0]).all() and (block.status[0] == Status.NOT_COMPUTED).all()
    units = ScoreBlock.empty((4, 2, 5))
    units.put(([0, 2], 0), SimpleNamespace(score=np.ones((2, 5)), status=np.zeros((2, 5)),
                                           tp=np.ones((2, 5)), fp=np.ones((2, 5)),
                                           fn=np.ones((2, 5))))
    assert (units.score[[0, 2], 0] == 1).all() and units.tp.dtype == np.int64


def test_blocks_and_results_are_frozen():
    good = expected(all_cases(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.layer.score = np.zeros(1)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.case_ids = ("x",)  # type: ignore[misc]


def test_good_batch_validates():
    good = expected(all_cases(3))
    good.validate(**RUN)
    assert good.n_cases == 3


@pytest.mark.parametrize("change, error, words", [
    (lambda b: {"layer": ScoreBlock.empty((2, 2, 4))}, ValueError,
     r"layer\.score has shape \(2, 2, 4\), expected \(2, 2, 3\).*layers and classes"),
    (lambda b: {"layer": dataclasses.replace(b.layer, tp=np.zeros((2, 2)))}, ValueError,
     r"layer\.tp has shape \(2, 2\), expected \(2, 2, 3\)"),
    (lambda b: {"case_ids": ("a", "a")}, ValueError, "more than once"),
    (lambda b: {"maps": {"zzz": {}}}, ValueError, "not in this batch"),
    (lambda b: {"output_dice": np.zeros((3, 2))}, ValueError, "expected 2 cases"),
    (lambda b: {"layer": dataclasses.replace(b.layer, tp=np.full((2, 2, 3), np.nan))},
     ValueError, r"layer\.tp.*NaN"),
    (lambda b: {"layer": dataclasses.replace(b.layer, status=np.full((2, 2, 3), -1.0))},
     ValueError, r"layer\.status.*out-of-range"),
    (lambda b: {"layer": dataclasses.replace(b.layer, status=np.full((2, 2, 3), 300))},
     ValueError, r"layer\.status.*out-of-range"),
    (lambda b: {"units": {7: ScoreBlock.empty((2, 2, 2))}}, ValueError,
     r"layer index 7, but the store has layers 0\.\.2"),
    (lambda b: {"units": {"x": ScoreBlock.empty((2, 2, 2))}}, TypeError, "layer indices"),
    (lambda b: {"units": {0: ScoreBlock.empty((2, 2, 5))}}, ValueError,
     r"units\[0\]\.score has shape \(2, 2, 5\), expected \(2, 2, 2\); layer 0 has 2 channels"),
    (lambda b: {"input": ScoreBlock.empty((2, 3, 2))}, ValueError,
     r"input\.score has shape \(2, 3, 2\), expected \(2, 2, n\)"),
    (lambda b: {"layer": {"score": np.zeros((2, 2, 3))}}, TypeError, "must be a ScoreBlock"),
    (lambda b: {"case_status": ("ok",)}, ValueError, "case_status has 1 entries, expected 2"),
    (lambda b: {"case_group": ("a", 3)}, TypeError, "case_group holds int"),
    (lambda b: {"case_index": np.array([0.5, 1.0])}, ValueError, "case_index.*non-integer"),
    (lambda b: {"case_index": np.arange(3)}, ValueError, r"case_index has shape \(3,\)"),
    (lambda b: {"baselines": {"frac": np.zeros((2, 1))}}, ValueError,
     r"baselines\['frac'\] has shape \(2, 1\), expected \(2, 2\)"),
    (lambda b: {"output_dice": np.array([["a", "b"], ["c", "d"]])}, TypeError,
     "output_dice holds <U1 values, expected numbers"),
    (lambda b: {"maps": {b.case_ids[0]: {"x": {"binary": np.array(["a"])}}}}, TypeError,
     "non-numeric"),
])
def test_wrong_fields_are_refused_with_what_was_expected(change, error, words):
    good = expected(all_cases(2))
    bad = dataclasses.replace(good, **change(good))
    with pytest.raises(error, match=words):
        bad.validate(**RUN)


def test_writer_refuses_bad_batches_and_writes_nothing(tmp_path):
    w = writer(tmp_path / "s.h5")
    good = expected(all_cases(2))
    with pytest.raises(ValueError, match=r"layer\.score.*expected \(2, 2, 3\)"):
        w.write_batch(dataclasses.replace(good, layer=ScoreBlock.empty((2, 2, 4))))
    with pytest.raises(TypeError, match="write_batch takes an engine.store.BatchResult, got dict"):
        w.write_batch({"case_ids": ["a"]})  # type: ignore[arg-type]
    assert w.done_ids() == set() and list(parts_dir(w.path).glob("part-*")) == []
    w.write_batch(good)
    later = dataclasses.replace(expected(all_cases(4)[2:]), input=None)
    with pytest.raises(ValueError, match=r"missing arrays \['input_scores/fn'"):
        w.write_batch(later)
    w.close()
    w2 = writer(w.path, resume=True)  # the schema is known again after resume
    with pytest.raises(ValueError, match="same arrays"):
        w2.write_batch(later)
    w2.close()


def test_float_counts_that_are_integers_are_stored_as_int64(tmp_path):
    good = expected(all_cases(2))
    as_float = dataclasses.replace(good, layer=dataclasses.replace(
        good.layer, tp=good.layer.tp.astype(float), status=good.layer.status.astype(float)))
    w = writer(tmp_path / "s.h5")
    w.write_batch(as_float)
    ls = open_store(w.finalize({})).layer_scores()
    assert ls["tp"].dtype == np.int64 and ls["status"].dtype == np.uint8
    np.testing.assert_array_equal(ls["tp"], good.layer.tp)


def test_batch_without_optional_parts_round_trips(tmp_path):
    """No units, no input SA, no baselines, no maps: only what was given is stored."""
    n = 3
    layer = ScoreBlock.empty((n, 1, 2))
    layer.score[:] = 0.5
    result = BatchResult(case_ids=("a", "b", "c"), case_index=np.arange(n),
                         case_status=("ok", "ok", "unreadable"), case_group=("", "", ""),
                         layer=layer, units={}, input=None,
                         output_dice=np.full((n, 1), np.nan), baselines={}, maps={})
    w = StoreWriter(tmp_path / "s.h5", config={}, layers=[{"name": "a"}, {"name": "b"}],
                    classes=[1])
    w.write_batch(result)
    store = open_store(w.finalize({}))
    assert not store.has_units and store.baselines() == {} and store.map_case_ids == []
    assert list(store.cases["status"]) == ["ok", "ok", "unreadable"]
    with pytest.raises(KeyError, match="input_scores"):
        store.input_scores()
    assert np.isnan(store.output_dice()).all()
