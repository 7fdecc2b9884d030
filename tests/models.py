"""Tiny ONNX models built with ``onnx.helper``, shared by everyone's tests.

Every builder returns a fresh :class:`onnx.ModelProto` with deterministic random weights
(``np.random.default_rng(seed)``), small enough that onnxruntime runs it in milliseconds at
32×32 (2-D) or 16³ (3-D). :func:`save` writes a model to a path (e.g. under ``tmp_path``);
:func:`write_truncated` writes a cut-off ``.onnx`` file for error tests.

The U-Net (:func:`unet`) names its tensors so tests can refer to them::

    x (input, NCHW) | x_nchw (Transpose of an NHWC input "img")
    enc1_conv → enc1 (Relu) → pool1 (MaxPool/AveragePool ÷2)
    enc2_conv → enc2 (Relu) → enc2_shift (enc2 + a Constant×initializer bias: a constant path)
    up (Resize ×2 linear, or ConvTranspose k2 s2) → cat (Concat[enc1, up]) → dec_conv → dec (Relu)
    head (1×1 conv: logits) → prob_nchw / prob (Sigmoid or Softmax over channels)

with a shape-arithmetic side branch (Shape → Gather → Cast, int64/float rank-1 tensors)
feeding nothing spatial. Hidden tensors a graph tool should list (NCHW input, sigmoid head,
Resize upsampling): enc1_conv, enc1, pool1, enc2_conv, enc2, enc2_shift, up, cat, dec_conv,
dec, head (plus x_nchw for an NHWC input, and prob_nchw when the head is followed by a
Transpose); never the input, the output, the constant path (``bias_const``, ``bias``) or the
shape branch (``shape_x``, ``dim2``, ``dim2_f``).

Examples
--------
>>> from tests.models import unet, save
>>> model = unet(ndim=3, layout="NDHWC", head="softmax", n_classes=3, batch="N")
>>> path = save(model, tmp_path / "unet3d.onnx")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.model.metadata import new_metadata, write_metadata

__all__ = [
    "OPSET",
    "HIDDEN_NCHW",
    "unet",
    "tiny_conv",
    "flat_model",
    "multi_output",
    "deep_unet",
    "unet_metadata",
    "save",
    "write_truncated",
    "serialized",
]

OPSET = 17

#: Hidden tensors the U-Net always has (any layout, head, upsampling).
HIDDEN_NCHW = (
    "enc1_conv",
    "enc1",
    "pool1",
    "enc2_conv",
    "enc2",
    "enc2_shift",
    "up",
    "cat",
    "dec_conv",
    "dec",
    "head",
)

_CHANNELS_LAST = {"NWC", "NHWC", "NDHWC"}
_LAYOUT_NDIM = {"NCW": 1, "NWC": 1, "NCHW": 2, "NHWC": 2, "NCDHW": 3, "NDHWC": 3}


def _default_layout(ndim: int) -> str:
    return {1: "NCW", 2: "NCHW", 3: "NCDHW"}[ndim]


def _conv_init(rng: np.random.Generator, name: str, cout: int, cin: int, k: int, ndim: int,
               *, transpose: bool = False) -> list[TensorProto]:
    """He-initialised conv weight and a small bias as initializers ``name_w`` / ``name_b``."""
    shape = (cin, cout) + (k,) * ndim if transpose else (cout, cin) + (k,) * ndim
    fan_in = cin * k**ndim
    w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
    b = rng.normal(0.0, 0.1, size=(cout,)).astype(np.float32)
    return [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]


def unet(
    *,
    ndim: int = 2,
    layout: str | None = None,
    head: str = "sigmoid",
    n_classes: int | None = None,
    batch: int | str = 1,
    size: int | str = 32,
    in_channels: int = 1,
    base: int = 4,
    pool: str = "max",
    upsample: str = "resize",
    seed: int = 0,
    metadata: bool | dict[str, Any] = False,
) -> onnx.ModelProto:
    """Build a two-level U-Net (see the module docstring for tensor names).

    Parameters
    ----------
    ndim : int
        Spatial dimensions, 1, 2 or 3.
    layout : str, optional
        Input (and output) layout: ``"NCHW"``-like (default) or channels-last
        (``"NHWC"``/``"NDHWC"``/``"NWC"``), the latter with in-graph Transposes as tf2onnx
        makes them (hidden tensors stay channels-first).
    head : {"sigmoid", "softmax", "logits"}
        Final activation. ``logits`` leaves the 1×1 conv output as the graph output.
    n_classes : int, optional
        Output channels; default 1 for sigmoid, 2 otherwise.
    batch : int or str
        Fixed batch size (e.g. 1) or a symbolic name (``"N"``) for a dynamic batch.
    size : int or str
        Spatial side (even, default 32), or a symbolic name for dynamic spatial dims.
    in_channels, base : int
        Input channels and the first level's feature channels (second level: ``2*base``).
    pool : {"max", "avg"}
        Downsampling op.
    upsample : {"resize", "convtranspose"}
        Upsampling op (linear Resize ×2 with half-pixel centres, or ConvTranspose k2 s2).
    seed : int
        Weight seed.
    metadata : bool or dict
        ``True`` writes a protoseg model card (:func:`unet_metadata`); a dict is written
        as given (it must carry the encoding pair, see :func:`engine.model.metadata.new_metadata`).

    Returns
    -------
    onnx.ModelProto
        A checked model, opset 17.
    """
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim={ndim!r}; expected 1, 2 or 3")
    layout = layout or _default_layout(ndim)
    if _LAYOUT_NDIM.get(layout) != ndim:
        raise ValueError(f"layout={layout!r} does not fit ndim={ndim}")
    if head not in ("sigmoid", "softmax", "logits"):
        raise ValueError(f"head={head!r}; expected sigmoid, softmax or logits")
    if n_classes is None:
        n_classes = 1 if head == "sigmoid" else 2
    channels_last = layout in _CHANNELS_LAST
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    b1, b2 = base, 2 * base
    k1 = [1] * ndim
    pads = [1] * (2 * ndim)
    spatial: list[int | str] = [size] * ndim

    def conv(name: str, x: str, cin: int, cout: int, k: int = 3) -> str:
        inits.extend(_conv_init(rng, name, cout, cin, k, ndim))
        nodes.append(helper.make_node(
            "Conv", [x, f"{name}_w", f"{name}_b"], [name], name=name,
            kernel_shape=[k] * ndim, pads=[k // 2] * (2 * ndim), strides=k1))
        return name

    # input
    if channels_last:
        in_name = "img"
        in_shape = [batch, *spatial, in_channels]
        perm = [0, ndim + 1, *range(1, ndim + 1)]
        nodes.append(helper.make_node("Transpose", [in_name], ["x_nchw"], name="to_nchw", perm=perm))
        x = "x_nchw"
    else:
        in_name = "x"
        in_shape = [batch, in_channels, *spatial]
        x = in_name

    # shape-arithmetic side branch (what exporters emit for dynamic sizes); leads nowhere
    inits.append(numpy_helper.from_array(np.array(2, dtype=np.int64), "axis2"))
    nodes.append(helper.make_node("Shape", [x], ["shape_x"], name="shape_of_x"))
    nodes.append(helper.make_node("Gather", ["shape_x", "axis2"], ["dim2"], name="gather_dim2", axis=0))
    nodes.append(helper.make_node("Cast", ["dim2"], ["dim2_f"], name="cast_dim2", to=TensorProto.FLOAT))

    conv("enc1_conv", x, in_channels, b1)
    nodes.append(helper.make_node("Relu", ["enc1_conv"], ["enc1"], name="enc1_relu"))
    pool_op = {"max": "MaxPool", "avg": "AveragePool"}[pool]
    nodes.append(helper.make_node(pool_op, ["enc1"], ["pool1"], name="pool1",
                                  kernel_shape=[2] * ndim, strides=[2] * ndim))
    conv("enc2_conv", "pool1", b1, b2)
    nodes.append(helper.make_node("Relu", ["enc2_conv"], ["enc2"], name="enc2_relu"))
    # a float rank-(ndim+2) constant path: Constant × initializer, then added to a feature
    cshape = [1, b2] + [1] * ndim
    nodes.append(helper.make_node(
        "Constant", [], ["bias_const"], name="bias_const",
        value=numpy_helper.from_array(rng.normal(size=cshape).astype(np.float32), "bias_value")))
    inits.append(numpy_helper.from_array(np.full(cshape, 0.1, np.float32), "bias_scale"))
    nodes.append(helper.make_node("Mul", ["bias_const", "bias_scale"], ["bias"], name="bias_mul"))
    nodes.append(helper.make_node("Add", ["enc2", "bias"], ["enc2_shift"], name="enc2_shift"))

    if upsample == "resize":
        inits.append(numpy_helper.from_array(np.array([1, 1] + [2] * ndim, np.float32), "up_scales"))
        nodes.append(helper.make_node(
            "Resize", ["enc2_shift", "", "up_scales"], ["up"], name="up", mode="linear",
            coordinate_transformation_mode="half_pixel"))
    elif upsample == "convtranspose":
        inits.extend(_conv_init(rng, "up", b2, b2, 2, ndim, transpose=True))
        nodes.append(helper.make_node(
            "ConvTranspose", ["enc2_shift", "up_w", "up_b"], ["up"], name="up",
            kernel_shape=[2] * ndim, strides=[2] * ndim))
    else:
        raise ValueError(f"upsample={upsample!r}; expected resize or convtranspose")
    nodes.append(helper.make_node("Concat", ["enc1", "up"], ["cat"], name="cat", axis=1))
    conv("dec_conv", "cat", b1 + b2, b1)
    nodes.append(helper.make_node("Relu", ["dec_conv"], ["dec"], name="dec_relu"))
    conv("head", "dec", b1, n_classes, k=1)

    act_out = "prob_nchw" if channels_last else "prob"
    if head == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["head"], [act_out], name="sigmoid"))
    elif head == "softmax":
        nodes.append(helper.make_node("Softmax", ["head"], [act_out], name="softmax", axis=1))
    else:
        act_out = "head"
    out_name = "prob" if head != "logits" else "logits"
    if channels_last:
        perm_back = [0, *range(2, ndim + 2), 1]
        nodes.append(helper.make_node("Transpose", [act_out], [out_name], name="to_nhwc", perm=perm_back))
        out_shape = [batch, *spatial, n_classes]
    else:
        if head == "logits":
            nodes.append(helper.make_node("Identity", ["head"], [out_name], name="logits_out"))
        out_shape = [batch, n_classes, *spatial]

    graph = helper.make_graph(
        nodes, f"unet{ndim}d",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="protoseg-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    if metadata:
        meta = metadata if isinstance(metadata, dict) else unet_metadata(
            ndim=ndim, layout=layout, head=head, n_classes=n_classes, size=size,
            out_name=out_name)
        write_metadata(model, meta)
    return model


def unet_metadata(*, ndim: int = 2, layout: str | None = None, head: str = "sigmoid",
                  n_classes: int = 1, size: int | str = 32, out_name: str = "prob") -> dict[str, Any]:
    """A protoseg model card matching :func:`unet` built with the same arguments.

    Hidden layer names are ``"block/<tensor>"`` so tests can tell them from node names.
    """
    layout = layout or _default_layout(ndim)
    channels_last = layout in _CHANNELS_LAST
    hidden = {name: {"layer": f"block/{name}", "layout": _default_layout(ndim)} for name in HIDDEN_NCHW}
    return new_metadata(
        framework="onnx",
        source="tests.models.unet",
        input={"name": "img" if channels_last else "x", "layout": layout,
               "size": [size] * ndim if isinstance(size, int) else None},
        prediction={"output": out_name, "activation": head, "layout": None,
                    "classes": [0] if n_classes == 1 else list(range(1, n_classes)),
                    "threshold": 0.5},
        preprocessing={"resize": True, "scaling": "minmax", "mean": None, "std": None},
        hidden=hidden,
    )


def tiny_conv(*, ndim: int = 2, batch: int | str = "N", size: int = 8, channels: int = 2,
              seed: int = 0) -> onnx.ModelProto:
    """Conv → Relu → Conv(1 channel) → Sigmoid; hidden tensors ``c1``, ``r1``, ``c2``."""
    rng = np.random.default_rng(seed)
    inits = _conv_init(rng, "c1", channels, 1, 3, ndim) + _conv_init(rng, "c2", 1, channels, 1, ndim)
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1",
                         kernel_shape=[3] * ndim, pads=[1] * (2 * ndim)),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["c2"], name="conv2", kernel_shape=[1] * ndim),
        helper.make_node("Sigmoid", ["c2"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1] + [size] * ndim)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1] + [size] * ndim)],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def flat_model(*, batch: int | str = "N", features: int = 16, hidden: int = 8,
               seed: int = 0) -> onnx.ModelProto:
    """An MLP on flat vectors (Gemm → Relu → Gemm → Sigmoid): no spatial hidden tensor."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(size=(features, hidden)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(hidden,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(hidden, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(1,)).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Sigmoid", ["h2"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def multi_output(*, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """A 2-D net with two outputs: ``seg`` (1×size², sigmoid) and ``aux`` (a pooled half-size map).

    The prediction is the output whose spatial shape equals the input's (``seg``).
    """
    rng = np.random.default_rng(seed)
    inits = _conv_init(rng, "c1", 2, 1, 3, 2) + _conv_init(rng, "c2", 1, 2, 1, 2)
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["c2"], name="conv2", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["seg"], name="sigmoid"),
        helper.make_node("MaxPool", ["r1"], ["aux"], name="aux_pool", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "multi_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, size, size])],
        [helper.make_tensor_value_info("aux", TensorProto.FLOAT, [1, 2, size // 2, size // 2]),
         helper.make_tensor_value_info("seg", TensorProto.FLOAT, [1, 1, size, size])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def deep_unet(*, levels: int = 4, base: int = 16, size: int = 256, seed: int = 0) -> onnx.ModelProto:
    """A deeper, more typical 2-D U-Net whose model card names only the block outputs.

    Each block is two 3×3 Conv + Relu; ``levels`` encoder blocks (``base``·2^l channels)
    with 2×2 max pooling between them, a bottleneck block, and ``levels`` decoder blocks
    (linear Resize ×2, Concat with the skip, two convs), then a 1×1 conv and a sigmoid.
    Hidden layers: ``enc<l>``, ``bottleneck`` and ``dec<l>`` only, graph outputs named in the
    metadata, as protoseg's exporters give the blocks of a real network (``layers="auto"``
    takes exactly these). The pipeline benchmark's typical workload (``benchmarks/pipeline.py``).

    Parameters
    ----------
    levels, base, size : int
        Encoder depth (>= 1), first-level channels (>= 1), image side (divisible by 2^levels).
    seed : int
        Weight seed.

    Returns
    -------
    onnx.ModelProto
        Opset 17, dynamic batch ``N``, input ``x`` (N, 1, size, size), output ``prob``.

    Raises
    ------
    ValueError
        ``levels < 1``, ``base < 1`` or a size not divisible by 2^levels.
    """
    if int(levels) < 1 or int(base) < 1 or int(size) % (2 ** int(levels)):
        raise ValueError(f"levels={levels!r}, base={base!r}, size={size!r}; expected levels >= 1, "
                         "base >= 1 and a size divisible by 2**levels")
    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = []

    def conv(name: str, x: str, cin: int, cout: int, k: int = 3) -> str:
        inits.extend(_conv_init(rng, name, cout, cin, k, 2))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4))
        return f"{name}_c"

    def block(name: str, x: str, cin: int, cout: int) -> str:
        h = conv(f"{name}_a", x, cin, cout)
        nodes.append(helper.make_node("Relu", [h], [f"{name}_ar"], name=f"{name}_a_relu"))
        h = conv(f"{name}_b", f"{name}_ar", cout, cout)
        nodes.append(helper.make_node("Relu", [h], [name], name=f"{name}_relu"))
        return name

    chans = [int(base) * 2**lv for lv in range(int(levels) + 1)]
    x, cin, skips, hidden = "x", 1, [], []
    for lv in range(int(levels)):
        x = block(f"enc{lv}", x, cin, chans[lv])
        skips.append(x)
        hidden.append(x)
        nodes.append(helper.make_node("MaxPool", [x], [f"pool{lv}"], name=f"pool{lv}",
                                      kernel_shape=[2, 2], strides=[2, 2]))
        x, cin = f"pool{lv}", chans[lv]
    x = block("bottleneck", x, cin, chans[-1])
    hidden.append(x)
    cin = chans[-1]
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up_scales"))
    for lv in reversed(range(int(levels))):
        nodes.append(helper.make_node("Resize", [x, "", "up_scales"], [f"up{lv}"], name=f"up{lv}",
                                      mode="linear", coordinate_transformation_mode="half_pixel"))
        nodes.append(helper.make_node("Concat", [skips[lv], f"up{lv}"], [f"cat{lv}"], name=f"cat{lv}",
                                      axis=1))
        x = block(f"dec{lv}", f"cat{lv}", chans[lv] + cin, chans[lv])
        hidden.append(x)
        cin = chans[lv]
    head = conv("head", x, cin, 1, k=1)
    nodes.append(helper.make_node("Sigmoid", [head], ["prob"], name="sigmoid"))
    graph = helper.make_graph(
        nodes, "deep_unet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, int(size), int(size)])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, int(size), int(size)])]
        + [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", None, None, None])
           for name in hidden],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="protoseg-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    write_metadata(model, new_metadata(
        framework="onnx", source="tests.models.deep_unet",
        input={"name": "x", "layout": "NCHW", "size": [int(size)] * 2},
        prediction={"output": "prob", "activation": "sigmoid", "layout": None, "classes": [0],
                    "threshold": 0.5},
        preprocessing={"resize": True, "scaling": "minmax", "mean": None, "std": None},
        hidden={name: {"layer": f"block/{name}", "layout": "NCHW"} for name in hidden}))
    return model


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def serialized(model: onnx.ModelProto) -> bytes:
    """Deterministic serialization, for comparing a model before and after a call."""
    return model.SerializeToString(deterministic=True)


def write_truncated(path: str | Path, model: onnx.ModelProto | None = None, *,
                    fraction: float = 0.5) -> Path:
    """Write the first ``fraction`` of a serialized model (default: a U-Net) to ``path``."""
    data = (model if model is not None else unet()).SerializeToString()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    return path
