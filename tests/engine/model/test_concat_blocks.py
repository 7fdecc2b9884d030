"""Which scored tensors are others side by side (``concat_blocks``, issue 15)."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from engine.model.graph import HiddenTensor, concat_blocks, list_hidden_tensors, load_model, select_tensors
from tests.models import unet

ROOT = Path(__file__).resolve().parents[3]


def _graph(nodes, out="y"):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    return helper.make_model(g)


def _t(name, shape, layout):
    return HiddenTensor(name=name, op="X", shape=shape, dtype="float32", layer=name, layout=layout, depth=1)


def test_torch_cat_of_scored_tensors():
    m = unet(ndim=2)
    tensors = list_hidden_tensors(m)
    assert concat_blocks(m, tensors) == {"cat": ("enc1", "up")}
    # a part not scored: the concatenation is scored on its own
    assert concat_blocks(m, [t for t in tensors if t.name != "up"]) == {}


def test_tf2onnx_transposed_concat():
    """NCHW compute, NHWC names: Transpose(Concat(a, b)) with a, b exposed through the same perm."""
    perm = [0, 2, 3, 1]
    nodes = [
        helper.make_node("Relu", ["x"], ["a_raw"]),
        helper.make_node("Sigmoid", ["x"], ["b_raw"]),
        helper.make_node("Transpose", ["a_raw"], ["a"], perm=perm),
        helper.make_node("Transpose", ["b_raw"], ["b"], perm=perm),
        helper.make_node("Concat", ["a_raw", "b_raw"], ["c_raw"], axis=1),
        helper.make_node("Transpose", ["c_raw"], ["c"], perm=perm),
        helper.make_node("Relu", ["c_raw"], ["y"]),
    ]
    m = _graph(nodes)
    ts = [_t("a", (1, 8, 8, 2), "NHWC"), _t("b", (1, 8, 8, 3), "NHWC"), _t("c", (1, 8, 8, 5), "NHWC")]
    assert concat_blocks(m, ts) == {"c": ("a", "b")}
    # the same graph read with a channels-first layout: the concat axis is not the channels
    cf = [_t("a", (1, 8, 8, 2), "NCHW"), _t("b", (1, 8, 8, 3), "NCHW"), _t("c", (1, 8, 8, 5), "NCHW")]
    assert concat_blocks(m, cf) == {}
    # a part exposed through another perm is not the same tensor
    nodes[3] = helper.make_node("Transpose", ["b_raw"], ["b"], perm=[0, 3, 2, 1])
    assert concat_blocks(_graph(nodes), ts) == {}


def test_concat_along_space_nested_and_shared_parts():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Sigmoid", ["x"], ["b"]),
        helper.make_node("Tanh", ["x"], ["d"]),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),       # channels: a group
        helper.make_node("Concat", ["c", "d"], ["e"], axis=1),       # nested: c is a group
        helper.make_node("Concat", ["a", "d"], ["f"], axis=-3),      # a is already a part
        helper.make_node("Concat", ["b", "d"], ["h"], axis=2),       # along space
        helper.make_node("Relu", ["e"], ["y"]),
    ]
    m = _graph(nodes)
    ts = [_t("a", (1, 2, 4, 4), "NCHW"), _t("b", (1, 3, 4, 4), "NCHW"), _t("d", (1, 1, 4, 4), "NCHW"),
          _t("c", (1, 5, 4, 4), "NCHW"), _t("e", (1, 6, 4, 4), "NCHW"), _t("f", (1, 3, 4, 4), "NCHW"),
          _t("h", (1, 3, 8, 4), "NCHW")]
    assert concat_blocks(m, ts) == {"c": ("a", "b")}


def test_deepbrain_skip_connections():
    m = load_model(ROOT / "cli" / "data" / "deepbrain" / "deepbrain.onnx")
    ts = select_tensors(list_hidden_tensors(m), "auto")
    assert concat_blocks(m, ts) == {"concat": ("conv3d_transpose", "conv3d_5"),
                                    "concat_1": ("conv3d_transpose_1", "conv3d_3"),
                                    "concat_2": ("conv3d_transpose_2", "conv3d_1")}
    assert isinstance(m, onnx.ModelProto)
