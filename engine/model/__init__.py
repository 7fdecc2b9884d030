"""The model stage: an ONNX file in, a ready onnxruntime session and its model card out.

- :mod:`engine.model.metadata` — the model card's schema as stored in the ONNX file (the only
  part of the engine that :mod:`exporters` imports).
- :mod:`engine.model.graph` — loading, listing, selecting and exposing hidden tensors, and
  planning passes under a memory budget.
- :mod:`engine.model.card` — the resolved :class:`ModelCard` (metadata < TOML < flags):
  preprocessing, prediction, layouts.
- :mod:`engine.model.session` — the onnxruntime session factory (provider probe, threads).

Names are imported lazily so that ``import engine.model.metadata`` does not load onnxruntime.
"""
from __future__ import annotations

from engine._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "HiddenTensor": "engine.model.graph",
    "load_model": "engine.model.graph",
    "list_hidden_tensors": "engine.model.graph",
    "require_hidden": "engine.model.graph",
    "select_tensors": "engine.model.graph",
    "expose": "engine.model.graph",
    "plan_passes": "engine.model.graph",
    "ModelCard": "engine.model.card",
    "resolve_model_card": "engine.model.card",
    "Session": "engine.model.session",
    "make_session": "engine.model.session",
    "cuda_usable": "engine.model.session",
    "read_metadata": "engine.model.metadata",
    "write_metadata": "engine.model.metadata",
    "new_metadata": "engine.model.metadata",
    "resolve_shapes": "engine.model.shapes",
    "accepted_multiple": "engine.model.shapes",
    "check_activation": "engine.model.activation",
    "infer_activation": "engine.model.activation",
    "ActivationError": "engine.model.activation",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("engine.model", globals(), _EXPORTS)
