"""exporters.onnx (ONNX from anywhere) and the shared helpers of exporters._common."""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from engine.model.metadata import read_metadata  # noqa: E402
from exporters import _common
from exporters._common import (  # noqa: E402
    ExportMismatchError,
    LayerNotFoundError,
    build_metadata,
    check_close,
    rename_tensors,
    require,
    run_onnx,
)
from exporters.onnx import expose, readable_name  # noqa: E402

RNG = np.random.default_rng(0)


def _conv(name: str, x: str, w: str, out: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [out], name=name, pads=[1, 1, 1, 1])


def _torch_like_model(channels_last: bool = False) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Relu -> Conv(1x1) -> Sigmoid, torch-style node names."""
    w1 = numpy_helper.from_array(RNG.normal(size=(3, 1, 3, 3)).astype("float32"), "w1")
    w2 = numpy_helper.from_array(RNG.normal(size=(3, 3, 3, 3)).astype("float32"), "w2")
    w3 = numpy_helper.from_array(RNG.normal(size=(1, 3, 1, 1)).astype("float32"), "w3")
    nodes = [
        _conv("/enc1/enc1.0/Conv", "x", "w1", "/enc1/enc1.0/Conv_output_0"),
        helper.make_node("Relu", ["/enc1/enc1.0/Conv_output_0"], ["/enc1/enc1.1/Relu_output_0"],
                         name="/enc1/enc1.1/Relu"),
        _conv("/enc2/Conv", "/enc1/enc1.1/Relu_output_0", "w2", "/enc2/Conv_output_0"),
        helper.make_node("Relu", ["/enc2/Conv_output_0"], ["/act/Relu_output_0"], name="/act/Relu"),
        helper.make_node("Conv", ["/act/Relu_output_0", "w3"], ["logits"], name="/head/Conv"),
        helper.make_node("Sigmoid", ["logits"], ["y"], name="/Sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 8, 8])],
        initializer=[w1, w2, w3],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_torch_like_model(), path)
    return path


def test_expose_names_layers_and_writes_card(model_file, tmp_path):
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    r = expose(model_file, tmp_path / "out.onnx", preprocessing={"scaling": "minmax"})
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == digest  # source untouched
    assert r.outputs == ["y", "enc1.0", "enc1.1", "enc2", "act"]
    proto = onnx.load(r.path)
    assert [o.name for o in proto.graph.output] == r.outputs
    meta = read_metadata(proto)
    assert meta["framework"] == "onnx"
    assert meta["input"] == {"name": "x", "layout": "NCHW", "size": [8, 8]}
    assert meta["prediction"]["output"] == "y" and meta["prediction"]["activation"] == "sigmoid"
    assert meta["hidden"]["enc2"] == {"layer": "enc2", "layout": "NCHW"}
    assert r.max_abs_diff["y"] == 0.0
    # the renamed outputs hold the tensors they are named after
    x = RNG.random((2, 1, 8, 8), dtype=np.float32)
    got = run_onnx(r.path, {"x": x})
    assert np.all(got["enc1.1"] >= 0) and np.array_equal(got["enc1.1"], np.maximum(got["enc1.0"], 0))
    np.testing.assert_allclose(got["y"], run_onnx(model_file, {"x": x})["y"], atol=1e-6)


def test_expose_selectors_and_names(model_file, tmp_path):
    r = expose(model_file, tmp_path / "a.onnx", layers="op:Relu")
    assert r.outputs == ["y", "enc1.1", "act"]
    r = expose(model_file, tmp_path / "b.onnx", layers=["enc*"],
               names={"/enc2/Conv_output_0": "second"})
    assert r.outputs == ["y", "enc1.0", "enc1.1", "second"]
    with pytest.raises(KeyError, match="no hidden tensor matches 'decoder'.*enc1.0"):
        expose(model_file, tmp_path / "c.onnx", layers="decoder")
    with pytest.raises(ValueError, match="already used"):
        expose(model_file, tmp_path / "d.onnx", layers=["enc2"], names={"/enc2/Conv_output_0": "w1"})


def test_expose_refuses_bad_requests(model_file, tmp_path):
    with pytest.raises(ValueError, match="never overwrites"):
        expose(model_file, model_file)
    with pytest.raises(LayerNotFoundError, match="graph output"):
        expose(model_file, tmp_path / "o.onnx", prediction="z")
    two = _torch_like_model()
    two.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    with pytest.raises(ValueError, match="pass prediction="):
        expose(two, tmp_path / "o.onnx")
    r = expose(two, tmp_path / "o.onnx", prediction="y", layers="op:Relu")
    assert r.outputs == ["y", "enc1.1", "act"]
    assert [o.name for o in two.graph.output] == ["y", "logits"]  # the caller's proto is untouched


def test_expose_keeps_previous_protoseg_outputs(model_file, tmp_path):
    first = expose(model_file, tmp_path / "1.onnx", layers="op:Relu")
    second = expose(first.path, tmp_path / "2.onnx", layers="op:Conv")
    assert second.outputs[:3] == ["y", "enc1.1", "act"]
    assert set(second.outputs[3:]) == {"enc1.0", "enc2", "head"}  # explicit op: keeps the logits
    assert read_metadata(onnx.load(second.path))["hidden"]["act"]["layer"] == "act"


@pytest.mark.parametrize(
    ("node", "op", "want"),
    [
        ("/enc1/enc1.0/Conv", "Conv", "enc1.0"),
        ("/enc2/2/Relu", "Relu", "enc2.2"),
        ("/decoder/decoder.1/decoder.1.conv/Conv_1", "Conv", "decoder.1.conv"),
        ("conv3d_1/Relu", "Relu", "conv3d_1"),
        ("model/block1/conv/Conv2D", "Conv", "model/block1/conv"),
        ("Conv__160", "Conv", "Conv__160"),
        ("/Concat", "Concat", "Concat"),
    ],
)
def test_readable_name(node, op, want):
    assert readable_name(node, op) == want


# ------------------------------------------------------------------ shared helpers


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=20),
    st.floats(0, 1e-2), st.floats(0, 1e-2), st.floats(-0.1, 0.1),
)
def test_check_close_matches_its_definition(values, atol, rtol, shift):
    ref = np.asarray(values, dtype=np.float32)
    got = ref + np.float32(shift)
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    ok = bool(np.all(diff <= atol + rtol * np.abs(ref.astype(np.float64)).max()))
    if ok:
        out = check_close({"a": ref}, {"a": got}, atol=atol, rtol=rtol, framework="f")
        assert out["a"] == pytest.approx(diff.max())
    else:
        with pytest.raises(ExportMismatchError, match="'a'"):
            check_close({"a": ref}, {"a": got}, atol=atol, rtol=rtol, framework="f")


def test_check_close_shape_and_missing():
    with pytest.raises(ExportMismatchError, match="shape"):
        check_close({"a": np.zeros((1, 2))}, {"a": np.zeros((2, 1))}, atol=1, rtol=1, framework="f")
    with pytest.raises(ExportMismatchError, match="no output 'b'"):
        check_close({"b": np.zeros(1)}, {"a": np.zeros(1)}, atol=1, rtol=1, framework="f")


def test_rename_tensors_everywhere_and_refuses_clash():
    model = _torch_like_model()
    rename_tensors(model, {"/act/Relu_output_0": "act", "x": "image"})
    assert model.graph.input[0].name == "image"
    assert any("act" in n.input for n in model.graph.node)
    assert not any("/act/Relu_output_0" in list(n.input) + list(n.output) for n in model.graph.node)
    with pytest.raises(ValueError, match="already used"):
        rename_tensors(model, {"act": "w2"})


def test_build_metadata_validates_vocabulary():
    base = dict(framework="f", source="s", input_name="x", input_layout="NCHW", input_size=[4, 4],
                prediction="y", activation="sigmoid")
    meta = build_metadata(**base, preprocessing={"scaling": "meanstd", "mean": [0.5], "std": 0.25})
    assert meta["preprocessing"] == {"resize": True, "scaling": "meanstd", "mean": [0.5], "std": [0.25]}
    with pytest.raises(ValueError, match="input layout"):
        build_metadata(**{**base, "input_layout": "HWC"})
    with pytest.raises(ValueError, match="activation"):
        build_metadata(**{**base, "activation": "relu"})
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        build_metadata(**base, preprocessing={"scale": "minmax"})
    with pytest.raises(TypeError, match="preprocessing must be a dict"):
        build_metadata(**base, preprocessing="minmax")


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'protoseg\[tensorflow\]'"):
        require("tf2onnx")
    assert require("numpy") is np


def test_save_onnx_rejects_invalid_model(tmp_path):
    bad = _torch_like_model()
    bad.graph.node[0].input[1] = "nowhere"
    with pytest.raises(ValueError, match="invalid"):
        _common.save_onnx(bad, tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())
