"""`estimate_store` with the combined estimator, Dice lower bounds and the failure benchmark."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import engine
from cli.main import cli
from engine.quality import Calibration
from engine.run import estimate_dataset, estimate_store
from tests import models
from tests.engine.run.test_loop import _npz


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comb")
    path = models.save(models.unet(batch="N", metadata=True), tmp / "u.onnx")
    data = _npz(tmp / "d.npz", 12, 32)
    result = estimate_dataset(path, data, tmp / "e.h5", card={"scaling": "none"}, n_boot=50,
                              calibration=tmp / "cal.json")
    return tmp, result


def test_fitting_a_calibration_stores_the_combined_model_and_conformal_scores(fitted):
    tmp, result = fitted
    cal = Calibration.load(tmp / "cal.json")
    assert cal.combined is not None and cal.combined["feature_set"] == "sa+baselines"
    assert set(cal.conformal) == {"calibrated", "combined"}
    scores = cal.conformal["combined"]["scores"]
    assert scores == sorted(scores) and len(scores) == 12
    assert "difference" in cal.combined["cv"]["sa_added_value"]
    rows = {r["name"]: r for r in result["validation"]}
    assert {"aurc", "e_aurc", "aurc_ci"} <= set(rows["all-layers"])
    assert rows["all-layers"]["e_aurc"] >= 0


def test_combined_with_coverage_ranks_by_the_bound(fitted):
    tmp, _ = fitted
    out = estimate_store(tmp / "e.h5", estimators=["combined", "all-layers"], calibration=tmp / "cal.json",
                         coverage=0.9, n_boot=50, flag_below=0.5)
    bounds = [r["dice_lower_bound"] for r in out["ranking"]]
    finite = [b for b in bounds if b is not None]
    assert finite == sorted(finite)
    for r in out["ranking"]:
        if r["dice_lower_bound"] is not None:
            assert 0 <= r["dice_lower_bound"] <= r["combined"] + 1e-12
            assert r["flag"] == (r["dice_lower_bound"] < 0.5)
    assert out["coverage_check"]["nominal"] == 0.9 and out["coverage_check"]["n"] == 12
    est = engine.open_store(tmp / "e.h5").estimates()
    assert "dice_lower_bound" in est and "combined" in est


def test_coverage_needs_a_calibration_and_conformal_scores(fitted):
    tmp, _ = fitted
    with pytest.raises(ValueError, match="calibrated on labelled cases"):
        estimate_store(tmp / "e.h5", coverage=0.9)
    with pytest.raises(ValueError, match="no conformal scores for 'all-layers'"):
        estimate_store(tmp / "e.h5", estimators=["all-layers"], calibration=tmp / "cal.json", coverage=0.9, n_boot=0)


def test_cli_estimate_combined_with_coverage(fitted):
    tmp, _ = fitted
    res = CliRunner().invoke(cli, ["estimate", str(tmp / "e.h5"), "--estimator", "combined", "--calibration",
                                   str(tmp / "cal.json"), "--coverage", "0.9", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["coverage"] == 0.9 and "dice_lower_bound" in out["ranking"][0]
    res = CliRunner().invoke(cli, ["estimate", str(tmp / "e.h5"), "--estimator", "combined", "--calibration",
                                   str(tmp / "cal.json"), "--coverage", "0.9"])
    assert res.exit_code == 0, res.output
    assert "dice_lower_bound" in res.output and "aurc" in res.output and "covered" in res.output
