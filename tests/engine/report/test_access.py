"""Tests of engine/report/access.py: a case's maps as figure panels."""
from __future__ import annotations

import numpy as np

from engine.report import write_report
from engine.report.access import case_maps
from engine.store import StoreWriter, open_store

from ._synthetic import CONFIG, PROVENANCE, check_png, make_batches


def test_unit_maps_follow_their_layer_and_1d(tmp_path):
    batches, layers = make_batches(n_cases=3, spatial=(20,), channels=(2, 3), maps=("c0",))
    entry = batches[0].maps["c0"]
    prob = np.linspace(0, 1, 20, dtype=np.float32)
    entry["t0#unit1"] = {"binary": prob > 0.5, "probability": prob}
    store_path = tmp_path / "s.h5"
    w = StoreWriter(store_path, config=dict(CONFIG), layers=layers, classes=[1])
    for b in batches:
        w.write_batch(b)
    w.finalize(dict(PROVENANCE))
    store = open_store(store_path)
    labels = {"t0": "block0.conv", "t1": "block1.conv"}
    _, ref, _, panels, _ = case_maps(store.maps("c0"), labels, {"t0": 1, "t1": 3}, 1, 0, 1, {})
    assert [p.label for p in panels] == ["block0.conv", "block0.conv unit 1", "block1.conv"]
    np.testing.assert_array_equal(panels[1].probability, prob)
    assert ref.shape == (20,)
    write_report(store, tmp_path / "out")  # 1-D maps are drawn as curves
    check_png(tmp_path / "out" / "figures" / "maps_c0.png")
