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


class _EagerStore:
    """The same store without ``map_keys``: the report then reads each case's maps whole."""

    map_keys = None

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)


def _many_layer_store(tmp_path, classes=(1,)):
    """3-D maps of 11 layers (more than MAX_MAP_LAYERS), each with 4 unit maps."""
    batches, layers = make_batches(n_cases=3, spatial=(6, 7, 8), channels=(4,) * 11, maps=("c0",),
                                   classes=classes)
    rng = np.random.default_rng(5)
    entry = batches[0].maps["c0"]
    for j in range(11):
        for u in range(4):
            for cls in classes:
                prob = rng.uniform(size=(6, 7, 8)).astype(np.float32)
                key = f"t{j}#unit{u}" + ("" if len(classes) == 1 else f"[class {cls}]")
                entry[key] = {"binary": prob > 0.5, "probability": prob}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "many.h5"
    w = StoreWriter(path, config=dict(CONFIG), layers=layers, classes=list(classes))
    for b in batches:
        w.write_batch(b)
    w.finalize(dict(PROVENANCE))
    return open_store(path)


def test_report_reads_only_drawn_maps_and_draws_the_same(tmp_path, monkeypatch):
    """Issue 15: the map figure reads the entries it draws (8 of 11 layers, 3 of 4 units each)
    in one read per case, and the report is the same as when every map is read."""
    import datetime as dt
    import types

    from engine.report import html

    class _Fixed(dt.datetime):  # the footer's time: both reports written "at once"
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, tzinfo=tz)

    monkeypatch.setattr(html, "_dt", types.SimpleNamespace(datetime=_Fixed, timezone=dt.timezone))
    for classes in ((1,), (1, 2)):
        store = _many_layer_store(tmp_path / f"k{len(classes)}", classes)
        read, names_read = store.maps, []

        def recording(case_id, names=None, read=read, names_read=names_read):
            names_read.append(None if names is None else sorted(names))
            return read(case_id, names)

        store.maps = recording
        lazy = write_report(store, tmp_path / f"lazy{len(classes)}")
        assert len(names_read) == 1 and names_read[0] is not None  # one read, a subset
        n_all = len(store.map_keys("c0"))
        assert len(names_read[0]) == 3 + len(classes) * 8 * 4 < n_all  # t0, the rank probe, is drawn
        eager = write_report(_EagerStore(store), tmp_path / f"eager{len(classes)}")
        assert names_read[1] is None
        for png in sorted((tmp_path / f"eager{len(classes)}" / "figures").glob("*.png")):
            assert (lazy.parent / "figures" / png.name).read_bytes() == png.read_bytes(), png.name
        assert lazy.read_text() == eager.read_text()
