"""Export PyTorch models to ONNX with hidden outputs named after their module paths.

The model is wrapped in a module that returns ``(prediction, *hidden)``; the hidden
tensors are captured with forward hooks on the chosen submodules, so the ONNX outputs are
exactly those tensors, named after the module paths (``"enc1"``, ``"decoder.0.conv"``).
torch is imported inside the functions: install it with ``pip install 'protoseg[torch]'``.
"""
from __future__ import annotations

import fnmatch
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from exporters._common import (
    ExportResult,
    build_metadata,
    check_close,
    layer_not_found,
    logger,
    require,
    run_onnx,
    save_onnx,
    set_metadata,
    spatial_layout,
    verify_activation,
)

__all__ = ["export", "load_torch_model", "default_layers"]

_EXPORTERS = ("auto", "dynamo", "torchscript")


def _torch() -> Any:
    return require("torch")


def load_torch_model(spec: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None) -> Any:
    """Load a PyTorch model for :func:`export`.

    Parameters
    ----------
    spec : str or path-like
        ``"package.module:function"`` — a callable returning an ``nn.Module`` (called
        without arguments); or a TorchScript file (``.pt``/``.pth``, ``torch.jit.save``);
        or a ``torch.export`` program (``.pt2``).
    weights : str or path-like, optional
        A state-dict file for ``package.module:function`` models, loaded with
        ``torch.load(..., weights_only=True)``; a dict with a ``"state_dict"`` entry
        is accepted too.

    Returns
    -------
    torch.nn.Module
        The model, in eval mode.

    Raises
    ------
    ImportError
        torch missing, or the module of ``spec`` cannot be imported.
    FileNotFoundError
        The file does not exist.
    ValueError
        ``spec`` is neither form, or the weights do not fit the model.

    Examples
    --------
    >>> model = load_torch_model("mypkg.nets:unet", weights="unet.pth")  # doctest: +SKIP
    """
    torch = _torch()
    text = os.fspath(spec)
    path = Path(text)
    if ":" in text and not path.exists():
        module_name, _, func_name = text.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"cannot import {module_name!r} from model spec {text!r}: {exc}") from exc
        factory = getattr(module, func_name, None)
        if factory is None or not callable(factory):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise layer_not_found(func_name, names, kind=f"callable in {module_name}")
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{text!r} returned {type(model).__name__}; expected a torch.nn.Module")
        if weights is not None:
            _load_weights(torch, model, Path(weights))
        return model.eval()
    if not path.exists():
        raise FileNotFoundError(
            f"PyTorch model {text!r} does not exist; expected 'package.module:function', "
            "a TorchScript .pt file or a torch.export .pt2 file"
        )
    if weights is not None:
        raise ValueError(
            f"weights= applies to 'package.module:function' models only; {text!r} is a file "
            "that already holds its weights"
        )
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module()
        except Exception as exc:  # noqa: BLE001 - framework errors vary
            raise ValueError(f"torch.export.load could not read {text!r}: {type(exc).__name__}: {exc}") from exc
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - framework errors vary
        raise ValueError(
            f"{text!r} is not a TorchScript file ({type(exc).__name__}); for a state dict "
            "pass 'package.module:function' with weights=the file"
        ) from exc


def _load_weights(torch: Any, model: Any, path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary
        raise ValueError(
            f"could not load weights {str(path)!r} with weights_only=True ({type(exc).__name__}: {exc}); "
            "save them with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"weights {str(path)!r} hold {type(state).__name__}; expected a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"weights {str(path)!r} do not fit the model: {first}") from exc


# ----------------------------------------------------------------------------- probing


def _probe(torch: Any, model: Any, x: Any) -> tuple[Any, dict[str, Any], dict[str, int]]:
    """Run the model once with hooks on every submodule: output, module outputs, call counts."""
    outputs: dict[str, Any] = {}
    calls: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Any:
        def fn(_module: Any, _inputs: Any, output: Any) -> None:
            outputs[name] = output
            calls[name] = calls.get(name, 0) + 1
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            pred = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return _prediction(torch, pred), outputs, calls


def _prediction(torch: Any, out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the model returned {type(out).__name__}; expected a tensor (or a tuple whose first "
        "element is the prediction tensor); wrap the model to return its segmentation output"
    )


def default_layers(model: Any, example_input: Any) -> list[str]:
    """Module paths :func:`export` exposes by default.

    The rule: the leaf-most *blocks* (modules with children, e.g. ``nn.Sequential`` or a
    custom ``DoubleConv``) whose output is a spatial feature map (a tensor of rank >= 3),
    plus convolution / transposed-convolution leaves that are not inside such a block.
    A block that is the only child of its parent and returns the same tensor is named
    after the parent. Modules producing the prediction, and modules called more than once,
    are left out. Single ReLU/BatchNorm layers are never chosen.

    Parameters
    ----------
    model : torch.nn.Module
    example_input : torch.Tensor

    Returns
    -------
    list of str
        Module paths in the order the forward pass runs them.
    """
    torch = _torch()
    pred, outs, calls = _probe(torch, model, example_input)
    return _default_layers(torch, model, pred, outs, calls)


def _is_spatial(torch: Any, value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 3 and value.is_floating_point()


def _default_layers(torch: Any, model: Any, pred: Any, outs: dict[str, Any], calls: dict[str, int]) -> list[str]:
    modules = dict(model.named_modules())
    order = list(outs)  # hooks fire in execution order (post-forward, so children first)
    spatial = {n for n in order if _is_spatial(torch, outs[n]) and calls[n] == 1 and outs[n] is not pred}
    blocks = {n for n in spatial if any(True for _ in modules[n].children())}

    def descendants(name: str) -> list[str]:
        return [m for m in modules if m.startswith(name + ".")]

    leafmost = {b for b in blocks if not any(d in blocks for d in descendants(b))}
    convs = {
        n for n in spatial
        if not any(True for _ in modules[n].children())
        and isinstance(modules[n], torch.nn.modules.conv._ConvNd)
        and not any(n.startswith(b + ".") for b in leafmost)
    }
    chosen: list[str] = []
    for name in order:
        if name not in leafmost and name not in convs:
            continue
        while "." in name:  # climb to a single-child parent returning the same tensor
            parent = name.rsplit(".", 1)[0]
            if parent in outs and outs[parent] is outs[name] and len(list(modules[parent].children())) == 1:
                name = parent
            else:
                break
        if name not in chosen and outs.get(name) is not pred:
            chosen.append(name)
    return chosen


def _select(torch: Any, model: Any, layers: Any, outs: dict[str, Any], calls: dict[str, int], pred: Any) -> list[str]:
    if layers is None:
        return _default_layers(torch, model, pred, outs, calls)
    patterns = [layers] if isinstance(layers, (str, type)) else list(layers)
    modules = {n: m for n, m in model.named_modules() if n}
    chosen: list[str] = []
    for pattern in patterns:
        if isinstance(pattern, type):
            hits = [n for n, m in modules.items() if isinstance(m, pattern)]
            label = pattern.__name__
        else:
            label = str(pattern)
            key = label[5:] if label.startswith("type:") else label
            hits = [key] if key in modules and not label.startswith("type:") else []
            if not hits and any(ch in key for ch in "*?["):
                hits = [n for n in modules if fnmatch.fnmatchcase(n, key)]
            if not hits:
                hits = [n for n, m in modules.items() if type(m).__name__ == key]
        if not hits:
            raise layer_not_found(label, list(modules), kind="module")
        for name in hits:
            if name not in outs:
                raise ValueError(f"module {name!r} was not called by forward(); pick a module the model uses")
            if calls[name] > 1:
                raise ValueError(
                    f"module {name!r} runs {calls[name]} times per forward pass; its output is "
                    "ambiguous, pick a module that runs once"
                )
            if not _is_spatial(torch, outs[name]):
                kind = type(outs[name]).__name__
                shape = tuple(outs[name].shape) if isinstance(outs[name], torch.Tensor) else kind
                raise ValueError(
                    f"module {name!r} outputs {shape}; expected a float feature map of rank >= 3 "
                    "(batch, channels, *spatial)"
                )
            if outs[name] is pred:
                continue
            same = [c for c in chosen if outs[c] is outs[name]]
            if same:
                logger.info("module %r returns the same tensor as %r; exposing it once", name, same[0])
                continue
            if name not in chosen:
                chosen.append(name)
    order = list(outs)
    return sorted(chosen, key=order.index)


# ----------------------------------------------------------------------------- export


def _wrapper(torch: Any, model: Any, names: list[str]) -> Any:
    class Capture(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.store: dict[str, Any] = {}

        def forward(self, x: Any) -> Any:
            self.store.clear()
            pred = _prediction(torch, self.model(x))
            return (pred, *[self.store[n] for n in names])

    wrapper = Capture()
    _eval(wrapper)
    modules = dict(model.named_modules())

    def hook(name: str) -> Any:
        def fn(_module: Any, _inputs: Any, output: Any) -> None:
            wrapper.store[name] = output
        return fn

    wrapper.handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    return wrapper


def export(
    model: Any,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    layers: str | type | Sequence[str | type] | None = None,
    prediction_activation: str | None = None,
    input_layout: str | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    classes: Sequence[int] | None = None,
    threshold: float = 0.5,
    input_name: str = "input",
    output_name: str = "output",
    exporter: str = "auto",
    source: str | None = None,
) -> ExportResult:
    """Export a PyTorch model to ONNX with hidden module outputs as named graph outputs.

    Parameters
    ----------
    model : torch.nn.Module
        The segmentation network (left unchanged: its train/eval modes are restored and
        the hooks removed).
    example_input : torch.Tensor or numpy.ndarray
        One input batch (N, C, *spatial) fixing rank, channels and the check's shape.
    path : str or path-like
        The ONNX file to write.
    layers : str, type or list of them, optional
        Modules to expose: module paths (``"enc1"``), globs (``"decoder.*"``), class names
        (``"Conv2d"`` or ``"type:Conv2d"``) or classes. Default: :func:`default_layers`.
    prediction_activation : {"sigmoid", "softmax", "logits"}, optional
        What the model output *already holds*; guessed from a final ``nn.Sigmoid``/
        ``nn.Softmax`` module or Sigmoid/Softmax node, else ``"logits"``. The check run
        verifies it: ``sigmoid``/``softmax`` on values outside [0, 1], or ``softmax`` on
        channels not summing to 1, raise before anything is written; a guess the values
        contradict is corrected, with a message.
    input_layout : str, optional
        Default channels-first for the input rank (``"NCHW"``, ``"NCDHW"``...).
    preprocessing : dict, optional
        ``{"resize": bool, "scaling": "none"|"minmax"|"zscore"|"meanstd", "mean", "std"}``.
    opset : int, optional
        ONNX opset (exporter default when omitted).
    dynamic_batch : bool
        Make the batch axis dynamic.
    dynamic_spatial : bool, optional
        Make the spatial axes dynamic. ``None`` tries and falls back to static sizes with
        a message when the model does not allow it; ``True`` requires it.
    atol, rtol : float
        Tolerance of the torch vs onnxruntime check (per output,
        ``|onnx - torch| <= atol + rtol * max|torch|``).
    classes : list of int, optional
        Classes scored one-vs-rest (model card).
    threshold : float
        Prediction threshold (model card).
    input_name, output_name : str
        Names of the ONNX input and prediction output.
    exporter : {"auto", "dynamo", "torchscript"}
        ``"auto"``: the dynamo exporter (torch's default), falling back to the TorchScript
        exporter with a message when it fails.
    source : str, optional
        Free text recorded as the model's origin (default: the class name).

    Returns
    -------
    ExportResult
        Path, outputs (prediction first), layer map, layouts, exporter used, max abs
        differences per output.

    Raises
    ------
    ImportError
        torch (or onnxscript for the dynamo exporter) missing: ``pip install 'protoseg[torch]'``.
    LayerNotFoundError
        A requested module does not exist (closest module paths listed).
    ExportMismatchError
        An output differs from torch beyond the tolerance (named).
    engine.model.activation.ActivationError
        ``prediction_activation`` contradicts the prediction's values (a ``ValueError``).
    RuntimeError
        Every exporter failed (their errors, with context).

    Examples
    --------
    >>> result = export(unet, torch.rand(1, 1, 64, 64), "unet.onnx",
    ...                 prediction_activation="logits")  # doctest: +SKIP
    >>> result.outputs  # doctest: +SKIP
    ['output', 'enc1', 'enc2', 'up1', 'dec1']
    """
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if exporter not in _EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(_EXPORTERS)}; got {exporter!r}")
    x = torch.as_tensor(np.asarray(example_input) if not isinstance(example_input, torch.Tensor) else example_input)
    if x.ndim < 3 or not x.is_floating_point():
        raise ValueError(
            f"example_input must be a float tensor (N, C, *spatial) of rank 3 to 5; got "
            f"{x.dtype} of shape {tuple(x.shape)}"
        )
    x = x.detach().to(torch.float32).cpu()
    modes = {m: m.training for m in model.modules()}
    _eval(model)
    wrapper = None
    try:
        scripted = isinstance(model, torch.jit.ScriptModule)
        if scripted:  # no hooks on TorchScript: name hidden tensors from the ONNX graph instead
            names = []
        else:
            pred, outs, calls = _probe(torch, model, x)
            names = _select(torch, model, layers, outs, calls, pred)
            if layers is None and not names:  # e.g. a torch.export module: its submodules never run
                scripted = True
        given = prediction_activation is not None
        if not given:
            prediction_activation = _guess_activation(torch, model)
        if output_name in names or input_name in names or input_name == output_name:
            raise ValueError(
                f"input_name {input_name!r} / output_name {output_name!r} clash with module names; "
                "pass other names"
            )
        wrapper = _wrapper(torch, model, names)
        exported = model if scripted else wrapper  # TorchScript modules export as they are
        onnx_names = [output_name] + names
        proto, used, messages = _convert(
            torch, exported, x, input_name, onnx_names, opset=opset,
            exporter="torchscript" if isinstance(model, torch.jit.ScriptModule) and exporter == "auto" else exporter,
            dynamic_batch=dynamic_batch, dynamic_spatial=dynamic_spatial,
        )
        if not given and prediction_activation == "logits":  # torch.sigmoid()/softmax() in forward
            from exporters.onnx import _guess_activation as graph_activation

            prediction_activation = graph_activation(proto.graph, output_name)
        _eval(exported)
        rng = np.random.default_rng(0)
        check = torch.from_numpy(rng.random(tuple(x.shape), dtype=np.float32))
        with torch.no_grad():
            values = exported(check)
            values = (_prediction(torch, values),) if scripted else values
            expected = {n: v.detach().cpu().numpy() for n, v in zip(onnx_names, values)}
    finally:
        if wrapper is not None:
            for handle in wrapper.handles:
                handle.remove()
        for module, mode in modes.items():
            module.training = mode
    rank_layout = {n: spatial_layout(v.ndim, False) for n, v in expected.items()}
    input_layout = input_layout or spatial_layout(x.ndim, False)
    hidden = {n: {"layer": n, "layout": rank_layout[n]} for n in names}
    card = build_metadata(
        framework="torch", source=source or f"torch:{type(model).__module__}.{type(model).__qualname__}",
        input_name=input_name, input_layout=input_layout, input_size=list(x.shape[2:]),
        prediction=output_name, activation=prediction_activation,
        prediction_layout=rank_layout[output_name], classes=classes, threshold=threshold,
        preprocessing=preprocessing, hidden=hidden,
    )
    set_metadata(proto, card)
    actual = run_onnx(proto, {input_name: check.numpy()}, onnx_names)
    diffs = check_close(expected, actual, atol=atol, rtol=rtol, framework="torch")
    verify_activation(proto, card, expected[output_name], given="argument" if given else "guessed",
                      path=path, messages=messages)
    if scripted:
        return _expose_scripted(
            proto, path, layers=layers, output_name=output_name, card=card, used=used,
            diffs=diffs, messages=messages,
        )
    written = save_onnx(proto, path)
    logger.info("exported %d outputs to %s with %s", len(onnx_names), written, used)
    return ExportResult(
        path=written, prediction=output_name, outputs=onnx_names, layers={n: n for n in names},
        layouts=rank_layout, exporter=used, max_abs_diff=diffs, metadata=card, messages=messages,
    )


def _eval(module: Any) -> None:
    """Eval mode by flags (``eval()`` itself raises on torch.export modules)."""
    for sub in module.modules():
        sub.training = False


def _expose_scripted(
    proto: Any, path: Any, *, layers: Any, output_name: str, card: dict[str, Any], used: str,
    diffs: dict[str, float], messages: list[str],
) -> ExportResult:
    """TorchScript models: export the prediction, then expose hidden tensors by ONNX node scope."""
    from exporters.onnx import expose as onnx_expose

    if layers is not None and not all(isinstance(p, str) for p in ([layers] if isinstance(layers, (str, type)) else layers)):
        raise TypeError("a TorchScript model's layers are chosen by name, glob or 'op:<OnnxOp>'; got a class")
    msg = "no hookable submodules (TorchScript/torch.export model): hidden tensors chosen in the ONNX graph, named from node scopes"
    logger.info(msg)
    target = Path(path)
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        plain = save_onnx(proto, Path(tmp) / "plain.onnx")
        selectors = layers
        if selectors is None:  # the activations, else every spatial tensor
            from engine.model.graph import list_hidden_tensors

            selectors = "op:Relu" if any(t.op == "Relu" for t in list_hidden_tensors(plain)) else "all"
        result = onnx_expose(
            plain, target, layers=selectors, prediction=output_name,
            activation=card["prediction"]["activation"], input_layout=card["input"]["layout"],
            preprocessing=card.get("preprocessing"), classes=card["prediction"]["classes"],
            threshold=card["prediction"]["threshold"], framework="torch",
        )
    result.exporter = used
    result.max_abs_diff = {**diffs, **result.max_abs_diff}
    result.messages = messages + [msg] + result.messages
    return result


def _guess_activation(torch: Any, model: Any) -> str:
    last = None
    for module in model.modules():
        if not any(True for _ in module.children()):
            last = module
    if isinstance(last, torch.nn.Sigmoid):
        return "sigmoid"
    if isinstance(last, (torch.nn.Softmax, torch.nn.Softmax2d)):
        return "softmax"
    return "logits"


def _dynamic_axes(x: Any, input_name: str, onnx_names: list[str], batch: bool, spatial: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    inp: dict[int, str] = {}
    if batch:
        inp[0] = "batch"
    if spatial:
        for i in range(2, x.ndim):
            inp[i] = f"{input_name}_dim{i}"
    axes[input_name] = inp
    for name in onnx_names:
        axes[name] = {0: "batch"} if batch else {}
    return {k: v for k, v in axes.items() if v}


def _convert(
    torch: Any, wrapper: Any, x: Any, input_name: str, onnx_names: list[str], *, opset: int | None,
    exporter: str, dynamic_batch: bool, dynamic_spatial: bool | None,
) -> tuple[Any, str, list[str]]:
    """Try the exporters (and dynamic spatial axes) in order; (proto, exporter used, messages)."""
    import onnx

    kinds = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    spatial_tries = [True, False] if dynamic_spatial is None else [bool(dynamic_spatial)]
    errors: list[str] = []
    messages: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            if kind == "dynamo":
                try:
                    require("onnxscript", extra="torch")
                except ImportError as exc:
                    errors.append(f"dynamo: {exc}")
                    continue
            for spatial in spatial_tries:
                target = os.path.join(tmp, f"{kind}-{int(spatial)}.onnx")
                axes = _dynamic_axes(x, input_name, onnx_names, dynamic_batch, spatial)
                try:
                    _run_exporter(torch, kind, wrapper, x, target, input_name, onnx_names, axes, opset)
                    proto = onnx.load(target)
                    _check_names(proto, input_name, onnx_names)
                    _tidy_dims(proto, set(onnx_names))
                except Exception as exc:  # noqa: BLE001 - exporter errors vary widely
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    errors.append(f"{kind} (dynamic spatial={spatial}): {type(exc).__name__}: {first}")
                    continue
                if errors:
                    msg = f"used the {kind} exporter" + ("" if spatial or dynamic_spatial is False else " with static spatial axes") + f" after: {'; '.join(errors)}"
                    logger.warning(msg)
                    messages.append(msg)
                return proto, f"torch.onnx({kind})", messages
    raise RuntimeError("torch could not export the model to ONNX: " + " | ".join(errors))


def _run_exporter(
    torch: Any, kind: str, wrapper: Any, x: Any, target: str, input_name: str,
    onnx_names: list[str], axes: dict[str, dict[int, str]], opset: int | None,
) -> None:
    import logging
    import warnings

    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:  # exporter chatter (e.g. "torchvision is not installed") is not ours to print
        q.setLevel(logging.ERROR)
    try:
        _export_quietly(torch, kind, wrapper, x, target, input_name, onnx_names, axes, opset, warnings)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _export_quietly(
    torch: Any, kind: str, wrapper: Any, x: Any, target: str, input_name: str,
    onnx_names: list[str], axes: dict[str, dict[int, str]], opset: int | None, warnings: Any,
) -> None:
    kwargs: dict[str, Any] = dict(input_names=[input_name], output_names=onnx_names)
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            dims = {}
            for axis, label in axes.get(input_name, {}).items():
                dims[axis] = torch.export.Dim(label.replace(".", "_"), min=1 if axis == 0 else 2)
            torch.onnx.export(
                wrapper, (x,), target, dynamo=True, dynamic_shapes=({**dims},) if dims else None,
                external_data=False, verbose=False, **kwargs,
            )
        else:
            torch.onnx.export(
                wrapper, (x,), target, dynamo=False, dynamic_axes=axes or None,
                training=torch.onnx.TrainingMode.PRESERVE, **kwargs,  # eval flags set by the caller
            )


def _check_names(proto: Any, input_name: str, onnx_names: list[str]) -> None:
    got = [o.name for o in proto.graph.output]
    if got != onnx_names:
        raise RuntimeError(f"exporter named the outputs {got}, expected {onnx_names}")
    if [i.name for i in proto.graph.input if i.name == input_name] != [input_name]:
        raise RuntimeError(f"exporter did not keep the input name {input_name!r}")


def _tidy_dims(proto: Any, outputs: set[str]) -> None:
    """Give each output's symbolic spatial axes its own name (TorchScript reuses one)."""
    for value in proto.graph.output:
        if value.name not in outputs:
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i > 0 and dim.HasField("dim_param"):
                dim.dim_param = f"{value.name}_dim{i}"
