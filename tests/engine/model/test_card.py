"""Tests for engine/model/card.py: resolution order, inference, preprocessing, probabilities."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine.model.metadata import new_metadata
from engine.model.card import ModelCard, resolve_model_card
from tests.models import multi_output, serialized, tiny_conv, unet


def _card(**kw) -> ModelCard:
    base = dict(input_name="x", layout="NCHW", input_size=(8, 8), channels=1, prediction_output="y",
                activation="sigmoid", classes=(0,))
    base.update(kw)
    return ModelCard(**base)


# ------------------------------------------------------------------------------- resolution

def test_from_metadata_nothing_assumed():
    model = unet(metadata=True, layout="NHWC")
    before = serialized(model)
    card = resolve_model_card(model)
    assert serialized(model) == before
    assert card.assumed == []
    assert (card.input_name, card.layout, card.input_size, card.scaling) == ("img", "NHWC", (32, 32), "minmax")
    assert card.prediction_output == "prob" and card.activation == "sigmoid" and card.classes == (0,)
    assert card.hidden_layers["enc1"] == "block/enc1" and card.hidden_layouts["enc1"] == "NCHW"
    assert card.spatial_ndim == 2


def test_toml_over_metadata_and_overrides_over_toml(tmp_path):
    toml = tmp_path / "card.toml"
    toml.write_text('threshold = 0.3\n[preprocessing]\nscaling = "zscore"\n[prediction]\nclasses = [0]\n')
    model = unet(metadata=True)
    card = resolve_model_card(model, toml=toml)
    assert (card.threshold, card.scaling, card.resize) == (0.3, "zscore", True)  # resize from metadata
    card = resolve_model_card(model, toml=toml, overrides={"scaling": "none", "prediction": {"threshold": 0.7}})
    assert (card.threshold, card.scaling) == (0.7, "none")
    assert card.assumed == []


def test_toml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_card(unet(), toml=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("layout = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        resolve_model_card(unet(), toml=bad)


def test_inference_lists_every_assumption():
    card = resolve_model_card(unet())
    text = " | ".join(card.assumed)
    for word in ("input", "layout NCHW", "resized", "scaling", "prediction", "activation sigmoid",
                 "classes [0]", "threshold"):
        assert word in text
    assert all(isinstance(s, str) and "\n" not in s for s in card.assumed)


@pytest.mark.parametrize("ndim,layout,size", [(2, "NHWC", 32), (3, "NDHWC", 16), (3, "NCDHW", 16), (1, "NWC", 32)])
def test_inferred_layout(ndim, layout, size):
    card = resolve_model_card(unet(ndim=ndim, layout=layout, size=size, batch="N"))
    assert card.layout == layout
    assert card.input_size == (size,) * ndim
    assert any(f"layout {layout}" in s for s in card.assumed)


def test_inferred_layout_deepbrain_like_shape():
    """[N,128,128,128,1] (deepbrain's input) → NDHWC, from the small last axis."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["img"], ["prob"])], "g",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 128, 128, 128, 1])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 128, 128, 128, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    card = resolve_model_card(model)
    assert card.layout == "NDHWC" and card.input_size == (128, 128, 128) and card.channels == 1
    assert card.activation == "sigmoid" and card.classes == (0,)


def test_channels_last_by_transpose_when_shape_is_symbolic():
    card = resolve_model_card(unet(layout="NHWC", size="S", batch="N", in_channels=1))
    assert card.layout == "NHWC"  # last axis is 1 anyway
    card = resolve_model_card(unet(layout="NHWC", size=32, batch="N", in_channels=3))
    assert card.layout == "NHWC" and card.channels == 3


@pytest.mark.parametrize("head,n,classes,activation", [("sigmoid", 1, (0,), "sigmoid"),
                                                      ("softmax", 2, (1,), "softmax"),
                                                      ("softmax", 3, (1, 2), "softmax"),
                                                      ("logits", 1, (0,), "logits"),
                                                      ("logits", 4, (1, 2, 3), "logits")])
def test_inferred_classes_and_activation(head, n, classes, activation):
    card = resolve_model_card(unet(head=head, n_classes=n, layout="NHWC"))
    assert card.classes == classes and card.activation == activation
    assert any(s.startswith(f"classes {list(classes)}") for s in card.assumed)
    assert any(s.startswith(f"activation {activation}") for s in card.assumed)


def test_symbolic_spatial_size():
    card = resolve_model_card(unet(size="S", batch="N"))
    assert card.input_size is None and card.resize is False
    assert any("input size: any" in s for s in card.assumed)


def test_prediction_among_several_outputs():
    card = resolve_model_card(multi_output())
    assert card.prediction_output == "seg"
    assert any("input's spatial shape" in s for s in card.assumed)
    assert resolve_model_card(multi_output(), overrides={"prediction_output": "aux",
                                                         "classes": [1]}).prediction_output == "aux"


def test_ambiguous_prediction_asks_the_user():
    model = multi_output()
    del model.graph.output[:]
    from onnx import TensorProto, helper

    model.graph.output.extend([helper.make_tensor_value_info("seg", TensorProto.FLOAT, [1, 1, 16, 16]),
                               helper.make_tensor_value_info("c1", TensorProto.FLOAT, [1, 2, 16, 16])])
    with pytest.raises(ValueError, match="set prediction_output"):
        resolve_model_card(model)


@pytest.mark.parametrize("overrides,match", [
    ({"layout": "HWC"}, "layout"),
    ({"layout": "NCDHW"}, "rank"),
    ({"activation": "relu"}, "activation"),
    ({"scaling": "robust"}, "scaling"),
    ({"prediction_output": "out"}, "outputs: \\['prob'\\]"),
    ({"input_name": "image"}, "inputs: \\['x'\\]"),
    ({"layuot": "NCHW"}, "did you mean \\['layout'\\]"),
    ({"input": {"sise": [32, 32]}}, "input.'sise'"),
    ({"scaling": "meanstd"}, "needs mean and std"),
    ({"classes": [2]}, "1 channel"),
    ({"threshold": 1.5}, "threshold"),
    ({"input_size": [32]}, "input_size"),
    ({"scaling": "meanstd", "mean": [0, 1], "std": [1]}, "mean has 2 values"),
])
def test_validation_errors(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        resolve_model_card(unet(), overrides=overrides)
    assert "\n" not in str(info.value)


def test_metadata_with_flat_hidden_and_to_dict():
    meta = new_metadata(input={"layout": "NCHW"}, hidden={"r1": "conv_block"})
    card = resolve_model_card(tiny_conv(), overrides=meta)
    assert card.hidden_layers == {"r1": "conv_block"}
    d = card.to_dict()
    assert d["layout"] == "NCHW" and isinstance(d["classes"], list) and d["assumed"] == card.assumed


# ---------------------------------------------------------------------------- preprocessing

def test_preprocess_layout_and_dtype():
    card = _card(layout="NHWC", input_size=(4, 5), channels=2, resize=False)
    img = np.arange(40, dtype=np.float64).reshape(2, 4, 5)
    out = card.preprocess(img)
    assert out.dtype == np.float32 and out.shape == (4, 5, 2) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.moveaxis(img, 0, -1))


def test_preprocess_resize_matches_torch():
    torch = pytest.importorskip("torch")
    card = _card(input_size=(8, 12), channels=2)
    img = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(img)[None], size=(8, 12), mode="bilinear",
                                           align_corners=False)[0].numpy()
    np.testing.assert_allclose(card.preprocess(img), want, rtol=1e-5, atol=1e-5)


def test_preprocess_errors():
    card = _card(resize=False)
    with pytest.raises(ValueError, match=r"does not resize; resample the images, or resize them all \(input_size="):
        card.preprocess(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"image\[None\]"):
        card.preprocess(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="2 channels"):
        card.preprocess(np.zeros((2, 8, 8)))


def test_scalings_against_numpy():
    rng = np.random.default_rng(1)
    img = rng.normal(3.0, 2.0, size=(2, 8, 8))
    img[1] = 7.0  # a constant channel
    mm = _card(channels=2, scaling="minmax").preprocess(img)
    np.testing.assert_allclose(mm[0], (img[0] - img[0].min()) / (img[0].max() - img[0].min()), rtol=1e-5, atol=1e-6)
    assert np.all(mm[1] == 0)
    zs = _card(channels=2, scaling="zscore").preprocess(img)
    np.testing.assert_allclose(zs[0], (img[0] - img[0].mean()) / img[0].std(), rtol=1e-5, atol=1e-6)
    assert np.all(zs[1] == 0)
    ms = _card(channels=2, scaling="meanstd", mean=[1.0, 2.0], std=[2.0, 4.0]).preprocess(img)
    np.testing.assert_allclose(ms[0], (img[0] - 1) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ms[1], (7 - 2) / 4, rtol=1e-6)


# --------------------------------------------------------------------------- probabilities

finite = st.floats(-30, 30, allow_nan=False, width=32)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
              elements=finite), st.booleans())
def test_logits_against_scipy(y, channels_last):
    n = y.shape[1]
    card = _card(activation="logits", classes=tuple(range(n)),
                 prediction_layout="NHWC" if channels_last else None)
    given_y = np.moveaxis(y, 1, -1) if channels_last else y
    got = card.to_probability({"y": given_y})
    want = scipy.special.expit(y.astype(np.float64)) if n == 1 else scipy.special.softmax(y.astype(np.float64), axis=1)
    assert got.dtype == np.float32 and got.shape == y.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_probability_heads_select_classes():
    rng = np.random.default_rng(2)
    p = scipy.special.softmax(rng.normal(size=(2, 3, 4, 4)), axis=1).astype(np.float32)
    soft = _card(activation="softmax", classes=(1, 2))
    np.testing.assert_array_equal(soft.to_probability(p), p[:, 1:3])
    sig = _card(activation="sigmoid", classes=(0,))
    np.testing.assert_array_equal(sig.to_probability(p[:, :1]), p[:, :1])
    np.testing.assert_array_equal(sig.to_probability(p[:, 0]), p[:, :1])  # no channel axis
    with pytest.raises(ValueError, match="1 channel"):
        _card(classes=(2,)).to_probability(p[:, :1])
    # a binary model's foreground may be written as label 1 (as exporters do) or channel 0
    np.testing.assert_array_equal(_card(classes=(1,)).to_probability(p[:, :1]), p[:, :1])
    with pytest.raises(ValueError, match="0..2"):
        _card(classes=(3,), activation="softmax").to_probability(p)
    with pytest.raises(ValueError, match="not among the outputs"):
        sig.to_probability({"other": p})
    with pytest.raises(ValueError, match="rank"):
        sig.to_probability(p[0, 0])


def test_probability_end_to_end_nhwc_softmax():
    import onnxruntime as ort

    model = unet(layout="NHWC", head="softmax", n_classes=3, batch="N")
    card = resolve_model_card(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    img = np.random.default_rng(3).normal(size=(1, 40, 24))  # resized to 32×32
    x = np.stack([card.preprocess(img)] * 2)
    assert x.shape == (2, 32, 32, 1)
    (y,) = sess.run(["prob"], {"img": x})
    prob = card.to_probability({"prob": y})
    assert prob.shape == (2, 2, 32, 32)
    np.testing.assert_array_equal(prob, np.moveaxis(y, -1, 1)[:, 1:])


def test_to_channels_first_views():
    card = dataclasses.replace(_card(layout="NHWC"), hidden_layouts={"h": "NHWC", "k": "NCHW"})
    t = np.zeros((2, 5, 6, 3), np.float32)
    v = card.to_channels_first(t, "h")
    assert v.shape == (2, 3, 5, 6) and np.shares_memory(v, t)
    assert card.to_channels_first(t, "x").shape == (2, 3, 5, 6)  # the input's layout
    assert card.to_channels_first(t, "k") is t
    assert card.to_channels_first(t, "unknown") is t  # ONNX computes channels-first
    with pytest.raises(ValueError, match="rank"):
        card.to_channels_first(np.zeros((2, 5, 6)), "h")


def test_binary_model_class_written_as_label_one():
    """Exporters write classes [1] for a one-channel sigmoid output: it reads channel 0."""
    card = resolve_model_card(unet(), overrides={"classes": [1]})
    assert card.classes == (1,) and card.channel_indices(1) == [0]
    p = np.random.default_rng(4).random((2, 1, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(card.to_probability({"prob": p}), p)


def test_channels_last_hidden_layout_on_a_conv_output_is_corrected():
    """A Keras layer's NHWC layout attached to tf2onnx's NCHW Conv output must not transpose it."""
    from engine.model.graph import list_hidden_tensors

    meta = new_metadata(hidden={"enc1_conv": {"layer": "conv2d", "layout": "NHWC"},
                                "enc1": {"layer": "relu", "layout": "NCHW"}})
    model = unet(metadata=meta)
    card = resolve_model_card(model)
    assert card.hidden_layouts == {"enc1_conv": "NCHW", "enc1": "NCHW"}
    assert any("enc1_conv" in s and "channels-first" in s for s in card.assumed)
    layouts = {t.name: t.layout for t in list_hidden_tensors(model)}
    assert layouts["enc1_conv"] == "NCHW"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_probability_heads_equal_the_float64_route(dtype, activation):
    """A probability head is passed through without a float64 copy of the whole output (issue
    15): the same float32 values as casting to float64 first, channels-first and C-contiguous."""
    rng = np.random.default_rng(4)
    p = scipy.special.softmax(rng.normal(size=(2, 3, 5, 6)) * 9, axis=1).astype(dtype)
    p[0, 1, 0, :3] = [np.nan, np.inf, 1e-30]
    card = _card(activation=activation, classes=(0, 2), prediction_layout="NHWC")
    got = card.to_probability({"y": np.moveaxis(p, 1, -1)})
    want = p.astype(np.float64)[:, [0, 2]].astype(np.float32)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
