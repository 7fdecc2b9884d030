"""Tests of engine/report.py: the report from a small store generated here."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.report import layer_summary, unit_summary, write_report
from engine.status import Status
from engine.store import Store, StoreWriter, open_store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- synthetic run
def make_batches(
    *,
    n_cases: int = 7,
    classes: tuple[int, ...] = (1,),
    spatial: tuple[int, ...] = (12, 14),
    channels: tuple[int, ...] = (3, 6, 5),
    units: bool = True,
    maps: tuple[str, ...] = ("c0", "c2"),
    input_sa: bool = True,
    dice: bool = True,
    batch_size: int = 3,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Batches in the pipeline's batch-dict format (docs/architecture.md, store) + layer rows."""
    rng = np.random.default_rng(seed)
    nk, nl = len(classes), len(channels)
    layers = [{"index": j, "name": f"t{j}", "layer": f"block{j}.conv", "op": "Conv", "channels": c,
               "depth": 2 * j + 1, "shape": [c, *spatial]} for j, c in enumerate(channels)]
    batches = []
    for start in range(0, n_cases, batch_size):
        ids = [f"c{i}" for i in range(start, min(n_cases, start + batch_size))]
        nb = len(ids)

        def block(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
            score = rng.uniform(0, 1, shape)
            status = np.zeros(shape, np.uint8)
            drop = rng.uniform(size=shape) < 0.15
            status[drop] = rng.choice([Status.EMPTY_DICE, Status.EMPTY_FOREGROUND],
                                      size=int(drop.sum()))
            score[drop] = np.nan
            tp = rng.integers(0, 50, shape)
            return {"score": score, "status": status, "tp": tp, "fp": tp // 2, "fn": tp // 3}

        b: dict = {"case_ids": np.array(ids, dtype=object),
                   "case_status": np.array(["ok"] * nb, dtype=object),
                   "case_group": np.array([f"s{i % 2}" for i in range(nb)], dtype=object)}
        for key, val in block((nb, nk, nl)).items():
            b[f"layer_{key}"] = val
        if units:
            for j, c in enumerate(channels):
                for key, val in block((nb, nk, c)).items():
                    b[f"unit/{j}/{key}"] = val
        if input_sa:
            for key, val in block((nb, nk, 1)).items():
                b[f"input_{key}"] = val
        b["output_dice"] = rng.uniform(0.5, 1, (nb, nk)) if dice else np.full((nb, nk), np.nan)
        b["baselines"] = {"predicted_fraction": rng.uniform(0, 0.5, (nb, nk))}
        mp = {}
        for cid in ids:
            if cid not in maps:
                continue
            ref = np.zeros((nk, *spatial), bool)
            ref[(slice(None),) + tuple(slice(n // 4, 3 * n // 4) for n in spatial)] = True
            entry: dict = {"_image": rng.normal(size=spatial).astype(np.float32),
                           "_prediction": rng.uniform(size=(nk, *spatial)).astype(np.float32),
                           "_reference": ref}
            for j in range(nl):
                for cls in classes:
                    key = f"t{j}" if nk == 1 else f"t{j}[class {cls}]"
                    prob = rng.uniform(size=spatial).astype(np.float32)
                    entry[key] = {"binary": prob > 0.5, "probability": prob}
            mp[cid] = entry
        b["maps"] = mp
        batches.append(b)
    return batches, layers


CONFIG = {"guide": "prediction", "reference": "ground_truth", "resize": "upsample",
          "level": "both", "threshold": 0.5}
PROVENANCE = {"model": "tiny.onnx", "model_sha256": "ab" * 32, "provider": "CPUExecutionProvider",
              "optimization": "all", "started": "2026-01-01T00:00:00Z", "seconds": 1.5}


def build_store(tmp_path: Path, **kw) -> Store:
    """A real store: batches written with StoreWriter, finalized, opened with open_store.

    ``maps`` calls are recorded in ``store.maps_read`` (to check lazy reading).
    """
    est = kw.pop("estimates", None)
    val = kw.pop("validation", None)
    classes = list(kw.get("classes", (1,)))
    batches, layers = make_batches(**kw)
    path = tmp_path / f"store{len(list(tmp_path.glob('store*.h5')))}.h5"
    writer = StoreWriter(path, config=dict(CONFIG), layers=layers, classes=classes)
    for b in batches:
        writer.write_batch(b)
    writer.finalize(dict(PROVENANCE))
    store = open_store(path)
    if est is not None:
        store.write_estimates(est, validation=val, info={"paper": {"layers": ["t1", "t2"]}})
    store.maps_read = []
    read = store.maps

    def recording(case_id):
        store.maps_read.append(case_id)
        return read(case_id)

    store.maps = recording
    return store


# ----------------------------------------------------------------------------- helpers
def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def as_float(text: str) -> float:
    return float("nan") if text in ("", "NaN") else float(text)


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        w, h = im.size
        assert w > 100 and h > 100, (path, im.size)
        assert im.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    n = 7
    from engine.validation import validate

    est = {"paper": np.linspace(0.2, 0.9, n), "all-layers": np.linspace(0.9, 0.3, n)}
    batches, _ = make_batches(n_cases=n)
    dice = np.concatenate([b["output_dice"][:, 0] for b in batches])
    groups = np.concatenate([b["case_group"] for b in batches])
    val = validate(est, dice, groups=groups, n_boot=50, dice_threshold=0.75)
    store = build_store(tmp, n_cases=n, estimates=est, validation=val)
    path = write_report(store, tmp / "out")
    return store, path


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


def test_html_has_no_external_urls(full_report):
    _, path = full_report
    text = path.read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text)
    assert refs
    assert not [r for r in refs if re.match(r"(?i)(https?:)?//", r)]
    assert "<script" not in text.lower()


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
    import engine.report

    monkeypatch.setattr(engine.report, "DEFAULT_MAP_CASES", 2)
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


def test_markdown(tmp_path):
    store = build_store(tmp_path, maps=("c1",), channels=(2, 3), spatial=(8, 8),
                        estimates={"paper": np.linspace(0, 1, 7)})
    path = write_report(store, tmp_path / "md", format="md")
    assert path.name == "report.md"
    text = path.read_text()
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert "figures/sa_depth.png" in links
    for link in links:
        assert (tmp_path / "md" / link).exists()
    assert "| class | layer |" in text
    assert not (tmp_path / "md" / "report.html").exists()


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


def test_escapes_text(tmp_path):
    store = build_store(tmp_path, maps=(), units=False)
    store.config = dict(CONFIG, note="<script>alert(1)</script>")
    text = write_report(store, tmp_path / "out").read_text()
    assert "<script>" not in text
    assert "&lt;script&gt;" in text


def test_unit_summary_and_layer_summary_direct():
    u = np.array([[0.9, 0.2, np.nan, 0.5], [0.7, np.nan, np.nan, 0.6]])
    s = unit_summary(u, threshold=0.5)
    assert s["n_above"] == 2 and s["units"] == 4 and s["n_defined"] == 3
    assert s["unit_mean"][1] == pytest.approx(0.2)
    assert s["best_unit"] == 0 and s["best_unit_sa"] == pytest.approx(0.8)
    assert math.isnan(s["unit_mean"][2])
    layers = np.array([(0, "t0", "", "Conv", 1, 3)], dtype=[
        ("index", "i8"), ("name", "O"), ("layer", "O"), ("op", "O"), ("channels", "i8"),
        ("depth", "i8")])
    rows = layer_summary(np.full((3, 1, 1), np.nan), np.full((3, 1, 1), Status.EMPTY_FOREGROUND),
                         layers, [1])
    assert rows[0]["n_used"] == 0 and rows[0]["nan_EMPTY_FOREGROUND"] == 3
    assert math.isnan(rows[0]["mean"]) and rows[0]["layer"] == "t0"


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
    for b in est_batches[::-1]:
        w.write_batch(b)
    w.finalize(dict(PROVENANCE))
    est = open_store(path)
    ids = list(est.cases["id"])
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


def test_unit_maps_follow_their_layer_and_1d(tmp_path):
    from engine.report import _case_maps

    batches, layers = make_batches(n_cases=3, spatial=(20,), channels=(2, 3), maps=("c0",))
    entry = batches[0]["maps"]["c0"]
    prob = np.linspace(0, 1, 20, dtype=np.float32)
    entry["t0#unit1"] = {"binary": prob > 0.5, "probability": prob}
    store_path = tmp_path / "s.h5"
    w = StoreWriter(store_path, config=dict(CONFIG), layers=layers, classes=[1])
    for b in batches:
        w.write_batch(b)
    w.finalize(dict(PROVENANCE))
    store = open_store(store_path)
    labels = {"t0": "block0.conv", "t1": "block1.conv"}
    _, ref, _, panels, _ = _case_maps(store.maps("c0"), labels, {"t0": 1, "t1": 3}, 1, 0, 1,
                                      {})
    assert [p.label for p in panels] == ["block0.conv", "block0.conv unit 1", "block1.conv"]
    np.testing.assert_array_equal(panels[1].probability, prob)
    assert ref.shape == (20,)
    write_report(store, tmp_path / "out")  # 1-D maps are drawn as curves
    check_png(tmp_path / "out" / "figures" / "maps_c0.png")


def test_store_without_scored_cases(tmp_path):
    batches, layers = make_batches(n_cases=2, maps=(), units=False)
    path = tmp_path / "empty.h5"
    StoreWriter(path, config=dict(CONFIG), layers=layers, classes=[1]).finalize(dict(PROVENANCE))
    text = write_report(path, tmp_path / "out").read_text()
    assert "summarised 0 cases" in text and "Layer-level SA: not recorded" in text
    rows = read_csv(tmp_path / "out" / "tables" / "layer_summary.csv")
    assert [int(r["n_used"]) for r in rows] == [0, 0, 0]


def _naive_layer_stats(s: np.ndarray) -> dict[str, float]:
    vals = [float(v) for v in s if not math.isnan(v)]
    n = len(vals)
    out = {"n_used": n, "mean": math.nan, "sd": math.nan, "median": math.nan}
    if n:
        out["mean"] = sum(vals) / n
        srt = sorted(vals)
        out["median"] = (srt[(n - 1) // 2] + srt[n // 2]) / 2
    if n > 1:
        out["sd"] = math.sqrt(sum((v - out["mean"]) ** 2 for v in vals) / (n - 1))
    return out


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_layer_summary_matches_naive(data):
    n_cases = data.draw(st.integers(0, 9))
    n_layers = data.draw(st.integers(1, 3))
    shape = (n_cases, 1, n_layers)
    values = data.draw(st.lists(st.one_of(st.floats(0, 1), st.just(math.nan)),
                                min_size=n_cases * n_layers, max_size=n_cases * n_layers))
    score = np.array(values, dtype=np.float64).reshape(shape)
    status = np.where(np.isnan(score), int(Status.EMPTY_DICE), 0).astype(np.uint8)
    layers = np.array([(j, f"t{j}", "", "Conv", 1, j) for j in range(n_layers)], dtype=[
        ("index", "i8"), ("name", "O"), ("layer", "O"), ("op", "O"), ("channels", "i8"),
        ("depth", "i8")])
    rows = layer_summary(score, status, layers, [1])
    for j, row in enumerate(rows):
        naive = _naive_layer_stats(score[:, 0, j])
        assert row["n_used"] == naive["n_used"]
        assert row["n_nan"] == row["nan_EMPTY_DICE"] == n_cases - naive["n_used"]
        for key in ("mean", "sd", "median"):
            assert row[key] == pytest.approx(naive[key], nan_ok=True, abs=1e-12)


def test_many_units_drawn_as_histogram():
    from engine._figures import fig_units

    fig = fig_units([("few", np.linspace(0, 1, 10)), ("many", np.linspace(0, 1, 200))], 0.5)
    few, many = fig.axes[:2]
    assert few.get_xlabel() == "10 units, sorted by SA"
    assert many.get_xlabel() == "unit SA"
    assert "100/200 units > 0.5 (50%)" in many.get_title()


def test_html_is_well_formed(full_report):
    from html.parser import HTMLParser

    class Balance(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []
            self.errors: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "img", "br", "hr", "link"):
                self.stack.append(tag)

        def handle_endtag(self, tag):
            if self.stack and self.stack[-1] == tag:
                self.stack.pop()
            else:
                self.errors.append(tag)

    _, path = full_report
    parser = Balance()
    parser.feed(path.read_text())
    assert parser.errors == [] and parser.stack == []
    assert path.read_text().startswith("<!DOCTYPE html>")
