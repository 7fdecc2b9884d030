"""The model card: how to feed a model and how to read its prediction.

A :class:`ModelCard` says which graph input takes the image and in which layout, the
spatial size the model expects, how images are scaled, which graph output is the prediction,
what it holds (sigmoid probabilities, softmax probabilities or logits), which classes are
scored, and the layout of every hidden tensor.

:func:`resolve_model_card` merges three sources, later ones winning field by field:
the protoseg metadata stored in the ONNX file (written by our exporters, see
:mod:`engine.model.metadata`) < a TOML file < an overrides dict. Whatever none of them gives is
inferred from the graph, and every inferred field adds one human sentence to
``card.assumed``.

TOML files and override dicts use either the metadata's nested form or flat field names::

    # card.toml
    [input]
    layout = "NDHWC"
    size = [128, 128, 128]
    [prediction]
    output = "prob"
    activation = "sigmoid"
    [preprocessing]
    scaling = "minmax"

    resolve_model_card(model, overrides={"layout": "NDHWC", "scaling": "minmax"})

Two fields say what medical-imaging frameworks do around the network (issue 17):
``[input] orientation = "RAS"`` (the axis codes the model expects; a run reorients every 3-D
case with an affine to them; or ``"zyx"``, a permutation of each file's voxel axes, as
nnU-Net's readers feed the network) and ``[preprocessing] normalization = [{kind = "ct", clip = [-95.0,
250.0], mean = 80.5, std = 60.25}]`` (per channel; nnU-Net's CTNormalization), which replaces
``scaling``: a later source giving one of the two drops what an earlier source gave of the other.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import option
from engine.model.graph import CHANNELS_FIRST_OPS, load_model
from engine.model.metadata import (ACTIVATIONS, LAYOUTS, NORMALIZATION_KINDS, SCALINGS, check_orientation,
                                   read_metadata)
from engine.resize import resize_linear

__all__ = ["ModelCard", "resolve_model_card", "FIELDS"]

_CHANNELS_LAST = ("NWC", "NHWC", "NDHWC")
_BY_RANK = {3: ("NCW", "NWC"), 4: ("NCHW", "NHWC"), 5: ("NCDHW", "NDHWC")}
#: Ops that only move data around: looked through when finding the prediction's activation.
PASS_THROUGH_OPS = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Cast",
                           "Flatten", "Slice", "Resize", "Upsample", "Pad"})

#: Flat field names accepted in overrides and TOML (``hidden`` maps to both hidden dicts).
FIELDS = ("input_name", "layout", "input_size", "channels", "prediction_output",
          "prediction_layout", "activation", "classes", "threshold", "resize", "scaling",
          "mean", "std", "hidden_layers", "hidden_layouts", "size_multiple", "orientation",
          "normalization")
_NESTED = {
    "input": {"name": "input_name", "layout": "layout", "size": "input_size", "channels": "channels",
              "size_multiple": "size_multiple", "orientation": "orientation"},
    "prediction": {"output": "prediction_output", "activation": "activation",
                   "layout": "prediction_layout", "classes": "classes", "threshold": "threshold"},
    "preprocessing": {"resize": "resize", "scaling": "scaling", "mean": "mean", "std": "std",
                      "normalization": "normalization"},
}
#: nnU-Net's floor on a standard deviation it divides by (``max(std, 1e-8)``).
STD_FLOOR = 1e-8
#: ``extra``: what an exporter records about the model's origin (class names, spacing, the
#: framework's preprocessing) that the engine does not read.
_IGNORED = {"encoding-type", "encoding-version", "framework", "source", "extra"}


def _is_channels_last(layout: str) -> bool:
    return layout in _CHANNELS_LAST


@dataclass
class ModelCard:
    """How to feed a model and read its prediction (see the module docstring).

    Attributes
    ----------
    input_name : str
        Graph input that takes the image.
    layout : str
        Input layout, one of ``NCW NWC NCHW NHWC NCDHW NDHWC``.
    input_size : tuple of int or None
        Spatial size the model expects; ``None`` when it takes any size.
    channels : int
        Image channels.
    prediction_output : str
        Graph output holding the prediction.
    activation : str
        What the prediction holds: ``sigmoid`` | ``softmax`` (probabilities) or ``logits``.
    classes : tuple of int
        Classes scored one-vs-rest: output channel indices; for a one-channel output
        ``0`` and ``1`` both name its single (foreground) channel.
    threshold : float
        Probability threshold of the prediction.
    resize : bool
        Resize images to ``input_size`` in :meth:`preprocess`.
    scaling : str
        ``none`` | ``minmax`` | ``zscore`` | ``meanstd`` (per channel).
    mean, std : tuple of float or None
        Per-channel (or single) values for ``meanstd``.
    hidden_layers, hidden_layouts : dict
        Hidden tensor name → framework layer name / layout (from exporter metadata).
    prediction_layout : str or None
        Layout of the prediction output; ``None`` means the input's layout.
    assumed : list of str
        One sentence per field that was inferred rather than given.
    size_multiple : tuple of int or None
        Per spatial axis, the number the model's input sizes must be multiples of (the
        product of a U-Net's pooling strides); ``None`` when not known. Never inferred.
        :meth:`preprocess` pads an image whose size is not such a multiple with zeros at the
        end of each axis (after scaling, as nnU-Net pads); scoring crops back
        (:meth:`padded_size`), so SA is computed on the image's own grid.
    orientation : str or None
        Axis codes (``"RAS"``, ``"LPS"``...) of the volumes the model was trained on: a run
        brings every 3-D case with an affine (NIfTI, NRRD) to them, by flips and
        permutations only (``protoseg score --reorient``/``--no-reorient`` override it);
        or a permutation of ``"xyz"``, each file's voxel axes as stored, naming the file
        axes the model takes in order (``"zyx"``: reversed, SimpleITK's array view, which
        nnU-Net's default readers feed the network; every case keeps its own orientation,
        its axes permuted: an RAS file is fed as SAR, an LPS file as SPL; see
        :func:`engine.model.metadata.check_orientation`); ``None``: voxels in file order.
        3-D layouts only. Never inferred.
    normalization : tuple of dict or None
        Per-channel intensity normalisation applied by :meth:`preprocess` instead of
        ``scaling`` (one entry for every channel, or one per channel), each
        ``{"kind": k, ...}`` with ``k`` in :data:`engine.model.metadata.NORMALIZATION_KINDS`:
        ``{"kind": "ct", "clip": [lo, hi], "mean": m, "std": s}`` is nnU-Net's
        ``CTNormalization``; ``zscore``, ``minmax``, ``meanstd`` (``mean``, ``std``) and
        ``none`` as the scalings of the same names. Set, it needs ``scaling="none"``.
    """

    input_name: str
    layout: str
    input_size: tuple[int, ...] | None
    channels: int
    prediction_output: str
    activation: str
    classes: tuple[int, ...]
    threshold: float = 0.5
    resize: bool = True
    scaling: str = "none"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    hidden_layers: dict[str, str] = field(default_factory=dict)
    hidden_layouts: dict[str, str] = field(default_factory=dict)
    prediction_layout: str | None = None
    assumed: list[str] = field(default_factory=list)
    size_multiple: tuple[int, ...] | None = None
    orientation: str | None = None
    normalization: tuple[dict[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- properties ---------------------------------------------------------------------
    @property
    def spatial_ndim(self) -> int:
        """Number of spatial axes (1, 2 or 3)."""
        return len(self.layout) - 2

    @property
    def output_layout(self) -> str:
        """Layout of the prediction output (the input's when not given)."""
        return self.prediction_layout or self.layout

    # -- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise a one-line ``ValueError``/``TypeError`` on the first bad one."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not a known layout; expected one of {list(LAYOUTS)}")
        if self.prediction_layout is not None and (
                self.prediction_layout not in LAYOUTS or len(self.prediction_layout) != len(self.layout)):
            raise ValueError(
                f"prediction_layout={self.prediction_layout!r}; expected a layout with "
                f"{self.spatial_ndim} spatial axes ({[l for l in LAYOUTS if len(l) == len(self.layout)]}) or None")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {list(ACTIVATIONS)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling={self.scaling!r}; expected one of {list(SCALINGS)}")
        if not isinstance(self.channels, (int, np.integer)) or self.channels < 1:
            raise ValueError(f"channels={self.channels!r}; expected a positive integer")
        if self.input_size is not None:
            size = tuple(self.input_size)
            if len(size) != self.spatial_ndim or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
                raise ValueError(
                    f"{option('input_size', ','.join(map(str, size)))}: expected {self.spatial_ndim} "
                    f"positive integers for layout {self.layout} (or none for any size)")
            self.input_size = tuple(int(s) for s in size)
        if self.size_multiple is not None:
            multiple = tuple(np.atleast_1d(self.size_multiple).tolist())
            if len(multiple) == 1:  # one number for every spatial axis
                multiple *= self.spatial_ndim
            if len(multiple) != self.spatial_ndim or not all(
                    isinstance(m, (int, np.integer)) and m > 0 for m in multiple):
                raise ValueError(
                    f"{option('size_multiple', ','.join(map(str, multiple)))}: expected one or "
                    f"{self.spatial_ndim} positive integers for layout {self.layout} (or none)")
            self.size_multiple = tuple(int(m) for m in multiple)
        self.classes = tuple(int(c) for c in self.classes)
        if not self.classes or min(self.classes) < 0:
            raise ValueError(f"classes={self.classes!r}; expected one or more non-negative channel indices")
        if not isinstance(self.threshold, (int, float)) or not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold={self.threshold!r}; expected a number strictly between 0 and 1")
        self.threshold = float(self.threshold)
        self.resize = bool(self.resize)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in np.atleast_1d(np.asarray(value, dtype=float)))
                if len(value) not in (1, self.channels):
                    raise ValueError(f"{name} has {len(value)} values; expected 1 or channels={self.channels}")
                setattr(self, name, value)
        if self.scaling == "meanstd" and (self.mean is None or self.std is None):
            raise ValueError("scaling='meanstd' needs mean and std (one value, or one per channel); "
                             "set both, or choose scaling 'zscore'")
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError(f"std={self.std!r} contains 0; expected non-zero values")
        if isinstance(self.orientation, str) and self.orientation.strip().lower() in ("", "none"):
            self.orientation = None
        if self.orientation is not None:
            self.orientation = check_orientation(self.orientation, file_axes=True)
            if self.spatial_ndim != 3:
                raise ValueError(
                    f"orientation={self.orientation!r} applies to 3-D models, but layout {self.layout} "
                    f"has {self.spatial_ndim} spatial axes; remove orientation from the model card")
        self.normalization = _check_normalization(self.normalization, self.channels)
        if self.normalization is not None and self.scaling != "none":
            raise ValueError(
                f"scaling={self.scaling!r} and a per-channel normalization are both set; the "
                "normalization replaces scaling: set scaling 'none', or drop the normalization "
                "(normalization 'none')")

    # -- conversion ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field (tuples as lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def channel_indices(self, n_channels: int) -> list[int]:
        """Output channels read for ``classes`` on a prediction with ``n_channels`` channels.

        With several channels, class ``c`` is channel ``c``. With one channel (a binary
        model) that channel is the foreground, whether the class is written ``0`` (its
        channel index) or ``1`` (the foreground label, as exporters write it).

        Raises
        ------
        ValueError
            When a class has no channel.
        """
        if n_channels == 1 and all(c in (0, 1) for c in self.classes):
            return [0] * len(self.classes)
        if max(self.classes) >= n_channels:
            valid = "0 or 1 (the only channel)" if n_channels == 1 else f"0..{n_channels - 1}"
            raise ValueError(
                f"classes={list(self.classes)} but the prediction has {n_channels} channel(s); "
                f"choose classes among {valid}")
        return list(self.classes)

    def layout_of(self, name: str) -> str | None:
        """Layout of a named tensor: the input, the prediction or a hidden tensor (None if unknown)."""
        if name == self.input_name:
            return self.layout
        if name == self.prediction_output:
            return self.output_layout
        return self.hidden_layouts.get(name)

    def to_channels_first(self, tensor: np.ndarray, name: str | None = None) -> np.ndarray:
        """View a batch of a named tensor as (B, C, *spatial).

        Parameters
        ----------
        tensor : numpy.ndarray
            Batch of a hidden tensor, the input or the prediction (batch on axis 0).
        name : str, optional
            Its ONNX name; the layout comes from the card (channels-first when unknown:
            ONNX computes channels-first, even inside converted NHWC models).

        Returns
        -------
        numpy.ndarray
            A view (``np.moveaxis``, no copy) when the tensor is channels-last.

        Raises
        ------
        ValueError
            When the rank does not fit the tensor's layout.
        """
        tensor = np.asarray(tensor)
        layout = self.layout_of(name) if name is not None else None
        if layout is None:
            if tensor.ndim < 3:
                raise ValueError(f"tensor {name!r} has shape {tensor.shape}; expected (B, C, *spatial), rank >= 3")
            return tensor
        if tensor.ndim != len(layout):
            raise ValueError(
                f"tensor {name!r} has shape {tensor.shape} (rank {tensor.ndim}); its layout {layout} "
                f"needs rank {len(layout)} with the batch axis first")
        return np.moveaxis(tensor, -1, 1) if _is_channels_last(layout) else tensor

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Turn one channels-first image into the model's input for one case.

        Parameters
        ----------
        image : numpy.ndarray
            One case, shape (C, *spatial), channels-first.

        Returns
        -------
        numpy.ndarray
            float32, in the model's layout, without the batch axis: resized to
            ``input_size`` (linear, half-pixel centres) when ``resize`` is set, then scaled.

        Raises
        ------
        ValueError
            Wrong rank or channel count, or a size the model cannot take without resizing.

        Notes
        -----
        Scaling is per channel: ``minmax`` → (x - min) / (max - min) (a constant channel
        becomes 0); ``zscore`` → (x - mean) / max(std, 1e-8) over the case, as nnU-Net's
        ``ZScoreNormalization`` without a mask (a constant channel becomes 0); ``meanstd`` →
        (x - mean[c]) / std[c] with the card's values. A ``normalization`` applies its kind
        per channel instead; ``ct`` (nnU-Net's ``CTNormalization``) →
        (clip(x, lo, hi) - mean) / max(std, 1e-8) with the card's values; ``zscore_nonzero``
        (nnU-Net's ``ZScoreNormalization`` with ``use_mask_for_norm``) → the z-score inside the
        holes-filled union over channels of the nonzero voxels, the outside kept. Statistics are
        taken in float64. Scaling never turns NaN or Inf into numbers: a channel holding one
        gives non-finite statistics (or, for ``ct``, keeps its NaN and ±Inf values) and
        stays non-finite. ``minmax`` and ``meanstd`` are evaluated in float64 one cache-sized
        chunk at a time (no float64 copy of the case), bit for bit what the whole-array
        float64 expressions give.
        """
        x = np.asarray(image)
        if x.ndim != self.spatial_ndim + 1:
            hint = " (add a channel axis: image[None])" if x.ndim == self.spatial_ndim else ""
            raise ValueError(
                f"image has shape {x.shape}; expected (C, *spatial) with {self.spatial_ndim} spatial "
                f"axes for layout {self.layout}{hint}")
        if x.shape[0] != self.channels:
            raise ValueError(
                f"image has {x.shape[0]} channels (shape {x.shape}); the model takes {self.channels}; "
                "convert the image or set channels in the model card")
        x = x.astype(np.float32, copy=False)
        spatial = tuple(x.shape[1:])
        if self.input_size is not None and spatial != self.input_size:
            if not self.resize:
                raise ValueError(
                    f"image spatial size {spatial} differs from the model's input size {self.input_size} "
                    f"and the model card does not resize; resample the images, or resize them all "
                    f"({option('input_size', ','.join(map(str, self.input_size)))})")
            x = np.asarray(resize_linear(x, self.input_size), dtype=np.float32)
        if self.scaling != "none" or self.normalization is not None:
            x = self._scale(x)
        padded = self.padded_size(tuple(x.shape[1:]))
        if padded != tuple(x.shape[1:]):
            x = np.pad(x, [(0, 0)] + [(0, p - s) for p, s in zip(padded, x.shape[1:])])
        if _is_channels_last(self.layout):
            x = np.moveaxis(x, 0, -1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def padded_size(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial size the model is fed for an image of ``spatial`` (after any resize):
        each axis rounded up to the card's ``size_multiple``; unchanged without one."""
        if self.size_multiple is None:
            return tuple(int(s) for s in spatial)
        return tuple(-(-int(s) // int(m)) * int(m) for s, m in zip(spatial, self.size_multiple))

    def _scale(self, x: np.ndarray) -> np.ndarray:
        if self.normalization is None and self.scaling in ("minmax", "meanstd"):
            # elementwise in float64 one cache-sized chunk at a time: no float64 copy of the case
            return (_minmax_float32(x) if self.scaling == "minmax" else
                    _shift_scale_float32(x, _per_channel(self.mean, x.shape[0]),
                                         _per_channel(self.std, x.shape[0])))
        x64 = x.astype(np.float64)
        if self.normalization is not None:
            norm = self.normalization
            out = np.empty_like(x64)
            specs = [norm[c] if len(norm) > 1 else norm[0] for c in range(x64.shape[0])]
            inside = _nonzero_mask(x64) if any(sp["kind"] == "zscore_nonzero" for sp in specs) else None
            for c, spec in enumerate(specs):
                if spec["kind"] == "zscore_nonzero":
                    out[c] = _zscore_inside(x64[c], inside)
                else:
                    out[c] = _normalize_channel(x64[c:c + 1], spec)[0]
            return out.astype(np.float32)
        if self.scaling == "meanstd":  # kept as the reference of _shift_scale_float32 (tests)
            shape = (-1,) + (1,) * (x.ndim - 1)
            mean = np.asarray(self.mean, dtype=np.float64).reshape(shape)
            std = np.asarray(self.std, dtype=np.float64).reshape(shape)
            return ((x64 - mean) / std).astype(np.float32)
        return _normalize_channel(x64, {"kind": self.scaling}).astype(np.float32)

    def to_probability(self, outputs: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """Foreground probability per scored class, channels-first.

        Parameters
        ----------
        outputs : dict or numpy.ndarray
            ``Session.run`` results (the prediction output is taken by name) or the
            prediction array itself, batch first, in ``output_layout``. An output without
            a channel axis (rank = spatial + 1) is read as one channel.

        Returns
        -------
        numpy.ndarray
            float32 (B, len(classes), *spatial).

        Raises
        ------
        ValueError
            When the prediction output is missing, its rank is wrong, or a class index is
            beyond its channels.

        Notes
        -----
        ``sigmoid``/``softmax``: the output's channels for ``classes`` as they are.
        ``logits``: sigmoid for a one-channel output, else softmax over channels, then the
        channels for ``classes``.
        """
        if isinstance(outputs, Mapping):
            if self.prediction_output not in outputs:
                raise ValueError(
                    f"prediction output {self.prediction_output!r} is not among the outputs "
                    f"{sorted(outputs)}; run the session with it or fix prediction_output")
            y = np.asarray(outputs[self.prediction_output])
        else:
            y = np.asarray(outputs)
        layout = self.output_layout
        if y.ndim == len(layout) - 1:
            y = y[:, None]
        elif y.ndim == len(layout):
            y = np.moveaxis(y, -1, 1) if _is_channels_last(layout) else y
        else:
            raise ValueError(
                f"prediction {self.prediction_output!r} has shape {y.shape}; expected rank "
                f"{len(layout)} ({layout}) or {len(layout) - 1} without a channel axis")
        n = y.shape[1]
        channels = self.channel_indices(n)
        if self.activation != "logits":  # the chosen channels as they are (float32 exactly as via float64)
            return np.ascontiguousarray(y[:, channels], dtype=np.float32)
        y = y.astype(np.float64)
        if self.activation == "logits":
            if n == 1:
                y = 0.5 * (1.0 + np.tanh(0.5 * y))  # stable sigmoid
            else:
                y = np.exp(y - y.max(axis=1, keepdims=True))
                y /= y.sum(axis=1, keepdims=True)
        return np.ascontiguousarray(y[:, channels], dtype=np.float32)


def _nonzero_mask(x64: np.ndarray) -> np.ndarray:
    """nnU-Net's ``create_nonzero_mask``: voxels nonzero in any channel of (C, *spatial), holes
    filled (``scipy.ndimage.binary_fill_holes``). NaN counts as nonzero, so it reaches the
    statistics and keeps them non-finite."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(np.any(x64 != 0, axis=0))


def _zscore_inside(channel: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """nnU-Net's ``ZScoreNormalization`` with ``use_mask_for_norm``: (x - mean) / max(std, 1e-8)
    with the statistics of, and applied to, the voxels ``inside`` the nonzero mask; the
    outside (zero in every channel) is kept. An empty mask leaves the channel as it is."""
    out = channel.copy()
    values = channel[inside]
    if values.size:
        sd = values.std()
        out[inside] = 0.0 if sd == 0 else (values - values.mean()) / max(sd, STD_FLOOR)
    return out


#: float64 values per chunk of :func:`_shift_scale_float32` (128 KiB: stays in the L2 cache).
_CHUNK = 1 << 14


def _per_channel(values: tuple[float, ...] | None, channels: int) -> np.ndarray:
    """A card's ``mean``/``std`` (one value, or one per channel) as float64 per channel."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.broadcast_to(v, (channels,)) if v.size == 1 else v


def _shift_scale_float32(x: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``((x.astype(float64) - shift[c]) / scale[c]).astype(float32)`` per channel ``c`` of
    ``x`` (C, *spatial), bit for bit, without the float64 copy of the whole case: each chunk
    of :data:`_CHUNK` values is cast to float64, shifted, divided and rounded to float32 in a
    buffer that stays in the cache (the same IEEE operations in the same order; NumPy has no
    fused multiply-add here). A channel whose ``scale`` is NaN becomes NaN and one whose
    ``scale`` is 0 becomes 0, as :func:`_normalize_channel`'s minmax treats a NaN or zero span."""
    out = np.empty(x.shape, dtype=np.float32)
    buf = np.empty(max(1, min(_CHUNK, out[0].size)), dtype=np.float64)
    for c in range(x.shape[0]):
        src = x[c].reshape(-1)
        dst = out[c].reshape(-1)
        a, b = float(shift[c]), float(scale[c])
        if np.isnan(b):
            dst.fill(np.nan)
            continue
        if b == 0:  # a constant channel
            dst.fill(0.0)
            continue
        for s in range(0, src.size, buf.size):
            part = src[s:s + buf.size]
            t = buf[:part.size]
            t[...] = part
            np.subtract(t, a, out=t)
            np.divide(t, b, out=t)
            dst[s:s + part.size] = t
    return out


def _minmax_float32(x: np.ndarray) -> np.ndarray:
    """``_normalize_channel(x.astype(float64), {"kind": "minmax"}).astype(float32)`` bit for
    bit (tests/engine/model/test_card_scaling_fused.py), for float32 ``x`` (C, *spatial).

    The extremes are taken on the float32 values (widening is exact and monotonic, and NaN
    propagates alike), so no float64 copy is made. Only the sign of a zero minimum can differ
    between the two reductions, and it changes the result only at voxels holding -0.0
    (``-0.0 - (+0.0)`` is -0.0, ``-0.0 - (-0.0)`` is +0.0): when a channel's minimum is zero
    and it holds a -0.0, the minima are taken in float64 as before."""
    axes = tuple(range(1, x.ndim))
    lo = x.min(axis=axes).astype(np.float64)
    hi = x.max(axis=axes).astype(np.float64)
    if any(lo[c] == 0 and np.signbit(x[c]).any() for c in range(x.shape[0])):
        lo = x.astype(np.float64).min(axis=axes)
    span = hi - lo
    # a span <= 0 (constant channel) gives 0; a NaN span gives NaN (see _shift_scale_float32)
    return _shift_scale_float32(x, lo, span)


def _normalize_channel(x64: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """One normalisation ``spec`` (a checked entry of ``normalization``) applied to float64
    ``x64`` (C, *spatial), each channel with its own statistics."""
    kind = spec["kind"]
    axes = tuple(range(1, x64.ndim))
    if kind == "minmax":
        lo = x64.min(axis=axes, keepdims=True)
        span = x64.max(axis=axes, keepdims=True) - lo
        # a constant channel becomes 0; a NaN span (NaN in the channel) keeps NaN
        return np.divide(x64 - lo, span, out=np.where(np.isnan(span), np.nan, np.zeros_like(x64)),
                         where=span > 0)
    if kind == "zscore":  # nnU-Net's ZScoreNormalization (no mask): (x - mean) / max(std, 1e-8)
        mu = x64.mean(axis=axes, keepdims=True)
        sd = x64.std(axis=axes, keepdims=True)
        out = (x64 - mu) / np.maximum(sd, STD_FLOOR)  # a NaN std stays NaN
        return np.where(sd == 0, 0.0, out)  # a constant channel: exactly 0, not rounding / 1e-8
    if kind == "ct":  # nnU-Net's CTNormalization: clip to the foreground percentiles, then z
        lo, hi = spec["clip"]
        clipped = np.where(np.isinf(x64), x64, np.clip(x64, lo, hi))  # ±Inf stays non-finite
        return (clipped - spec["mean"]) / max(float(spec["std"]), STD_FLOOR)
    if kind == "meanstd":
        return (x64 - spec["mean"]) / spec["std"]
    return x64  # none


def _check_normalization(value: Any, channels: int) -> tuple[dict[str, Any], ...] | None:
    """``normalization`` checked: None, or one dict (every channel) or one per channel, each
    with a known ``kind`` and exactly the keys that kind takes, as finite floats."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    entries = [value] if isinstance(value, Mapping) else value
    if isinstance(entries, (str, bytes)) or not isinstance(entries, (list, tuple)):
        raise TypeError(f"normalization={value!r}: expected a list of per-channel tables such as "
                        "[{kind = 'ct', clip = [-95, 250], mean = 80.5, std = 60.2}], or none")
    if not entries:
        return None
    if len(entries) not in (1, channels):
        raise ValueError(f"normalization has {len(entries)} entries; expected 1 (every channel) or "
                         f"channels={channels} (one per channel)")
    out = []
    for c, entry in enumerate(entries):
        where = f"normalization[{c}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where}={entry!r}: expected a table with a 'kind' key")
        kind = entry.get("kind")
        if kind not in NORMALIZATION_KINDS:
            raise ValueError(f"{where} has kind={kind!r}; expected one of {list(NORMALIZATION_KINDS)}")
        need = NORMALIZATION_KINDS[kind]
        missing = [k for k in need if entry.get(k) is None]
        extra = sorted(set(entry) - set(need) - {"kind"})
        if missing or extra:
            raise ValueError(f"{where} (kind {kind!r}) has keys {sorted(entry)}; expected kind and "
                             f"{list(need) or 'nothing else'}")
        spec: dict[str, Any] = {"kind": str(kind)}
        for key in need:
            try:
                num = [float(v) for v in entry[key]] if key == "clip" else float(entry[key])
            except (TypeError, ValueError):
                num = None
            nums = num if isinstance(num, list) else [num]
            if num is None or not all(v is not None and np.isfinite(v) for v in nums):
                raise ValueError(f"{where}.{key}={entry[key]!r}: expected finite number(s)")
            spec[key] = num
        if kind == "ct":
            if len(spec["clip"]) != 2 or spec["clip"][0] > spec["clip"][1]:
                raise ValueError(f"{where}.clip={entry['clip']!r}: expected [lo, hi] with lo <= hi")
            if spec["std"] < 0:
                raise ValueError(f"{where}.std={entry['std']!r}: expected a standard deviation >= 0")
        if kind == "meanstd" and spec["std"] == 0:
            raise ValueError(f"{where}.std=0: expected a non-zero divisor")
        out.append(spec)
    return tuple(out)


# ---------------------------------------------------------------------------------------
# resolution

def _flatten(source: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """Nested metadata/TOML form or flat field names → flat field dict."""
    flat: dict[str, Any] = {}
    for key, value in source.items():
        if key in _IGNORED:
            continue
        if key in _NESTED:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise TypeError(f"{origin}: [{key}] must be a table/dict, got {type(value).__name__}")
            for sub, sub_value in value.items():
                if sub not in _NESTED[key]:
                    raise ValueError(
                        f"{origin}: unknown key {key}.{sub!r}; valid: {sorted(_NESTED[key])}")
                if sub_value is not None:
                    flat[_NESTED[key][sub]] = sub_value
        elif key == "hidden":
            for tensor, info in (value or {}).items():
                if isinstance(info, Mapping):
                    if info.get("layer"):
                        flat.setdefault("hidden_layers", {})[tensor] = str(info["layer"])
                    if info.get("layout"):
                        flat.setdefault("hidden_layouts", {})[tensor] = str(info["layout"])
                else:
                    flat.setdefault("hidden_layers", {})[tensor] = str(info)
        elif key in FIELDS:
            if value is not None:
                flat[key] = value
        else:
            valid = sorted(set(FIELDS) | set(_NESTED) | {"hidden"})
            close = difflib.get_close_matches(key, valid, n=3)
            raise ValueError(f"{origin}: unknown model-card key {key!r}; "
                             + (f"did you mean {close}?" if close else f"valid keys: {valid}"))
    return flat


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model-card TOML file not found: {str(p)!r}; check the path")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"model-card TOML file {str(p)!r} is not valid TOML ({exc}); fix the file") from None


def _shape(value_info: Any) -> list[int | str | None]:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _small(dim: Any) -> bool:
    return isinstance(dim, int) and 0 < dim <= 4


def _infer_layout(shape: list[Any], *, first_consumer_perm: list[int] | None = None,
                  fallback: str | None = None) -> tuple[str | None, str]:
    """Layout from a shape: which of axis 1 and the last axis is small (<= 4)."""
    pair = _BY_RANK.get(len(shape))
    if pair is None:
        return None, f"rank {len(shape)}"
    first, last = shape[1], shape[-1]
    if _small(first) and not _small(last):
        return pair[0], f"axis 1 has {first} entries (channels) in shape {shape}"
    if _small(last) and not _small(first):
        return pair[1], f"the last axis has {last} entries (channels) in shape {shape}"
    r = len(shape)
    if first_consumer_perm == [0, r - 1, *range(1, r - 1)]:
        return pair[1], f"the input goes through a Transpose to channels-first (shape {shape})"
    if fallback in pair:
        return fallback, f"shape {shape} is ambiguous; taken as the input's layout"
    return pair[0], f"shape {shape} is ambiguous; channels-first by default"


def _activation_of(graph: Any, output: str) -> tuple[str, str]:
    producers = {o: n for n in graph.node for o in n.output}
    name = output
    for _ in range(16):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in ("Sigmoid", "HardSigmoid"):
            return "sigmoid", f"the output is produced by a {node.op_type} node ({node.name or name!r})"
        if node.op_type in ("Softmax", "LogSoftmax"):
            if node.op_type == "LogSoftmax":
                return "logits", "the output is produced by LogSoftmax (softmax applied to it again)"
            return "softmax", f"the output is produced by a Softmax node ({node.name or name!r})"
        if node.op_type not in PASS_THROUGH_OPS or not node.input:
            return "logits", f"the output is produced by {node.op_type}, not Sigmoid/Softmax"
        name = node.input[0]
    return "logits", "no Sigmoid or Softmax found before the output"


def resolve_model_card(
    model: Any,
    *,
    overrides: Mapping[str, Any] | None = None,
    toml: str | os.PathLike[str] | None = None,
) -> ModelCard:
    """Build the model card: metadata < TOML file < overrides, the rest inferred.

    Parameters
    ----------
    model : onnx.ModelProto or path
        The model (not modified).
    overrides : mapping, optional
        Field values (flat names from :data:`FIELDS`, or the metadata's nested form).
    toml : path, optional
        A TOML file with the same keys.

    Returns
    -------
    ModelCard
        ``card.assumed`` lists, one sentence each, the fields that were inferred.

    Raises
    ------
    ValueError
        Unknown keys or values (layout, activation, scaling...), an input or output name
        that is not in the graph (lists the valid ones), or a prediction that cannot be
        chosen among several outputs.
    FileNotFoundError
        When the TOML file does not exist.

    Notes
    -----
    Each ``_resolve_*`` step fills the fields it owns that none of the sources gave, in
    place, and appends one sentence per inferred field to ``assumed``; the steps run in the
    order of the card (input, preprocessing, prediction, classes, threshold, hidden layouts).

    Examples
    --------
    >>> card = resolve_model_card("deepbrain.onnx", overrides={"scaling": "minmax"})  # doctest: +SKIP
    >>> card.layout, card.assumed[:1]  # doctest: +SKIP
    ('NDHWC', ['input layout NDHWC: the last axis has 1 entries (channels) in shape [...]'])
    """
    proto = load_model(model)
    fields = _merged_fields(proto, toml=toml, overrides=overrides)
    graph = proto.graph
    assumed: list[str] = []
    in_shape, in_spatial = _resolve_input(graph, fields, assumed)
    _resolve_preprocessing(fields, assumed)
    n_out = _resolve_prediction(graph, fields, assumed, in_shape=in_shape, in_spatial=in_spatial)
    _resolve_classes(fields, assumed, n_out=n_out)
    if "threshold" not in fields:
        fields["threshold"] = 0.5
        assumed.append("threshold 0.5 on the foreground probability")
    if fields.get("input_size") is not None:
        fields["input_size"] = tuple(fields["input_size"])
    if fields.get("classes") is not None:
        fields["classes"] = tuple(fields["classes"])
    _resolve_hidden_layouts(graph, fields, assumed)
    return ModelCard(**fields, assumed=assumed)


def _merged_fields(proto: Any, *, toml: str | os.PathLike[str] | None,
                   overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Flat fields from the ONNX metadata < the TOML file < the overrides, field by field."""
    fields: dict[str, Any] = {}
    sources = []
    meta = read_metadata(proto)
    if meta:
        sources.append(_flatten(meta, "ONNX metadata"))
    if toml is not None:
        sources.append(_flatten(_read_toml(toml), f"TOML {str(toml)!r}"))
    if overrides:
        sources.append(_flatten(overrides, "overrides"))
    for flat in sources:
        # scaling and a per-channel normalization replace each other: a later source giving
        # one of them drops what an earlier source gave of the other
        if "normalization" in flat and "scaling" not in flat:
            fields["scaling"] = "none"
        elif "scaling" in flat and "normalization" not in flat:
            fields.pop("normalization", None)
        fields.update(flat)
    return fields


def _resolve_input(graph: Any, fields: dict[str, Any],
                   assumed: list[str]) -> tuple[list[Any], list[Any]]:
    """Fill ``input_name``, ``layout``, ``channels`` and ``input_size``.

    Returns the input's shape and its spatial dimensions (in the layout's order).
    """
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    if "input_name" in fields:
        if fields["input_name"] not in inputs:
            raise ValueError(f"input {fields['input_name']!r} is not a graph input; inputs: {sorted(inputs)}")
    elif len(inputs) == 1:
        fields["input_name"] = next(iter(inputs))
        assumed.append(f"input: {fields['input_name']!r}, the model's only input")
    else:
        raise ValueError(f"the model has {len(inputs)} inputs {sorted(inputs)}; set input_name in the model card")
    in_shape = _shape(inputs[fields["input_name"]])
    if "layout" not in fields:
        layout, why = _infer_layout(in_shape, first_consumer_perm=_input_perm(graph, fields["input_name"]))
        if layout is None:
            raise ValueError(
                f"input {fields['input_name']!r} has shape {in_shape} ({why}); cannot infer a layout: "
                f"set layout to one of {list(LAYOUTS)}")
        fields["layout"] = layout
        assumed.append(f"input layout {layout}: {why}")
    layout = fields["layout"]
    if layout in LAYOUTS and in_shape and len(in_shape) != len(layout):
        raise ValueError(f"layout={layout!r} has rank {len(layout)} but input {fields['input_name']!r} "
                         f"has shape {in_shape}; choose a layout of rank {len(in_shape)}")
    ch_axis = -1 if _is_channels_last(layout) else 1
    spatial_axes = [i for i in range(1, len(in_shape)) if i != (len(in_shape) - 1 if ch_axis == -1 else 1)]
    in_spatial = [in_shape[i] for i in spatial_axes] if in_shape else []
    if "channels" not in fields:
        dim = in_shape[ch_axis] if in_shape else None
        if isinstance(dim, int) and dim > 0:
            fields["channels"] = dim
        else:
            fields["channels"] = 1
            assumed.append("input channels: 1 (the model's channel axis is symbolic)")
    if "input_size" not in fields:
        if in_spatial and all(isinstance(d, int) and d > 0 for d in in_spatial):
            fields["input_size"] = tuple(in_spatial)
        else:
            fields["input_size"] = None
            assumed.append("input size: any (the model's spatial axes are symbolic); images are fed at their own size")
    return in_shape, in_spatial


def _input_perm(graph: Any, input_name: str) -> list[int] | None:
    """The ``perm`` of the Transpose that consumes the input, when only Transposes do
    (Shape and Size consumers aside); else ``None``."""
    consumers = [n for n in graph.node if input_name in n.input]
    perm = None
    if len(consumers) >= 1 and all(n.op_type == "Transpose" for n in consumers
                                   if n.op_type not in ("Shape", "Size")):
        tr = [n for n in consumers if n.op_type == "Transpose"]
        if tr:
            perm = [list(a.ints) for a in tr[0].attribute if a.name == "perm"]
            perm = perm[0] if perm else None
    return perm


def _resolve_preprocessing(fields: dict[str, Any], assumed: list[str]) -> None:
    """Fill ``resize`` (on when the input size is fixed) and ``scaling`` (none)."""
    if "resize" not in fields:
        fields["resize"] = fields["input_size"] is not None
        if fields["resize"]:
            assumed.append(f"preprocessing: images are resized (linear) to the input size {tuple(fields['input_size'])}")
    if "scaling" not in fields:
        fields["scaling"] = "none"
        if fields.get("normalization") is None:
            assumed.append("preprocessing: no intensity scaling (images are fed as read)")


def _resolve_prediction(graph: Any, fields: dict[str, Any], assumed: list[str], *,
                        in_shape: list[Any], in_spatial: list[Any]) -> int | None:
    """Fill ``prediction_output``, ``prediction_layout`` and ``activation``.

    Returns the prediction's number of channels, ``None`` when unknown.
    """
    outputs = {o.name: o for o in graph.output}
    if "prediction_output" in fields:
        if fields["prediction_output"] not in outputs:
            raise ValueError(f"prediction output {fields['prediction_output']!r} is not a graph output; "
                             f"outputs: {sorted(outputs)}")
    elif len(outputs) == 1:
        fields["prediction_output"] = next(iter(outputs))
        assumed.append(f"prediction: {fields['prediction_output']!r}, the model's only output")
    else:
        fields["prediction_output"] = _output_like_input(outputs, in_shape=in_shape, in_spatial=in_spatial)
        assumed.append(f"prediction: {fields['prediction_output']!r}, the only output with the input's spatial shape")
    layout = fields["layout"]
    out_shape = _shape(outputs[fields["prediction_output"]])
    if "prediction_layout" not in fields and len(out_shape) == len(layout):
        out_layout, why = _infer_layout(out_shape, fallback=layout)
        if out_layout != layout:
            fields["prediction_layout"] = out_layout
            assumed.append(f"prediction layout {out_layout}: {why}")
    n_out = _output_channels(out_shape, fields.get("prediction_layout") or layout)
    if "activation" not in fields:
        act, why = _activation_of(graph, fields["prediction_output"])
        fields["activation"] = act
        assumed.append(f"activation {act}: {why}")
    return n_out


def _output_like_input(outputs: Mapping[str, Any], *, in_shape: list[Any], in_spatial: list[Any]) -> str:
    """The one output whose spatial shape is the input's (with or without a channel axis)."""
    matches = []
    if in_spatial and all(isinstance(d, int) for d in in_spatial):
        for name, vi in outputs.items():
            shp = _shape(vi)
            if (len(shp) == len(in_shape) and in_spatial in (shp[2:], shp[1:-1])) or (
                    len(shp) == len(in_shape) - 1 and shp[1:] == in_spatial):
                matches.append(name)
    if len(matches) != 1:
        raise ValueError(
            f"cannot tell which of the outputs {sorted(outputs)} is the prediction "
            f"({len(matches)} have the input's spatial shape); set prediction_output")
    return matches[0]


def _output_channels(out_shape: list[Any], out_layout: str) -> int | None:
    """Channels of an output in ``out_layout`` (1 without a channel axis); ``None`` when unknown."""
    if len(out_shape) == len(out_layout):
        n_out = out_shape[-1 if _is_channels_last(out_layout) else 1]
    elif len(out_shape) == len(out_layout) - 1:
        n_out = 1
    else:
        n_out = None
    return n_out if isinstance(n_out, int) and n_out > 0 else None


def _resolve_classes(fields: dict[str, Any], assumed: list[str], *, n_out: int | None) -> None:
    """Fill ``classes`` from the output's channels (channel 0 the background when there are
    several), or check the given ones against them."""
    if "classes" not in fields:
        if n_out is None or n_out == 1:
            fields["classes"] = (0,)
            what = "one output channel" if n_out == 1 else "unknown output channels"
            assumed.append(f"classes [0]: {what}, scored as the foreground")
        elif n_out == 2:
            fields["classes"] = (1,)
            assumed.append("classes [1]: two output channels, channel 0 taken as the background")
        else:
            fields["classes"] = tuple(range(1, n_out))
            assumed.append(f"classes {list(range(1, n_out))}: {n_out} output channels, channel 0 taken "
                           "as the background, the others scored one-vs-rest")
    elif n_out is not None and max(int(c) for c in fields["classes"]) >= max(n_out, 2):
        valid = "0 or 1 (the only channel)" if n_out == 1 else f"0..{n_out - 1}"
        raise ValueError(f"classes={list(fields['classes'])} but output {fields['prediction_output']!r} "
                         f"has {n_out} channel(s); choose among {valid}")


def _resolve_hidden_layouts(graph: Any, fields: dict[str, Any], assumed: list[str]) -> None:
    """Correct a channels-last hidden layout given for a tensor that a channels-first op
    (Conv, pooling, normalization...) computes, as tf2onnx graphs of Keras models have."""
    layouts = dict(fields.get("hidden_layouts") or {})
    if not layouts:
        return
    producers = {o: n.op_type for n in graph.node for o in n.output}
    for name, lay in layouts.items():
        if _is_channels_last(lay) and producers.get(name) in CHANNELS_FIRST_OPS:
            layouts[name] = {"NWC": "NCW", "NHWC": "NCHW", "NDHWC": "NCDHW"}[lay]
            assumed.append(f"hidden tensor {name!r}: layout {layouts[name]}, not {lay} as given: "
                           f"its {producers[name]} node computes channels-first")
    fields["hidden_layouts"] = layouts
