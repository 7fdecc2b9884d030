"""`estimate_store` / `protoseg estimate --coverage` with the normalised and the constant Dice
lower bound: method chosen, ranking by the bound, old calibrations, the CLI's output."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from cli.main import cli
from engine.quality import Calibration, conformal_quantile
from engine.run import estimate_dataset, estimate_store
from tests import models
from tests.engine.run.test_loop import _npz


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounds")
    path = models.save(models.unet(batch="N", metadata=True), tmp / "u.onnx")
    data = _npz(tmp / "d.npz", 14, 32)
    estimate_dataset(path, data, tmp / "e.h5", card={"scaling": "none"}, n_boot=20, calibration=tmp / "cal.json")
    # the same calibration as an older protoseg wrote it: no normalised scores
    d = json.loads((tmp / "cal.json").read_text())
    for entry in d["conformal"].values():
        entry.pop("normalized", None)
        entry.pop("normalized_error", None)
    (tmp / "old.json").write_text(json.dumps(d))
    return tmp


def _estimate(tmp, **kw):
    return estimate_store(tmp / "e.h5", estimators=["combined", "all-layers"], calibration=kw.pop("cal", tmp / "cal.json"),
                          coverage=0.9, n_boot=20, **kw)


def test_the_calibration_stores_a_difficulty_model_per_estimator(fitted):
    cal = Calibration.load(fitted / "cal.json")
    for name in ("calibrated", "combined"):
        norm = cal.conformal[name]["normalized"]
        model = norm["difficulty"]
        assert model["features"] == ["estimate", "mean_entropy", "uncertain_fraction", "sa_dispersion"]
        assert model["floor"] > 0 and min(model["coef"]) >= 0 and model["intercept"] >= 0
        assert model["layers"] and norm["scores"] == sorted(norm["scores"]) and norm["n"] <= 14


def test_default_is_the_normalized_bound_ranked_and_stored(fitted):
    out = _estimate(fitted)
    assert out["bound_method"] == "normalized" and out["bound_note"] == ""
    assert out["coverage_check"]["method"] == "normalized"
    rows = out["ranking"]
    key = [(-1.0 if r["dice_lower_bound"] is None else r["dice_lower_bound"],
            -1.0 if r["combined"] is None else r["combined"]) for r in rows]
    assert key == sorted(key)  # by the bound, ties (bounds clipped to 0) by the estimate
    for r in rows:
        if r["dice_lower_bound"] is None:
            assert r["flag"] and r["reason"]
        else:
            assert 0 <= r["dice_lower_bound"] <= 1 and r["bound_scale"] > 0
    est = engine.open_store(fitted / "e.h5").estimates()
    info = est["info"]["bound"]
    assert info["method"] == "normalized" and info["n_calibration"] >= 10
    # the stored bound is estimate − q·σ with the stored scale (clipped to [0, 1])
    b, s, e = (np.asarray(est[k], dtype=float).reshape(-1) for k in ("dice_lower_bound", "dice_bound_scale", "combined"))
    ok = np.isfinite(b)
    np.testing.assert_allclose(b[ok], np.clip(e[ok] - info["q"] * s[ok], 0, 1), atol=1e-12)


def test_constant_bound_on_request_is_the_estimate_minus_q(fitted):
    out = _estimate(fitted, bound_method="constant")
    assert out["bound_method"] == "constant"
    entry = Calibration.load(fitted / "cal.json").conformal["combined"]
    q = conformal_quantile(np.asarray(entry["scores"]), 0.9)
    for r in out["ranking"]:
        if r["combined"] is not None:
            assert r["dice_lower_bound"] == pytest.approx(min(max(r["combined"] - q, 0.0), 1.0))
            assert r["bound_scale"] == 1.0


def test_an_old_calibration_gives_the_constant_bound(fitted):
    out = _estimate(fitted, cal=fitted / "old.json")
    assert out["bound_method"] == "constant" and "no normalised scores" in out["bound_note"]
    with pytest.raises(ValueError, match="no normalised conformal scores"):
        _estimate(fitted, cal=fitted / "old.json", bound_method="normalized")


def test_bound_method_needs_a_coverage_and_a_known_name(fitted):
    with pytest.raises(ValueError, match="give coverage=0.9 too"):
        estimate_store(fitted / "e.h5", calibration=fitted / "cal.json", bound_method="constant", n_boot=0)
    with pytest.raises(ValueError, match="bound_method"):
        _estimate(fitted, bound_method="quantile")


def test_cli_says_which_bound(fitted):
    base = ["estimate", str(fitted / "e.h5"), "--estimator", "combined", "--calibration", str(fitted / "cal.json"),
            "--coverage", "0.9"]
    res = CliRunner().invoke(cli, base)
    assert res.exit_code == 0, res.output
    assert "normalized split conformal" in res.output and "dice_lower_bound" in res.output
    res = CliRunner().invoke(cli, base + ["--bound-method", "constant", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["bound_method"] == "constant" and out["coverage_check"]["method"] == "constant"
    res = CliRunner().invoke(cli, ["estimate", str(fitted / "e.h5"), "--calibration", str(fitted / "old.json"),
                                   "--estimator", "combined", "--coverage", "0.9"])
    assert res.exit_code == 0, res.output
    assert "constant split conformal" in res.output and "note: constant bound" in res.output
    res = CliRunner().invoke(cli, ["estimate", str(fitted / "e.h5"), "--bound-method", "constant"])
    assert res.exit_code != 0 and "--coverage" in res.output
