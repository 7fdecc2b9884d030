"""The report's quality-control results (issue 20): failure detection, Dice bounds, SA's
added value, from a store annotated by the real `estimate_store` (calibration fitted on the
store's ground truth, then applied with a coverage)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.quality.conformal import coverage_interval
from engine.quality.failure import aurc, risk_coverage_curve
from engine.report import write_report
from engine.run import estimate_store
from engine.store import open_store

from ._synthetic import as_float, build_store, check_png, read_csv

#: Scored as `protoseg estimate` needs it: the prediction as guide and reference.
LABEL_FREE = {"guide": "prediction", "reference": "prediction", "output_path_tensors": []}


@pytest.fixture(scope="module")
def qc_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qc")
    store = build_store(tmp, n_cases=24, seed=3, config=LABEL_FREE)
    cal = tmp / "cal.json"
    estimate_store(store.path, estimators=["all-layers", "paper"], calibration=cal, n_boot=50)
    out = estimate_store(store.path, estimators=["combined", "all-layers"], calibration=cal,
                         coverage=0.9, n_boot=50)
    path = write_report(open_store(store.path), tmp / "out")
    return open_store(store.path), path, out


def test_failure_table_has_aurc_and_auroc_at_each_threshold(qc_report):
    store, path, _ = qc_report
    val = store.validation()
    rows = {r["estimator"]: r for r in read_csv(path.parent / "tables" / "failure.csv")}
    assert set(rows) == {n for n, v in val.items() if "failure" in v}
    assert {"combined", "all-layers", "predicted_fraction", "input_sa"} <= set(rows)
    for name, row in rows.items():
        fail = val[name]["failure"]
        assert as_float(row["aurc"]) == pytest.approx(fail["aurc"]["value"])
        assert as_float(row["e_aurc_hi"]) == pytest.approx(fail["e_aurc"]["ci"][1])
        for t, a in fail["auroc"].items():
            expect = math.nan if a["value"] is None else a["value"]
            assert as_float(row[f"auroc_{t}"]) == pytest.approx(expect, nan_ok=True)
            assert int(row[f"n_bad_{t}"]) == a["n_bad"]
    # Dice is uniform in [0.5, 1): nothing below 0.5, so that AUROC is undefined, and said why
    assert math.isnan(as_float(rows["combined"]["auroc_0.5"]))
    assert "AUROC at 0.5: no case with Dice < 0.5" in rows["combined"]["note"]
    assert 0 <= as_float(rows["combined"]["auroc_0.8"]) <= 1
    html = path.read_text()
    for t in ("0.5", "0.7", "0.8", "0.9"):
        assert f"<th>auroc_{t}</th>" in html
    assert "(tables/failure.csv)" in html


def test_validation_rows_carry_aurc(qc_report):
    _, path, _ = qc_report
    rows = read_csv(path.parent / "tables" / "validation.csv")
    everyone = [r for r in rows if r["scope"] == "all"]
    assert everyone and all(r["aurc"] not in ("", "NaN") for r in everyone)
    assert {"aurc_lo", "aurc_hi", "e_aurc", "e_aurc_lo", "e_aurc_hi"} <= set(rows[0])


def test_risk_coverage_figure(qc_report):
    store, path, _ = qc_report
    figs = path.parent / "figures"
    check_png(figs / "risk_coverage.png")
    svg = (figs / "risk_coverage.svg").read_text()
    assert "<svg" in svg
    assert 'id="fig-risk_coverage"' in path.read_text()
    # the curve drawn is the engine's, and its mean is the stored AURC
    dice = store.output_dice()[:, 0]
    est = store.estimates()["combined"]
    cov, risk = risk_coverage_curve(est, 1 - dice)
    assert cov[-1] == 1.0 and risk[-1] == pytest.approx(np.mean(1 - dice))
    stored = store.validation()["combined"]["failure"]["aurc"]["value"]
    assert risk.mean() == pytest.approx(stored) == pytest.approx(aurc(est, 1 - dice))


def test_dice_lower_bound_column_and_coverage_check(qc_report):
    store, path, out = qc_report
    bound = store.estimates()["dice_lower_bound"]
    cases = read_csv(path.parent / "tables" / "cases.csv")
    assert [as_float(r["dice_lower_bound"]) for r in cases] == pytest.approx(bound, nan_ok=True)
    triage = read_csv(path.parent / "tables" / "triage.csv")
    b = [as_float(r["dice_lower_bound"]) for r in triage]
    assert b == sorted(b) and len(b) == 24
    assert list(triage[0])[:6] == ["rank", "id", "group", "estimate_combined",
                                   "dice_lower_bound", "output_dice"]
    check = out["coverage_check"]
    # the interval follows the calibration cases of the method used (the normalised scores
    # leave out a case whose difficulty features are undefined)
    entry = store.estimates()["info"]["calibration"]["conformal"]["combined"]
    assert check["method"] == out["bound_method"] == "normalized"
    lo, hi = coverage_interval(entry["normalized"]["n"], 0.9)
    text = path.read_text()
    line = (f"{check['covered']} of 24 labelled cases ({check['coverage']:.0%}) have a Dice "
            f"at or above their bound (nominal 90%)")
    assert line in text
    assert (f"<td>at 90% coverage for combined: {check['covered']} of 24 labelled cases at or "
            "above their bound (see Validation)</td>") in text  # in the summary
    assert f"lies in [{lo:.2f}, {hi:.2f}] with 95 % probability" in text
    assert "Cases ranked by their Dice lower bound at 90% coverage" in text


def test_added_value_verdict(qc_report):
    store, path, _ = qc_report
    sav = store.estimates()["info"]["calibration"]["combined"]["cv"]["sa_added_value"]
    rows = json.loads((path.parent / "tables" / "added_value.json").read_text())
    assert rows[0]["difference"] == pytest.approx(sav["difference"])
    assert [rows[0]["ci_lo"], rows[0]["ci_hi"]] == pytest.approx(sav["ci"])
    lo, hi = sav["ci"]
    verdict = ("SA adds information" if hi < 0 else "SA makes the baselines worse" if lo > 0
               else "no evidence that SA adds information")
    assert rows[0]["verdict"].startswith(verdict)
    text = path.read_text()
    assert "<td>SA beyond the baselines</td>" in text
    assert "Does SA add information beyond the baselines?" in text


def test_report_without_the_benchmark_has_none_of_it(full_report):
    _, path = full_report
    names = {p.stem for p in (path.parent / "tables").glob("*.csv")}
    assert not names & {"failure", "triage", "added_value"}
    assert not (path.parent / "figures" / "risk_coverage.png").exists()
    assert "Dice lower bound" not in path.read_text()


def test_same_store_gives_the_same_tables(qc_report, tmp_path):
    store, path, _ = qc_report
    again = write_report(store, tmp_path / "again")
    for name in ("failure", "triage", "added_value", "validation"):
        assert ((again.parent / "tables" / f"{name}.csv").read_bytes()
                == (path.parent / "tables" / f"{name}.csv").read_bytes())
