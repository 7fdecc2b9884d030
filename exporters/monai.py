"""Export a MONAI bundle's network to ONNX with hidden outputs, read through MONAI's ConfigParser.

A MONAI bundle is a folder with ``configs/inference.json`` (or ``.yaml``), whose
``network_def`` entry defines the network, ``configs/metadata.json`` (the
``network_data_format``: input channels and spatial shape, output channels and their names)
and ``models/model.pt`` (the state dict). The network is instantiated by
``monai.bundle.ConfigParser`` exactly as ``monai.bundle`` does it, the weights loaded with
``torch.load(..., weights_only=True)``, and the bundle's post-processing activation
(``Activationsd(softmax=True)`` or ``sigmoid=True``) put into the exported graph. The model
card gets the input channels, the output classes and their names, and the pre-processing
the card can express: ``ScaleIntensityRange`` as ``meanstd`` (its clipping recorded in
``extra``), ``NormalizeIntensity`` as ``zscore`` (or ``meanstd`` with a fixed subtrahend and
divisor), ``ScaleIntensity`` to [0, 1] as ``minmax``, ``Orientation``'s ``axcodes`` as the
card's ``input.orientation`` (3-D); spacing and the sliding-window size go to ``extra``.
monai and torch are imported inside the functions:
``pip install 'protoseg[torch,monai]'``.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.model.metadata import check_orientation
from exporters._common import ExportResult, logger, require

__all__ = ["BundleInfo", "read_bundle", "default_layers", "export"]

_EXTRA = "torch,monai"
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
#: transforms that only load, convert or move data: nothing for the card to say
_FORMAT_ONLY = frozenset({
    "LoadImage", "EnsureChannelFirst", "AddChannel", "AsChannelFirst", "EnsureType", "ToTensor",
    "CastToType", "ToDevice", "Identity", "EnsureTyped", "SaveImage", "CopyItems", "DeleteItems",
    "SelectItems", "ToNumpy", "EnsureSameShape",
})
_MULTIPLE = re.compile(r"^\s*(\d+)\s*\*\s*n\s*$")
#: ``Orientation``'s default ``labels`` (nibabel's): the letters its ``axcodes`` are made of.
_MONAI_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class BundleInfo:
    """What a MONAI bundle says about its network's input and output.

    Attributes
    ----------
    config : pathlib.Path
        The inference config read.
    network_id : str
        The config id of the network definition (``network_def``).
    spatial_dims : int or None
    input_channels : int or None
    output_channels : int or None
    class_names : tuple of str
        Name of each output channel (``channel_def``), empty when not given.
    activation : str
        ``softmax`` / ``sigmoid`` (the post-processing's ``Activations``) or ``logits``.
    scaling : str
        The card's scaling; ``mean``/``std`` for ``meanstd``.
    normalization : tuple of dict or None
        The card's per-channel normalization when ``ScaleIntensityRange(clip=True)`` starts
        the intensity transforms (kind ``ct``: clip, then (x - mean) / std); ``scaling`` is
        then ``none``.
    mean, std : tuple of float or None
    size_multiple : tuple of int or None
        From the metadata's ``spatial_shape`` entries such as ``"16*n"``.
    example_size : tuple of int or None
        The sliding window's ``roi_size``, else the metadata's fixed ``spatial_shape``.
    extra : dict
        Spacing, orientation, clipping, window size, what the card cannot express.
    notes : tuple of str
        Pre-processing the card does not express.
    orientation : str or None
        The card's ``input.orientation``: ``Orientation(d)``'s ``axcodes`` in a 3-D bundle
        (MONAI reads volumes in file voxel order and reorients them to those codes with
        nibabel's conventions); None without that transform, in 2-D, or with other labels.
    """

    config: Path
    network_id: str
    spatial_dims: int | None
    input_channels: int | None
    output_channels: int | None
    class_names: tuple[str, ...]
    activation: str
    scaling: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    size_multiple: tuple[int, ...] | None
    example_size: tuple[int, ...] | None
    extra: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    orientation: str | None = None
    normalization: tuple[dict[str, Any], ...] | None = None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The card's ``preprocessing`` (the bundle feeds images at their size: no resize)."""
        pre: dict[str, Any] = {"resize": False, "scaling": self.scaling,
                               "mean": list(self.mean) if self.mean is not None else None,
                               "std": list(self.std) if self.std is not None else None}
        if self.normalization is not None:
            pre["normalization"] = [dict(n) for n in self.normalization]
        return pre

    @property
    def classes(self) -> list[int] | None:
        """Scored channels: every channel for sigmoid, else all but channel 0 (background)."""
        n = self.output_channels
        if n is None:
            return None
        if n == 1:
            return [1]
        return list(range(n)) if self.activation == "sigmoid" else list(range(1, n))


def _monai() -> Any:
    require("torch", extra=_EXTRA)
    return require("monai.bundle", extra=_EXTRA)


def _config_file(root: Path, config: str | os.PathLike[str] | None) -> Path:
    configs = root / "configs"
    if config is not None:
        path = Path(config)
        for candidate in (path, configs / path, root / path):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"bundle config {os.fspath(config)!r} not found (looked in {str(configs)!r} "
                                f"too); configs there: {_listing(configs)}")
    for name in _CONFIG_NAMES:
        if (configs / name).is_file():
            return configs / name
    raise FileNotFoundError(f"{str(root)!r} is not a MONAI bundle: no configs/inference.json or .yaml "
                            f"(configs found: {_listing(configs)}); pass the bundle folder or --config")


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _parser(root: Path, config_file: Path) -> Any:
    bundle = _monai()
    parser = bundle.ConfigParser()
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    try:
        parser.read_config(str(config_file))
    except ImportError as exc:  # YAML configs need PyYAML
        raise ImportError(f"reading {str(config_file)!r} needs {exc}; pip install 'protoseg[monai]'") from exc
    parser["bundle_root"] = str(root)
    return parser


def _sep() -> str:
    from monai.bundle.utils import ID_SEP_KEY

    return ID_SEP_KEY


def _transforms(parser: Any, key: str) -> tuple[list[tuple[str, str, Mapping[str, Any]]], str | None]:
    """(id, class name, raw dict) of each transform of a Compose entry; and a note when unreadable."""
    sep = _sep()
    if key not in parser:
        return [], None
    raw, base = parser.get(key), key
    for _ in range(8):  # follow "@id" references to the list
        if isinstance(raw, Mapping) and "transforms" in raw:
            raw, base = raw["transforms"], f"{base}{sep}transforms"
        elif isinstance(raw, str) and raw.startswith("@"):
            base = raw[1:]
            raw = parser.get(base)
        else:
            break
    if not isinstance(raw, list):
        return [], f"the bundle's {key!r} is an expression ({str(raw)[:80]!r}); its transforms were not read"
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, Mapping) and isinstance(item.get("_target_"), str):
            out.append((f"{base}{sep}{i}", item["_target_"].rsplit(".", 1)[-1], item))
        elif isinstance(item, str) and item.startswith("@"):
            ref = parser.get(item[1:])
            if isinstance(ref, Mapping) and isinstance(ref.get("_target_"), str):
                out.append((item[1:], ref["_target_"].rsplit(".", 1)[-1], ref))
    return out, None


def _base(name: str) -> str:
    """``ScaleIntensityRanged`` → ``ScaleIntensityRange`` (dictionary transforms end in d/D)."""
    return name[:-1] if name.endswith(("d", "D")) and len(name) > 1 else name


def _value(parser: Any, tid: str, item: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key not in item:
        return default
    return parser.get_parsed_content(f"{tid}{_sep()}{key}")


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    try:
        return [float(v) for v in value]
    except TypeError:
        return [float(value)]


def _preprocessing(parser: Any, key: str = "preprocessing") -> tuple[
        str, Any, Any, tuple[dict[str, Any], ...] | None, dict[str, Any], list[str]]:
    """Scaling, mean, std, normalization, extra and notes from the bundle's pre-processing.

    Notes
    -----
    Affine intensity maps compose: ``ScaleIntensityRange`` y = (x - a_min) / (a_max - a_min)
    * (b_max - b_min) + b_min is ``meanstd`` with s = (a_max - a_min) / (b_max - b_min),
    mean = a_min - b_min * s, std = s; two ``meanstd`` in a row are one. ``zscore`` and
    ``minmax`` forget any earlier affine map. With ``clip=True`` (the first intensity
    transform, increasing) the output is clipped to [b_min, b_max], which is the input
    clipped to [a_min, a_max] before the affine map: the card's per-channel normalization
    ``{"kind": "ct", "clip": [a_min, a_max], "mean": mean, "std": std}`` (nnU-Net's CT form),
    affine maps after it composed into its mean and std.
    """
    transforms, note = _transforms(parser, key)
    notes = [note] if note else []
    extra: dict[str, Any] = {}
    state: tuple[str, Any, Any] = ("none", None, None)
    unexpressed: list[str] = []
    clip: list[float] | None = None  # clipping bounds on the raw intensities, when expressible
    clip_lost: list[str] = []
    for tid, name, item in transforms:
        base = _base(name)
        try:
            if base == "ScaleIntensityRange":
                a_min, a_max = float(_value(parser, tid, item, "a_min")), float(_value(parser, tid, item, "a_max"))
                b_min, b_max = _value(parser, tid, item, "b_min"), _value(parser, tid, item, "b_max")
                if b_min is None or b_max is None:
                    s, m = a_max - a_min, a_min
                else:
                    s = (a_max - a_min) / (float(b_max) - float(b_min))
                    m = a_min - float(b_min) * s
                before = state
                state = _compose(state, [m], [s]) or _unexpressed(unexpressed, name, state)
                if _value(parser, tid, item, "clip", False):
                    extra["clip"] = [a_min, a_max]
                    if before[0] == "none" and state[0] == "meanstd" and a_min <= a_max and s > 0 and clip is None:
                        clip = [a_min, a_max]  # clip(affine(x)) = affine(clip(x)): nnU-Net's CT form
                    else:
                        clip = None
                        clip_lost.append(name)
            elif base == "NormalizeIntensity":
                sub, div = _value(parser, tid, item, "subtrahend"), _value(parser, tid, item, "divisor")
                if sub is not None and div is not None:
                    state = _compose(state, _floats(sub), _floats(div)) or _unexpressed(unexpressed, name, state)
                else:
                    state = ("zscore", None, None)
                if _value(parser, tid, item, "nonzero", False):
                    notes.append(f"{name}(nonzero=True) normalises over the nonzero voxels only; the card's "
                                 "zscore uses the whole image")
            elif base == "ScaleIntensity":
                minv, maxv = _value(parser, tid, item, "minv", 0.0), _value(parser, tid, item, "maxv", 1.0)
                if minv == 0 and maxv == 1 and _value(parser, tid, item, "factor") is None:
                    state = ("minmax", None, None)
                else:
                    unexpressed.append(name)
            elif base == "Spacing":
                extra["spacing"] = _floats(_value(parser, tid, item, "pixdim"))
            elif base == "Orientation":
                axcodes = _value(parser, tid, item, "axcodes")
                extra["orientation"] = "".join(axcodes) if isinstance(axcodes, (list, tuple)) else axcodes
                labels = _value(parser, tid, item, "labels", _MONAI_LABELS)
                if labels is not None and [tuple(p) for p in labels] != [tuple(p) for p in _MONAI_LABELS]:
                    extra["orientation_labels"] = [list(p) for p in labels]
                    notes.append(f"{name} uses the axis labels {extra['orientation_labels']} (not L/R, P/A, "
                                 "I/S): the card sets no orientation; reorient the images as the bundle does")
            elif name not in _FORMAT_ONLY and base not in _FORMAT_ONLY:
                unexpressed.append(name)
        except Exception as exc:  # noqa: BLE001 - a reference the parser cannot resolve offline
            unexpressed.append(name)
            logger.info("bundle transform %s (%s) not read: %s", name, tid, exc)
    if unexpressed:
        extra["not_expressed"] = unexpressed
        notes.append(f"the bundle's pre-processing also runs {unexpressed}, which the model card does not "
                     "express; apply them to the images before scoring")
    scaling, mean, std = state
    if clip is not None and scaling != "meanstd":  # a z-score or min-max after the clipping
        clip_lost.append("ScaleIntensityRange(clip=True)")
        clip = None
    if clip_lost:
        notes.append(f"{clip_lost} clip intensities in a way the model card cannot express (after another "
                     "intensity transform, or followed by a z-score/min-max): it records the affine part "
                     f"(scaling {scaling!r}) and the bounds in extra.clip; clip the images before scoring")
    if clip is not None:
        # ScaleIntensityRange(clip=True) then affine maps = clip to [a_min, a_max], then (x - m) / s
        normalization = tuple({"kind": "ct", "clip": list(clip), "mean": float(m), "std": float(s)}
                              for m, s in zip(mean, std))
        return "none", None, None, normalization, extra, notes
    return scaling, mean, std, None, extra, notes


def _unexpressed(names: list[str], name: str, state: tuple[str, Any, Any]) -> tuple[str, Any, Any]:
    names.append(name)
    return state


def _compose(state: tuple[str, Any, Any], mean: list[float] | None,
             std: list[float] | None) -> tuple[str, Any, Any] | None:
    """The scaling after an affine map (x - mean) / std; ``None`` when no card scaling is it."""
    import numpy as np

    kind, m0, s0 = state
    if mean is None or std is None:
        return None
    if kind == "none":
        return "meanstd", list(mean), list(std)
    if kind == "meanstd":
        m0, s0, m, s = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (m0, s0, mean, std)))
        return "meanstd", (m0 + m * s0).tolist(), (s0 * s).tolist()
    return None  # zscore or minmax followed by an affine map


def _activation(parser: Any) -> tuple[str, str | None]:
    for tid, name, item in _transforms(parser, "postprocessing")[0]:
        if _base(name) == "Activations":
            try:
                if _value(parser, tid, item, "softmax", False):
                    return "softmax", None
                if _value(parser, tid, item, "sigmoid", False):
                    return "sigmoid", None
            except Exception as exc:  # noqa: BLE001
                return "logits", f"the post-processing {name} could not be read ({exc}); the card records logits"
    return "logits", None


def _first(section: Any) -> Mapping[str, Any]:
    if isinstance(section, Mapping) and section:
        value = next(iter(section.values()))
        return value if isinstance(value, Mapping) else {}
    return {}


def read_bundle(folder: str | os.PathLike[str], *, config: str | os.PathLike[str] | None = None,
                network_id: str = "network_def", parser: Any = None) -> BundleInfo:
    """Read a bundle's metadata and inference config (nothing is instantiated but references).

    Parameters
    ----------
    folder : path-like
        The bundle folder (``configs/``, ``models/``).
    config : path-like, optional
        The inference config (a path, or a name in ``configs/``); default
        ``configs/inference.json``, ``.yaml`` or ``.yml``.
    network_id : str
        The config id of the network definition.
    parser : monai.bundle.ConfigParser, optional
        One already holding the config (used by :func:`export`).

    Returns
    -------
    BundleInfo

    Raises
    ------
    FileNotFoundError
        Not a bundle folder (what was found is listed).
    KeyError
        ``network_id`` is not in the config (ids listed).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"MONAI bundle folder {str(root)!r} does not exist")
    config_file = _config_file(root, config)
    parser = parser if parser is not None else _parser(root, config_file)
    if network_id not in parser:
        ids = sorted(k for k in (parser.get() or {}) if not str(k).startswith("_"))
        raise KeyError(f"{str(config_file)!r} has no {network_id!r}; its ids: {ids}; pass the network's id")
    meta_path = root / "configs" / "metadata.json"
    meta: Mapping[str, Any] = {}
    if meta_path.is_file():
        with meta_path.open() as fh:
            meta = json.load(fh)
    fmt = meta.get("network_data_format") or {}
    inp, out = _first(fmt.get("inputs")), _first(fmt.get("outputs"))
    notes: list[str] = []
    shape = inp.get("spatial_shape")
    multiple = fixed = None
    if isinstance(shape, list) and shape:
        found = [_MULTIPLE.match(s) if isinstance(s, str) else None for s in shape]
        if all(found):
            multiple = tuple(int(f.group(1)) for f in found)  # type: ignore[union-attr]
        elif all(isinstance(s, int) for s in shape):
            fixed = tuple(shape)
    roi = None
    if "inferer" in parser and isinstance(parser.get("inferer"), Mapping) and "roi_size" in parser.get("inferer"):
        try:
            roi = tuple(int(v) for v in parser.get_parsed_content(f"inferer{_sep()}roi_size"))
        except Exception as exc:  # noqa: BLE001
            logger.info("inferer roi_size not read: %s", exc)
    net_raw = parser.get(network_id)
    spatial_dims = None
    for candidate in (roi, fixed, multiple):
        if candidate:
            spatial_dims = len(candidate)
            break
    if spatial_dims is None and isinstance(net_raw, Mapping) and "spatial_dims" in net_raw:
        spatial_dims = int(parser.get_parsed_content(f"{network_id}{_sep()}spatial_dims"))
    in_ch = inp.get("num_channels")
    if in_ch is None and isinstance(net_raw, Mapping) and "in_channels" in net_raw:
        in_ch = parser.get_parsed_content(f"{network_id}{_sep()}in_channels")
    out_ch = out.get("num_channels")
    if out_ch is None and isinstance(net_raw, Mapping) and "out_channels" in net_raw:
        out_ch = parser.get_parsed_content(f"{network_id}{_sep()}out_channels")
    channel_def = out.get("channel_def") or {}
    names = tuple(str(channel_def[k]) for k in sorted(channel_def, key=lambda k: int(k))) if channel_def else ()
    activation, act_note = _activation(parser)
    if act_note:
        notes.append(act_note)
    scaling, mean, std, normalization, extra, pre_notes = _preprocessing(parser)
    notes.extend(pre_notes)
    if roi is not None:
        extra["roi_size"] = list(roi)
    orientation = None
    if extra.get("orientation") is not None and "orientation_labels" not in extra:
        try:
            orientation = check_orientation(extra["orientation"], what="Orientation axcodes")
        except ValueError as exc:
            notes.append(f"{exc}; the card sets no orientation")
        if orientation is not None and spatial_dims != 3:
            orientation = None  # not known to be 3-D: the card's orientation is for volumes
    in_names = inp.get("channel_def") or {}
    extra.update({
        "class_names": list(names),
        "channel_names": [str(in_names[k]) for k in sorted(in_names, key=lambda k: int(k))] if in_names else [],
        "bundle": {"name": meta.get("name"), "version": meta.get("version"), "config": config_file.name,
                   "network_id": network_id, "modality": inp.get("modality"), "format": inp.get("format")},
    })
    return BundleInfo(
        config=config_file, network_id=network_id, spatial_dims=spatial_dims,
        input_channels=int(in_ch) if in_ch is not None else None,
        output_channels=int(out_ch) if out_ch is not None else None, class_names=names,
        activation=activation, scaling=scaling,
        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
        size_multiple=multiple, example_size=roi or fixed, extra=extra, notes=tuple(notes),
        orientation=orientation, normalization=normalization,
    )


def _load_weights(torch: Any, net: Any, path: Path) -> None:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"could not load {str(path)!r} with weights_only=True ({type(exc).__name__}: {first}); "
                         "a bundle's models/model.pt holds the network's state dict") from exc
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "network"):
            if key in state and isinstance(state[key], Mapping) and len(state) <= 3:
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} holds {type(state).__name__}; expected the network's state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{str(path)!r} does not fit the bundle's network: {first}") from exc


def _unet_multiple(net: Any, ndim: int) -> tuple[int, ...] | None:
    """Product of the strides of ``monai.networks.nets.UNet`` (its attribute ``strides``)."""
    if type(net).__name__ != "UNet" or not type(net).__module__.startswith("monai."):
        return None
    multiple = [1] * ndim
    for s in getattr(net, "strides", ()):
        per = [int(s)] * ndim if isinstance(s, (int, float)) else [int(v) for v in s]
        multiple = [m * v for m, v in zip(multiple, per)]
    return tuple(multiple)


def default_layers(network: Any, example_input: Any) -> list[str] | None:
    """The stages of MONAI's U-Nets; ``None`` for other networks (the torch exporter's default).

    The torch exporter's generic rule (leaf-most blocks) would expose each MONAI
    ``Convolution``'s convolution and its ADN (norm, dropout, activation) separately. The
    stages are: for ``monai.networks.nets.UNet``, which nests them in ``SkipConnection``
    modules, the outermost ``ResidualUnit``/``Convolution`` blocks (every down and bottom
    unit, every up-sampling convolution and up unit); for ``BasicUNet``, its children
    (``conv_0``, ``down_1``... ``upcat_1``). The block computing the logits is left out.
    """
    kind = type(network).__name__ if type(network).__module__.startswith("monai.") else None
    if kind == "UNet":
        from monai.networks.blocks import Convolution, ResidualUnit

        names = [n for n, m in network.named_modules() if isinstance(m, (Convolution, ResidualUnit))]
        candidates = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    elif kind == "BasicUNet":
        candidates = [n for n, _ in network.named_children()]
    else:
        return None
    from exporters.torch import _probe

    torch = require("torch", extra=_EXTRA)
    pred, outs, calls = _probe(torch, network, example_input)
    chosen = {n for n in candidates if n in outs and calls[n] == 1 and outs[n] is not pred
              and isinstance(outs[n], torch.Tensor) and outs[n].ndim >= 3}
    return [n for n in outs if n in chosen] or None


def export(
    folder: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    network_id: str = "network_def",
    weights: str | os.PathLike[str] | None = None,
    input_size: Sequence[int] | None = None,
    layers: Any = None,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    exporter: str = "auto",
) -> ExportResult:
    """Export a MONAI bundle's network to ONNX, its card filled from the bundle's metadata.

    Parameters
    ----------
    folder : path-like
        The bundle folder.
    path : path-like
        The ONNX file to write.
    config : path-like, optional
        The inference config (default ``configs/inference.json``/``.yaml``).
    network_id : str
        The config id of the network (``network_def`` in MONAI's bundle specification).
    weights : path-like, optional
        The state dict (default ``models/model.pt``).
    input_size : list of int, optional
        Spatial size of the export and numeric check; default the inferer's ``roi_size``, the
        metadata's fixed ``spatial_shape``, else 64 per axis rounded to the size multiple.
    layers : optional
        Modules to expose (as in :func:`exporters.torch.export`); default: a MONAI ``UNet``'s
        stages (:func:`default_layers`), else the torch exporter's blocks.
    opset, atol, rtol, exporter
        As in :func:`exporters.torch.export`.

    Returns
    -------
    ExportResult
        The card: input channels, activation from the post-processing, classes (all channels
        for sigmoid, else 1..n-1), the expressible pre-processing, ``input.size_multiple``
        (metadata ``"16*n"`` shapes, or a MONAI ``UNet``'s strides); ``extra`` holds class
        names, spacing, orientation, clipping, ``roi_size``.

    Raises
    ------
    ImportError
        monai or torch missing: ``pip install 'protoseg[torch,monai]'``.
    FileNotFoundError
        Not a bundle, or no weights (the files of ``models/`` listed).
    KeyError
        ``network_id`` is not in the config.
    ValueError
        Weights that ``weights_only`` refuses or that do not fit; sizes that are not multiples.
    ExportMismatchError
        ONNX and torch disagree.

    Examples
    --------
    >>> export("spleen_ct_segmentation", "spleen.onnx")  # doctest: +SKIP
    """
    from exporters._network import check_size, export_network

    torch = require("torch", extra=_EXTRA)
    _monai()
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"MONAI bundle folder {str(root)!r} does not exist")
    config_file = _config_file(root, config)
    parser = _parser(root, config_file)
    info = read_bundle(root, config=config_file, network_id=network_id, parser=parser)
    net = parser.get_parsed_content(network_id, instantiate=True)
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"the bundle's {network_id!r} is {type(net).__name__}, not a torch.nn.Module")
    weights_path = Path(weights) if weights is not None else root / "models" / "model.pt"
    if not weights_path.is_file():
        raise FileNotFoundError(f"weights {str(weights_path)!r} do not exist; models/ holds "
                                f"{_listing(root / 'models')} (a TorchScript model.ts is not read: pass "
                                "the state dict models/model.pt)")
    _load_weights(torch, net, weights_path)
    net.eval()
    ndim = info.spatial_dims or (len(input_size) if input_size is not None else None)
    if ndim is None:
        raise ValueError(f"the bundle {str(root)!r} says nothing of its spatial size (no metadata "
                         "spatial_shape, inferer roi_size or network spatial_dims); pass input_size")
    multiple = info.size_multiple or _unet_multiple(net, ndim)
    if input_size is not None:
        size = input_size
    elif info.example_size is not None:
        size = info.example_size
    else:
        step = multiple or (1,) * ndim
        size = tuple(m * max(1, math.ceil(64 / m)) for m in step)
    size = check_size(size, multiple, what="input size")
    channels = info.input_channels
    if channels is None:
        raise ValueError("the bundle's metadata gives no input num_channels and the network no in_channels; "
                         "add network_data_format.inputs.<name>.num_channels to configs/metadata.json")
    example = torch.rand((1, channels, *size), generator=torch.Generator().manual_seed(0))
    if layers is None:
        layers = default_layers(net, example)
    notes = list(info.notes)
    for note in notes:
        logger.warning(note)
    name = info.extra.get("bundle", {}).get("name") or root.name
    return export_network(
        net, example, path, framework="monai", source=f"monai-bundle:{name}/{weights_path.name}",
        activation=info.activation, classes=info.classes, preprocessing=info.preprocessing,
        size_multiple=multiple, extra=info.extra, messages=notes, layers=layers,
        opset=opset, atol=atol, rtol=rtol, exporter=exporter, orientation=info.orientation,
    )
