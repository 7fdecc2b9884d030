"""exporters.tensorflow: tiny Keras U-Nets (2-D NHWC, 3-D NDHWC) and a frozen GraphDef."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")

from engine.model.metadata import read_metadata  # noqa: E402
from exporters import tensorflow as tfx  # noqa: E402
from exporters._common import ExportMismatchError, LayerNotFoundError, run_onnx  # noqa: E402

L = keras.layers


def _unet(dim: int = 2, size: int = 16, c: int = 3) -> keras.Model:
    keras.utils.set_random_seed(0)
    conv = L.Conv2D if dim == 2 else L.Conv3D
    up = L.Conv2DTranspose if dim == 2 else L.Conv3DTranspose
    pool = L.MaxPooling2D if dim == 2 else L.MaxPooling3D
    inp = keras.Input((size,) * dim + (1,), name="image")
    e1 = conv(c, 3, padding="same", activation="relu", name="enc1")(inp)
    b = L.BatchNormalization(name="enc1b_bn")(conv(c, 3, padding="same", name="enc1b")(e1))
    b = L.Activation("relu", name="enc1b_act")(b)
    e2 = conv(2 * c, 3, padding="same", activation="relu", name="enc2")(pool(2, name="pool")(b))
    u = up(c, 2, strides=2, name="up")(L.Dropout(0.5, name="drop")(e2))
    d = conv(c, 3, padding="same", activation="relu", name="dec1")(L.Concatenate(name="cat")([u, b]))
    out = conv(1, 1, activation="sigmoid", name="head")(d)
    model = keras.Model(inp, out, name=f"unet{dim}d")
    bn = model.get_layer("enc1b_bn")
    bn.moving_mean.assign(np.linspace(-0.3, 0.3, c).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, c).astype("float32"))
    return model


@pytest.fixture(scope="module")
def unet2d():
    return _unet(2)


def test_keras_2d_nhwc_default_layers(tmp_path, unet2d):
    r = tfx.export(unet2d, tmp_path / "k.onnx")
    # convolutions after their BatchNorm/activation chain, the transposed conv, the concat
    assert r.outputs == ["head", "enc1", "enc1b_act", "enc2", "up", "cat", "dec1"]
    assert r.exporter == "tf2onnx.from_function"
    assert all(v == "NHWC" for v in r.layouts.values())
    meta = read_metadata(onnx.load(r.path))
    assert meta["input"] == {"name": "image", "layout": "NHWC", "size": [16, 16]}
    assert meta["prediction"]["activation"] == "sigmoid" and meta["prediction"]["layout"] == "NHWC"
    assert meta["hidden"]["cat"] == {"layer": "cat", "layout": "NHWC"}
    # the exposed tensors are the Keras layer outputs, channels last, at any batch size
    x = np.random.default_rng(3).random((3, 16, 16, 1), dtype=np.float32)
    got = run_onnx(r.path, {"image": x})
    probe = keras.Model(unet2d.input, [unet2d.get_layer(n).output for n in ("cat", "enc1b_act")])
    cat, act = probe(x, training=False)
    assert got["cat"].shape == (3, 16, 16, 6)
    np.testing.assert_allclose(got["cat"], np.asarray(cat), atol=1e-5)
    np.testing.assert_allclose(got["enc1b_act"], np.asarray(act), atol=1e-5)


def test_recorded_layout_lets_the_engine_score_nhwc(tmp_path, unet2d):
    modelcard = pytest.importorskip("engine.model.card")
    scores = pytest.importorskip("engine.scores")
    r = tfx.export(unet2d, tmp_path / "k.onnx", layers=["enc2", "dec1"])
    card = modelcard.resolve_model_card(onnx.load(r.path))
    assert card.hidden_layouts["enc2"] == "NHWC"
    x = np.random.default_rng(4).random((2, 16, 16, 1), dtype=np.float32)
    out = run_onnx(r.path, {"image": x})
    enc2 = card.to_channels_first(out["enc2"], "enc2")
    assert enc2.shape == (2, 6, 8, 8)  # 6 filters: the channel axis was the last one
    prob = out["head"][..., 0]
    guide = (prob > np.median(prob)).astype(np.float32)
    first = scores.sa_scores(np.ascontiguousarray(enc2), guide, guide > 0.5, layout="channels_first")
    last = scores.sa_scores(out["enc2"], guide, guide > 0.5, layout="channels_last")
    np.testing.assert_array_equal(first.score, last.score)
    assert np.all((first.score >= 0) & (first.score <= 1))


def test_keras_3d_file_with_globs_and_types(tmp_path):
    model = _unet(3, size=8)
    model.save(tmp_path / "u3.keras")
    r = tfx.export(tmp_path / "u3.keras", tmp_path / "u3.onnx", layers=["enc*", "type:Concatenate"],
                   preprocessing={"scaling": "zscore"})
    assert r.outputs == ["head", "enc1", "enc1b", "enc1b_bn", "enc1b_act", "enc2", "cat"]
    assert r.layouts["cat"] == "NDHWC"
    meta = read_metadata(onnx.load(r.path))
    assert meta["source"].endswith("u3.keras")
    assert meta["preprocessing"]["scaling"] == "zscore" and meta["preprocessing"]["resize"] is True
    assert meta["input"]["size"] == [8, 8, 8]


def test_unknown_layer_lists_closest(tmp_path, unet2d):
    with pytest.raises(LayerNotFoundError) as info:
        tfx.export(unet2d, tmp_path / "x.onnx", layers="enc3")
    assert "'enc2'" in str(info.value) and "enc3" in str(info.value)


def test_mismatch_names_the_output(tmp_path, unet2d, monkeypatch):
    real = tfx.run_onnx

    def perturbed(model, feeds, outputs=None):
        out = real(model, feeds, outputs)
        out["up"] = out["up"] * 1.01 + 1e-3
        return out

    monkeypatch.setattr(tfx, "run_onnx", perturbed)
    with pytest.raises(ExportMismatchError, match="'up'"):
        tfx.export(unet2d, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_converter_failure_has_context(tmp_path, unet2d, monkeypatch):
    import tf2onnx

    def boom(*args, **kwargs):
        raise ValueError("unsupported op FancyOp")

    monkeypatch.setattr(tf2onnx.convert, "from_function", boom)
    with pytest.raises(RuntimeError, match="tf2onnx could not convert Keras model 'unet2d'.*FancyOp"):
        tfx.export(unet2d, tmp_path / "f.onnx")


def test_tensorflow_missing_names_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r"protoseg\[tensorflow\]"):
        tfx.export(tmp_path / "m.keras", tmp_path / "x.onnx")


def test_load_tf_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tfx.load_tf_model(tmp_path / "missing.keras")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported TensorFlow model file"):
        tfx.load_tf_model(tmp_path / "m.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a SavedModel"):
        tfx.load_tf_model(tmp_path / "folder")
    (tmp_path / "bad.pb").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match="not a frozen TensorFlow GraphDef"):
        tfx.load_tf_model(tmp_path / "bad.pb")


def _frozen_graph() -> tuple[object, dict[str, np.ndarray]]:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    rng = np.random.default_rng(0)
    k1 = tf.constant(rng.normal(size=(3, 3, 1, 4)).astype("float32"))
    b1 = tf.constant(rng.normal(size=4).astype("float32"))
    k2 = tf.constant(rng.normal(size=(1, 1, 4, 1)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 12, 12, 1], tf.float32, name="img")])
    def net(img):
        with tf.name_scope("block1"):
            h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(img, k1, 1, "SAME", name="Conv2D"), b1))
        with tf.name_scope("head"):
            logits = tf.nn.conv2d(h, k2, 1, "SAME", name="Conv2D")
        return tf.sigmoid(logits, name="prob")

    frozen = convert_variables_to_constants_v2(net.get_concrete_function())
    return frozen.graph.as_graph_def(), {"k1": k1.numpy(), "b1": b1.numpy()}


def test_graph_def_ops_named_after_scopes(tmp_path):
    graph_def, weights = _frozen_graph()
    pb = tmp_path / "g.pb"
    pb.write_bytes(graph_def.SerializeToString())
    r = tfx.export(pb, tmp_path / "g.onnx", inputs=["img"], outputs=["prob"])
    # the first convolution, followed through BiasAdd and Relu; the head conv only feeds the
    # prediction (its logits) and is not a hidden layer
    assert r.outputs == ["prob", "block1"]
    assert r.layers["block1"].startswith("block1/")
    assert r.exporter == "tf2onnx.from_graph_def"
    meta = read_metadata(onnx.load(r.path))
    assert meta["prediction"]["activation"] == "sigmoid" and meta["input"]["layout"] == "NHWC"
    x = np.random.default_rng(1).random((2, 12, 12, 1), dtype=np.float32)
    got = run_onnx(r.path, {"img": x})
    want = np.maximum(tf.nn.conv2d(x, weights["k1"], 1, "SAME").numpy() + weights["b1"], 0)
    np.testing.assert_allclose(got["block1"], want, atol=1e-5)
    r = tfx.export(graph_def, tmp_path / "g2.onnx", inputs=["img"], outputs=["prob"], layers="op:Conv2D")
    assert r.outputs == ["prob", "block1"]
    with pytest.raises(LayerNotFoundError, match="graph op"):
        tfx.export(graph_def, tmp_path / "g3.onnx", inputs=["img"], outputs=["prob"], layers="block2/Relu")


def test_saved_model_folder_is_frozen_and_exported(tmp_path, unet2d):
    unet2d.export(str(tmp_path / "sm"))
    r = tfx.export(tmp_path / "sm", tmp_path / "sm.onnx")
    assert r.exporter == "tf2onnx.from_graph_def"
    hidden = r.outputs[1:]
    # one output per convolution / transposed conv / concat, named by layer scope; the head's
    # logits (only feeding the sigmoid prediction) are left out
    assert [h.rsplit("/", 1)[-1].rsplit("_", 1)[0] for h in hidden] == ["enc1", "enc1b", "enc2", "up", "cat", "dec1"]
    assert r.metadata["prediction"]["activation"] == "sigmoid"
    x = np.random.default_rng(5).random((2, 16, 16, 1), dtype=np.float32)
    got = run_onnx(r.path, {r.metadata["input"]["name"]: x})
    np.testing.assert_allclose(got[r.prediction], np.asarray(unet2d(x, training=False)), atol=1e-5)
