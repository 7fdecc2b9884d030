"""The metadata protoseg stores inside an ONNX file (the model card on disk).

Exporters write it; the engine reads it. It lives in ``ModelProto.metadata_props`` under
the key :data:`METADATA_KEY` as one JSON object::

    {
      "encoding-type": "protoseg-model-card",
      "encoding-version": "1",
      "framework": "torch" | "tensorflow" | "onnx" | ...,
      "source": "free text: the model's origin (module path, file name)",
      "input":  {"name": "img", "layout": "NCHW" | "NHWC" | "NCDHW" | "NDHWC",
                 "size": [128, 128, 128] | null},          # spatial size the model expects
      "prediction": {"output": "prob",                     # graph output holding the prediction
                     "activation": "sigmoid" | "softmax" | "logits",
                     "layout": "NCHW" | "NHWC" | ... | null,   # null: same as input
                     "classes": [1] | null,                # classes scored one-vs-rest
                     "threshold": 0.5},
      "preprocessing": {"resize": true,                    # resize images to input.size
                        "scaling": "none" | "minmax" | "zscore" | "meanstd",
                        "mean": [..] | null, "std": [..] | null},
      "hidden": {"<onnx tensor name>": {"layer": "<framework layer name>",
                                        "layout": "NCHW" | "NHWC" | ...}}
    }

``activation`` describes what the prediction output already holds: ``sigmoid`` —
foreground probabilities (one channel per class); ``softmax`` — class probabilities
summing to one over the channel axis; ``logits`` — raw scores (sigmoid applied for one
channel, softmax over channels otherwise). Every key is optional except the encoding
pair; what is missing is inferred by :mod:`engine.model.card`, which says what it assumed.
"""
from __future__ import annotations

import json
from typing import Any

__all__ = [
    "METADATA_KEY",
    "ENCODING_TYPE",
    "ENCODING_VERSION",
    "LAYOUTS",
    "ACTIVATIONS",
    "SCALINGS",
    "read_metadata",
    "write_metadata",
    "new_metadata",
]

METADATA_KEY = "protoseg"
ENCODING_TYPE = "protoseg-model-card"
ENCODING_VERSION = "1"
LAYOUTS = ("NCW", "NWC", "NCHW", "NHWC", "NCDHW", "NDHWC")
ACTIVATIONS = ("sigmoid", "softmax", "logits")
SCALINGS = ("none", "minmax", "zscore", "meanstd")


def new_metadata(**fields: Any) -> dict[str, Any]:
    """Return a metadata dict with the encoding pair set and ``fields`` merged in."""
    meta: dict[str, Any] = {"encoding-type": ENCODING_TYPE, "encoding-version": ENCODING_VERSION}
    meta.update(fields)
    return meta


def read_metadata(model: Any) -> dict[str, Any] | None:
    """Return the protoseg metadata of an ``onnx.ModelProto``, or ``None`` when absent.

    Raises
    ------
    ValueError
        When the entry exists but is not valid JSON, or carries an unknown encoding
        version (upgrade protoseg to read it).
    """
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                meta = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"ONNX metadata entry {METADATA_KEY!r} is not valid JSON ({exc}); "
                    "re-export the model with protoseg or remove the entry"
                ) from None
            if meta.get("encoding-type") != ENCODING_TYPE:
                raise ValueError(
                    f"ONNX metadata entry {METADATA_KEY!r} has encoding-type "
                    f"{meta.get('encoding-type')!r}, expected {ENCODING_TYPE!r}"
                )
            if str(meta.get("encoding-version")) != ENCODING_VERSION:
                raise ValueError(
                    f"model card encoding-version {meta.get('encoding-version')!r} is not "
                    f"supported by this protoseg (reads {ENCODING_VERSION!r}); upgrade protoseg"
                )
            return meta
    return None


def write_metadata(model: Any, meta: dict[str, Any]) -> None:
    """Set (replace) the protoseg metadata entry of ``model`` in place.

    Call it on a copy: protoseg never mutates a caller's model.
    """
    value = json.dumps(meta, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = value
