"""engine.run.score_batch: the pure batch step, and errors that name the case and its file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import engine
from engine.datasets import open_dataset
from engine.errors import CaseError
from engine.run import ScoreOptions, build_plan, score_batch, score_dataset
from tests import models


def _log_model() -> onnx.ModelProto:
    """y = sigmoid(x) is the prediction; the hidden tensor ``logx = log(x)`` is NaN where x < 0."""
    nodes = [helper.make_node("Log", ["x"], ["logx"], name="log"),
             helper.make_node("Sigmoid", ["x"], ["y"], name="sigmoid")]
    graph = helper.make_graph(
        nodes, "log_branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = 8
    return model


def _folder(root: Path, images: dict[str, np.ndarray]) -> Path:
    root.mkdir()
    for name, img in images.items():
        np.save(root / f"{name}.npy", img.astype(np.float32))
    return root


def test_nonfinite_features_name_the_case_the_file_and_the_tensor(tmp_path):
    pos = np.full((8, 8), 2.0)
    pos[:4] = 0.5
    neg = pos.copy()
    neg[6, 6] = -1.0  # log(-1) = NaN in the hidden tensor only; the prediction stays finite
    data = _folder(tmp_path / "cases", {"a": pos, "b": neg})
    path = models.save(_log_model(), tmp_path / "m.onnx")
    with pytest.raises(CaseError) as info:
        score_dataset(path, data, tmp_path / "r.h5", layers=["logx"], batch_size=2,
                      card={"scaling": "none"})
    err = info.value
    assert err.case_id == "b" and err.path.endswith("b.npy") and err.tensor == "logx"
    assert str(err).startswith("case 'b' (") and "b.npy" in str(err) and "NaN" in str(err)
    assert "\n" not in str(err)


def test_score_batch_is_pure_and_matches_the_run(tmp_path):
    """The same plan and cases give the same BatchResult twice, equal to what the store holds."""
    model = models.unet(batch="N", metadata=True)
    path = models.save(model, tmp_path / "u.onnx")
    rng = np.random.default_rng(0)
    images = {f"c{i}": rng.standard_normal((32, 32)) for i in range(3)}
    data = _folder(tmp_path / "cases", images)
    options = ScoreOptions(level="both", card={"scaling": "none"})
    card = engine.resolve_model_card(engine.load_model(path), overrides={"scaling": "none"})
    ds = open_dataset(data, spatial_ndim=card.spatial_ndim)
    plan = build_plan(path, ds, options, card=card)
    cases = [ds[i] for i in range(len(ds))]
    a = score_batch(plan, cases, range(len(cases)))
    b = score_batch(plan, cases, range(len(cases)))
    assert a.case_ids == ("c0", "c1", "c2") and list(a.case_index) == [0, 1, 2]
    np.testing.assert_array_equal(a.layer.score, b.layer.score)
    assert sorted(a.units) == sorted(b.units) and a.units
    summary = score_dataset(path, data, tmp_path / "r.h5", level="both", card={"scaling": "none"})
    st = engine.open_store(summary.store)
    np.testing.assert_array_equal(st.layer_scores()["score"], a.layer.score)
    for li, block in a.units.items():
        np.testing.assert_array_equal(st.unit_scores(li)["score"], block.score)


def test_options_are_validated_once_with_the_valid_values(tmp_path):
    with pytest.raises(ValueError, match="level='layers'.*'layer'"):
        ScoreOptions(level="layers")
    with pytest.raises(ValueError, match="batch_size"):
        ScoreOptions(batch_size=0)
    with pytest.raises(ValueError, match="shard"):
        ScoreOptions(shard="3/2")
    assert ScoreOptions(shard="1/4").shard == (1, 4)
    with pytest.raises(Exception):
        ScoreOptions().level = "unit"  # frozen
