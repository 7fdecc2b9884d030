"""Tests of engine/report/write.py: reports of small stores generated here, end to end.

The CSV and JSON tables are checked against statistics recomputed with NumPy/SciPy from the
store's arrays; the figures by their PNG/SVG signatures and sizes.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import engine.report.build
from engine.report import write_report
from engine.status import Status
from engine.store import StoreWriter, open_store

from ._synthetic import (CONFIG, PROVENANCE, as_float, build_store, check_png, make_batches,
                         read_csv)


def test_html_written_with_figures_and_tables(full_report):
    store, path = full_report
    out = path.parent
    assert path.name == "report.html"
    for name in ("sa_depth", "unit_sa_class1", "maps_c0", "maps_c2", "sa_vs_dice",
                 "baselines_vs_dice"):
        check_png(out / "figures" / f"{name}.png")
        svg = (out / "figures" / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for name in ("layer_summary", "unit_summary", "cases", "run", "input_summary",
                 "validation", "correlations"):
        assert (out / "tables" / f"{name}.csv").stat().st_size > 0
        json.loads((out / "tables" / f"{name}.json").read_text())
    text = path.read_text()
    assert text.count("data:image/png;base64,") == 6
    assert "summarised 7 cases" in text

def test_layer_table_agrees_with_store(full_report):
    store, path = full_report
    rows = read_csv(path.parent / "tables" / "layer_summary.csv")
    score = store.layer_scores()["score"]
    status = store.layer_scores()["status"]
    assert len(rows) == score.shape[1] * score.shape[2]
    for row in rows:
        j = int(row["layer_index"])
        s = score[:, 0, j]
        f = s[np.isfinite(s)]
        assert as_float(row["mean"]) == pytest.approx(np.mean(f), rel=1e-12)
        assert as_float(row["sd"]) == pytest.approx(np.std(f, ddof=1), rel=1e-12)
        assert as_float(row["median"]) == pytest.approx(np.median(f), rel=1e-12)
        assert as_float(row["q25"]) == pytest.approx(np.quantile(f, 0.25), rel=1e-12)
        assert as_float(row["q75"]) == pytest.approx(np.quantile(f, 0.75), rel=1e-12)
        assert int(row["n_used"]) == f.size
        assert int(row["n_nan"]) == s.size - f.size
        assert int(row["nan_EMPTY_DICE"]) == np.sum(status[:, 0, j] == Status.EMPTY_DICE)
        assert int(row["depth"]) == store.layers["depth"][j]
    # the JSON copy says the same
    js = json.loads((path.parent / "tables" / "layer_summary.json").read_text())
    assert [r["mean"] for r in js] == pytest.approx([as_float(r["mean"]) for r in rows])


def test_unit_table_agrees_with_store(full_report):
    store, path = full_report
    rows = read_csv(path.parent / "tables" / "unit_summary.csv")
    assert len(rows) == len(store.layers)
    for row in rows:
        u = store.unit_scores(int(row["layer_index"]))["score"][:, 0, :]
        per_unit = np.array([np.mean(c[np.isfinite(c)]) if np.isfinite(c).any() else np.nan
                             for c in u.T])
        above = int(np.sum(per_unit[np.isfinite(per_unit)] > 0.5))
        assert int(row["n_above"]) == above
        assert int(row["units"]) == u.shape[1]
        assert as_float(row["fraction_above"]) == pytest.approx(above / u.shape[1])
        assert int(row["best_unit"]) == int(np.nanargmax(per_unit))


def test_cases_table_and_correlations(full_report):
    store, path = full_report
    rows = read_csv(path.parent / "tables" / "cases.csv")
    assert [r["id"] for r in rows] == list(store.cases["id"])
    score = store.layer_scores()["score"][:, 0, :]
    for i, r in enumerate(rows):
        f = score[i][np.isfinite(score[i])]
        expect = f.mean() if f.size else math.nan
        assert as_float(r["mean_layer_sa"]) == pytest.approx(expect, nan_ok=True)
        assert as_float(r["estimate_paper"]) == pytest.approx(store.estimates()["paper"][i])
    from scipy import stats

    corr = {r["x"]: r for r in read_csv(path.parent / "tables" / "correlations.csv")}
    d = store.output_dice()[:, 0]
    expect = stats.spearmanr(store.estimates()["paper"], d)[0]
    assert as_float(corr["estimate: paper"]["spearman_rho"]) == pytest.approx(expect)
    x = store.input_scores()["score"][:, 0, 0]
    ok = np.isfinite(x)
    assert as_float(corr["input SA"]["pearson_r"]) == pytest.approx(
        stats.pearsonr(x[ok], d[ok])[0])


def test_validation_rendered(full_report):
    store, path = full_report
    rows = read_csv(path.parent / "tables" / "validation.csv")
    val = store.validation()
    assert {(r["estimator"], r["scope"]) for r in rows} == {
        (e, s) for e in ("paper", "all-layers") for s in ("all", "group:s0", "group:s1")}
    for r in rows:
        if r["scope"] == "all":
            v = val[r["estimator"]]
            assert as_float(r["spearman"]) == pytest.approx(v["spearman"]["r"])
            assert as_float(r["spearman_lo"]) == pytest.approx(v["spearman"]["ci"][0])
    text = path.read_text()
    # intervals shown as "r [lo, hi]" in the HTML table
    v = val["paper"]["pearson"]
    assert f"{v['r']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" in text

def test_other_validation_layouts_still_render(tmp_path):
    val = {"paper": {"pearson": 0.5, "spearman": {"value": 0.4, "ci": [0.1, 0.7]}, "n": 7}}
    store = build_store(tmp_path, n_cases=4, estimates={"paper": np.arange(4.0)}, validation=val,
                        maps=(), units=False)
    path = write_report(store, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "tables" / "validation.csv")
    assert rows[0]["estimator"] == "paper" and as_float(rows[0]["spearman.value"]) == 0.4
    assert "0.400 [0.100, 0.700]" in path.read_text()

def test_maps_read_lazily_and_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(engine.report.build, "DEFAULT_MAP_CASES", 2)
    ids = tuple(f"c{i}" for i in range(6))
    store = build_store(tmp_path, n_cases=6, maps=ids, units=False, channels=(2, 3),
                        spatial=(8, 9))
    write_report(store, tmp_path / "out")
    assert store.maps_read == ["c0", "c1"]  # default cap, one read per case
    store.maps_read.clear()
    write_report(store, tmp_path / "out2", cases=["c5"], max_cases=1)
    assert store.maps_read == ["c5"]
    assert (tmp_path / "out2" / "figures" / "maps_c5.png").exists()

def test_minimal_store_says_not_recorded(tmp_path):
    store = build_store(tmp_path, units=False, maps=(), input_sa=False, dice=False)
    path = write_report(store, tmp_path / "out")
    text = path.read_text()
    for what in ("Unit-level SA: not recorded", "Maps: not recorded",
                 "Input SA: not recorded", "Output Dice: not recorded",
                 "Validation: not recorded"):
        assert what in text
    assert (tmp_path / "out" / "figures" / "sa_depth.png").exists()
    assert not (tmp_path / "out" / "figures" / "unit_sa_class1.png").exists()

def test_multiclass_and_3d(tmp_path):
    store = build_store(tmp_path, classes=(1, 2), spatial=(6, 7, 8), n_cases=4,
                        maps=("c1",), channels=(2,))
    path = write_report(store, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "tables" / "layer_summary.csv")
    assert {r["class"] for r in rows} == {"1", "2"}
    score = store.layer_scores()["score"]
    for r in rows:
        k = [1, 2].index(int(r["class"]))
        s = score[:, k, int(r["layer_index"])]
        assert as_float(r["mean"]) == pytest.approx(np.mean(s[np.isfinite(s)]))
    check_png(tmp_path / "out" / "figures" / "maps_c1_class1.png")
    check_png(tmp_path / "out" / "figures" / "maps_c1_class2.png")
    assert store.maps_read == ["c1"]  # read once for both classes
    check_png(tmp_path / "out" / "figures" / "unit_sa_class2.png")
    cases = read_csv(tmp_path / "out" / "tables" / "cases.csv")
    assert "mean_layer_sa_class2" in cases[0]
    assert "3-D" in path.read_text()

@pytest.mark.parametrize("kwargs, exc, words", [
    ({"format": "pdf"}, ValueError, "format"),
    ({"unit_threshold": 1.5}, ValueError, "unit_threshold"),
    ({"max_cases": -1}, ValueError, "max_cases"),
    ({"cases": ["c99"]}, KeyError, "not in the store"),
    ({"cases": ["c1"]}, ValueError, "has no maps"),
])
def test_bad_arguments(tmp_path, kwargs, exc, words):
    store = build_store(tmp_path, maps=("c0",), units=False)
    with pytest.raises(exc, match=words):
        write_report(store, tmp_path / "out", **kwargs)


def test_bad_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing.h5", tmp_path / "out")
    with pytest.raises(TypeError, match="expected a store path"):
        write_report(42, tmp_path / "out")

def test_estimates_from_a_second_store(tmp_path):
    main = build_store(tmp_path, n_cases=5, maps=())
    # the estimate store lists the cases in another order and lacks c4
    est_batches, layers = make_batches(n_cases=4, maps=(), units=False, seed=3)
    path = tmp_path / "est.h5"
    w = StoreWriter(path, config=dict(CONFIG, reference="prediction"), layers=layers,
                    classes=[1])
    for b in est_batches:
        w.write_batch(dataclasses.replace(b, case_index=3 - b.case_index))
    w.finalize(dict(PROVENANCE))
    est = open_store(path)
    ids = list(est.cases["id"])
    assert ids == ["c3", "c2", "c1", "c0"]
    values = np.array([0.1 * int(c[1:]) + 0.05 for c in ids])
    flags = (values < 0.2).astype(np.uint8)
    est.write_estimates({"paper": values, "flag": flags}, info={"estimators": ["paper"]})
    write_report(main, tmp_path / "out", estimates=path)
    rows = read_csv(tmp_path / "out" / "tables" / "cases.csv")
    for r in rows:
        i = int(r["id"][1:])
        expect = 0.1 * i + 0.05 if i < 4 else math.nan
        assert as_float(r["estimate_paper"]) == pytest.approx(expect, nan_ok=True)
        assert as_float(r["flag"]) == pytest.approx(float(expect < 0.2) if i < 4 else math.nan,
                                                    nan_ok=True)
    drawn = [r["x"] for r in read_csv(tmp_path / "out" / "tables" / "correlations.csv")]
    assert "estimate: paper" in drawn and "estimate: flag" not in drawn

def test_store_without_scored_cases(tmp_path):
    batches, layers = make_batches(n_cases=2, maps=(), units=False)
    path = tmp_path / "empty.h5"
    StoreWriter(path, config=dict(CONFIG), layers=layers, classes=[1]).finalize(dict(PROVENANCE))
    text = write_report(path, tmp_path / "out").read_text()
    assert "summarised 0 cases" in text and "Layer-level SA: not recorded" in text
    rows = read_csv(tmp_path / "out" / "tables" / "layer_summary.csv")
    assert [int(r["n_used"]) for r in rows] == [0, 0, 0]


def test_answer_first_configuration_last_and_model_card_as_table(tmp_path):
    store = build_store(tmp_path, n_cases=1, maps=(), units=False,
                        estimates={"paper": np.array([0.4])})
    card = {"input_name": "x", "layout": "NCHW", "input_size": [32, 32], "channels": 1,
            "prediction_output": "prob", "activation": "sigmoid", "classes": [1],
            "threshold": 0.5, "resize": True, "scaling": "minmax", "mean": None, "std": None,
            "hidden_layers": {"t0": "block0.conv"}, "hidden_layouts": {},
            "prediction_layout": None, "assumed": ["input: 'x', the model's only input"]}
    store.config = dict(CONFIG, model_card=card)
    text = write_report(store, tmp_path / "out").read_text()
    ids = [text.index(f'<section id="{s}"') for s in
           ("summary", "layers", "units", "maps", "quality", "validation", "cases", "run")]
    assert ids == sorted(ids)
    summary = text[ids[0]:ids[1]]
    for fact in ("tiny.onnx", "1 case: 1 ok", "output Dice", "estimate: paper",
                 "best layer", "worst layer", 'id="fig-sa_depth"'):
        assert fact in summary, fact
    # configuration and provenance: last, closed, the model card a table, not JSON
    run = text[ids[-1]:]
    assert run.startswith('<section id="run" class="collapsed"><details><summary>')
    assert "<details open" not in text
    assert "&#34;input_name&#34;" not in text and '"input_name"' not in text
    for cells in ("<td>preprocessing</td><td>scaling</td><td>minmax</td>",
                  "<td>inputs</td><td>input_size</td><td>32, 32</td>",
                  "<td>layers</td><td>t0</td><td>block0.conv</td>",
                  "<td>input: &#39;x&#39;, the model&#39;s only input</td>"):
        assert cells in run, cells
    # plural forms
    assert "summarised 1 case ·" in text and "3 hidden tensors" in text
    assert "1 case in tables/cases.csv" in text
    assert "1 cases" not in text and "case(s)" not in text and "class(es)" not in text


def test_model_card_rows_group_the_fields():
    from engine.report.build import model_card_rows

    rows = model_card_rows({"layout": "NHWC", "threshold": 0.3, "mean": [0.5], "extra": 1,
                            "hidden_layers": {}, "hidden_layouts": {"t": "NHWC"}})
    assert [(r["part"], r["field"], r["value"]) for r in rows] == [
        ("inputs", "layout", "NHWC"), ("outputs", "threshold", "0.3"),
        ("preprocessing", "mean", "0.5"), ("layers", "t", "t (NHWC)"),
        ("other", "extra", "1")]
