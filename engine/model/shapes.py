"""Sizes of hidden tensors with symbolic or unknown dims, from the input the data gives.

Most models in the wild have dynamic axes (``('N', 16, 'unk__0', 'unk__1')``): their hidden
tensors' sizes are only known once an input is. :func:`resolve_shapes` binds the model
input to a concrete shape and asks ONNX shape inference (symbolic names stay consistent
across tensors); what inference cannot tell (custom ops, data-dependent shapes) is read off
one run of the model on a zero input of that shape. The memory planner then sizes passes
from the resolved shapes.

:func:`accepted_multiple` answers the other question a dynamic model raises: which spatial
sizes it can take at all (a U-Net with four poolings needs multiples of 16).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from engine.errors import option
from engine.model.graph import Dim, HiddenTensor, expose, list_hidden_tensors

__all__ = ["unresolved", "resolve_shapes", "accepted_multiple", "size_message"]

log = logging.getLogger("protoseg")


def unresolved(t: HiddenTensor) -> bool:
    """Whether a non-batch dim of ``t`` is symbolic or unknown."""
    return any(not isinstance(d, int) for d in tuple(t.shape)[1:])


def _known(shape: Sequence[Dim] | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in tuple(shape)[1:])


def _zeros(input_type: str | None, shape: Sequence[int]) -> np.ndarray:
    dtype = np.float16 if input_type == "tensor(float16)" else (
        np.float64 if input_type == "tensor(double)" else np.float32)
    return np.zeros(tuple(shape), dtype=dtype)


def resolve_shapes(proto: Any, tensors: Sequence[HiddenTensor], input_name: str,
                   input_shape: Sequence[int], *, spatial_axes: Sequence[int] = (),
                   provider: str = "cpu") -> list[HiddenTensor]:
    """``tensors`` with every non-batch dim known for a model input of ``input_shape``.

    Parameters
    ----------
    proto : onnx.ModelProto
        The model (not modified).
    tensors : sequence of HiddenTensor
        As listed by :func:`engine.model.graph.list_hidden_tensors`.
    input_name : str
        The graph input the data feeds.
    input_shape : sequence of int
        A concrete input shape, batch first, in the model's layout.
    spatial_axes : sequence of int
        The input's spatial axes, to say which sizes the model takes when it fails on this one.
    provider : str
        Where the observing run (only when inference cannot tell) runs.

    Returns
    -------
    list of HiddenTensor
        Same order; tensors already known are returned as they are.

    Raises
    ------
    ValueError
        When the model cannot run on ``input_shape`` (the message is onnxruntime's first line).
    """
    todo = [t for t in tensors if unresolved(t)]
    if not todo:
        return list(tensors)
    shape = tuple(int(d) for d in input_shape)
    inferred = {t.name: t.shape for t in list_hidden_tensors(proto, input_shapes={input_name: shape})}
    found = {t.name: inferred[t.name] for t in todo if _known(inferred.get(t.name))}
    left = [t for t in todo if t.name not in found]
    if left:
        from engine.model.session import make_session

        log.debug("shape inference leaves %d tensor(s) unsized; reading their shapes off one run",
                  len(left))
        sess = make_session(expose(proto, left), provider=provider)
        feed_shape = (sess.fixed_batch or 1,) + shape[1:]
        try:
            out = sess.run({input_name: _zeros(sess.input_types.get(input_name), feed_shape)},
                           outputs=[t.name for t in left])
        except Exception as exc:
            m = accepted_multiple(sess, input_name, feed_shape, spatial_axes) if spatial_axes else None
            if m is not None:
                raise ValueError(size_message(tuple(shape[a] for a in spatial_axes), m)) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"the model cannot run on an input of shape {shape} ({first})") from None
        found.update({t.name: (t.shape[0],) + tuple(out[t.name].shape[1:]) for t in left})
    return [replace(t, shape=tuple(found[t.name])) if t.name in found else t for t in tensors]


def size_message(size: Sequence[int], multiple: int) -> str:
    """The one line for a spatial size a model cannot take, with the sizes it can."""
    fit = tuple(-(-int(s) // multiple) * multiple for s in size)
    return (f"the model cannot take spatial size {tuple(int(s) for s in size)}: it runs on sizes that "
            f"are multiples of {multiple} (such as {fit}); pad each image to such a size and score "
            f"it on its own grid ({option('size_multiple', multiple)}), or resize every image "
            f"({option('input_size', ','.join(map(str, fit)))})")


def accepted_multiple(session: Any, input_name: str, input_shape: Sequence[int],
                      spatial_axes: Sequence[int], *, largest: int = 128) -> int | None:
    """The smallest ``m`` (a power of two up to ``largest``) such that the model runs on
    the input padded up to multiples of ``m`` on every spatial axis; None when none does.

    Asked only after a run failed: each try runs the model once on a zero input of one case.
    """
    shape = list(int(d) for d in input_shape)
    shape[0] = session.fixed_batch or 1
    m = 2
    while m <= largest:
        trial = list(shape)
        for ax in spatial_axes:
            trial[ax] = int(math.ceil(shape[ax] / m) * m)
        if trial == shape:  # already a multiple of m: it failed as it is
            m *= 2
            continue
        try:
            session.run({input_name: _zeros(session.input_types.get(input_name), trial)})
            return m
        except Exception:  # noqa: BLE001 - any failure: this size is not accepted either
            m *= 2
    return None
