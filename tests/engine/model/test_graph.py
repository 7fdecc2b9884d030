"""Tests for engine/model/graph.py: loading, listing, selecting, exposing, planning passes."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from engine.model.graph import (
    HiddenTensor,
    activation_bytes,
    expose,
    list_hidden_tensors,
    load_model,
    plan_passes,
    require_hidden,
    select_tensors,
)
from tests.models import (
    HIDDEN_NCHW,
    flat_model,
    save,
    serialized,
    tiny_conv,
    unet,
    write_truncated,
)

NOT_HIDDEN = {"x", "img", "prob", "logits", "bias_const", "bias", "shape_x", "dim2", "dim2_f"}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


# -------------------------------------------------------------------------------- load_model

def test_load_model_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope.onnx")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_load_model_truncated_file(tmp_path, fraction):
    path = write_truncated(tmp_path / "cut.onnx", fraction=fraction)
    with pytest.raises(ValueError) as info:
        load_model(path)
    msg = str(info.value)
    assert "cut.onnx" in msg and "\n" not in msg
    assert "truncated" in msg or "not a" in msg


def test_load_model_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    with pytest.raises(ValueError, match="notes.onnx"):
        load_model(path)


def test_load_model_directory_and_type(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_model(tmp_path)
    with pytest.raises(TypeError, match="ModelProto"):
        load_model(42)  # type: ignore[arg-type]


def test_load_model_round_trip(tmp_path):
    model = unet()
    loaded = load_model(save(model, tmp_path / "u.onnx"))
    assert serialized(loaded) == serialized(model)
    assert load_model(model) is model


# ------------------------------------------------------------------------ list_hidden_tensors

@pytest.mark.parametrize("ndim,layout,size", [(2, "NCHW", 32), (2, "NHWC", 32), (3, "NCDHW", 16),
                                              (3, "NDHWC", 16), (1, "NCW", 32)])
@pytest.mark.parametrize("upsample", ["resize", "convtranspose"])
def test_list_hidden_tensors_unet(ndim, layout, size, upsample):
    model = unet(ndim=ndim, layout=layout, size=size, upsample=upsample, head="softmax", n_classes=3)
    tensors = list_hidden_tensors(model)
    names = [t.name for t in tensors]
    expected = set(HIDDEN_NCHW)
    if layout in ("NHWC", "NDHWC"):  # in-graph transposes: the NCHW copies are hidden tensors
        expected |= {"x_nchw", "prob_nchw"}
    assert set(names) == expected
    assert not NOT_HIDDEN & set(names)
    # topological order: every tensor after the ones it depends on
    assert names.index("enc1") < names.index("pool1") < names.index("up") < names.index("cat") < names.index("head")
    depths = [t.depth for t in tensors]
    assert depths == sorted(depths)
    by_name = {t.name: t for t in tensors}
    assert by_name["pool1"].shape == (1, 4) + (size // 2,) * ndim
    assert by_name["cat"].shape == (1, 12) + (size,) * ndim
    assert by_name["up"].op == ("Resize" if upsample == "resize" else "ConvTranspose")
    assert by_name["enc1"].layer == "enc1_relu"  # node name without metadata
    assert by_name["enc1"].layout == {1: "NCW", 2: "NCHW", 3: "NCDHW"}[ndim]
    assert all(t.dtype == "float32" for t in tensors)
    assert by_name["cat"].channels == 12


def test_list_hidden_tensors_metadata_layers():
    tensors = list_hidden_tensors(unet(metadata=True))
    assert {t.name: t.layer for t in tensors}["enc2"] == "block/enc2"


def test_list_hidden_tensors_symbolic_dims_and_input_shapes():
    model = unet(batch="N", size="S")
    tensors = {t.name: t for t in list_hidden_tensors(model)}
    assert tensors["enc1"].shape[0] == "N"
    assert all(isinstance(d, str) or d is None for d in tensors["enc1"].shape[2:])
    fixed = {t.name: t for t in list_hidden_tensors(model, input_shapes={"x": ["N", 1, 24, 24]})}
    assert fixed["pool1"].shape == ("N", 4, 12, 12)
    assert serialized(model) == serialized(unet(batch="N", size="S"))  # not modified


def test_list_hidden_tensors_excludes_non_float_and_low_rank():
    model = tiny_conv(batch="N")
    graph = model.graph
    # add an int64 rank-4 tensor computed from the input and a rank-2 float tensor
    graph.node.append(onnx.helper.make_node("Cast", ["r1"], ["r1_int"], to=onnx.TensorProto.INT64))
    graph.node.append(onnx.helper.make_node("ReduceMean", ["r1"], ["r1_mean"], keepdims=0, axes=[2, 3]))
    graph.node.append(onnx.helper.make_node("Identity", ["r1_mean"], ["r1_mean_out"]))
    graph.output.append(onnx.helper.make_tensor_value_info("r1_mean_out", onnx.TensorProto.FLOAT, None))
    names = [t.name for t in list_hidden_tensors(model)]
    assert names == ["c1", "r1", "c2"]


def test_model_without_spatial_tensors():
    tensors = list_hidden_tensors(flat_model())
    assert tensors == []
    with pytest.raises(ValueError, match="no hidden tensor that can hold spatial features"):
        require_hidden(tensors)
    require_hidden(list_hidden_tensors(tiny_conv()))  # no error


# ---------------------------------------------------------------------------- select_tensors

@pytest.fixture(scope="module")
def tensors() -> list[HiddenTensor]:
    return list_hidden_tensors(unet(metadata=True))


def test_select_all_and_exact(tensors):
    assert select_tensors(tensors) == tensors
    assert [t.name for t in select_tensors(tensors, "pool1")] == ["pool1"]
    assert [t.name for t in select_tensors(tensors, "block/dec")] == ["dec"]  # layer name


def test_select_glob_regex_op(tensors):
    assert [t.name for t in select_tensors(tensors, "enc*")] == ["enc1_conv", "enc1", "enc2_conv", "enc2", "enc2_shift"]
    assert [t.name for t in select_tensors(tensors, "re:_conv$")] == ["enc1_conv", "enc2_conv", "dec_conv"]
    assert [t.name for t in select_tensors(tensors, "op:Relu")] == ["enc1", "enc2", "dec"]
    assert [t.name for t in select_tensors(tensors, "op:relu")] == ["enc1", "enc2", "dec"]
    # union of several patterns, in topological order, no duplicates
    got = [t.name for t in select_tensors(tensors, ["head", "op:Relu", "enc1"])]
    assert got == ["enc1", "enc2", "dec", "head"]


def test_select_unknown_lists_closest(tensors):
    with pytest.raises(KeyError) as info:
        select_tensors(tensors, "enc_2")
    assert "enc2" in str(info.value)
    with pytest.raises(KeyError, match="Relu"):
        select_tensors(tensors, "op:Rlu")


def test_select_bad_input(tensors):
    with pytest.raises(ValueError, match="regular expression"):
        select_tensors(tensors, "re:(")
    with pytest.raises(ValueError, match="empty"):
        select_tensors(tensors, [])
    with pytest.raises(TypeError):
        select_tensors(tensors, [1])  # type: ignore[list-item]


# ----------------------------------------------------------------------------------- expose

def test_expose_does_not_mutate_model_or_file(tmp_path):
    model = unet(batch="N")
    path = save(model, tmp_path / "u.onnx")
    before_bytes, before_file = serialized(model), path.read_bytes()
    tensors = list_hidden_tensors(model)
    exposed = expose(model, tensors)
    exposed_from_path = expose(path, tensors)
    assert serialized(model) == before_bytes
    assert path.read_bytes() == before_file
    names = [o.name for o in exposed.graph.output]
    assert names == ["prob"] + [t.name for t in tensors]
    assert [o.name for o in exposed_from_path.graph.output] == names
    onnx.checker.check_model(exposed)
    cat = next(o for o in exposed.graph.output if o.name == "cat")
    assert cat.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(cat.type.tensor_type.shape.dim) == 4


def test_expose_after_listing_with_assumed_shapes_runs_any_batch():
    model = unet(batch="N", size="S")
    tensors = list_hidden_tensors(model, input_shapes={"x": [8, 1, 32, 32]})
    out = _run(expose(model, tensors), {"x": np.zeros((2, 1, 24, 24), np.float32)})
    assert out["cat"].shape == (2, 12, 24, 24)


def _conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain 2-D 'same' cross-correlation, NCHW, odd kernel."""
    k = w.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    win = sliding_window_view(xp, (k, k), axis=(2, 3))  # (B, Cin, H, W, k, k)
    return np.einsum("bchwij,ocij->bohw", win, w) + b[None, :, None, None]


def test_exposed_values_equal_reference():
    model = tiny_conv(batch="N", size=8, channels=3)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    x = np.random.default_rng(1).normal(size=(2, 1, 8, 8)).astype(np.float32)
    out = _run(expose(model, list_hidden_tensors(model)), {"x": x})
    c1 = _conv_ref(x.astype(np.float64), inits["c1_w"], inits["c1_b"])
    r1 = np.maximum(c1, 0)
    c2 = _conv_ref(r1, inits["c2_w"], inits["c2_b"])
    np.testing.assert_allclose(out["c1"], c1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["r1"], r1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["c2"], c2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["y"], 1 / (1 + np.exp(-c2)), rtol=1e-5, atol=1e-6)


def test_exposed_unet_consistent_and_prediction_unchanged():
    model = unet(batch="N", layout="NHWC", head="softmax", n_classes=3)
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 1)).astype(np.float32)
    plain = _run(model, {"img": x})
    out = _run(expose(model, list_hidden_tensors(model)), {"img": x})
    np.testing.assert_allclose(out["prob"], plain["prob"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["x_nchw"], np.moveaxis(x, -1, 1))
    np.testing.assert_allclose(out["enc1"], np.maximum(out["enc1_conv"], 0))
    pooled = out["enc1"].reshape(2, 4, 16, 2, 16, 2).max(axis=(3, 5))
    np.testing.assert_allclose(out["pool1"], pooled)
    np.testing.assert_array_equal(out["cat"], np.concatenate([out["enc1"], out["up"]], axis=1))
    np.testing.assert_allclose(np.moveaxis(out["prob_nchw"], 1, -1), out["prob"], rtol=1e-6)


def test_expose_by_name_and_unknown():
    model = tiny_conv()
    exposed = expose(model, ["r1", "y", "r1"])  # output kept once, duplicates once
    assert [o.name for o in exposed.graph.output] == ["y", "r1"]
    with pytest.raises(KeyError, match="r1"):
        expose(model, ["r_1"])


# ------------------------------------------------------------------------------- plan_passes

def test_activation_bytes_and_plan_split(caplog):
    tensors = list_hidden_tensors(unet())  # float32, batch 1 in the file
    sizes = [activation_bytes(t, 4) for t in tensors]
    for t, s in zip(tensors, sizes):
        assert s == 4 * 4 * int(np.prod(t.shape[1:]))
    assert plan_passes(tensors, 4, max_activation_memory=sum(sizes)) == [tensors]
    budget = max(sizes) + 1
    with caplog.at_level(logging.INFO, logger="protoseg"):
        passes = plan_passes(tensors, 4, max_activation_memory=budget)
    assert len(passes) > 1
    assert [t for p in passes for t in p] == tensors  # order kept, nothing lost or repeated
    for p in passes:
        assert sum(activation_bytes(t, 4) for t in p) <= budget
    assert sum("passes" in r.getMessage() for r in caplog.records) == 1


def test_plan_passes_oversized_tensor_warns(caplog):
    tensors = list_hidden_tensors(unet())
    with caplog.at_level(logging.INFO, logger="protoseg"):
        passes = plan_passes(tensors, 2, max_activation_memory=10)
    assert passes == [[t] for t in tensors]
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_plan_passes_symbolic_dims():
    tensors = list_hidden_tensors(unet(batch="N", size="S"))
    with pytest.raises(ValueError, match="input_size"):
        plan_passes(tensors, 2, max_activation_memory=1 << 30)
    passes = plan_passes(tensors, 2, max_activation_memory=1 << 30, input_size=(32, 32))
    assert passes == [tensors]
    cat = next(t for t in tensors if t.name == "cat")
    assert activation_bytes(cat, 2, input_size=(32, 32)) == 2 * 12 * 32 * 32 * 4


def test_plan_passes_default_budget_and_bad_args():
    tensors = list_hidden_tensors(tiny_conv())
    assert plan_passes(tensors, 1) == [tensors]
    assert plan_passes([], 3) == []
    with pytest.raises(ValueError, match="batch_size"):
        plan_passes(tensors, 0)
    with pytest.raises(ValueError, match="max_activation_memory"):
        plan_passes(tensors, 1, max_activation_memory=0)


def test_shape_derived_float_tensor_is_excluded():
    """ConstantOfShape(Shape(x)) is rank-4 float but holds no features; what it feeds does."""
    model = tiny_conv(batch="N")
    g = model.graph
    g.node.extend([
        onnx.helper.make_node("Shape", ["r1"], ["r1_shape"]),
        onnx.helper.make_node("ConstantOfShape", ["r1_shape"], ["zeros"],
                              value=onnx.numpy_helper.from_array(np.array([0.5], np.float32))),
        onnx.helper.make_node("Mul", ["zeros", "zeros"], ["zeros_sq"]),
        onnx.helper.make_node("Add", ["r1", "zeros_sq"], ["r1_plus"]),
        onnx.helper.make_node("Identity", ["r1_plus"], ["r1_out"]),
    ])
    g.output.append(onnx.helper.make_tensor_value_info("r1_out", onnx.TensorProto.FLOAT, None))
    names = [t.name for t in list_hidden_tensors(model)]
    assert "zeros" not in names and "zeros_sq" not in names
    assert "r1_plus" in names


def _fake(name: str, channels: int, side: int) -> HiddenTensor:
    return HiddenTensor(name=name, op="Conv", shape=("N", channels, side, side), dtype="float32",
                        layer=name, layout="NCHW", depth=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 32)), min_size=1, max_size=12),
       st.integers(1, 8), st.integers(1, 200_000))
def test_plan_passes_invariants(specs, batch, budget):
    tensors = [_fake(f"t{i}", c, s) for i, (c, s) in enumerate(specs)]
    passes = plan_passes(tensors, batch, max_activation_memory=budget)
    assert [t for p in passes for t in p] == tensors
    sizes = {t.name: batch * 4 * int(np.prod(t.shape[1:])) for t in tensors}
    for k, p in enumerate(passes):
        total = sum(sizes[t.name] for t in p)
        assert total <= budget or len(p) == 1
        if k + 1 < len(passes):  # greedy: the next tensor did not fit
            assert total + sizes[passes[k + 1][0].name] > budget
