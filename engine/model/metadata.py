"""The metadata protoseg stores inside an ONNX file (the model card on disk).

Exporters write it; the engine reads it. It lives in ``ModelProto.metadata_props`` under
the key :data:`METADATA_KEY` as one JSON object::

    {
      "encoding-type": "protoseg-model-card",
      "encoding-version": "1",
      "framework": "torch" | "tensorflow" | "onnx" | ...,
      "source": "free text: the model's origin (module path, file name)",
      "input":  {"name": "img", "layout": "NCHW" | "NHWC" | "NCDHW" | "NDHWC",
                 "size": [128, 128, 128] | null,           # spatial size the model expects
                 "orientation": "RAS" | "LPS" | ... | "zyx" | ... | null},  # voxel axis order it expects
      "prediction": {"output": "prob",                     # graph output holding the prediction
                     "activation": "sigmoid" | "softmax" | "logits",
                     "layout": "NCHW" | "NHWC" | ... | null,   # null: same as input
                     "classes": [1] | null,                # classes scored one-vs-rest
                     "threshold": 0.5},
      "preprocessing": {"resize": true,                    # resize images to input.size
                        "scaling": "none" | "minmax" | "zscore" | "meanstd",
                        "mean": [..] | null, "std": [..] | null,
                        "normalization": [{"kind": "ct", "clip": [lo, hi],   # per channel,
                                           "mean": m, "std": s}, ...] | null},  # replaces scaling
      "hidden": {"<onnx tensor name>": {"layer": "<framework layer name>",
                                        "layout": "NCHW" | "NHWC" | ...}}
    }

``activation`` describes what the prediction output already holds: ``sigmoid`` —
foreground probabilities (one channel per class); ``softmax`` — class probabilities
summing to one over the channel axis; ``logits`` — raw scores (sigmoid applied for one
channel, softmax over channels otherwise). ``input.orientation`` (three axis codes, one of
R/L, A/P, S/I each, as :func:`nibabel.aff2axcodes` names them) says the model was trained on
volumes whose voxel axes run that way: a run brings every 3-D case with an affine to it
(flips and permutations, no resampling). It may instead be a permutation of ``"xyz"`` — the
voxel axes of each image file as stored — naming the file axes the model takes, in order
(``"zyx"``: each file's axes reversed, as nnU-Net's default readers give them): a run
permutes every 3-D case with an affine so (no flips). ``preprocessing.normalization`` is a per-channel
intensity normalisation (one entry for every channel, or one per channel; see
:data:`NORMALIZATION_KINDS`) that replaces ``scaling``; ``ct`` is nnU-Net's
``CTNormalization``. Every key is optional except the encoding pair; what is missing is
inferred by :mod:`engine.model.card`, which says what it assumed.
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
    "NORMALIZATION_KINDS",
    "FILE_AXES",
    "check_orientation",
    "file_axis_order",
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
#: Per-channel normalisations of ``preprocessing.normalization`` and the keys each takes:
#: ``ct`` clip to ``clip`` = [lo, hi], then (x - mean) / max(std, 1e-8) (nnU-Net's
#: CTNormalization); ``zscore`` (x - mean) / max(std, 1e-8) over the case (nnU-Net's
#: ZScoreNormalization without a mask); ``zscore_nonzero`` the same inside the case's nonzero
#: mask only, the outside kept (nnU-Net's ZScoreNormalization with ``use_mask_for_norm``: the
#: mask is the union over channels of the nonzero voxels, holes filled); ``minmax`` to [0, 1];
#: ``meanstd`` (x - mean) / std with given values; ``none`` as is.
NORMALIZATION_KINDS: dict[str, tuple[str, ...]] = {
    "ct": ("clip", "mean", "std"),
    "zscore": (),
    "zscore_nonzero": (),
    "minmax": (),
    "meanstd": ("mean", "std"),
    "none": (),
}
_AXIS_PAIRS = ("RL", "AP", "SI")
#: The voxel axes of an image file as stored (NIfTI's i, j, k; nibabel's and pynrrd's array
#: axes): an ``orientation`` that permutes these letters names the file axes a model takes.
FILE_AXES = "xyz"


def check_orientation(codes: Any, *, what: str = "orientation", file_axes: bool = False) -> str:
    """Three axis codes (``"RAS"``, ``"lps"``...) checked and upper-cased; with
    ``file_axes``, also a permutation of :data:`FILE_AXES` (``"zyx"``...), lower-cased.

    Each anatomical letter names the world direction toward which a voxel axis increases; the
    three letters take one of R/L, one of A/P and one of S/I, in any order. A permutation of
    ``"xyz"`` names, for each axis the model takes, the voxel axis of the image file it is
    (``x`` the file's first axis as stored): ``"zyx"`` is each file's axes reversed, what
    SimpleITK's ``GetArrayFromImage`` (and so nnU-Net's default readers) give. ``"xyz"``
    itself is refused: file order is no orientation (None).

    Parameters
    ----------
    codes : str
    what : str
        The option's name, for the error message.
    file_axes : bool, default False
        Accept a permutation of ``"xyz"`` (the model card's ``orientation``, a dataset's
        ``reorient``); anatomical codes only otherwise.

    Raises
    ------
    ValueError
        Anything else (the message names what was received and gives examples).

    Examples
    --------
    >>> check_orientation("lps")
    'LPS'
    >>> check_orientation("ZYX", file_axes=True)
    'zyx'
    """
    if isinstance(codes, str):
        text = codes.strip()
        if file_axes and text.lower() != FILE_AXES and sorted(text.lower()) == sorted(FILE_AXES):
            return text.lower()
        text = text.upper()
        if len(text) == 3 and all(sum(c in pair for c in text) == 1 for pair in _AXIS_PAIRS):
            return text
    raise ValueError(f"{what}={codes!r}: expected 3 axis codes, one of R/L, one of A/P and one of "
                     "S/I (e.g. 'RAS', 'LPS', 'PIR')"
                     + (", or a permutation of the file's voxel axes 'xyz' (e.g. 'zyx': each file's "
                        "axes reversed, as nnU-Net reads images; 'xyz' itself is file order: set no "
                        "orientation)" if file_axes else ""))


def file_axis_order(orientation: str | None) -> tuple[int, ...] | None:
    """The file axes an ``orientation`` that permutes :data:`FILE_AXES` names, as indices
    (``"zyx"`` → ``(2, 1, 0)``); None for anatomical codes and None.

    Examples
    --------
    >>> file_axis_order("yzx"), file_axis_order("RAS")
    ((1, 2, 0), None)
    """
    if orientation is None or sorted(orientation) != sorted(FILE_AXES):
        return None
    return tuple(FILE_AXES.index(c) for c in orientation)


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
