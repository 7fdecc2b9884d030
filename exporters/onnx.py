"""ONNX from anywhere: expose and name the hidden tensors of an existing ONNX model.

For a model exported by any framework (or by hand), :func:`expose` writes a *copy* whose
graph outputs are the prediction followed by the chosen hidden tensors, each renamed to a
readable layer name derived from its producing node (``/enc1/enc1.0/Conv`` -> ``enc1.0``,
``conv3d_1/Relu`` -> ``conv3d_1``), with the protoseg model card written into it. The
input file is never modified. Tensor listing, selection and exposing are
:mod:`engine.model.graph`'s (``list_hidden_tensors``, ``select_tensors``, ``expose``).
"""
from __future__ import annotations

import ast
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engine.model.card import PASS_THROUGH_OPS
from engine.model.metadata import read_metadata
from exporters._common import (
    ExportResult,
    build_metadata,
    check_close,
    layer_not_found,
    logger,
    rename_tensors,
    run_onnx,
    save_onnx,
    set_metadata,
    spatial_layout,
    verify_activation,
)

__all__ = ["expose", "readable_name"]

_OP_SUFFIX = re.compile(r"^(?P<op>[A-Za-z][A-Za-z0-9]*?)(_\d+)?(_output_\d+|:\d+)?$")


def readable_name(node_name: str, op_type: str) -> str:
    """A readable layer name for a node: its scope without the op, else the node name.

    Parameters
    ----------
    node_name : str
        ONNX node name (``"/enc1/enc1.0/Conv"`` from torch, ``"conv3d_1/Relu"`` from tf2onnx).
    op_type : str
        The node's op type (``"Conv"``).

    Returns
    -------
    str
        The torch module path (``"enc1.0"``), the TF scope (``"conv3d_1"``), or the node
        name when it has no scope (``"Conv__160"``).

    Examples
    --------
    >>> readable_name("/decoder/decoder.1/decoder.1.conv/Conv", "Conv")
    'decoder.1.conv'
    >>> readable_name("/enc2/2/Relu", "Relu")
    'enc2.2'
    >>> readable_name("conv3d_1/Relu", "Relu")
    'conv3d_1'
    """
    parts = [p for p in node_name.strip("/").split("/") if p]
    if len(parts) >= 2:
        last = parts[-1]
        match = _OP_SUFFIX.match(last)
        if match and match.group("op").lower().startswith(op_type.lower()):  # Conv, Conv_1, Conv2D
            parts = parts[:-1]
    if not parts:
        return node_name or op_type
    if not node_name.startswith("/"):  # tf2onnx and others: TF scopes joined by "/"
        return "/".join(parts)
    name = ""  # torch: scopes are attribute names ("enc2/2") or full dotted paths ("enc1/enc1.0")
    for part in parts:
        name = part if not name or part.startswith(name + ".") else f"{name}.{part}"
    return name


def expose(
    model_path_or_proto: Any,
    path: str | os.PathLike[str],
    *,
    layers: str | Sequence[str] = "all",
    prediction: str | None = None,
    activation: str | None = None,
    input_layout: str | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
    classes: Sequence[int] | None = None,
    threshold: float = 0.5,
    framework: str = "onnx",
    check: bool = True,
) -> ExportResult:
    """Write a copy of an ONNX model with hidden tensors exposed, named and described.

    Parameters
    ----------
    model_path_or_proto : str, path-like or onnx.ModelProto
        The model (never modified: neither the object nor the file).
    path : str or path-like
        The ONNX file to write (must differ from the source file).
    layers : str or list of str
        ``"all"`` or selectors of :func:`engine.model.graph.select_tensors`: tensor names,
        layer names, globs, ``re:<regex>``, ``op:<OpType>``. ``"all"`` leaves out the
        prediction's logits when they only feed its final Sigmoid/Softmax.
    prediction : str, optional
        The graph output holding the prediction (default: the only graph output).
    activation : {"sigmoid", "softmax", "logits"}, optional
        What the prediction *already holds*; default: the source's model card, else guessed
        from a final Sigmoid/Softmax node. The numeric check's run verifies it:
        ``sigmoid``/``softmax`` on values outside [0, 1], or ``softmax`` on channels not
        summing to 1, raise before anything is written; a guess the values contradict is
        corrected, with a message.
    input_layout : str, optional
        ``"NCHW"``, ``"NHWC"``...; guessed from the input shape when omitted
        (channels-first unless only the last axis looks like channels).
    preprocessing : dict, optional
        ``{"resize": bool, "scaling": ..., "mean": [...], "std": [...]}``.
    names : mapping, optional
        Tensor name -> output name, overriding the readable names.
    classes : list of int, optional
        Classes scored one-vs-rest (model card).
    threshold : float
        Prediction threshold (model card).
    framework : str
        Recorded in the model card.
    check : bool
        Run the source and the copy on one random input and compare the prediction
        (skipped, with a message, when the input has symbolic spatial sizes).

    Returns
    -------
    ExportResult
        Path, outputs (prediction first), tensor -> layer map, layouts.

    Raises
    ------
    KeyError
        A selector or ``prediction`` matches nothing (closest names listed).
    ValueError
        ``path`` is the source file, the model has several outputs and no
        ``prediction``, or it has no spatial hidden tensor; or
        (:class:`engine.model.activation.ActivationError`) the activation contradicts the
        prediction's values.

    Examples
    --------
    >>> result = expose("model.onnx", "model-protoseg.onnx", layers="op:Conv",
    ...                 activation="softmax")  # doctest: +SKIP
    """
    from engine.model.graph import expose as graph_expose
    from engine.model.graph import list_hidden_tensors, load_model, select_tensors

    if isinstance(model_path_or_proto, (str, os.PathLike)):
        src_path = Path(model_path_or_proto)
        if Path(path).resolve() == src_path.resolve():
            raise ValueError(
                f"output path {os.fspath(path)!r} is the source file; protoseg never overwrites "
                "the input model, pass another -o/path"
            )
        source = os.fspath(src_path)
    else:
        source = "ModelProto"
    original = load_model(model_path_or_proto)
    old_meta = read_metadata(original) or {}
    graph = original.graph
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ValueError(
            f"expected a model with one input; got {[i.name for i in inputs]}; protoseg scores "
            "single-input segmentation models"
        )
    outputs = [o.name for o in graph.output]
    if prediction is None:
        prediction = (old_meta.get("prediction") or {}).get("output")
        if prediction is None:
            if len(outputs) != 1:
                raise ValueError(
                    f"the model has {len(outputs)} outputs {outputs}; pass prediction= with the one "
                    "holding the segmentation"
                )
            prediction = outputs[0]
    if prediction not in outputs:
        raise layer_not_found(prediction, outputs, kind="graph output")
    tensors = list_hidden_tensors(original)
    if not tensors:
        raise ValueError(
            "the model has no hidden tensor that can hold spatial features (float, rank >= 3); "
            "protoseg needs a convolutional segmentation network"
        )
    producers = {o: n for n in graph.node for o in n.output}
    old_hidden: Mapping[str, Any] = old_meta.get("hidden") or {}
    # selectors match the readable layer names too (``enc*`` finds ``/enc1/enc1.0/Conv``)
    tensors = [replace(t, layer=_layer_name(t, producers.get(t.name), old_hidden)) for t in tensors]
    chosen = select_tensors(tensors, layers)
    if layers == "all":  # the prediction's own logits (only feeding its Sigmoid/Softmax) are not hidden
        pred_node = producers.get(prediction)
        if pred_node is not None and pred_node.op_type in ("Sigmoid", "Softmax", "LogSoftmax"):
            users = [n for n in graph.node if pred_node.input[0] in n.input]
            if len(users) == 1:
                chosen = [t for t in chosen if t.name != pred_node.input[0]]
    taken = {n for node in graph.node for n in list(node.input) + list(node.output)} | init_names
    taken |= {i.name for i in graph.input} | set(outputs)
    mapping: dict[str, str] = {}
    layer_of: dict[str, str] = {}
    used: set[str] = set()
    names = dict(names or {})
    unknown = set(names) - {t.name for t in chosen}
    if unknown:
        first = sorted(unknown)[0]
        raise layer_not_found(first, [t.name for t in chosen], kind="selected tensor")
    for t in chosen:
        node = producers.get(t.name)
        layer = t.layer
        candidates = [names[t.name]] if t.name in names else [layer, node.name if node is not None else "", t.name]
        new = next((c for c in candidates if c and (c == t.name or c not in taken) and c not in used), t.name)
        if t.name in names and new != names[t.name]:
            raise ValueError(f"cannot name tensor {t.name!r} {names[t.name]!r}: that name is already used in the graph")
        used.add(new)
        if new != t.name:
            mapping[t.name] = new
        layer_of[new] = layer
    proto = graph_expose(original, chosen)
    rename_tensors(proto, mapping)
    # keep the prediction first, then the hidden outputs in topological order
    # hidden outputs a protoseg exporter already named stay, with their model-card entries
    previous = [o for o in outputs if o in old_hidden and o != prediction]
    order = [prediction] + previous + [mapping.get(t.name, t.name) for t in chosen]
    by_name = {o.name: o for o in proto.graph.output}
    kept = [by_name[n] for n in order]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    hidden = {name: dict(old_hidden[name]) for name in previous}
    layouts: dict[str, str | None] = {name: old_hidden[name].get("layout") for name in previous}
    for t in chosen:
        new = mapping.get(t.name, t.name)
        layouts[new] = t.layout
        hidden[new] = {"layer": layer_of[new], "layout": t.layout}
    in_dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if input_layout is None:
        input_layout = (old_meta.get("input") or {}).get("layout") or _guess_layout(in_dims)
    pred_rank = len(by_name[prediction].type.tensor_type.shape.dim) or len(in_dims)
    pred_layout = (old_meta.get("prediction") or {}).get("layout") or (
        spatial_layout(pred_rank, input_layout.endswith("C")) if input_layout else None
    )
    given = "argument" if activation is not None else "guessed"
    if activation is None and (old_meta.get("prediction") or {}).get("activation"):
        activation, given = old_meta["prediction"]["activation"], "card"
    if activation is None:
        activation = _guess_activation(graph, prediction)
    size = None
    if input_layout and len(in_dims) == len(input_layout):
        spatial = in_dims[1:-1] if input_layout.endswith("C") else in_dims[2:]
        size = spatial if all(isinstance(s, int) and s > 0 for s in spatial) else None
    card = build_metadata(
        framework=old_meta.get("framework", framework), source=old_meta.get("source", source),
        input_name=inputs[0].name, input_layout=input_layout, input_size=size,
        prediction=prediction, activation=activation, prediction_layout=pred_layout,
        classes=classes if classes is not None else (old_meta.get("prediction") or {}).get("classes"),
        threshold=threshold, preprocessing=preprocessing if preprocessing is not None else old_meta.get("preprocessing"),
        hidden=hidden,
    )
    set_metadata(proto, card)
    diffs: dict[str, float] = {}
    messages: list[str] = []
    if check:
        shape = [1 if i == 0 and d is None else d for i, d in enumerate(in_dims)]
        if any(d is None for d in shape):
            msg = (f"numeric and activation checks skipped: input {inputs[0].name!r} has symbolic "
                   f"sizes {in_dims}")
            logger.info(msg)
            messages.append(msg)
        else:
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            feeds = {inputs[0].name: x}
            expected = run_onnx(original, feeds, [prediction])
            got = run_onnx(proto, feeds, order)
            diffs = check_close(expected, {prediction: got[prediction]}, atol=1e-5, rtol=1e-5, framework="the source model")
            verify_activation(proto, card, expected[prediction], given=given, path=path, messages=messages)
    written = save_onnx(proto, path)
    logger.info("exposed %d hidden tensors in %s", len(chosen), written)
    return ExportResult(
        path=written, prediction=prediction, outputs=order,
        layers={k: str(v.get("layer", k)) for k, v in hidden.items()},
        layouts={prediction: pred_layout, **layouts}, exporter="onnx", max_abs_diff=diffs,
        metadata=card, messages=messages,
    )


def _guess_layout(dims: Sequence[int | None]) -> str | None:
    rank = len(dims)
    if rank < 3:
        return None
    channel_like = (1, 2, 3, 4)
    if dims[1] in channel_like or dims[-1] not in channel_like:
        return spatial_layout(rank, False)
    return spatial_layout(rank, True)


def _guess_activation(graph: Any, prediction: str) -> str:
    """``sigmoid``/``softmax`` when the prediction comes from a Sigmoid/Softmax node (through
    ops that only move data, such as tf2onnx's final Transpose), else ``logits``."""
    producers = {o: n for n in graph.node for o in n.output}
    name = prediction
    for _ in range(16):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in ("Sigmoid", "Softmax"):
            return node.op_type.lower()
        if node.op_type not in PASS_THROUGH_OPS or not node.input:
            break
        name = node.input[0]
    return "logits"


def _torch_scope(node: Any) -> str | None:
    """The module path torch's dynamo exporter records on a node (``name_scopes``), if any."""
    if node is None:
        return None
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def _layer_name(tensor: Any, node: Any, old_hidden: Mapping[str, Any]) -> str:
    """Layer name of a hidden tensor: model card, torch scope, readable node name, as found."""
    return str(
        (old_hidden.get(tensor.name) or {}).get("layer")
        or _torch_scope(node)
        or (readable_name(node.name, node.op_type) if node is not None and node.name else tensor.layer)
    )
