"""A run scores a concatenation from its parts and stores what scoring it alone stores
(issue 15): the shipped deepbrain 3-D U-Net (tf2onnx, NDHWC) on Colin27."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

import engine.scores as scores
from engine.run.batch import score_batch
from engine.run.options import ScoreOptions
from engine.run.plan import build_plan, open_data, resolve_card
from engine.model.graph import load_model

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "cli" / "data"

pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def deepbrain_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("db")
    shutil.copyfile(DATA / "colin27" / "colin27.nii.gz", folder / "vol000.nii.gz")
    shutil.copyfile(DATA / "colin27" / "colin27_mask.nii.gz", folder / "vol000_mask.nii.gz")
    model = DATA / "deepbrain" / "deepbrain.onnx"
    options = ScoreOptions(level="both", provider="cpu", batch_size=1)
    proto = load_model(model)
    card = resolve_card(proto, options.card)
    ds = open_data(folder, card, options)
    return build_plan(model, ds, options, card=card, proto=proto), ds


def test_concatenations_scored_from_parts_store_the_same(deepbrain_plan, monkeypatch):
    plan, ds = deepbrain_plan
    assert set(plan.concat_groups) == {"concat", "concat_1", "concat_2"}
    calls = []
    real = scores.sa_scores_concat
    monkeypatch.setattr("engine.run.batch.sa_scores_concat", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [ds[0]]
    grouped = score_batch(plan, cases, [0])
    assert len(calls) == 3
    alone = score_batch(dataclasses.replace(plan, concat_groups={}), cases, [0])
    assert len(calls) == 3
    for a, b in ((grouped.layer, alone.layer), *((grouped.units[i], alone.units[i]) for i in alone.units)):
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.status, b.status)
        np.testing.assert_array_equal(a.tp, b.tp)
        np.testing.assert_array_equal(a.fp, b.fp)
        np.testing.assert_array_equal(a.fn, b.fn)
    assert sorted(grouped.units) == sorted(alone.units) == list(range(len(plan.layers)))
    assert np.isfinite(grouped.layer.score).all()
