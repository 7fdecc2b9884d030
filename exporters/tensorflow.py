"""Export TensorFlow / Keras models to ONNX with hidden outputs named after their layers.

Sources: a Keras 3 model in memory, a ``.keras`` or ``.h5`` file, a SavedModel folder, or
a frozen GraphDef (``.pb`` file or ``GraphDef`` proto). Conversion goes through tf2onnx:
Keras models become a multi-output ``tf.function`` (``tf2onnx.convert.from_function``);
SavedModels are frozen to a GraphDef; GraphDefs go through
``tf2onnx.convert.from_graph_def``. TensorFlow and tf2onnx are imported inside the
functions: install them with ``pip install 'protoseg[tensorflow]'``.

Layouts: tf2onnx keeps every graph *output* exactly as TensorFlow computes it, so a
channels-last Keras model gives NHWC / NDHWC hidden outputs (convolutions run NCHW
inside the ONNX graph, between transposes). The layout of each exposed output is
recorded in the model card (``hidden[name]["layout"]``) and checked against
TensorFlow's own tensor shape.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from exporters._common import (
    ExportResult,
    build_metadata,
    check_close,
    layer_not_found,
    logger,
    rename_tensors,
    require,
    run_onnx,
    save_onnx,
    set_metadata,
    spatial_layout,
    verify_activation,
)

__all__ = ["export", "load_tf_model", "DEFAULT_KERAS_TYPES", "DEFAULT_GRAPH_OPS"]

#: Keras layer classes whose outputs are exposed by default (plus nested models).
DEFAULT_KERAS_TYPES = (
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "SeparableConv1D", "SeparableConv2D", "DepthwiseConv1D", "DepthwiseConv2D",
    "Concatenate", "Add",
)
#: Layers that transform a convolution's output elementwise: the default selection follows a
#: convolution through a single-consumer chain of these and exposes its end. Dropout and
#: noise layers are not followed: they are the identity at inference.
_KERAS_ELEMENTWISE = (
    "BatchNormalization", "GroupNormalization", "LayerNormalization", "Activation", "ReLU",
    "LeakyReLU", "PReLU", "ELU", "Softmax",
)
#: GraphDef op types exposed by default: convolutions, transposed convolutions, concats.
DEFAULT_GRAPH_OPS = (
    "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput",
    "Conv3DBackpropInputV2", "ConcatV2", "Concat",
)
#: Ops between a model's logits and its prediction output (the logits are not hidden layers).
_GRAPH_PASS = ("Sigmoid", "Softmax", "Identity", "Add", "AddV2")
_GRAPH_ELEMENTWISE = (
    "BiasAdd", "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "FusedBatchNorm",
    "FusedBatchNormV2", "FusedBatchNormV3",
)


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return require("tensorflow")


def load_tf_model(path: str | os.PathLike[str]) -> Any:
    """Load a TensorFlow model from disk for :func:`export`.

    Parameters
    ----------
    path : str or path-like
        A ``.keras`` or ``.h5`` Keras file, a SavedModel folder (with
        ``saved_model.pb``), or a frozen GraphDef ``.pb`` file.

    Returns
    -------
    keras.Model or tf.compat.v1.GraphDef
        Keras files give a Keras model; SavedModels (serving signature) and ``.pb``
        files give a frozen GraphDef.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When the file is none of the supported kinds or cannot be parsed.

    Examples
    --------
    >>> model = load_tf_model("unet.keras")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"TensorFlow model {str(path)!r} does not exist; expected a .keras/.h5 file, "
            "a SavedModel folder or a frozen .pb GraphDef"
        )
    tf = _tf()
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ValueError(
                f"folder {str(path)!r} is not a SavedModel (no saved_model.pb); "
                "pass a SavedModel folder, a .keras/.h5 file or a .pb GraphDef"
            )
        return _freeze_saved_model(tf, path)
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        keras = require("keras", extra="tensorflow")
        try:
            return keras.models.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001 - framework errors vary
            raise ValueError(f"Keras could not load {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if suffix == ".pb":
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - protobuf DecodeError
            raise ValueError(
                f"{str(path)!r} is not a frozen TensorFlow GraphDef ({exc}); "
                "for a SavedModel pass its folder instead"
            ) from exc
        return graph_def
    raise ValueError(
        f"unsupported TensorFlow model file {str(path)!r} (suffix {suffix!r}); "
        "expected .keras, .h5, a SavedModel folder or a frozen .pb GraphDef"
    )


def _freeze_saved_model(tf: Any, path: Path) -> Any:
    from tensorflow.python.framework.convert_to_constants import (  # type: ignore[import-not-found]
        convert_variables_to_constants_v2,
    )

    loaded = tf.saved_model.load(str(path))
    signatures = getattr(loaded, "signatures", {})
    if "serving_default" not in signatures:
        raise ValueError(
            f"SavedModel {str(path)!r} has no 'serving_default' signature "
            f"(has {sorted(signatures)}); re-save it with a serving signature"
        )
    frozen = convert_variables_to_constants_v2(signatures["serving_default"])
    return frozen.graph.as_graph_def()


def export(
    model_or_path: Any,
    path: str | os.PathLike[str],
    *,
    layers: str | Sequence[str] | None = None,
    input_shape: Sequence[int | None] | None = None,
    input_signature: Any = None,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    prediction_activation: str | None = None,
    input_layout: str | None = None,
    classes: Sequence[int] | None = None,
    threshold: float = 0.5,
    preprocessing: Mapping[str, Any] | None = None,
    opset: int | None = None,
    check_input: np.ndarray | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    source: str | None = None,
) -> ExportResult:
    """Export a TensorFlow/Keras model to ONNX with hidden tensors as named outputs.

    Parameters
    ----------
    model_or_path : keras.Model, GraphDef, str or path-like
        A Keras model, a frozen ``GraphDef``, or a path accepted by
        :func:`load_tf_model`.
    path : str or path-like
        The ONNX file to write.
    layers : str or list of str, optional
        Hidden tensors to expose. Keras: layer names, globs (``"conv*"``) or
        ``"type:Conv2D"``. GraphDef: op names (``"conv3d_1/Relu"``), globs or
        ``"op:Conv3D"`` (a convolution selected by type is followed through its
        BiasAdd/activation chain). Default: convolutions, transposed convolutions,
        concatenations (and, for Keras, additions and nested models), each taken after
        its elementwise chain (BatchNorm, activation, dropout).
    input_shape : sequence of int or None, optional
        Input shape with batch, e.g. ``(None, 64, 64, 1)``; default from the model.
        ``None`` axes stay dynamic in the ONNX file.
    input_signature : tf.TensorSpec or list, optional
        Alternative to ``input_shape`` for Keras models.
    inputs, outputs : list of str, optional
        GraphDef only: input placeholder names and the prediction tensor name
        (default: the single Placeholder and the last op's output).
    prediction_activation : {"sigmoid", "softmax", "logits"}, optional
        What the prediction output *already holds*; guessed from a final Sigmoid/Softmax.
        The numeric check's run verifies it: ``sigmoid``/``softmax`` on values outside
        [0, 1], or ``softmax`` on channels not summing to 1, raise before anything is
        written; a guess the values contradict is corrected, with a message.
    input_layout : str, optional
        ``"NHWC"``... ; default channels-last for the input's rank.
    classes : list of int, optional
        Classes scored one-vs-rest (model card).
    threshold : float
        Prediction threshold (model card).
    preprocessing : dict, optional
        ``{"resize": bool, "scaling": "minmax"|..., "mean": [...], "std": [...]}``.
    opset : int, optional
        ONNX opset (tf2onnx's default when omitted).
    check_input : numpy.ndarray, optional
        Input for the numeric check (default: uniform random in [0, 1), batch 2).
    atol, rtol : float
        Tolerance of the TensorFlow vs onnxruntime check.
    source : str, optional
        Free text recorded as the model's origin.

    Returns
    -------
    ExportResult
        Path, outputs (prediction first), layer map, layouts, exporter, max abs diffs.

    Raises
    ------
    ImportError
        TensorFlow or tf2onnx missing (names ``protoseg[tensorflow]``).
    LayerNotFoundError
        A requested layer does not exist (closest names listed).
    ExportMismatchError
        An output differs from TensorFlow beyond the tolerance (named).
    engine.model.activation.ActivationError
        ``prediction_activation`` contradicts the prediction's values (a ``ValueError``).
    RuntimeError
        tf2onnx failed (its error with context).

    Notes
    -----
    The numeric check passes when ``|onnx - tf| <= atol + rtol * max|tf|`` everywhere, per output.

    Examples
    --------
    >>> result = export(keras_model, "unet.onnx", prediction_activation="sigmoid")  # doctest: +SKIP
    >>> result.layers  # doctest: +SKIP
    {'conv2d': 'conv2d', 'concatenate': 'concatenate', ...}
    """
    tf = _tf()
    if isinstance(model_or_path, (str, os.PathLike)):
        source = source or os.fspath(model_or_path)
        model = load_tf_model(model_or_path)
    else:
        model = model_or_path
    if isinstance(model, tf.compat.v1.GraphDef):
        return _export_graph_def(
            tf, model, path, layers=layers, inputs=inputs, outputs=outputs,
            input_shape=input_shape, prediction_activation=prediction_activation,
            input_layout=input_layout, classes=classes, threshold=threshold,
            preprocessing=preprocessing, opset=opset, check_input=check_input,
            atol=atol, rtol=rtol, source=source or "GraphDef",
        )
    keras = require("keras", extra="tensorflow")
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"expected a keras.Model, a GraphDef or a path to a TensorFlow model; got "
            f"{type(model).__name__}; for a tf.Module export a SavedModel and pass its folder"
        )
    return _export_keras(
        tf, keras, model, path, layers=layers, input_shape=input_shape,
        input_signature=input_signature, prediction_activation=prediction_activation,
        input_layout=input_layout, classes=classes, threshold=threshold,
        preprocessing=preprocessing, opset=opset, check_input=check_input, atol=atol,
        rtol=rtol, source=source or f"keras:{model.name}",
    )


# ----------------------------------------------------------------------------- Keras


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _keras_select(model: Any, layers: list[str] | None) -> list[Any]:
    named = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    final = {id(t) for t in model.outputs}
    if layers is None:
        chosen: list[Any] = []
        consumers = _keras_consumers(model)
        for layer in named:
            kind = type(layer).__name__
            if kind in DEFAULT_KERAS_TYPES or (hasattr(layer, "layers") and hasattr(layer, "outputs")):
                end = layer
                while True:
                    nxt = consumers.get(id(end), [])
                    if len(nxt) == 1 and type(nxt[0]).__name__ in _KERAS_ELEMENTWISE:
                        end = nxt[0]
                    else:
                        break
                if id(end.output) in final or end in chosen:
                    continue
                if len(end.output.shape) >= 3:
                    chosen.append(end)
        return chosen
    chosen = []
    for pattern in layers:
        if pattern.startswith("type:"):
            hits = [layer for layer in named if type(layer).__name__ == pattern[5:]]
        else:
            hits = [layer for layer in named if layer.name == pattern]
            if not hits and any(ch in pattern for ch in "*?["):
                hits = [layer for layer in named if fnmatch.fnmatchcase(layer.name, pattern)]
        if not hits:
            raise layer_not_found(pattern, [layer.name for layer in named], kind="Keras layer")
        for layer in hits:
            if layer not in chosen and id(layer.output) not in final:
                chosen.append(layer)
    return chosen


def _keras_consumers(model: Any) -> dict[int, list[Any]]:
    """Layer id -> layers consuming its output (functional graph)."""
    consumers: dict[int, list[Any]] = {}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for parent in getattr(node, "parent_nodes", []):
                op = getattr(parent, "operation", None)
                if op is not None:
                    consumers.setdefault(id(op), []).append(layer)
    return consumers


def _keras_layout(layer: Any, rank: int, default_last: bool) -> str | None:
    fmt = getattr(layer, "data_format", None)
    last = default_last if fmt is None else fmt == "channels_last"
    return spatial_layout(rank, last)


def _export_keras(
    tf: Any, keras: Any, model: Any, path: Any, *, layers: Any, input_shape: Any,
    input_signature: Any, prediction_activation: Any, input_layout: Any, classes: Any,
    threshold: float, preprocessing: Any, opset: Any, check_input: Any, atol: float,
    rtol: float, source: str,
) -> ExportResult:
    tf2onnx = require("tf2onnx")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"expected a Keras model with one input and one output; got {len(model.inputs)} inputs "
            f"and {len(model.outputs)} outputs; wrap it in a single-input single-output keras.Model"
        )
    chosen = _keras_select(model, _as_list(layers))
    multi = keras.Model(model.inputs[0], [model.outputs[0]] + [layer.output for layer in chosen])
    in_tensor = model.inputs[0]
    input_name = re.sub(r"[^A-Za-z0-9_./-]", "_", str(getattr(in_tensor, "name", "input"))) or "input"
    if input_signature is None:
        shape = tuple(input_shape) if input_shape is not None else tuple(in_tensor.shape)
        shape = (None,) + tuple(shape[1:])
        input_signature = [tf.TensorSpec(shape, tf.float32, name=input_name)]
    elif not isinstance(input_signature, (list, tuple)):
        input_signature = [input_signature]
    input_name = input_signature[0].name or input_name
    shape = tuple(input_signature[0].shape)
    rank = len(shape)
    input_layout = input_layout or spatial_layout(rank, True)
    channels_last = input_layout is not None and input_layout.endswith("C")

    @tf.function(input_signature=input_signature)
    def forward(x: Any) -> Any:
        return list(multi(x, training=False))

    history = getattr(model.outputs[0], "_keras_history", None)
    last_layer = history[0] if history else model.layers[-1]  # the layer producing the prediction
    names = [last_layer.name] + [layer.name for layer in chosen]  # the output is never in `chosen`
    given = prediction_activation is not None
    if not given:
        prediction_activation = _keras_activation(last_layer)
    try:
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=input_signature, opset=opset)
    except Exception as exc:  # noqa: BLE001 - converter errors vary
        raise RuntimeError(
            f"tf2onnx could not convert Keras model {model.name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    onnx_outputs = [o.name for o in proto.graph.output]
    if len(onnx_outputs) != len(names):
        raise RuntimeError(
            f"tf2onnx produced {len(onnx_outputs)} outputs for {len(names)} requested tensors; "
            "report it with the model"
        )
    mapping = dict(zip(onnx_outputs, names))
    mapping[proto.graph.input[0].name] = input_name
    rename_tensors(proto, mapping)
    layouts: dict[str, str | None] = {}
    for name, producer, tensor in zip(names, [last_layer] + chosen, [model.outputs[0]] + [c.output for c in chosen]):
        layouts[name] = _keras_layout(producer, len(tensor.shape), channels_last)
    hidden = {c.name: {"layer": c.name, "layout": layouts[c.name]} for c in chosen}
    x = _check_input(check_input, shape)
    expected = {n: np.asarray(v) for n, v in zip(names, multi(x, training=False))}
    return _finish(
        proto, path, names=names, layouts=layouts, hidden=hidden, feeds={input_name: x},
        expected=expected, exporter="tf2onnx.from_function", atol=atol, rtol=rtol,
        activation_given=given,
        meta=dict(
            framework="tensorflow", source=source, input_name=input_name,
            input_layout=input_layout, input_size=_spatial_size(shape, input_layout),
            prediction=names[0], activation=prediction_activation,
            prediction_layout=layouts[names[0]], classes=classes, threshold=threshold,
            preprocessing=preprocessing,
        ),
    )


def _keras_activation(layer: Any) -> str | None:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None) or (layer.get_config().get("activation") if hasattr(layer, "get_config") else None)
    kind = type(layer).__name__
    if kind == "Softmax" or name == "softmax":
        return "softmax"
    if name == "sigmoid":
        return "sigmoid"
    if name == "linear":
        return "logits"
    return None


def _clean(name: str) -> str:
    return name.split(":")[0]


def _spatial_size(shape: Sequence[Any], layout: str | None) -> list[int] | None:
    if layout is None:
        return None
    spatial = shape[1:-1] if layout.endswith("C") else shape[2:]
    if any(s is None or (isinstance(s, int) and s < 0) for s in spatial):
        return None
    return [int(s) for s in spatial]


def _check_input(check_input: Any, shape: Sequence[Any]) -> np.ndarray:
    if check_input is not None:
        return np.ascontiguousarray(check_input, dtype=np.float32)
    concrete = [2 if i == 0 and (s is None or s < 0) else s for i, s in enumerate(shape)]
    if any(s is None or s < 0 for s in concrete):
        raise ValueError(
            f"the model input has unknown spatial size {tuple(shape)}; pass input_shape= with "
            "every spatial size, or check_input= with an example array"
        )
    return np.random.default_rng(0).random(concrete, dtype=np.float32)


def _finish(
    proto: Any, path: Any, *, names: list[str], layouts: dict[str, str | None],
    hidden: dict[str, dict[str, Any]], feeds: dict[str, np.ndarray],
    expected: dict[str, np.ndarray], exporter: str, atol: float, rtol: float,
    meta: dict[str, Any], activation_given: bool = True,
) -> ExportResult:
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param.startswith("unk__"):
            dims[0].dim_param = "batch"
    card = build_metadata(hidden=hidden, **meta)
    set_metadata(proto, card)
    actual = run_onnx(proto, feeds, names)
    diffs = check_close(expected, actual, atol=atol, rtol=rtol, framework="TensorFlow")
    messages: list[str] = []
    verify_activation(proto, card, expected[names[0]], given="argument" if activation_given else "guessed",
                      path=path, messages=messages)
    written = save_onnx(proto, path)
    logger.info("exported %d outputs to %s with %s", len(names), written, exporter)
    return ExportResult(
        path=written, prediction=names[0], outputs=names,
        layers={k: v["layer"] for k, v in hidden.items()}, layouts=layouts,
        exporter=exporter, max_abs_diff=diffs, metadata=card, messages=messages,
    )


# ----------------------------------------------------------------------------- GraphDef


def _graph_select(graph_def: Any, layers: list[str] | None, stop: set[str]) -> list[str]:
    """Op names (chain ends) to expose, in graph order."""
    nodes = {n.name: n for n in graph_def.node}
    consumers: dict[str, list[str]] = {}
    for n in graph_def.node:
        for inp in n.input:
            src = inp.lstrip("^").split(":")[0]
            consumers.setdefault(src, []).append(n.name)

    def chain_end(name: str) -> str:
        while True:
            nxt = consumers.get(name, [])
            if len(nxt) == 1 and nodes[nxt[0]].op in _GRAPH_ELEMENTWISE and nxt[0] not in stop:
                name = nxt[0]
            else:
                return name

    if layers is None:
        picks = [chain_end(n.name) for n in graph_def.node if n.op in DEFAULT_GRAPH_OPS]
    else:
        picks = []
        for pattern in layers:
            if pattern.startswith("op:") or pattern.startswith("type:"):
                kind = pattern.split(":", 1)[1]
                hits = [chain_end(n.name) for n in graph_def.node if n.op == kind]
            else:
                key = _clean(pattern)
                hits = [key] if key in nodes else []
                if not hits and any(ch in key for ch in "*?["):
                    hits = [n.name for n in graph_def.node if fnmatch.fnmatchcase(n.name, key)]
            if not hits:
                raise layer_not_found(pattern, [n.name for n in graph_def.node if n.op != "Const"], kind="graph op")
            picks.extend(hits)
    # a chain that only feeds the prediction is its pre-activation (logits), not a hidden layer
    def feeds_only_prediction(name: str) -> bool:
        for _ in range(len(nodes)):
            nxt = consumers.get(name, [])
            if len(nxt) != 1:
                return False
            if nxt[0] in stop:
                return True
            if nodes[nxt[0]].op not in _GRAPH_ELEMENTWISE + _GRAPH_PASS:
                return False
            name = nxt[0]
        return False

    logits = {p for p in picks if feeds_only_prediction(p)}
    return [p for i, p in enumerate(picks) if p not in stop | logits and p not in picks[:i]]


def _layer_of(op_name: str, start_ops: dict[str, str]) -> str:
    """Readable output name for an exposed op: its layer scope (``conv3d_1/Relu`` -> ``conv3d_1``)."""
    origin = start_ops.get(op_name, op_name)
    origin = origin.removeprefix("StatefulPartitionedCall/")  # frozen SavedModel functions
    return origin.rsplit("/", 1)[0] if "/" in origin else origin


def _export_graph_def(
    tf: Any, graph_def: Any, path: Any, *, layers: Any, inputs: Any, outputs: Any,
    input_shape: Any, prediction_activation: Any, input_layout: Any, classes: Any,
    threshold: float, preprocessing: Any, opset: Any, check_input: Any, atol: float,
    rtol: float, source: str,
) -> ExportResult:
    tf2onnx = require("tf2onnx")
    nodes = {n.name: n for n in graph_def.node}
    if inputs is None:
        inputs = [n.name for n in graph_def.node if n.op == "Placeholder"]
        if len(inputs) != 1:
            raise ValueError(
                f"cannot tell the input of this GraphDef: placeholders {inputs}; pass inputs=[name]"
            )
    if len(inputs) != 1:
        raise ValueError(f"expected exactly one input placeholder; got {list(inputs)}")
    input_op = _clean(inputs[0])
    if input_op not in nodes:
        raise layer_not_found(input_op, [n.name for n in graph_def.node if "Placeholder" in n.op], kind="input")
    if outputs is None:
        outputs = [graph_def.node[-1].name]
    pred_op = _clean(list(outputs)[0])
    if pred_op not in nodes:
        raise layer_not_found(pred_op, [n.name for n in graph_def.node if n.op != "Const"], kind="output op")
    given = prediction_activation is not None
    if not given:
        node = nodes[pred_op]
        while node.op == "Identity" and node.input and node.input[0].split(":")[0] in nodes:
            node = nodes[node.input[0].split(":")[0]]  # SavedModel outputs end in Identity ops
        prediction_activation = {"Sigmoid": "sigmoid", "Softmax": "softmax"}.get(node.op, "logits")
    hidden_ops = _graph_select(graph_def, _as_list(layers), stop={pred_op, input_op})
    start_ops = _chain_starts(graph_def)
    names: list[str] = []
    for op in hidden_ops:
        base = _layer_of(op, start_ops)
        names.append(base if base not in names and base not in (pred_op, input_op) else op)
    all_names = [pred_op] + names
    shape = _graph_input_shape(tf, nodes[input_op], input_shape)
    input_layout = input_layout or spatial_layout(len(shape), True)
    x = _check_input(check_input, shape)
    tf_names = [pred_op + ":0"] + [op + ":0" for op in hidden_ops]
    expected_list = _run_graph_def(tf, graph_def, input_op + ":0", x, tf_names)
    try:
        proto, _ = tf2onnx.convert.from_graph_def(
            graph_def, input_names=[input_op + ":0"], output_names=tf_names, opset=opset,
            tensors_to_rename={input_op + ":0": input_op, **dict(zip(tf_names, all_names))},
        )
    except Exception as exc:  # noqa: BLE001 - converter errors vary
        raise RuntimeError(
            f"tf2onnx could not convert the GraphDef ({source}): {type(exc).__name__}: {exc}"
        ) from exc
    got = [o.name for o in proto.graph.output]
    if got != all_names:
        rename_tensors(proto, dict(zip(got, all_names)))
    channels_last = input_layout is not None and input_layout.endswith("C")
    layouts = {n: spatial_layout(v.ndim, channels_last) for n, v in zip(all_names, expected_list)}
    hidden = {n: {"layer": op, "layout": layouts[n]} for n, op in zip(names, hidden_ops)}
    expected = dict(zip(all_names, expected_list))
    return _finish(
        proto, path, names=all_names, layouts=layouts, hidden=hidden, feeds={input_op: x},
        expected=expected, exporter="tf2onnx.from_graph_def", atol=atol, rtol=rtol,
        activation_given=given,
        meta=dict(
            framework="tensorflow", source=source, input_name=input_op,
            input_layout=input_layout, input_size=_spatial_size(shape, input_layout),
            prediction=pred_op, activation=prediction_activation,
            prediction_layout=layouts[pred_op], classes=classes, threshold=threshold,
            preprocessing=preprocessing,
        ),
    )


def _chain_starts(graph_def: Any) -> dict[str, str]:
    """Chain end op -> the convolution/concat op that starts its elementwise chain."""
    nodes = {n.name: n for n in graph_def.node}
    consumers: dict[str, list[str]] = {}
    for n in graph_def.node:
        for inp in n.input:
            consumers.setdefault(inp.lstrip("^").split(":")[0], []).append(n.name)
    starts: dict[str, str] = {}
    for n in graph_def.node:
        if n.op not in DEFAULT_GRAPH_OPS:
            continue
        name = n.name
        while True:
            nxt = consumers.get(name, [])
            if len(nxt) == 1 and nodes[nxt[0]].op in _GRAPH_ELEMENTWISE:
                name = nxt[0]
            else:
                break
        starts.setdefault(name, n.name)
    return starts


def _graph_input_shape(tf: Any, node: Any, input_shape: Any) -> tuple[int | None, ...]:
    if input_shape is not None:
        return tuple(None if s is None or s < 0 else int(s) for s in input_shape)
    if "shape" in node.attr and not node.attr["shape"].shape.unknown_rank:
        dims = [d.size for d in node.attr["shape"].shape.dim]
        return tuple(None if d < 0 else int(d) for d in dims)
    raise ValueError(f"input {node.name!r} has no known shape; pass input_shape=(None, ...)")


def _run_graph_def(tf: Any, graph_def: Any, input_name: str, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        values = sess.run(outputs, feed_dict={input_name: x})
    return [np.asarray(v) for v in values]
