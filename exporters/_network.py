"""Export a network that a training framework built (nnU-Net, MONAI) through the torch exporter.

The framework's own exporters (:mod:`exporters.nnunet`, :mod:`exporters.monai`) read their
folders, build the ``torch.nn.Module`` and decide the model card; this module does the part
they share: the framework's output activation (softmax or sigmoid, which nnU-Net and MONAI
apply after the network at inference) is put into the exported graph, the network goes
through :func:`exporters.torch.export` (hooks, the numeric check against torch), a second
check runs at another input size when the spatial axes are dynamic, and the card is
completed with what only the framework knows (``input.size_multiple``, ``extra``).
torch is imported inside the functions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from exporters._common import ExportResult, check_close, logger, require, run_onnx, save_onnx, set_metadata

__all__ = ["export_network", "check_size", "stage_layers"]


def check_size(size: Sequence[int], multiple: Sequence[int] | None, *, what: str) -> tuple[int, ...]:
    """Validate a spatial size against the axes' required multiples.

    Raises
    ------
    ValueError
        When an axis is not a positive multiple of its ``multiple`` (the nearest valid size
        is suggested).
    """
    size = tuple(int(s) for s in size)
    if not size or any(s < 1 for s in size):
        raise ValueError(f"{what} {list(size)}: expected positive integers")
    if multiple is not None:
        if len(multiple) != len(size):
            raise ValueError(f"{what} {list(size)} has {len(size)} axes; the network has {len(multiple)} spatial axes")
        if any(s % m for s, m in zip(size, multiple)):
            fit = [max(m, -(-s // m) * m) for s, m in zip(size, multiple)]
            raise ValueError(
                f"{what} {list(size)} is not a multiple of {list(multiple)} on every axis (the "
                f"product of the network's pooling strides); use e.g. {fit}")
    return size


def stage_layers(model: Any, pattern: str = r"(encoder|decoder)\.stages\.\d+") -> list[str]:
    """Module paths of the encoder/decoder stages (``encoder.stages.0``...), in module order."""
    import re

    rx = re.compile(pattern + "$")
    return [name for name, _ in model.named_modules() if rx.fullmatch(name)]


def _activation_hook(torch: Any, activation: str) -> Any:
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        if isinstance(output, (tuple, list)):  # deep supervision left on: the first is the prediction
            output = output[0]
        return torch.softmax(output, 1) if activation == "softmax" else torch.sigmoid(output)
    return hook


def _dynamic_spatial(proto: Any) -> bool:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return any(not d.HasField("dim_value") for d in list(dims)[2:])


def _second_size(size: Sequence[int], multiple: Sequence[int]) -> tuple[int, ...]:
    """Another valid input size: one multiple smaller where the deepest stage keeps two or more
    voxels (instance norm needs them), else one multiple larger."""
    return tuple(s - m if s >= 3 * m else s + m for s, m in zip(size, multiple))


def export_network(
    network: Any,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    framework: str,
    source: str,
    activation: str,
    classes: Sequence[int] | None,
    preprocessing: Mapping[str, Any],
    size_multiple: Sequence[int] | None,
    extra: Mapping[str, Any],
    messages: Sequence[str] = (),
    layers: Any = None,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    exporter: str = "auto",
    orientation: str | None = None,
) -> ExportResult:
    """Export ``network`` with ``activation`` applied to its output, and complete the card.

    Parameters
    ----------
    network : torch.nn.Module
        The framework's network, weights loaded; it is left unchanged (the activation is a
        forward hook removed afterwards).
    example_input : torch.Tensor
        (1, C, *spatial): the size of the export and of the first numeric check.
    path : path-like
        The ONNX file to write.
    framework, source : str
        Written into the card (``"nnunet"``, ``"monai"``; the folder and checkpoint).
    activation : {"softmax", "sigmoid", "logits"}
        What the framework applies to the network's output at inference; ``softmax`` and
        ``sigmoid`` are applied in the exported graph, so the prediction holds probabilities.
    classes : list of int, optional
        Output channels scored one-vs-rest.
    preprocessing : dict
        The card's preprocessing (``resize`` is set from the exported input: off when the
        spatial axes are dynamic); a ``normalization`` key (per-channel, see
        :mod:`engine.model.metadata`) is written as it is.
    size_multiple : list of int, optional
        Per spatial axis, what the input sizes must be multiples of (``input.size_multiple``).
    extra : dict
        Framework facts the card's fields cannot hold (class names, spacing, clipping...),
        written as the card's ``extra`` (JSON-serialisable).
    messages : list of str
        Notes gathered while reading the framework's folder, put first in ``result.messages``.
    layers : optional
        As in :func:`exporters.torch.export`; default :func:`exporters.torch.default_layers`
        of the network without the activation (so the logits' module stays out).
    opset, atol, rtol, exporter
        As in :func:`exporters.torch.export`; the spatial axes are made dynamic (either
        exporter), else static with a message.
    orientation : str, optional
        The axis codes the framework brings volumes to before the network
        (``input.orientation``), when it does.

    Returns
    -------
    ExportResult
        With ``metadata`` the completed card.

    Raises
    ------
    ExportMismatchError
        An output differs from torch beyond the tolerance, at the example size or (dynamic
        spatial axes) at the second size.
    """
    torch = require("torch")
    import onnx

    from exporters.torch import export as torch_export

    notes = list(messages)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if layers is None:  # chosen before the activation hook, which hides the logits' module
        from exporters.torch import default_layers

        layers = default_layers(network, example_input) or None
    hook = None
    if activation in ("softmax", "sigmoid"):
        hook = network.register_forward_hook(_activation_hook(torch, activation))
    try:
        with tempfile.TemporaryDirectory(prefix=".protoseg-", dir=target.parent) as tmp, _quiet_tracing():
            pre = dict(preprocessing)
            normalization = pre.pop("normalization", None)  # the card's field, not torch.export's
            kwargs = dict(layers=layers, prediction_activation=activation, preprocessing=pre,
                          classes=classes, opset=opset, atol=atol, rtol=rtol, exporter=exporter, source=source)
            try:  # both exporters with dynamic spatial axes first: the frameworks predict at any size
                result = torch_export(network, example_input, Path(tmp) / "model.onnx", dynamic_spatial=True,
                                      **kwargs)
            except RuntimeError as exc:
                if "could not export" not in str(exc):
                    raise
                result = torch_export(network, example_input, Path(tmp) / "model.onnx", dynamic_spatial=None,
                                      **kwargs)
            proto = onnx.load(str(result.path))
        card = dict(result.metadata)
        card["framework"] = framework
        dynamic = _dynamic_spatial(proto)
        card["input"] = dict(card["input"])
        card["preprocessing"] = dict(card.get("preprocessing") or {})
        if normalization is not None:
            card["preprocessing"]["normalization"] = [dict(n) for n in normalization]
        if orientation is not None:
            card["input"]["orientation"] = str(orientation)
        if dynamic:
            card["input"]["size"] = None
            card["preprocessing"]["resize"] = False
        else:
            card["preprocessing"]["resize"] = True
            msg = (f"the exported model takes only the size {card['input']['size']} (static spatial "
                   "axes): images will be resized to it, which the framework does not do; the "
                   "message before this one says why the dynamic export failed")
            logger.warning(msg)
        card["input"]["channels"] = int(example_input.shape[1])
        card["input"]["size_multiple"] = [int(m) for m in size_multiple] if size_multiple is not None else None
        card["extra"] = _jsonable(dict(extra))
        set_metadata(proto, card)
        diffs = dict(result.max_abs_diff)
        if dynamic and size_multiple is not None:
            diffs.update(_check_other_size(torch, network, proto, example_input, size_multiple,
                                           card["input"]["name"], result.prediction, atol=atol, rtol=rtol))
    finally:
        if hook is not None:
            hook.remove()
    written = save_onnx(proto, target)
    logger.info("wrote %s (%s model card)", written, framework)
    messages = notes + list(result.messages) + ([] if dynamic else [msg])
    return dataclasses.replace(result, path=written, metadata=card, max_abs_diff=diffs, messages=messages)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence torch's tracing loggers: a failed dynamic export is reported once, in the messages."""
    names = ("torch._guards", "torch._dynamo", "torch.fx.experimental.symbolic_shapes", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_other_size(torch: Any, network: Any, proto: Any, example: Any, multiple: Sequence[int],
                      input_name: str, prediction: str, *, atol: float, rtol: float) -> dict[str, float]:
    """Compare the prediction of torch and onnxruntime at a second valid size."""
    shape = tuple(example.shape[:2]) + _second_size(tuple(example.shape[2:]), multiple)
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    modes = {m: m.training for m in network.modules()}
    try:
        for m in network.modules():
            m.training = False
        with torch.no_grad():
            out = network(torch.from_numpy(x))
    finally:
        for m, mode in modes.items():
            m.training = mode
    out = out[0] if isinstance(out, (tuple, list)) else out
    got = run_onnx(proto, {input_name: x}, [prediction])
    key = f"{prediction}@{'x'.join(map(str, shape[2:]))}"
    diffs = check_close({key: out.detach().cpu().numpy()}, {key: got[prediction]}, atol=atol, rtol=rtol,
                        framework="torch (second input size)")
    return diffs


def _jsonable(value: Any) -> Any:
    """Plain JSON types: tuples to lists, numpy scalars to Python numbers, keys to str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
