"""ONNX graph tools: load a model, list its hidden tensors, select and expose them.

A *hidden tensor* is any intermediate tensor of the graph that can hold spatial features:
floating point, rank ≥ 3 (batch, channels, at least one spatial axis), computed from the
graph input (not a constant, not an initializer-only path, not shape arithmetic), and
neither a graph input nor a graph output. Shapes come from ONNX shape inference; symbolic
dimensions are kept as strings and unknown ones as ``None``.

Exposing tensors edits a *copy* of the model (:func:`expose`): the caller's model and file
are never mutated. :func:`plan_passes` splits a selection into several inference passes
when the activations of one batch would exceed a memory budget.
"""
from __future__ import annotations

import copy
import difflib
import heapq
import fnmatch
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from engine.errors import option
from engine.memory import available_memory as _available_memory
from engine.model.metadata import read_metadata

__all__ = [
    "HiddenTensor",
    "load_model",
    "list_hidden_tensors",
    "require_hidden",
    "select_tensors",
    "expose",
    "plan_passes",
    "available_memory",
    "activation_bytes",
    "output_path_tensors",
    "concat_blocks",
]

logger = logging.getLogger("protoseg")

#: ONNX float element types → numpy dtype names (bfloat16 has no numpy dtype; 2 bytes).
_FLOAT_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64",
    TensorProto.BFLOAT16: "bfloat16",
}
_ELEM_TYPE = {name: code for code, name in _FLOAT_TYPES.items()}
_ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8, "bfloat16": 2}
#: Ops whose outputs describe shapes, not features: everything computed only from them
#: (and constants) is shape arithmetic.
_SHAPE_OPS = frozenset({"Shape", "Size"})
_DEFAULT_LAYOUT = {3: "NCW", 4: "NCHW", 5: "NCDHW"}
#: ONNX ops whose output is channels-first by definition (whatever a framework calls it).
CHANNELS_FIRST_OPS = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
    "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization", "InstanceNormalization",
    "LRN", "MaxRoiPool", "DeformConv"})

Dim = int | str | None


def _channels_last(layout: str | None) -> bool:
    return layout in ("NWC", "NHWC", "NDHWC")


@dataclass(frozen=True)
class HiddenTensor:
    """One hidden tensor of an ONNX graph.

    Attributes
    ----------
    name : str
        The ONNX tensor name (what :func:`expose` adds as a graph output).
    op : str
        Type of the node producing it (``"Conv"``, ``"Relu"``...).
    shape : tuple of int, str or None
        Shape from shape inference; ``str`` for a symbolic dimension, ``None`` unknown.
    dtype : str
        Numpy dtype name (``"float32"``...; ``"bfloat16"`` has no numpy equivalent).
    layer : str
        The layer it belongs to: from the exporter's metadata when present, else the
        producing node's name (the tensor name when the node has none).
    layout : str or None
        ``"NCHW"``-like layout name; from metadata when present, else channels-first
        by rank (ONNX computes channels-first internally, even for converted NHWC models).
    depth : int
        Depth of the producing node: the longest path, in nodes, from a graph input (layout
        ops such as Transpose keep their input's depth), so that sorting by depth follows
        the network from input to output whatever order the file lists its nodes in.
    exported : bool
        True for a graph output that the model card declares hidden (a layer an exporter
        chose and named); :func:`select_tensors` with ``"auto"`` takes exactly these.
    """

    name: str
    op: str
    shape: tuple[Dim, ...]
    dtype: str
    layer: str
    layout: str | None
    depth: int
    exported: bool = False

    @property
    def channels(self) -> int | None:
        """Channel count (axis 1 for channels-first layouts, last axis otherwise)."""
        dim = self.shape[-1 if _channels_last(self.layout) else 1]
        return dim if isinstance(dim, int) else None


# ---------------------------------------------------------------------------------------
# loading

def load_model(path_or_proto: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """Load and check an ONNX model.

    Parameters
    ----------
    path_or_proto : str, path-like or onnx.ModelProto
        A ``.onnx`` file (external data next to it is loaded too) or an already loaded model,
        which is returned as is (not copied, not modified).

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the file is truncated, corrupt, or not an ONNX model.
    TypeError
        When ``path_or_proto`` is neither a path nor a ``ModelProto``.

    Examples
    --------
    >>> model = load_model("unet.onnx")  # doctest: +SKIP
    """
    if isinstance(path_or_proto, onnx.ModelProto):
        return path_or_proto
    if not isinstance(path_or_proto, (str, os.PathLike)):
        raise TypeError(
            f"model must be a path to an .onnx file or an onnx.ModelProto, "
            f"got {type(path_or_proto).__name__}")
    path = Path(path_or_proto)
    if not path.exists():
        raise FileNotFoundError(f"ONNX model file not found: {str(path)!r}; check the path")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, missing external data, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"cannot read {str(path)!r} as an ONNX model (truncated or corrupt file: {reason}); "
            "re-export or copy the file again") from None
    if model.ir_version <= 0 or not model.opset_import or not model.graph.output:
        raise ValueError(
            f"{str(path)!r} is not an ONNX model (no IR version, opset or graph outputs; "
            f"{path.stat().st_size} bytes, possibly truncated); re-export or copy the file again")
    try:
        onnx.checker.check_model(str(path) if path.stat().st_size > 1 << 30 else model)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{str(path)!r} is not a valid ONNX model ({reason}); the file may be truncated "
            "or corrupt: re-export or copy it again") from None
    return model


# ---------------------------------------------------------------------------------------
# listing

def _dims(type_proto: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return tuple(dims)


def _with_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[Dim]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the given dims (for shape inference only)."""
    model = copy.deepcopy(model)
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise KeyError(f"input_shapes names {name!r}, not a graph input; inputs: {sorted(inputs)}")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) and len(shape.dim) != len(dims):
            raise ValueError(
                f"input_shapes[{name!r}] has {len(dims)} dims, the model's input has {len(shape.dim)}")
        shape.ClearField("dim")
        for d in dims:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str):
                dim.dim_param = d
    return model


def _topological(nodes: Sequence[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    """Nodes in a topological order (stable: keeps the file's order where it is valid)."""
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps = [{produced_by[x] for x in n.input if x and x not in known and x in produced_by} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    pending = [len(d) for d in deps]

    ready = [i for i, p in enumerate(pending) if p == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):  # a cycle: not a valid ONNX graph; keep the file order
        return list(nodes)
    return [nodes[i] for i in order]


def list_hidden_tensors(
    model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    input_shapes: Mapping[str, Sequence[Dim]] | None = None,
) -> list[HiddenTensor]:
    """List the tensors of a model that can hold spatial features, in topological order.

    Parameters
    ----------
    model : path or onnx.ModelProto
        The model (not modified).
    input_shapes : mapping, optional
        Input name → dims to assume for shape inference (e.g. ``{"x": [8, 1, 256, 256]}``),
        which turns symbolic spatial dims into numbers. The model itself is not changed.

    Returns
    -------
    list of HiddenTensor
        Empty when the model has no spatial hidden tensor (see :func:`require_hidden`).

    Notes
    -----
    Left out: graph inputs and outputs (except outputs the model card declares hidden:
    layers an exporter exposed, marked ``exported``), non-float tensors, rank < 3 (or unknown rank),
    outputs of nodes computed only from initializers/constants, and shape arithmetic
    (everything computed from ``Shape``/``Size`` outputs and constants only). Only the main
    graph is listed (not the bodies of ``If``/``Loop``).

    Examples
    --------
    >>> [t.name for t in list_hidden_tensors("unet.onnx")][:2]  # doctest: +SKIP
    ['enc1_conv', 'enc1']
    """
    model = load_model(model)
    meta = read_metadata(model) or {}
    hidden_meta: Mapping[str, Any] = meta.get("hidden") or {}
    source = _with_input_shapes(model, input_shapes) if input_shapes else model
    try:
        inferred = onnx.shape_inference.infer_shapes(source, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as exc:  # keep going with what the file declares
        logger.debug("onnx shape inference failed (%s); using declared shapes only", exc)
        inferred = source
    graph = inferred.graph
    types: dict[str, onnx.TypeProto] = {}
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        types[vi.name] = vi.type
    initializers = {init.name for init in graph.initializer} | {
        s.values.name for s in graph.sparse_initializer}
    graph_inputs = {i.name for i in graph.input} - initializers
    graph_outputs = {o.name for o in graph.output}

    constant: set[str] = set(initializers) | {""}
    shape_derived: set[str] = set()
    out: list[HiddenTensor] = []
    level: dict[str, int] = {}  # tensor -> longest path (in nodes) from a graph input
    for node in _topological(list(graph.node), initializers | graph_inputs):
        ins = [x for x in node.input if x]
        depth = 1 + max((level.get(x, 0) for x in ins), default=0)
        # a pure layout op (tf2onnx's output Transposes) keeps its input's depth
        if node.op_type in ("Transpose", "Identity") and ins:
            depth = level.get(ins[0], depth)
        for o in node.output:
            level[o] = depth
        if node.op_type in _SHAPE_OPS:
            shape_derived.update(node.output)
            continue
        if all(x in constant for x in ins):
            constant.update(node.output)
            continue
        if all(x in constant or x in shape_derived for x in ins):
            shape_derived.update(node.output)
            continue
        for name in node.output:
            if not name or name in graph_inputs:
                continue
            if name in graph_outputs and name not in hidden_meta:
                continue  # the prediction (or another model output), not a hidden layer
            tp = types.get(name)
            if tp is None or not tp.HasField("tensor_type"):
                continue
            dtype = _FLOAT_TYPES.get(tp.tensor_type.elem_type)
            shape = _dims(tp)
            if dtype is None or shape is None or len(shape) < 3:
                continue
            info = hidden_meta.get(name) or {}
            layer = info.get("layer") or node.name or name
            layout = info.get("layout") or _DEFAULT_LAYOUT.get(len(shape))
            if _channels_last(layout) and node.op_type in CHANNELS_FIRST_OPS:
                # e.g. a Keras layer's NHWC layout attached to tf2onnx's NCHW Conv output
                logger.warning("metadata gives %s a %s layout, but its %s node computes "
                               "channels-first; using %s", name, layout, node.op_type,
                               _DEFAULT_LAYOUT.get(len(shape)))
                layout = _DEFAULT_LAYOUT.get(len(shape))
            out.append(HiddenTensor(name=name, op=node.op_type, shape=shape, dtype=dtype,
                                    layer=str(layer), layout=layout, depth=depth,
                                    exported=name in graph_outputs))
    return out


def require_hidden(tensors: Sequence[HiddenTensor], *, model_name: str = "the model") -> None:
    """Raise a helpful ``ValueError`` when a model has no spatial hidden tensor.

    Raises
    ------
    ValueError
        When ``tensors`` is empty.
    """
    if not tensors:
        raise ValueError(
            f"{model_name} has no hidden tensor that can hold spatial features (float, rank >= 3, "
            "computed from the input); protoseg needs a convolutional segmentation network "
            "(e.g. a U-Net) whose intermediate tensors keep spatial axes")


# ---------------------------------------------------------------------------------------
# selection

def _match_one(tensors: Sequence[HiddenTensor], pattern: str) -> list[HiddenTensor]:
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern[3:]!r} in select ({exc})") from None
        return [t for t in tensors if rx.search(t.name) or rx.search(t.layer)]
    if pattern.startswith("op:"):
        op = pattern[3:]
        return [t for t in tensors if t.op == op or t.op.lower() == op.lower()]
    exact = [t for t in tensors if t.name == pattern]
    if exact:
        return exact
    by_layer = [t for t in tensors if t.layer == pattern]
    if by_layer:
        return by_layer
    if any(c in pattern for c in "*?["):
        return [t for t in tensors if fnmatch.fnmatchcase(t.name, pattern)
                or fnmatch.fnmatchcase(t.layer, pattern)]
    return []


def select_tensors(tensors: Sequence[HiddenTensor], select: str | Iterable[str] = "all") -> list[HiddenTensor]:
    """Select hidden tensors by name, layer, glob, regex or op type.

    Parameters
    ----------
    tensors : sequence of HiddenTensor
        From :func:`list_hidden_tensors`.
    select : str or iterable of str
        ``"auto"``: the layers an exporter exposed and named (graph outputs declared hidden
        in the model card) when there are any, else every tensor; ``"all"``: every hidden
        tensor; or one pattern or several, each one of: an exact tensor name, an exact
        layer name, a glob (``"enc*"``, :mod:`fnmatch`, matched against names and layers),
        ``"re:<regex>"`` (``re.search`` on names and layers), ``"op:<OpType>"``.

    Returns
    -------
    list of HiddenTensor
        The union of the matches, in the order of ``tensors`` (topological), no duplicates.

    Raises
    ------
    KeyError
        When a pattern matches nothing; the message lists the closest names.
    ValueError
        When a ``re:`` pattern is not a valid regular expression, or ``select`` is empty.

    Examples
    --------
    >>> select_tensors(tensors, ["op:Relu", "re:^dec"])  # doctest: +SKIP
    """
    if isinstance(select, str):
        patterns = [select]
    else:
        patterns = list(select)
        if not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"select must be a string or a list of strings, got {select!r}")
    if not patterns:
        raise ValueError("select is empty; pass 'all' or at least one tensor name or pattern")
    if "all" in patterns:
        return list(tensors)
    if patterns == ["auto"]:
        exported = [t for t in tensors if t.exported]
        return exported if exported else list(tensors)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = _match_one(tensors, pattern)
        if not hits:
            names = sorted({t.name for t in tensors} | {t.layer for t in tensors})
            key = pattern[3:] if pattern[:3] in ("re:", "op:") else pattern
            if pattern.startswith("op:"):
                names = sorted({t.op for t in tensors})
            close = difflib.get_close_matches(key, names, n=5, cutoff=0.4)
            hint = f"closest: {close}" if close else f"valid names: {names[:20]}" + (
                " ..." if len(names) > 20 else "")
            raise KeyError(f"no hidden tensor matches {pattern!r}; {hint}")
        chosen.update(t.name for t in hits)
    return [t for t in tensors if t.name in chosen]


# ---------------------------------------------------------------------------------------
# exposing

def expose(model: str | os.PathLike[str] | onnx.ModelProto,
           tensors: Iterable[HiddenTensor | str]) -> onnx.ModelProto:
    """Return a copy of ``model`` with ``tensors`` added as graph outputs.

    Parameters
    ----------
    model : path or onnx.ModelProto
        The model; never modified (neither the object nor the file).
    tensors : iterable of HiddenTensor or str
        Tensors to expose. Names already among the graph outputs are kept once.

    Returns
    -------
    onnx.ModelProto
        A new model whose outputs are the original outputs followed by ``tensors`` (typed
        with their element type and rank).

    Raises
    ------
    KeyError
        When a name is not produced by any node of the graph (lists the closest names).

    Examples
    --------
    >>> exposed = expose(model, select_tensors(list_hidden_tensors(model), "op:Relu"))  # doctest: +SKIP
    """
    src = load_model(model)
    out = onnx.ModelProto()
    out.CopyFrom(src)
    graph = out.graph
    produced = {o for n in graph.node for o in n.output if o}
    existing = {o.name for o in graph.output}
    value_info = {vi.name: vi for vi in graph.value_info}
    wanted: list[HiddenTensor | str] = list(tensors)
    missing = [t if isinstance(t, str) else t.name for t in wanted]
    missing = [n for n in missing if n not in produced]
    if missing:
        close = difflib.get_close_matches(missing[0], sorted(produced), n=5, cutoff=0.4)
        raise KeyError(f"cannot expose {missing[0]!r}: no node of the graph produces it; closest: {close}")
    need_types = [t for t in wanted if isinstance(t, str) and t not in value_info]
    inferred: dict[str, onnx.ValueInfoProto] = {}
    if need_types:
        try:
            g = onnx.shape_inference.infer_shapes(src, strict_mode=False).graph
            inferred = {vi.name: vi for vi in g.value_info}
        except Exception:  # untyped outputs are fine for onnxruntime
            inferred = {}
    added: set[str] = set()
    for t in wanted:
        name = t if isinstance(t, str) else t.name
        if name in existing or name in added:
            continue
        added.add(name)
        if isinstance(t, HiddenTensor):
            # element type and rank only: the inferred dims may come from assumed input
            # shapes (list_hidden_tensors(input_shapes=...)) that a run does not use
            vi = onnx.helper.make_tensor_value_info(
                name, _ELEM_TYPE.get(t.dtype, TensorProto.FLOAT), [None] * len(t.shape))
        elif name in value_info or name in inferred:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(value_info.get(name) or inferred[name])
        else:
            vi = onnx.helper.make_empty_tensor_value_info(name)
        graph.output.append(vi)
    if added:  # a name may not be both a graph output and a value_info entry
        keep = [vi for vi in graph.value_info if vi.name not in added]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return out


# ---------------------------------------------------------------------------------------
# memory planning

def available_memory() -> int:
    """Bytes this process can still use: the smallest of ``MemAvailable``, the cgroup (v1/v2)
    limit less its usage, and ``RLIMIT_AS``/``RLIMIT_DATA`` less this process's size
    (see :func:`engine.memory.memory_limit`)."""
    return _available_memory()


def activation_bytes(tensor: HiddenTensor, batch_size: int, *,
                     input_size: Sequence[int] | None = None) -> int:
    """Bytes one batch of ``tensor`` takes (batch axis = ``batch_size``).

    Unknown or symbolic non-batch dims are taken from ``input_size`` (the model input's
    spatial size: an upper bound for the usual encoder/decoder tensor).

    Raises
    ------
    ValueError
        When a non-batch dim is unknown and ``input_size`` cannot resolve it.
    """
    shape = list(tensor.shape)
    n = int(batch_size)
    unresolved = [i for i, d in enumerate(shape[1:], start=1) if not isinstance(d, int)]
    if unresolved:
        ch_axis = len(shape) - 1 if _channels_last(tensor.layout) else 1
        spatial_axes = [i for i in range(1, len(shape)) if i != ch_axis]
        if input_size is None or ch_axis in unresolved or len(input_size) != len(spatial_axes):
            raise ValueError(
                f"tensor {tensor.name!r} has shape {tensor.shape} with unknown dims; pass "
                f"input_size=(the model input's spatial size, {len(spatial_axes)} ints) or list "
                "the tensors with input_shapes= so their sizes are known")
        for axis, size in zip(spatial_axes, input_size):
            if not isinstance(shape[axis], int):
                shape[axis] = int(size)
    for d in shape[1:]:
        n *= int(d)  # type: ignore[arg-type]
    return n * _ITEMSIZE.get(tensor.dtype, 4)


def plan_passes(
    tensors: Sequence[HiddenTensor],
    batch_size: int,
    *,
    max_activation_memory: int | None = None,
    input_size: Sequence[int] | None = None,
) -> list[list[HiddenTensor]]:
    """Split tensors into inference passes whose exposed activations fit a memory budget.

    Parameters
    ----------
    tensors : sequence of HiddenTensor
        The selection, in topological order.
    batch_size : int
        Cases per inference call (the first dim of each tensor, whatever the model says).
    max_activation_memory : int, optional
        Budget in bytes for one pass's exposed tensors; default 25 % of available RAM.
    input_size : sequence of int, optional
        The input's spatial size, to size tensors with symbolic spatial dims.

    Returns
    -------
    list of list of HiddenTensor
        Consecutive groups in order (one group when everything fits; ``[]`` for no tensors).
        A tensor larger than the budget alone gets its own pass (with a warning).

    Raises
    ------
    ValueError
        For a non-positive ``batch_size`` or budget, or a tensor whose size is unknown.

    Notes
    -----
    ``bytes = batch_size × Π(non-batch dims) × itemsize``. Splitting is logged once per
    call (logger ``"protoseg"``, INFO): each extra pass reruns the model on the batch.

    Examples
    --------
    >>> plan_passes(tensors, 8, max_activation_memory=2 << 30)  # doctest: +SKIP
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
    if max_activation_memory is None:
        max_activation_memory = available_memory() // 4
    if max_activation_memory <= 0:
        raise ValueError(f"max_activation_memory={max_activation_memory!r}; expected a positive number of bytes")
    passes: list[list[HiddenTensor]] = []
    current: list[HiddenTensor] = []
    used = 0
    too_big: list[str] = []
    for t in tensors:
        size = activation_bytes(t, batch_size, input_size=input_size)
        if size > max_activation_memory:
            too_big.append(t.name)
        if current and used + size > max_activation_memory:
            passes.append(current)
            current, used = [], 0
        current.append(t)
        used += size
    if current:
        passes.append(current)
    if too_big:
        logger.warning("tensor(s) %s alone exceed the %.1f MiB budget for exposed activations at "
                       "batch %d; each gets its own pass (lower %s to stay within it)",
                       ", ".join(too_big[:5]) + (" ..." if len(too_big) > 5 else ""),
                       max_activation_memory / 2**20, batch_size, option("batch_size", "N"))
    if len(passes) > 1:
        logger.info("exposed activations exceed their %.1f MiB budget at batch %d: "
                    "running the model in %d passes per batch", max_activation_memory / 2**20,
                    batch_size, len(passes))
    return passes


#: Ops through which the prediction is still the prediction (activation, layout, casts).
_OUTPUT_PATH_OPS = frozenset({"Sigmoid", "Softmax", "LogSoftmax", "Transpose", "Identity",
                              "Reshape", "Squeeze", "Unsqueeze", "Cast", "Flatten"})


def output_path_tensors(model: Any, output: str) -> list[str]:
    """Tensors that are the prediction in another form (logits before the final activation).

    Walks back from ``output`` through activation and layout ops; the tensors met are the
    output itself, not hidden layers, so every estimator leaves them out.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    names: list[str] = []
    cur = output
    while cur in producer and producer[cur].op_type in _OUTPUT_PATH_OPS:
        node = producer[cur]
        cur = node.input[0]
        names.append(cur)
    return names


def _perm(node: onnx.NodeProto) -> tuple[int, ...] | None:
    """A Transpose node's ``perm`` (None when absent: the reversal, not a layout change we match)."""
    for a in node.attribute:
        if a.name == "perm":
            return tuple(int(v) for v in a.ints)
    return None


def _spatial(t: HiddenTensor) -> tuple[Dim, ...]:
    """``t``'s shape without its batch and channel axes."""
    return tuple(t.shape[1:-1]) if _channels_last(t.layout) else tuple(t.shape[2:])


def concat_blocks(model: Any, tensors: Sequence[HiddenTensor]) -> dict[str, tuple[str, ...]]:
    """Tensors of ``tensors`` that are others of ``tensors`` side by side along the channels.

    A U-Net's skip connections concatenate the upsampled decoder features with the
    encoder's (``torch.cat``, Keras ``Concatenate``). When the parts are scored too, the
    concatenation's prototypes are theirs side by side and its scalar map ``F·(P-N)`` the sum
    of theirs, so its features need not be read again
    (:func:`engine.scores.sa_scores_concat`; a third of the deepbrain U-Net's hidden bytes).

    Parameters
    ----------
    model : onnx.ModelProto
        The model the tensors were listed from.
    tensors : sequence of HiddenTensor
        The tensors scored (a group is made only of these).

    Returns
    -------
    dict
        Name of a concatenation → its parts' names in channel order. A tensor qualifies when
        it is a ``Concat`` along its own channel axis whose inputs are all tensors of
        ``tensors`` with its layout and spatial shape, read either directly or through one
        ``Transpose`` with the same ``perm`` on both sides (tf2onnx computes NCDHW and names
        NDHWC tensors). A tensor is a part of one group at most, and a group's parts are not
        groups themselves; every other tensor is scored on its own.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    by_name = {t.name: t for t in tensors}
    groups: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for t in tensors:
        node = producer.get(t.name)
        if node is None or t.name in used or not t.shape:
            continue
        perm = None
        if node.op_type == "Transpose":
            perm = _perm(node)
            node = producer.get(node.input[0]) if perm is not None else None
        if node is None or node.op_type != "Concat":
            continue
        rank = len(t.shape)
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), None)
        if axis is None:
            continue
        axis = axis + rank if axis < 0 else axis
        out_axis = axis if perm is None else (perm.index(axis) if axis in perm else -1)
        if out_axis != (rank - 1 if _channels_last(t.layout) else 1):
            continue
        parts: list[str] = []
        for x in node.input:
            if perm is None:
                name = x if x in by_name else None
            else:
                name = next((c.output[0] for c in consumers.get(x, ())
                             if c.op_type == "Transpose" and _perm(c) == perm and c.output[0] in by_name), None)
            p = by_name.get(name) if name is not None else None
            if (p is None or p.name == t.name or p.name in used or p.name in groups or p.name in parts
                    or p.layout != t.layout or _spatial(p) != _spatial(t) or len(p.shape) != rank):
                parts = []
                break
            parts.append(p.name)
        if len(parts) >= 2:
            groups[t.name] = tuple(parts)
            used.update(parts)
    return groups
