"""Export an nnU-Net v2 trained model folder to ONNX with its stages as hidden outputs.

An nnU-Net v2 results folder (``nnUNetTrainer__nnUNetPlans__3d_fullres/``) holds
``plans.json``, ``dataset.json`` and ``fold_F/checkpoint_final.pth`` (and
``checkpoint_best.pth``). The network is rebuilt the way nnU-Net does it for inference: the
class named by the configuration's ``architecture.network_class_name`` (from the
``dynamic-network-architectures`` package) called with ``arch_kwargs`` (the entries listed
in ``_kw_requires_import`` imported), the input channels of ``dataset.json``, one output per
label (or region) and deep supervision off; the checkpoint's ``network_weights`` are loaded
with ``torch.load(..., weights_only=True)``. nnU-Net's softmax (sigmoid for region-based
training) is put into the exported graph. The model card records the input channels, the
classes and their names, the configuration's intensity normalisation, spacing, patch size, the
size multiple the network needs, and the axis order nnU-Net's image reader and
``transpose_forward`` give it (``input.orientation``: ``"zyx"`` permuted, each file's axes
reversed, for the default readers).

``nnunetv2`` itself is not needed (it pulls a training stack); the plans are read here, as
``nnunetv2.utilities.plans_handling.plans_handler`` reads them (configuration inheritance,
the pre-2.4 plans format). torch and dynamic-network-architectures are imported inside the
functions: ``pip install 'protoseg[torch,nnunet]'``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.model.metadata import FILE_AXES
from exporters._common import ExportResult, logger, require

__all__ = ["NnUNetPlan", "read_plan", "load_network", "export"]

_CHECKPOINTS = ("final", "best")
_EXTRA = "torch,nnunet"
#: numpy objects an nnU-Net checkpoint's ``logging`` and ``_best_ema`` hold (float64 scalars):
#: data, not code, so ``weights_only`` may load them.
_SAFE_NUMPY = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype")
_SAFE_NUMPY_DTYPES = re.compile(r"numpy\.dtypes\.\w+DType")


@dataclass(frozen=True)
class NnUNetPlan:
    """What an nnU-Net v2 configuration says about its network and its input.

    Attributes
    ----------
    configuration : str
        The configuration's name (``"2d"``, ``"3d_fullres"``...).
    network_class : str
        Dotted name of the network class (``architecture.network_class_name``).
    arch_kwargs : dict
        Its keyword arguments, as in the plans (names still to import are strings).
    requires_import : tuple of str
        The ``arch_kwargs`` keys whose values are dotted names to import.
    input_channels : int
        Channels of ``dataset.json`` (``channel_names``).
    channel_names : tuple of str
    output_channels : int
        Labels (background included) or, for region-based training, regions.
    class_names : tuple of str
        Name of each output channel.
    regions : bool
        Region-based training (sigmoid per region) rather than labels (softmax).
    activation : str
        ``"softmax"`` or ``"sigmoid"``.
    classes : tuple of int
        Output channels scored: the foreground labels, or every region.
    patch_size : tuple of int
    spacing : tuple of float
    size_multiple : tuple of int
        Per axis, the product of the pooling strides: input sizes must be multiples of it.
    scaling : str
        The card's scaling (``zscore``, ``meanstd``, ``minmax`` or ``none``).
    mean, std : tuple of float or None
        Per channel, for ``meanstd``.
    normalization : tuple of dict
        Per channel: scheme, mask use and, for CT, clipping bounds, mean and std (the card's
        ``extra.normalization``).
    transpose_forward : tuple of int or None
        The axis order nnU-Net transposes images to before the network.
    notes : tuple of str
        What the card cannot express (normalisation inside a mask, unknown schemes...).
    card_normalization : tuple of dict or None
        The card's per-channel ``preprocessing.normalization`` (CT, or channels with
        different schemes); None when one ``scaling`` says it all.
    orientation : str or None
        The card's ``input.orientation``, from the plans' ``image_reader_writer`` and
        ``transpose_forward`` (3-D configurations; see :func:`_orientation`): nnU-Net's
        default readers (``SimpleITKIO``, ``NibabelIO``) give the network each file's axes
        reversed, then permuted by ``transpose_forward``: ``"zyx"`` so permuted (each file's
        voxel axes, no reorientation); ``NibabelIOWithReorient`` (and
        ``SimpleITKIOWithReorient``) reorient to RAS first: ``"SAR"`` so permuted. None for
        other readers.
    """

    configuration: str
    network_class: str
    arch_kwargs: dict[str, Any]
    requires_import: tuple[str, ...]
    input_channels: int
    channel_names: tuple[str, ...]
    output_channels: int
    class_names: tuple[str, ...]
    regions: bool
    activation: str
    classes: tuple[int, ...]
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    size_multiple: tuple[int, ...]
    scaling: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    normalization: tuple[dict[str, Any], ...]
    transpose_forward: tuple[int, ...] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    card_normalization: tuple[dict[str, Any], ...] | None = None
    orientation: str | None = None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The card's ``preprocessing`` (nnU-Net feeds images at their size: no resize)."""
        pre: dict[str, Any] = {"resize": False, "scaling": self.scaling,
                               "mean": list(self.mean) if self.mean is not None else None,
                               "std": list(self.std) if self.std is not None else None}
        if self.card_normalization is not None:
            pre["normalization"] = [dict(n) for n in self.card_normalization]
        return pre


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with path.open() as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} holds {type(data).__name__}; expected a JSON object")
    return data


def _model_folder(folder: str | os.PathLike[str]) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"nnU-Net model folder {str(root)!r} does not exist")
    if not (root / "plans.json").is_file():
        inner = sorted(str(p.parent) for p in root.glob("*/plans.json"))
        hint = (f"; the trained-model folders below it are {inner}" if inner else
                "; pass the folder nnU-Net trained into (nnUNet_results/DatasetXXX_Name/"
                "Trainer__Plans__configuration) holding plans.json, dataset.json and fold_F/")
        raise FileNotFoundError(f"{str(root)!r} holds no plans.json{hint}")
    return root


def _configuration(plans: Mapping[str, Any], name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The configuration ``name`` with ``inherits_from`` resolved."""
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise KeyError(f"configuration {name!r} is not in plans.json; configurations: {sorted(configs)}")
    config = dict(configs[name])
    parent = config.get("inherits_from")
    if parent is not None:
        if parent in seen + (name,):
            raise ValueError(f"plans.json: configurations inherit in a circle: {' -> '.join(seen + (name, parent))}")
        base = _configuration(plans, parent, seen + (name,))
        base.update(config)
        config = base
    return config


def _legacy_architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``architecture`` entry of plans written before nnU-Net 2.4 (``UNet_class_name``...)."""
    name = config["UNet_class_name"]
    if name not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise ValueError(f"plans.json names the network {name!r} in the old plans format; only "
                         "PlainConvUNet and ResidualEncoderUNet can be rebuilt from it")
    dim = len(config["patch_size"])
    n_stages = len(config["n_conv_per_stage_encoder"])
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    blocks = "n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"
    return {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [min(config["UNet_base_num_features"] * 2 ** i, config["unet_max_num_features"])
                                   for i in range(n_stages)],
            "conv_op": conv, "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"], blocks: config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "conv_bias": True,
            "norm_op": norm, "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _labels(dataset: Mapping[str, Any]) -> tuple[tuple[str, ...], bool, str | None]:
    """Output channel names, whether training is region-based, and a note."""
    labels = dataset.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"dataset.json has no 'labels' mapping (got {labels!r}); expected e.g. "
                         "{'background': 0, 'liver': 1}")
    labels = {k: v for k, v in labels.items() if k != "ignore"}  # the ignore label has no output
    regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    if regions:
        order = dataset.get("regions_class_order")
        named = [(k, v) for k, v in labels.items() if k != "background"]
        names = tuple(k for k, _ in named)
        note = None
        if order is None or len(order) != len(named):
            note = ("dataset.json: region-based labels without a matching 'regions_class_order'; "
                    "channels named in the order of 'labels'")
        return names, True, note
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        value = value[0] if isinstance(value, (list, tuple)) else value
        by_value[int(value)] = str(name)
    if sorted(by_value) != list(range(len(by_value))):
        raise ValueError(f"dataset.json labels {dict(labels)} are not consecutive from 0; nnU-Net v2 "
                         "needs labels 0..n-1")
    return tuple(by_value[i] for i in range(len(by_value))), False, None


def _channels(dataset: Mapping[str, Any]) -> tuple[str, ...]:
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, Mapping) or not channels:
        raise ValueError("dataset.json has no 'channel_names' (nor 'modality'); expected e.g. {'0': 'CT'}")
    return tuple(str(channels[k]) for k in sorted(channels, key=lambda k: int(k)))


def _size_multiple(strides: Any, ndim: int) -> tuple[int, ...]:
    multiple = [1] * ndim
    for stride in strides:
        per_axis = [stride] * ndim if isinstance(stride, int) else list(stride)
        if len(per_axis) != ndim:
            raise ValueError(f"plans.json: stride {stride!r} does not have {ndim} axes (patch size rank)")
        multiple = [m * int(s) for m, s in zip(multiple, per_axis)]
    return tuple(multiple)


#: nnU-Net's normalisation schemes → the model card's per-channel normalisation kinds.
_SCHEME_KINDS = {"ZScoreNormalization": "zscore", "CTNormalization": "ct", "RescaleTo01Normalization": "minmax",
                 "RGBTo01Normalization": "meanstd", "NoNormalization": "none"}


def _normalization(plans: Mapping[str, Any], config: Mapping[str, Any], channels: Sequence[str]) -> tuple[
        str, tuple[float, ...] | None, tuple[float, ...] | None, tuple[dict[str, Any], ...] | None,
        tuple[dict[str, Any], ...], list[str]]:
    """Card scaling, mean, std, per-channel normalization, per-channel details and notes.

    Notes
    -----
    nnU-Net's schemes (``nnunetv2/preprocessing/normalization/default_normalization_schemes.py``),
    per channel: ``ZScoreNormalization`` (x - mean) / max(std, 1e-8) over the image →
    ``zscore``, or inside the nonzero mask when ``use_mask_for_norm`` → ``zscore_nonzero``; ``CTNormalization`` clips to
    the foreground's ``percentile_00_5`` and ``percentile_99_5``, then (x - mean) /
    max(std, 1e-8) with the foreground's ``mean`` and ``std``
    (``foreground_intensity_properties_per_channel``) → ``ct`` with those four numbers;
    ``RescaleTo01Normalization`` → ``minmax``; ``RGBTo01Normalization`` x / 255 → ``meanstd``
    (0, 255); ``NoNormalization`` → ``none``. One scheme for every channel, other than CT,
    is written as the card's ``scaling``; CT, or channels with different schemes, as the
    card's per-channel ``normalization``.
    """
    schemes = list(config.get("normalization_schemes") or [])
    masks = list(config.get("use_mask_for_norm") or [False] * len(schemes))
    props = plans.get("foreground_intensity_properties_per_channel",
                      plans.get("foreground_intensity_properties_by_modality")) or {}
    notes: list[str] = []
    if len(schemes) != len(channels):
        raise ValueError(f"plans.json: {len(schemes)} normalization_schemes for {len(channels)} input "
                         f"channels {list(channels)}")
    details = []
    entries: list[dict[str, Any]] = []
    for c, (scheme, name) in enumerate(zip(schemes, channels)):
        info: dict[str, Any] = {"channel": name, "scheme": scheme, "use_mask": bool(masks[c]) if c < len(masks) else False}
        kind = _SCHEME_KINDS.get(scheme)
        entry: dict[str, Any] = {"kind": kind}
        if scheme == "CTNormalization":
            p = props.get(str(c)) or props.get(c)
            if not p:
                raise ValueError(f"plans.json: channel {c} ({name}) uses CTNormalization but "
                                 "foreground_intensity_properties_per_channel has no entry for it")
            try:
                clip = [float(p["percentile_00_5"]), float(p["percentile_99_5"])]
                mean, std = float(p["mean"]), float(p["std"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"plans.json: foreground_intensity_properties_per_channel[{c}] lacks a "
                                 f"usable {exc}; CTNormalization needs percentile_00_5, percentile_99_5, "
                                 "mean and std") from None
            entry.update(clip=clip, mean=mean, std=std)
            info.update(clip=clip, mean=mean, std=std)
        elif scheme == "RGBTo01Normalization":
            entry.update(mean=0.0, std=255.0)
        elif scheme == "ZScoreNormalization" and info["use_mask"]:
            entry["kind"] = "zscore_nonzero"
        details.append(info)
        entries.append(entry)
    unknown = sorted({s for s in schemes if s not in _SCHEME_KINDS})
    if unknown:
        notes.append(f"channels use the normalisations {schemes}; {unknown} is not one of nnU-Net's default "
                     "schemes, which the model card cannot express: it records none (scaling 'none'); "
                     "normalise the images as nnU-Net does before scoring (the schemes are in the card's "
                     "extra.normalization)")
        return "none", None, None, None, tuple(details), notes
    if any(d["use_mask"] and d["scheme"] == "ZScoreNormalization" for d in details):
        notes.append("ZScoreNormalization with use_mask_for_norm: normalised inside the nonzero mask as "
                     "nnU-Net does (zscore_nonzero); nnU-Net also crops each case to that mask's bounding "
                     "box before the network, which protoseg does not (the network sees the zero border)")
    kinds = {e["kind"] for e in entries}
    if len(set(schemes)) == 1 and not kinds & {"ct", "zscore_nonzero"}:
        kind = entries[0]["kind"]
        if kind == "meanstd":  # RGBTo01 on every channel: x / 255
            return "meanstd", (0.0,) * len(entries), (255.0,) * len(entries), None, tuple(details), notes
        return kind, None, None, None, tuple(details), notes
    return "none", None, None, tuple(entries), tuple(details), notes


def read_plan(folder: str | os.PathLike[str], *, configuration: str) -> NnUNetPlan:
    """Read ``plans.json`` and ``dataset.json`` of a trained-model folder for one configuration.

    Parameters
    ----------
    folder : path-like
        The trained-model folder (``plans.json``, ``dataset.json``, ``fold_F/``).
    configuration : str
        The configuration (``"2d"``, ``"3d_fullres"``...).

    Returns
    -------
    NnUNetPlan

    Raises
    ------
    FileNotFoundError
        The folder or its JSON files are missing.
    KeyError
        The configuration is not in the plans (the valid ones are listed).
    ValueError
        The plans or the dataset description cannot be read as nnU-Net v2 writes them, or the
        configuration is a cascade's second stage.

    Notes
    -----
    ``size_multiple`` per axis is the product over the encoder stages of the pooling strides
    (``arch_kwargs["strides"]``): a network with strides 1, 2, 2, 2 needs multiples of 8.
    """
    root = _model_folder(folder)
    plans = _read_json(root / "plans.json", "plans file")
    dataset = _read_json(root / "dataset.json", "dataset description")
    config = _configuration(plans, configuration)
    if config.get("previous_stage"):
        raise ValueError(
            f"configuration {configuration!r} is the second stage of a cascade: its network takes the "
            f"segmentation of {config['previous_stage']!r} as extra input channels; export "
            f"{config['previous_stage']!r} or 3d_fullres instead")
    arch = config.get("architecture") or _legacy_architecture(config)
    try:
        network_class = str(arch["network_class_name"])
        arch_kwargs = dict(arch["arch_kwargs"])
    except KeyError as exc:
        raise ValueError(f"plans.json configuration {configuration!r}: architecture has no {exc}; "
                         "expected network_class_name and arch_kwargs (nnU-Net >= 2.4 plans)") from None
    requires = tuple(arch.get("_kw_requires_import", arch.get("arch_kwargs_requires_import", ())))
    patch = tuple(int(p) for p in config["patch_size"])
    channels = _channels(dataset)
    class_names, regions, label_note = _labels(dataset)
    scaling, mean, std, normalization, details, notes = _normalization(plans, config, channels)
    if label_note:
        notes.insert(0, label_note)
    transpose = plans.get("transpose_forward")
    orientation, orientation_note = _orientation(plans, len(patch), transpose)
    if orientation_note:
        notes.append(orientation_note)
    n_out = len(class_names)
    return NnUNetPlan(
        configuration=configuration, network_class=network_class, arch_kwargs=arch_kwargs,
        requires_import=requires, input_channels=len(channels), channel_names=channels,
        output_channels=n_out, class_names=class_names, regions=regions,
        activation="sigmoid" if regions else "softmax",
        classes=tuple(range(n_out)) if regions else tuple(range(1, n_out)) or (0,),
        patch_size=patch, spacing=tuple(float(s) for s in config.get("spacing") or ()),
        size_multiple=_size_multiple(arch_kwargs.get("strides", [1]), len(patch)),
        scaling=scaling, mean=mean, std=std, normalization=details, card_normalization=normalization,
        transpose_forward=tuple(int(t) for t in transpose) if transpose is not None else None,
        notes=tuple(notes), orientation=orientation,
    )


#: nnU-Net's image readers whose arrays are each file's voxels with the axes reversed:
#: SimpleITK's ``GetArrayFromImage`` gives (z, y, x) for a file stored (x, y, z), and
#: ``NibabelIO`` transposes nibabel's array to match it. An empty name is the default reader
#: nnU-Net picks by file ending (SimpleITKIO for NIfTI, NRRD, MHA).
_REVERSING_READERS = ("SimpleITKIO", "NibabelIO", "")
#: nnU-Net's readers that bring each file to RAS, then reverse the axes as the others do.
_REORIENTING_READERS = ("NibabelIOWithReorient", "SimpleITKIOWithReorient")


def _orientation(plans: Mapping[str, Any], ndim: int,
                 transpose: Sequence[int] | None) -> tuple[str | None, str | None]:
    """The card's ``orientation`` and a note, from the plans' ``image_reader_writer``.

    nnU-Net's readers give the preprocessing each file's array with its axes reversed
    (SimpleITK's (z, y, x) view of an (x, y, z) file; ``NibabelIO`` transposes nibabel's
    array to match), and the preprocessing permutes it by ``transpose_forward``
    (``data.transpose([0, *[i + 1 for i in transpose_forward]])``): the network's axis ``i``
    is the file's axis ``"zyx"[t]`` for ``t = transpose_forward[i]``. That is the card's
    orientation, a permutation of the file's voxel axes (``"zyx"`` for the identity): each
    case keeps its own orientation, as nnU-Net never reorients with these readers.
    ``NibabelIOWithReorient`` (nibabel's ``as_reoriented(io_orientation(affine))``) and
    ``SimpleITKIOWithReorient`` (``DICOMOrient(image, "RAS")``, letters the direction each
    axis increases toward, as nibabel's) bring each file to RAS first: ``"SAR"[t]``.

    ``Tiff3DIO`` and custom readers set none (TIFF files have no affine; protoseg reads them
    in tifffile's axis order, as ``Tiff3DIO`` does): a non-identity ``transpose_forward`` is
    noted. A 2-D configuration of 3-D data (:func:`_volumes`) is noted: the network takes
    slices, which the card cannot express. 2-D data sets none (the card's orientation is for
    3-D models).
    """
    order = [int(t) for t in transpose] if transpose is not None else list(range(max(ndim, 3)))
    reader = str(plans.get("image_reader_writer") or "")
    if ndim != 3:
        if ndim == 2 and len(order) == 3 and _volumes(plans):  # slices of volumes: out of the card's reach
            if reader in _REVERSING_READERS:
                axes = [FILE_AXES[::-1][t] for t in order]
                where = (f"across the file's {axes[0]} axis, each slice's rows along its {axes[1]} axis and "
                         f"columns along its {axes[2]} axis ({FILE_AXES}: a NIfTI's voxel axes as stored)")
            elif reader in _REORIENTING_READERS:
                axes = ["SAR"[t] for t in order]
                where = (f"of each volume brought to RAS, across its {axes[0]} axis, rows toward {axes[1]} and "
                         f"columns toward {axes[2]}")
            else:
                where = f"across axis {order[0]} of the array its reader {reader!r} gives"
            return None, (f"a 2-D configuration of 3-D data: nnU-Net feeds the network 2-D slices {where}; "
                          "protoseg scores the 2-D images it is given and does not slice volumes: export a "
                          "3-D configuration (3d_fullres), or give it those slices")
        return None, None
    if reader in _REORIENTING_READERS:
        return "".join("SAR"[t] for t in order), None
    if reader in _REVERSING_READERS:
        return "".join(FILE_AXES[::-1][t] for t in order), None
    if order != sorted(order):
        if reader == "Tiff3DIO":
            return None, (f"nnU-Net permutes the axes of each TIFF volume by transpose_forward {order} before "
                          "the network; TIFF files have no affine, so protoseg reads them as stored and the "
                          "card cannot permute them: give protoseg volumes (TIFF or .npy) with their axes so "
                          "permuted")
        return None, (f"nnU-Net permutes the arrays its reader {reader!r} gives by transpose_forward {order} "
                      "before the network, and protoseg does not know that reader's axis order: the card "
                      "sets no orientation; give protoseg volumes in the axis order the network saw")
    return None, None


def _volumes(plans: Mapping[str, Any]) -> bool:
    """Whether the plans were made for 3-D data. nnU-Net plans 2-D images as volumes of one
    slice (``transpose_forward`` has three entries either way) and makes 3-D configurations
    only when ``original_median_shape_after_transp[0]`` is not 1."""
    shape = plans.get("original_median_shape_after_transp")
    if isinstance(shape, (list, tuple)) and len(shape) == 3:
        return int(shape[0]) != 1
    return any(str(name).startswith("3d") for name in plans.get("configurations") or {})


# ----------------------------------------------------------------------------- network


def _locate(name: str, what: str) -> Any:
    module_name, _, attr = name.rpartition(".")
    if module_name:
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            pass
    if what == "network class":  # moved between dynamic-network-architectures releases
        arch = require("dynamic_network_architectures.architectures", extra=_EXTRA)
        import pkgutil

        for info in pkgutil.iter_modules(arch.__path__):
            try:
                module = importlib.import_module(f"{arch.__name__}.{info.name}")
            except ImportError:  # an architecture needing optional packages (timm, einops)
                continue
            if hasattr(module, attr or name):
                logger.info("network class %r found as %s.%s", name, module.__name__, attr or name)
                return getattr(module, attr or name)
    raise ImportError(f"plans.json names the {what} {name!r}, which cannot be imported; install the "
                      f"package defining it (nnU-Net's networks: pip install 'protoseg[{_EXTRA}]')")


def load_network(plan: NnUNetPlan, weights: Mapping[str, Any] | None = None) -> Any:
    """Build the configuration's network (deep supervision off), with ``weights`` loaded.

    Parameters
    ----------
    plan : NnUNetPlan
    weights : mapping, optional
        A state dict (the checkpoint's ``network_weights``); ``module.`` and ``_orig_mod.``
        prefixes (DDP, ``torch.compile``) are removed.

    Returns
    -------
    torch.nn.Module
        In eval mode.

    Raises
    ------
    ImportError
        torch, dynamic-network-architectures or a class named in the plans missing.
    TypeError
        A dotted name of the plans is not a ``torch.nn.Module`` class.
    ValueError
        The weights do not fit the network (first mismatch named).
    """
    torch = require("torch", extra=_EXTRA)
    require("dynamic_network_architectures", extra=_EXTRA)
    cls = _locate(plan.network_class, "network class")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"plans.json network_class_name {plan.network_class!r} is {cls!r}, not a torch.nn.Module class")
    kwargs = dict(plan.arch_kwargs)
    for key in plan.requires_import:
        value = kwargs.get(key)
        if value is not None:
            obj = _locate(str(value), f"{key} class")
            if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
                raise TypeError(f"plans.json arch_kwargs[{key!r}] = {value!r} is not a torch.nn.Module class")
            kwargs[key] = obj
    kwargs.update(input_channels=plan.input_channels, num_classes=plan.output_channels)
    try:
        net = cls(deep_supervision=False, **kwargs)
    except TypeError as exc:
        if "deep_supervision" not in str(exc):
            raise TypeError(f"{plan.network_class}({', '.join(sorted(kwargs))}) failed: {exc}") from exc
        net = cls(**kwargs)
    if weights is not None:
        state = {_strip(k): v for k, v in weights.items()}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"the checkpoint's network_weights do not fit {plan.network_class} built from "
                             f"plans.json ({plan.configuration}): {first}; was it trained with a custom "
                             "trainer that builds another network?") from exc
    return net.eval()


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _load_checkpoint(torch: Any, path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, allowing the numpy scalars nnU-Net logs.

    nnU-Net saves ``network_weights`` with its optimizer state, ``init_args`` (plans, dataset
    description, a ``torch.device``) and its training log, whose float64 numpy scalars the
    weights-only unpickler refuses by default; those (and only those) are allowed.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - unpickling errors vary
        try:
            unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - not a torch zip file
            raise ValueError(f"{str(path)!r} is not a checkpoint torch.load can read "
                             f"({type(first).__name__}: {str(first).strip().splitlines()[0]})") from first
        others = [g for g in unsafe if g not in _SAFE_NUMPY and not _SAFE_NUMPY_DTYPES.fullmatch(g)]
        if others:
            raise ValueError(
                f"{str(path)!r} holds objects that torch.load(weights_only=True) does not load: "
                f"{others}; protoseg never unpickles code. If you trust the file, save the weights "
                "alone: torch.save({'network_weights': torch.load(path, weights_only=False)"
                "['network_weights']}, 'checkpoint_final.pth') in a copy of the folder") from first
        allowed = []
        for name in unsafe:
            module, _, attr = name.rpartition(".")
            try:
                allowed.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError):
                continue
        if any(g.endswith("dtype") for g in unsafe):  # the dtype's class is met only while loading
            import numpy as np

            allowed += [type(np.dtype(code)) for code in ("f8", "f4", "f2", "i8", "i4", "i2", "i1",
                                                           "u8", "u4", "u2", "u1", "b1")]
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True)


def _checkpoint_path(root: Path, fold: int | str, checkpoint: str) -> Path:
    if checkpoint not in _CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(_CHECKPOINTS)}; got {checkpoint!r}")
    fold_dir = root / f"fold_{fold}"
    path = fold_dir / f"checkpoint_{checkpoint}.pth"
    if path.is_file():
        return path
    found = sorted(str(p.relative_to(root)) for p in root.glob("fold_*/checkpoint_*.pth"))
    raise FileNotFoundError(f"{str(path)!r} does not exist; checkpoints in {str(root)!r}: "
                            f"{found or '(none)'}; choose them with --fold and --checkpoint")


def _configuration_name(root: Path, ckpt: Mapping[str, Any], plans_configs: Sequence[str]) -> str:
    init = ckpt.get("init_args")
    if isinstance(init, Mapping) and isinstance(init.get("configuration"), str):
        return init["configuration"]
    parts = root.name.split("__")
    if len(parts) == 3 and parts[2] in plans_configs:
        return parts[2]
    if len(plans_configs) == 1:
        return plans_configs[0]
    raise ValueError(f"cannot tell the configuration of {str(root)!r} (the checkpoint has no init_args and "
                     f"the folder is not named Trainer__Plans__configuration); pass one of {list(plans_configs)}")


# ----------------------------------------------------------------------------- export


def export(
    folder: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    fold: int | str = 0,
    checkpoint: str = "final",
    configuration: str | None = None,
    input_size: Sequence[int] | None = None,
    layers: Any = None,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    exporter: str = "auto",
) -> ExportResult:
    """Export an nnU-Net v2 trained model to ONNX with its encoder/decoder stages exposed.

    Parameters
    ----------
    folder : path-like
        The trained-model folder (``plans.json``, ``dataset.json``, ``fold_F/``).
    path : path-like
        The ONNX file to write.
    fold : int or "all"
        The fold whose checkpoint is exported (``fold_F/``).
    checkpoint : {"final", "best"}
        ``checkpoint_final.pth`` or ``checkpoint_best.pth``.
    configuration : str, optional
        The plans configuration; default: the checkpoint's ``init_args``, else the folder name
        (``Trainer__Plans__configuration``).
    input_size : list of int, optional
        Spatial size of the export and numeric check (default: the configuration's patch
        size); multiples of the size multiple.
    layers : optional
        Modules to expose (as in :func:`exporters.torch.export`); default: every
        ``encoder.stages.i`` and ``decoder.stages.j``, else the torch exporter's default.
    opset, atol, rtol, exporter
        As in :func:`exporters.torch.export`.

    Returns
    -------
    ExportResult
        ``metadata`` is the card: input channels, ``softmax`` (``sigmoid`` for regions) over
        the labels, classes = the foreground labels, the normalisation as scaling, no resize,
        ``input.size_multiple``; ``extra`` holds class and channel names, spacing, patch size,
        per-channel normalisation (CT clipping bounds), trainer, fold and checkpoint.

    Raises
    ------
    ImportError
        torch or dynamic-network-architectures missing: ``pip install 'protoseg[torch,nnunet]'``.
    FileNotFoundError
        The folder, its JSON files or the checkpoint are missing (the checkpoints found are
        listed).
    ValueError
        Unreadable plans, a checkpoint holding objects ``weights_only`` refuses, weights that
        do not fit, an input size that is not a multiple of the size multiple.
    ExportMismatchError
        ONNX and torch disagree.

    Notes
    -----
    nnU-Net's inference also resamples to the configuration's spacing, crops to the nonzero
    region, predicts by sliding windows of the patch size (Gaussian-weighted) and mirrors
    (test-time augmentation); none of that is in the network, so none is in the ONNX file.

    Examples
    --------
    >>> result = export("nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres",
    ...                 "hippocampus.onnx", fold=0)  # doctest: +SKIP
    >>> result.outputs[:3]  # doctest: +SKIP
    ['output', 'encoder.stages.0', 'encoder.stages.1']
    """
    from exporters._network import check_size, export_network, stage_layers

    torch = require("torch", extra=_EXTRA)
    require("dynamic_network_architectures", extra=_EXTRA)
    root = _model_folder(folder)
    ckpt_path = _checkpoint_path(root, fold, checkpoint)
    ckpt = _load_checkpoint(torch, ckpt_path)
    if not isinstance(ckpt, Mapping) or "network_weights" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{str(ckpt_path)!r} is not an nnU-Net checkpoint: no 'network_weights' (it holds {keys})")
    plans = _read_json(root / "plans.json", "plans file")
    if configuration is None:
        configuration = _configuration_name(root, ckpt, sorted(plans.get("configurations") or {}))
    plan = read_plan(root, configuration=configuration)
    network = load_network(plan, ckpt["network_weights"])
    size = check_size(input_size if input_size is not None else plan.patch_size, plan.size_multiple,
                      what="input size" if input_size is not None else "patch size")
    example = torch.rand((1, plan.input_channels, *size), generator=torch.Generator().manual_seed(0))
    if layers is None:
        layers = stage_layers(network) or None
    trainer = ckpt.get("trainer_name")
    mirroring = ckpt.get("inference_allowed_mirroring_axes")
    extra = {
        "nnunet": {"configuration": plan.configuration, "fold": str(fold), "checkpoint": ckpt_path.name,
                   "trainer": trainer, "network_class": plan.network_class,
                   "inference_allowed_mirroring_axes": list(mirroring) if mirroring is not None else None,
                   "regions": plan.regions, "image_reader_writer": plans.get("image_reader_writer")},
        "class_names": list(plan.class_names),
        "channel_names": list(plan.channel_names),
        "spacing": list(plan.spacing),
        "patch_size": list(plan.patch_size),
        "transpose_forward": list(plan.transpose_forward) if plan.transpose_forward is not None else None,
        "normalization": [dict(d) for d in plan.normalization],
    }
    notes = list(plan.notes)
    for note in notes:
        logger.warning(note)
    return export_network(
        network, example, path, framework="nnunet",
        source=f"nnunet:{root.name}/fold_{fold}/{ckpt_path.name}",
        activation=plan.activation, classes=list(plan.classes), preprocessing=plan.preprocessing,
        size_multiple=plan.size_multiple, extra=extra, messages=notes, layers=layers,
        opset=opset, atol=atol, rtol=rtol, exporter=exporter, orientation=plan.orientation,
    )
