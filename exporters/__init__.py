"""protoseg exporters: framework models -> ONNX files whose hidden tensors are outputs.

Submodules (``exporters.torch``, ``exporters.tensorflow``, ``exporters.onnx``,
``exporters.nnunet``, ``exporters.monai``) import their framework lazily, inside the
functions that need it; ``import exporters`` never imports torch, TensorFlow or MONAI. The names below are resolved on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, str]] = {
    "export_torch": ("exporters.torch", "export"),
    "load_torch_model": ("exporters.torch", "load_torch_model"),
    "export_tensorflow": ("exporters.tensorflow", "export"),
    "load_tf_model": ("exporters.tensorflow", "load_tf_model"),
    "expose_onnx": ("exporters.onnx", "expose"),
    "export_nnunet": ("exporters.nnunet", "export"),
    "read_nnunet_plan": ("exporters.nnunet", "read_plan"),
    "export_monai_bundle": ("exporters.monai", "export"),
    "read_monai_bundle": ("exporters.monai", "read_bundle"),
    "ExportResult": ("exporters._common", "ExportResult"),
    "LayerNotFoundError": ("exporters._common", "LayerNotFoundError"),
    "ExportMismatchError": ("exporters._common", "ExportMismatchError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'exporters' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
