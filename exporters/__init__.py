"""protoseg exporters: framework models -> ONNX files whose hidden tensors are outputs.

Submodules (``exporters.torch``, ``exporters.tensorflow``, ``exporters.onnx``) import
their framework lazily, inside the functions that need it; ``import exporters`` never
imports torch or TensorFlow.
"""
from __future__ import annotations

__all__: list[str] = []
