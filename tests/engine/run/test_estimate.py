"""Score once, estimate from the store: engine.estimate_store and `protoseg estimate STORE`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from cli.main import cli
from engine.run import EstimateStoreError, estimate_dataset, estimate_store, score_dataset
from tests import models
from tests.engine.run.test_loop import _npz


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("est")
    path = models.save(models.unet(batch="N", metadata=True), tmp / "u.onnx")
    data = _npz(tmp / "d.npz", 6, 32)
    result = estimate_dataset(path, data, tmp / "e.h5", card={"scaling": "none"}, n_boot=50)
    return tmp, path, data, result


def test_estimate_store_gives_what_estimate_dataset_gave_without_a_model_run(scored, monkeypatch):
    tmp, _, _, first = scored
    import engine.model.session as session

    def no_session(*a, **k):  # estimating from a store must not run the model
        raise AssertionError("a model session was built")

    monkeypatch.setattr(session, "make_session", no_session)
    again = estimate_store(tmp / "e.h5", n_boot=50)
    assert again["ranking"] == first["ranking"]
    assert again["validation"] == first["validation"]
    st = engine.open_store(tmp / "e.h5")
    est = st.estimates()
    ranked = {r["case"]: r["paper"] for r in again["ranking"]}
    for cid, v in zip(st.cases["id"], est["paper"]):
        assert (ranked[str(cid)] is None and np.isnan(v)) or ranked[str(cid)] == pytest.approx(v)


def test_a_store_scored_against_ground_truth_is_refused_with_the_fix(scored):
    tmp, path, data, _ = scored
    summary = score_dataset(path, data, tmp / "gt.h5", level="both", card={"scaling": "none"})
    with pytest.raises(EstimateStoreError, match="reference='ground_truth'.*estimate_dataset.*reference='prediction'"):
        estimate_store(summary.store)
    layer_only = score_dataset(path, data, tmp / "l.h5", reference="prediction", card={"scaling": "none"})
    with pytest.raises(EstimateStoreError, match="no unit-level scores.*all-layers"):
        estimate_store(layer_only.store)
    out = estimate_store(layer_only.store, estimators=["all-layers"], n_boot=20)
    assert out["estimators"] == ["all-layers"]


def test_cli_estimate_from_a_store_and_its_usage_errors(scored):
    tmp, path, data, first = scored
    runner = CliRunner()
    res = runner.invoke(cli, ["estimate", str(tmp / "e.h5"), "--json", "--flag-lowest", "2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["case"] for r in out["ranking"]] == [r["case"] for r in first["ranking"]]
    assert sum(r["flag"] for r in out["ranking"]) == 2
    res = runner.invoke(cli, ["estimate", str(tmp / "e.h5"), "--batch-size", "2"])
    assert res.exit_code == 2 and "--batch-size apply when scoring" in res.output
    res = runner.invoke(cli, ["estimate", str(path)])
    assert res.exit_code == 2 and "missing argument DATA" in res.output
    res = runner.invoke(cli, ["estimate", str(path), str(data)])
    assert res.exit_code == 2 and "-o/--output" in res.output
    gt = score_dataset(path, data, tmp / "gt-cli.h5", level="both", card={"scaling": "none"})
    res = runner.invoke(cli, ["estimate", str(gt.store)])
    assert res.exit_code == 1
    assert "`protoseg estimate MODEL DATA -o STORE`" in res.output and "--reference prediction" in res.output
    assert "reference='prediction'" not in res.output
