"""Shared pieces of the exporters: results, errors, naming, metadata and the numeric check.

Every exporter ends the same way: an ONNX ``ModelProto`` whose graph outputs are the
prediction followed by the hidden tensors (each named after its framework layer), the
protoseg model card written into it (:mod:`engine.model.metadata`), the file saved, and the
framework's outputs compared with onnxruntime's on the same input. This module holds
those steps so that ``exporters.torch``, ``exporters.tensorflow`` and ``exporters.onnx``
read alike. It imports neither torch nor TensorFlow.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from engine.model.metadata import ACTIVATIONS, LAYOUTS, SCALINGS, new_metadata, write_metadata

__all__ = [
    "ExportResult",
    "LayerNotFoundError",
    "ExportMismatchError",
    "logger",
    "require",
    "closest_matches",
    "layer_not_found",
    "check_close",
    "build_metadata",
    "rename_tensors",
    "save_onnx",
    "run_onnx",
    "spatial_layout",
    "verify_activation",
]

logger = logging.getLogger("protoseg")

_EXTRAS = {
    "torch": "torch",
    "onnxscript": "torch",
    "tensorflow": "tensorflow",
    "tf2onnx": "tensorflow",
    "keras": "tensorflow",
}


class LayerNotFoundError(KeyError, ValueError):
    """A requested layer/tensor name does not exist; the message lists the closest ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ExportMismatchError(ValueError):
    """The exported ONNX model disagrees with the framework beyond the tolerance."""


@dataclass
class ExportResult:
    """What an export produced.

    Attributes
    ----------
    path : pathlib.Path
        The ONNX file written.
    prediction : str
        Name of the graph output holding the prediction.
    outputs : list of str
        All graph output names, prediction first, then the hidden tensors.
    layers : dict
        Hidden output name -> framework layer name (module path, Keras layer, TF op).
    layouts : dict
        Output name -> layout (``"NCHW"``, ``"NHWC"``, ...) as stored in the file.
    exporter : str
        Which converter produced the graph (``"torch.onnx(dynamo)"``, ``"tf2onnx"``, ...).
    max_abs_diff : dict
        Output name -> maximum absolute difference framework vs onnxruntime
        (empty when no check was run).
    metadata : dict
        The model card written into the file.
    messages : list of str
        Fallbacks taken during the export (also logged on logger ``"protoseg"``).
    """

    path: Path
    prediction: str
    outputs: list[str]
    layers: dict[str, str]
    layouts: dict[str, str | None]
    exporter: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (path as a string)."""
        return {
            "path": str(self.path), "prediction": self.prediction, "outputs": list(self.outputs),
            "layers": dict(self.layers), "layouts": dict(self.layouts), "exporter": self.exporter,
            "max_abs_diff": dict(self.max_abs_diff), "metadata": self.metadata,
            "messages": list(self.messages),
        }


def require(module: str, *, extra: str | None = None) -> Any:
    """Import ``module`` or raise an ImportError naming the protoseg extra to install.

    Parameters
    ----------
    module : str
        Module to import (``"torch"``, ``"tf2onnx"``, ...).
    extra : str, optional
        The protoseg extra providing it; guessed from the module name when omitted.

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ImportError
        When the module cannot be imported.
    """
    extra = extra or _EXTRAS.get(module.split(".")[0], module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is required for this export but could not be imported ({exc}); "
            f"install it with: pip install 'protoseg[{extra}]'"
        ) from exc


def closest_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` candidates closest to ``name`` (difflib), else the first ``n`` candidates."""
    candidates = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    return close or candidates[:n]


def layer_not_found(name: str, candidates: Iterable[str], *, kind: str = "layer") -> LayerNotFoundError:
    """Build the error for an unknown layer name, listing the closest valid names."""
    candidates = list(candidates)
    close = closest_matches(name, candidates)
    return LayerNotFoundError(
        f"no {kind} matches {name!r}; closest: {', '.join(map(repr, close)) or '(none)'} "
        f"({len(candidates)} {kind}s in total); pass an exact name, a glob or a type"
    )


def check_close(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    *,
    atol: float,
    rtol: float,
    framework: str,
) -> dict[str, float]:
    """Compare framework outputs with onnxruntime outputs, per output name.

    Parameters
    ----------
    expected : mapping
        Output name -> array computed by the framework.
    actual : mapping
        Output name -> array computed by onnxruntime.
    atol, rtol : float
        Tolerances: an output passes when ``|a - e| <= atol + rtol * max|e|`` everywhere
        (``rtol`` is relative to the output's largest magnitude: float32 convolutions
        accumulate rounding in proportion to the tensor's scale, not to each element).
    framework : str
        Name used in the error message.

    Returns
    -------
    dict
        Output name -> maximum absolute difference.

    Raises
    ------
    ExportMismatchError
        Naming the first output (in ``expected`` order) outside the tolerance, or whose
        shape differs.
    """
    diffs: dict[str, float] = {}
    for name, ref in expected.items():
        if name not in actual:
            raise ExportMismatchError(f"the ONNX model has no output {name!r} to compare with {framework}")
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(actual[name], dtype=np.float64)
        if ref.shape != got.shape:
            raise ExportMismatchError(
                f"output {name!r}: onnxruntime gives shape {got.shape}, {framework} gives {ref.shape}; "
                "the export is wrong, report it with the model"
            )
        diff = np.abs(got - ref)
        diffs[name] = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        if not np.all(diff <= atol + rtol * scale):
            raise ExportMismatchError(
                f"output {name!r} differs from {framework} by up to {diffs[name]:.3g} "
                f"(atol={atol:g}, rtol={rtol:g}); check the model for nondeterminism "
                "(dropout, training mode) or loosen atol/rtol"
            )
    return diffs


def verify_activation(
    proto: Any,
    card: dict[str, Any],
    values: np.ndarray,
    *,
    given: str,
    path: str | os.PathLike[str],
    messages: list[str],
) -> None:
    """Check the prediction computed for the numeric check against the card's activation.

    The activation says what the output *already holds*; the exporter's check run shows it.

    Parameters
    ----------
    proto : onnx.ModelProto
        The exported model; its model card is rewritten when the activation is corrected.
    card : dict
        The model card written into ``proto`` (updated in place when corrected).
    values : numpy.ndarray
        The prediction on the check input.
    given : {"argument", "card", "guessed"}
        Where the activation came from: passed by the caller (``--activation``), read from the
        source file's model card, or guessed from the graph (a final Sigmoid/Softmax).
    path : path-like
        The file the export would write (named in the error: nothing is written).
    messages : list of str
        The export's messages; a correction or a note is appended (and logged).

    Raises
    ------
    engine.model.activation.ActivationError
        When a given (or card) activation contradicts the values: ``sigmoid``/``softmax`` on
        values outside [0, 1], ``softmax`` on channels that do not sum to 1. A *guessed*
        activation is corrected to what the values show instead, with a message.
    """
    from engine.errors import option
    from engine.model.activation import ActivationError, channel_axis_of, check_activation, infer_activation

    pred = card["prediction"]
    declared = pred.get("activation")
    if declared is None:
        return
    layout = pred.get("layout") or (card.get("input") or {}).get("layout")
    values = np.asarray(values)
    try:
        channel_axis_of(layout, values.ndim)
    except ValueError as exc:  # not a segmentation map the engine can read: not ours to refuse here
        logger.info("activation not checked: prediction output %r: %s", pred["output"], exc)
        return
    where = f"prediction output {pred['output']!r}" + (
        " (activation read from the source file's model card)" if given == "card" else "")
    try:
        check_activation(values, declared, layout=layout, where=where)
    except ActivationError as exc:
        if given != "guessed":
            raise exc.with_note(f" (export stopped: {os.fspath(path)!r} not written)") from None
        fixed = exc.suggested
        msg = (f"prediction output {pred['output']!r}: the activation guessed from the model "
               f"({declared!r}) does not fit its {exc.observed}, which range from {exc.low:.4g} to "
               f"{exc.high:.4g} on the check input; recorded {fixed!r} instead (pass "
               f"{option('activation', fixed)} to state it)")
        _note(msg, messages)
        pred["activation"] = fixed
        set_metadata(proto, card)
        return
    try:
        seen = infer_activation(values, layout=layout)
    except ValueError:
        return
    if declared == "logits" and seen == "softmax":
        if given == "guessed":  # channels summing to 1 everywhere: softmax probabilities, not scores
            msg = (f"prediction output {pred['output']!r}: no final Softmax was found, but its "
                   "channels sum to 1 at every position of the check input; recorded 'softmax' "
                   f"(pass {option('activation', 'logits')} if it holds raw scores)")
            _note(msg, messages)
            pred["activation"] = "softmax"
            set_metadata(proto, card)
        else:
            _note(f"prediction output {pred['output']!r}: declared logits, but its channels sum "
                  "to 1 at every position of the check input (softmax probabilities?); the engine "
                  f"will apply softmax to them again unless {option('activation', 'softmax')} is "
                  "passed", messages)
    elif declared == "logits" and seen == "sigmoid" and given == "guessed":
        logger.info("prediction output %r: no final Sigmoid/Softmax was found and its values lie in "
                    "[0, 1] on the check input; recorded 'logits' (pass %s if they are probabilities)",
                    pred["output"], option("activation", "sigmoid"))
    elif declared == "sigmoid" and seen == "softmax":
        logger.info("prediction output %r: its channels sum to 1 (softmax); read as sigmoid "
                    "probabilities, which the engine treats alike", pred["output"])


def _note(msg: str, messages: list[str]) -> None:
    logger.warning(msg)
    messages.append(msg)


def spatial_layout(rank: int, channels_last: bool) -> str | None:
    """The layout name for a tensor of ``rank`` (3, 4 or 5) and channel position."""
    names = {3: ("NCW", "NWC"), 4: ("NCHW", "NHWC"), 5: ("NCDHW", "NDHWC")}
    if rank not in names:
        return None
    return names[rank][int(bool(channels_last))]


def _check_choice(value: Any, choices: Sequence[str], what: str) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def build_metadata(
    *,
    framework: str,
    source: str,
    input_name: str,
    input_layout: str | None,
    input_size: Sequence[int] | None,
    prediction: str,
    activation: str | None,
    prediction_layout: str | None = None,
    classes: Sequence[int] | None = None,
    threshold: float = 0.5,
    preprocessing: Mapping[str, Any] | None = None,
    hidden: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble the model card (schema of :mod:`engine.model.metadata`), validating its values.

    Raises
    ------
    ValueError
        For a layout, activation or scaling outside the schema's vocabulary.
    """
    _check_choice(input_layout, LAYOUTS, "input layout")
    _check_choice(prediction_layout, LAYOUTS, "prediction layout")
    _check_choice(activation, ACTIVATIONS, "prediction activation")
    pre: dict[str, Any] | None = None
    if preprocessing is not None:
        if not isinstance(preprocessing, Mapping):
            raise TypeError(
                f"preprocessing must be a dict such as {{'resize': True, 'scaling': 'minmax'}}; "
                f"got {type(preprocessing).__name__}"
            )
        unknown = set(preprocessing) - {"resize", "scaling", "mean", "std"}
        if unknown:
            raise ValueError(
                f"unknown preprocessing keys {sorted(unknown)}; expected resize, scaling, mean, std"
            )
        _check_choice(preprocessing.get("scaling"), SCALINGS, "preprocessing scaling")
        pre = {
            "resize": bool(preprocessing.get("resize", input_size is not None)),
            "scaling": preprocessing.get("scaling", "none"),
            "mean": _floats(preprocessing.get("mean")),
            "std": _floats(preprocessing.get("std")),
        }
    meta = new_metadata(
        framework=framework,
        source=source,
        input={
            "name": input_name,
            "layout": input_layout,
            "size": [int(s) for s in input_size] if input_size is not None else None,
        },
        prediction={
            "output": prediction,
            "activation": activation,
            "layout": prediction_layout,
            "classes": [int(c) for c in classes] if classes is not None else None,
            "threshold": float(threshold),
        },
        hidden={k: dict(v) for k, v in (hidden or {}).items()},
    )
    if pre is not None:
        meta["preprocessing"] = pre
    return meta


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    return [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]


def rename_tensors(model: Any, mapping: Mapping[str, str]) -> None:
    """Rename tensors of an ONNX ``ModelProto`` in place, everywhere they appear.

    Node inputs/outputs (subgraphs included), graph inputs/outputs, value_info and
    initializers are renamed. Call it on a copy.

    Raises
    ------
    ValueError
        When a new name is already used by another tensor of the graph.
    """
    mapping = {old: new for old, new in mapping.items() if old != new}
    if not mapping:
        return
    used = _all_tensor_names(model.graph) - set(mapping)
    clash = sorted(set(mapping.values()) & used)
    if clash:
        raise ValueError(f"cannot rename tensors to {clash}: these names are already used in the graph")
    _rename_graph(model.graph, mapping)


def _all_tensor_names(graph: Any) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                names |= _all_tensor_names(sub)
    names.update(v.name for v in graph.input)
    names.update(v.name for v in graph.output)
    names.update(i.name for i in graph.initializer)
    names.discard("")
    return names


def _rename_graph(graph: Any, mapping: Mapping[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename_graph(attr.g, mapping)
            for sub in attr.graphs:
                _rename_graph(sub, mapping)
    for seq in (graph.input, graph.output, graph.value_info):
        for value in seq:
            if value.name in mapping:
                value.name = mapping[value.name]
    for init in graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]


def save_onnx(model: Any, path: str | os.PathLike[str]) -> Path:
    """Check ``model`` (onnx.checker) and write it to ``path`` atomically (temp file + replace).

    Raises
    ------
    ValueError
        When the ONNX checker rejects the model (the checker's message is included).
    """
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ValueError(f"the exported ONNX model is invalid ({first}); report it with the model") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            fh.write(model.SerializeToString())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def run_onnx(model: Any, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run an ONNX model (path, bytes or ModelProto) on CPU with onnxruntime; name -> array."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    values = session.run(names, dict(feeds))
    return dict(zip(names, values))


def set_metadata(model: Any, meta: Mapping[str, Any]) -> None:
    """Write the model card into ``model`` (a copy the exporter owns)."""
    write_metadata(model, dict(meta))
