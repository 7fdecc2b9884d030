"""Tests of engine/report/compare.py and `protoseg compare`: two real stores, scored here.

Two tiny ONNX U-Nets (tests/models.py) with other weights are scored on the same cases; the
paired differences, their bootstrap intervals, the changed cases and the unit differences
are checked against NumPy computed directly from the two stores.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from cli.main import cli
from engine.report.compare import StoresDifferError, compare_stores, match_layers
from engine.run import score_dataset
from tests import models
from tests.engine.run.test_loop import _npz

from ._synthetic import as_float, check_png, read_csv
from .test_browser import CHROMIUM, HEADLINE_BOX, check_clean_load, chromium, open_in_chromium  # noqa: F401

CARD = {"scaling": "none"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Stores of 6 cases: two checkpoints, another threshold, fewer cases, two other networks."""
    tmp = tmp_path_factory.mktemp("compare")
    data = _npz(tmp / "d.npz", 6, 32)
    fewer = _npz(tmp / "d5.npz", 5, 32)

    def score(model, name, on=data, **kw):
        path = models.save(model, tmp / f"{name}.onnx")
        return score_dataset(path, on, tmp / f"{name}.h5", level="both", card=CARD, **kw).store

    return {
        "a": score(models.unet(batch="N", seed=0), "a"),
        "b": score(models.unet(batch="N", seed=1), "b"),
        "threshold": score(models.unet(batch="N", seed=1), "thr", threshold=0.6),
        "fewer": score(models.unet(batch="N", seed=1), "fewer", on=fewer),
        "wide": score(models.unet(batch="N", base=8, seed=1), "wide"),
        "deep": score(models.deep_unet(levels=2, base=4, size=32, seed=1), "deep"),
        "tmp": tmp,
    }


def _layer_pos(store, name):
    return list(store.layers["name"]).index(name)


def test_paired_differences_agree_with_numpy(stores):
    c = compare_stores(stores["a"], stores["b"], n_boot=300, seed=3, top_cases=2)
    sa, sb = engine.open_store(stores["a"]), engine.open_store(stores["b"])
    assert c.match == "name" and c.differences == () and len(c.cases) == 6
    assert len(c.layers) == len(sa.layers)
    xa, xb = sa.layer_scores()["score"][:, 0, :], sb.layer_scores()["score"][:, 0, :]
    assert list(sa.cases["id"]) == list(sb.cases["id"]) == list(c.cases)
    for row in c.layers:
        x, y = xa[:, _layer_pos(sa, row["name_a"])], xb[:, _layer_pos(sb, row["name_b"])]
        ok = np.isfinite(x) & np.isfinite(y)
        d = y[ok] - x[ok]
        assert row["n"] == d.size > 0
        assert row["mean_a"] == pytest.approx(x[ok].mean())
        assert row["mean_b"] == pytest.approx(y[ok].mean())
        assert row["mean_diff"] == pytest.approx(d.mean())
        assert row["n_higher"] == int((d > 0).sum()) and row["n_lower"] == int((d < 0).sum())
        # the documented bootstrap, by hand: one generator per layer, seeded
        idx = np.random.default_rng(3).integers(0, d.size, size=(300, d.size))
        lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
        assert (row["ci_lo"], row["ci_hi"]) == pytest.approx((lo, hi))
        assert row["ci_lo"] <= row["mean_diff"] <= row["ci_hi"]
        assert row["differs"] == bool(lo > 0 or hi < 0)
        # the cases that changed most
        full = np.where(ok, y - x, np.nan)
        order = np.argsort(-np.abs(np.nan_to_num(full, nan=-1.0)), kind="stable")[:2]
        top = [r for r in c.changed if r["layer_a"] == row["layer_a"]]
        assert [r["case"] for r in top] == [c.cases[i] for i in order]
        assert [r["diff"] for r in top] == pytest.approx(full[order])
    # per case: mean over the paired layers defined in both
    for i, row in enumerate(c.case_rows):
        ok = np.isfinite(xa[i]) & np.isfinite(xb[i])
        assert row["diff"] == pytest.approx(xb[i][ok].mean() - xa[i][ok].mean())
    # per unit: same layer names and channel counts, so units are matched by index
    assert {r["units_matched"] for r in c.units} == {"by index"}
    j = _layer_pos(sa, "dec")
    ua, ub = sa.unit_scores(j)["score"][:, 0, :], sb.unit_scores(j)["score"][:, 0, :]
    rows = [r for r in c.unit_diff if r["layer"] == c.layers[j]["layer_a"]]
    assert len(rows) == ua.shape[1]
    for r in rows:
        x, y = ua[:, r["unit"]], ub[:, r["unit"]]
        ok = np.isfinite(x) & np.isfinite(y)
        assert r["n"] == ok.sum()
        assert r["diff"] == pytest.approx((y[ok] - x[ok]).mean(), nan_ok=True)


def test_a_store_against_itself_differs_nowhere(stores):
    c = compare_stores(stores["a"], stores["a"], n_boot=50)
    for row in c.layers:
        assert row["mean_diff"] == 0 and row["ci_lo"] == 0 and row["ci_hi"] == 0
        assert not row["differs"]
    assert all(r["diff"] == 0 for r in c.unit_diff if np.isfinite(r["diff"]))


def test_refuses_other_cases_unless_allowed(stores):
    with pytest.raises(StoresDifferError) as info:
        compare_stores(stores["a"], stores["fewer"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "1 case only in A ('case005')" in msg and "allow_different=True" in msg
    assert "on their 5 common cases" in msg
    c = compare_stores(stores["a"], stores["fewer"], allow_different=True, n_boot=50)
    assert c.cases == tuple(f"case{i:03d}" for i in range(5)) and c.only_a == ("case005",)
    assert c.differences and c.differences[0].startswith("other cases")


def test_refuses_other_settings_naming_them_unless_allowed(stores):
    with pytest.raises(StoresDifferError, match=r"threshold=0\.5 in A, 0\.6 in B; compare them "
                                                r"anyway with allow_different=True"):
        compare_stores(stores["a"], stores["threshold"])
    c = compare_stores(stores["a"], stores["threshold"], allow_different=True, n_boot=50)
    assert c.differences == ("threshold=0.5 in A, 0.6 in B",)
    # the model itself (its hash, card, layers) is what is compared, never a refusal
    assert compare_stores(stores["a"], stores["b"], n_boot=0).differences == ()


def test_two_networks_are_matched_by_relative_depth(stores):
    c = compare_stores(stores["a"], stores["deep"], n_boot=50)
    sd = engine.open_store(stores["deep"])
    assert c.match == "depth" and "relative depth" in c.match_text
    # each of the deep U-Net's 5 block outputs to the nearest of the U-Net's 11 tensors
    assert len(sd.layers) == 5
    assert [r["name_b"] for r in c.layers] == list(sd.layers["name"][np.argsort(
        sd.layers["depth"], kind="stable")])
    assert [r["name_a"] for r in c.layers] == ["enc1_conv", "pool1", "enc2_shift", "cat",
                                               "head"]
    assert [r["depth_a"] for r in c.layers] == pytest.approx([0, 0.2, 0.5, 0.7, 1.0])
    assert [r["depth_b"] for r in c.layers] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert len(c.unmatched_a) == 6 and c.unmatched_b == ()
    # unit counts differ: summaries side by side, no unit-by-unit difference
    assert c.units and {r["units_matched"] for r in c.units} == {"no (summary only)"}
    assert c.unit_diff == []
    # forced by name: only the tensor both networks call "enc1" (4 and 8 channels)
    c = compare_stores(stores["a"], stores["deep"], match="name", n_boot=20)
    assert [(r["name_a"], r["name_b"]) for r in c.layers] == [("enc1", "enc1")]
    assert c.units[0]["units_matched"] == "no (summary only)"


def test_same_names_other_widths_compare_units_by_summary(stores):
    c = compare_stores(stores["a"], stores["wide"], n_boot=50)
    assert c.match == "name"
    # only the 1-channel head keeps its channel count: its unit is matched by index
    matched = {r["layer_a"]: r["units_matched"] for r in c.units}
    assert matched.pop("head") == "by index"
    assert set(matched.values()) == {"no (summary only)"}
    assert {r["layer"] for r in c.unit_diff} == {"head"}
    assert [(r["units_a"], r["units_b"]) for r in c.units][:2] == [(4, 8), (4, 8)]


def test_match_layers_by_depth_gives_distinct_partners():
    ra = np.linspace(0, 1, 7)
    rb = np.linspace(0, 1, 3)
    how, pairs = match_layers([f"a{i}" for i in range(7)], ["b0", "b1", "b2"], ra, rb)
    assert how == "depth" and pairs == [(0, 0), (3, 1), (6, 2)]
    with pytest.raises(ValueError, match="no layer name is in both stores.*match='depth'"):
        match_layers(["x"], ["y"], ra[:1], rb[:1], match="name")
    with pytest.raises(ValueError, match="match='sideways'"):
        match_layers(["x"], ["x"], ra[:1], rb[:1], match="sideways")


def test_cli_compare_writes_the_page_figure_and_tables(stores):
    out = stores["tmp"] / "cmp"
    runner = CliRunner()
    res = runner.invoke(cli, ["compare", str(stores["a"]), str(stores["b"]), "-o", str(out),
                              "--n-boot", "100"])
    assert res.exit_code == 0, res.output
    assert "layers matched by name" in res.output and str(out / "compare.html") in res.output
    html = (out / "compare.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html
    assert html.count("data:image/png;base64,") == 1 and "<details>" in html
    check_png(out / "figures" / "sa_compare.png")
    assert "<svg" in (out / "figures" / "sa_compare.svg").read_text()
    direct = compare_stores(stores["a"], stores["b"], n_boot=100)
    rows = read_csv(out / "tables" / "layers.csv")
    assert [as_float(r["mean_diff"]) for r in rows] == pytest.approx(
        [r["mean_diff"] for r in direct.layers])
    assert [as_float(r["ci_lo"]) for r in rows] == pytest.approx([r["ci_lo"] for r in direct.layers])
    for name in ("changed_cases", "cases", "units", "unit_diff", "settings"):
        assert read_csv(out / "tables" / f"{name}.csv")
        json.loads((out / "tables" / f"{name}.json").read_text())
    # --json: one object on stdout
    res = runner.invoke(cli, ["compare", str(stores["a"]), str(stores["deep"]), "--json",
                              "--n-boot", "20"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["match"] == "depth" and len(data["layers"]) == 5 and data["html"] is None
    # refused with one line naming the difference and the flag
    res = runner.invoke(cli, ["compare", str(stores["a"]), str(stores["threshold"])])
    assert res.exit_code == 1
    assert "threshold=0.5 in A, 0.6 in B" in res.output and "--allow-different" in res.output
    assert "allow_different=True" not in res.output
    res = runner.invoke(cli, ["compare", str(stores["a"]), str(stores["threshold"]),
                              "--allow-different", "--n-boot", "20"])
    assert res.exit_code == 0 and "compared although different: threshold" in res.output
    res = runner.invoke(cli, ["compare", str(stores["a"]), str(stores["b"]), "--match", "nearest"])
    assert res.exit_code == 2
    assert runner.invoke(cli, ["compare", str(stores["a"])]).exit_code == 2


def test_bad_arguments(stores):
    with pytest.raises(ValueError, match="n_boot"):
        compare_stores(stores["a"], stores["b"], n_boot=-1)
    with pytest.raises(ValueError, match="match="):
        compare_stores(stores["a"], stores["b"], match="layers")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compare_stores(stores["tmp"] / "missing.h5", stores["b"])
    with pytest.raises(TypeError, match="compare_stores got a int"):
        compare_stores(3, stores["b"])


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")
def test_compare_page_in_headless_chromium(stores, chromium):  # noqa: F811
    out = stores["tmp"] / "cmp-browser"
    page = compare_stores(stores["a"], stores["deep"], out, n_boot=50).path
    result = open_in_chromium(chromium, page, {
        "headline": HEADLINE_BOX.replace("fig-sa_depth", "fig-sa_compare"),
        "run_open": "document.querySelector('#run details').open"})
    check_clean_load(result, page)
    assert len(result["images"]) == 1
    top, height = result["headline"]
    assert 0 < top < 1000 and height > 200
    assert result["run_open"] is False
