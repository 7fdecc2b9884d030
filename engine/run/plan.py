"""The plan of a scoring run, built once: model, card, tensors, passes, sessions, classes.

:func:`build_plan` does everything that does not depend on a batch — loading the ONNX
model, resolving the model card, selecting and ordering the hidden tensors, splitting them
into passes under the memory budget, building one onnxruntime session per pass, resolving
the reference and the maps to save — and returns a frozen :class:`Plan`.
:func:`engine.run.batch.score_batch` then needs only the plan and the cases, which is what
a worker process (``--shard``, Dask) rebuilds from the model *path*.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.datasets import open_dataset
from engine.errors import option
from engine.gpu import DeviceScorer, choose_backend
from engine.model.card import ModelCard, resolve_model_card
from engine.model.graph import (HiddenTensor, concat_blocks, expose, list_hidden_tensors, load_model,
                                output_path_tensors, plan_passes, select_tensors)
from engine.model.session import Session, make_session
from engine.model.shapes import resolve_shapes, unresolved
from engine.run.manifest import dataset_manifest
from engine.run.options import ScoreOptions, as_selector

__all__ = ["Plan", "Pass", "build_plan", "resolve_card", "open_data", "model_sha256", "layer_row",
           "spatial_hidden"]

log = logging.getLogger("protoseg")


@dataclass(frozen=True)
class Pass:
    """Hidden tensors exposed together, and the session that runs the model exposing them."""

    tensors: tuple[HiddenTensor, ...]
    session: Session


@dataclass(frozen=True)
class Plan:
    """Everything a batch needs that does not change from batch to batch.

    Attributes
    ----------
    options : ScoreOptions
        The run's settings.
    model : onnx.ModelProto
        The loaded model (the caller's file is never modified).
    model_path : Path or None
        Where it came from (None for an in-memory model).
    model_sha256 : str
        Hash of the model file (or of the serialised model).
    card : ModelCard
        The resolved model card (layouts, preprocessing, prediction).
    passes : tuple of Pass
        The selected tensors in network order, split into passes; the first pass also
        yields the prediction.
    layers : tuple of dict
        One row per scored tensor, in store order (name, layer, op, depth, shape, channels,
        layout).
    layer_index : mapping
        Tensor name → position in ``layers``.
    classes : tuple of int
        Classes scored one-vs-rest.
    threshold : float
        Probability threshold of the prediction.
    reference : {"ground_truth", "prediction"}
        What the maps are scored against (``"auto"`` resolved).
    has_masks : bool
        Whether the dataset has ground truth.
    map_ids : frozenset of str
        Cases whose maps are saved.
    planned_voxels : int or None
        For a model with dynamic spatial dims, the input voxels per case the passes were
        sized for (a batch of larger cases is scored in smaller parts); None when every
        tensor's size is fixed by the model.
    concat_groups : mapping
        Scored tensors that are other scored tensors side by side along the channels (a
        U-Net's skip concatenations): name → the parts' names
        (:func:`engine.model.graph.concat_blocks`). Where the parts are in the same pass,
        the concatenation is scored from theirs (:func:`engine.scores.sa_scores_concat`).
    """

    options: ScoreOptions
    model: Any
    model_path: Path | None
    model_sha256: str
    card: ModelCard
    passes: tuple[Pass, ...]
    layers: tuple[dict[str, Any], ...]
    layer_index: Mapping[str, int]
    classes: tuple[int, ...]
    threshold: float
    reference: str
    has_masks: bool
    map_ids: frozenset[str]
    planned_voxels: int | None = None
    #: GPU data path (issue 19): the :class:`engine.gpu.DeviceScorer` that scores hidden
    #: tensors on the device, or None when they are scored on the CPU.
    device: Any = None
    concat_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        """The onnxruntime provider that runs the model."""
        return self.passes[0].session.provider

    @property
    def backend(self) -> str:
        """Where hidden tensors are scored: ``"cuda"`` (:mod:`engine.gpu`) or ``"cpu"``."""
        return "cpu" if self.device is None else "cuda"

    @property
    def binary_model(self) -> bool:
        return len(self.classes) == 1

    def config(self, data: Any, n_cases: int) -> dict[str, Any]:
        """Every setting that changes the numbers (compared when a run is resumed)."""
        o = self.options
        config = {
            "model_sha256": self.model_sha256,
            "layers": [r["name"] for r in self.layers],
            "level": o.level,
            "guide": o.guide,
            "guide_kind": o.guide_kind,
            "reference": self.reference,
            "resize": o.resize,
            "threshold": self.threshold,
            "classes": list(self.classes),
            "empty": o.empty,
            "nonfinite": o.nonfinite,
            **({} if o.volume is None else {"volume": o.volume}),  # only when set: older stores resume
            # the orientation cases were brought to (card or --reorient); absent in file order
            **({"reorient": orientation} if (orientation := o.orientation(self.card.orientation)) else {}),
            **({"deterministic": True} if o.deterministic else {}),  # likewise (GPU numbers)
            "input_sa": bool(o.input_sa),
            "model_card": _card_config(self.card),
            "dataset": dataset_manifest(data, n_cases).config(),  # by content, not by path
            "n_cases": n_cases,
            "saved_maps": sorted(self.map_ids),
            # the prediction in another form (logits...): estimates leave these out
            "output_path_tensors": output_path_tensors(self.model, self.card.prediction_output),
        }
        config.update(o.extra_config)
        return config


def _card_config(card: ModelCard) -> dict[str, Any]:
    """The card as the configuration records it: fields added after a store was written
    (``orientation``, ``normalization``) only when set, so that older runs still resume."""
    out = card.to_dict()
    for key in ("orientation", "normalization"):
        if out.get(key) is None:
            out.pop(key, None)
    return out


def spatial_hidden(proto: Any) -> list[HiddenTensor]:
    """The model's hidden tensors that can hold spatial features; none is an error."""
    hidden = list_hidden_tensors(proto)
    if not hidden:
        raise ValueError(
            "the model has no hidden tensors that can hold spatial features (float, rank >= 3); "
            "check that this is a segmentation network, or export it with protoseg's exporters")
    return hidden


def model_sha256(path: Path | None, proto: Any) -> str:
    """sha256 of the model file, or of the serialised model when it has no file."""
    h = hashlib.sha256()
    if path is not None and path.is_file():
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(proto.SerializeToString())
    return h.hexdigest()


def resolve_card(proto: Any, card: Any) -> ModelCard:
    """A ModelCard from: a ready card, a TOML path, an overrides dict (its optional
    ``"_toml"`` key names a TOML file the overrides apply on top of), or None."""
    if isinstance(card, ModelCard):
        return card
    if isinstance(card, (str, os.PathLike)):
        return resolve_model_card(proto, toml=card)
    if isinstance(card, dict) and "_toml" in card:
        rest = {k: v for k, v in card.items() if k != "_toml"}
        return resolve_model_card(proto, toml=card["_toml"], overrides=rest or None)
    return resolve_model_card(proto, overrides=card)


def open_data(data: Any, card: ModelCard, options: ScoreOptions) -> Any:
    """The dataset: a ready one (anything with ``ids`` and ``__getitem__``) or opened from a path,
    read as the card says: its spatial rank, its input channels (how a 4-D image is read) and
    the orientation 3-D cases are brought to (:meth:`ScoreOptions.orientation`)."""
    if hasattr(data, "ids") and hasattr(data, "__getitem__"):
        return data
    orientation = options.orientation(card.orientation)
    if orientation is not None and card.orientation is not None and options.reorient is None:
        if orientation.islower():  # a permutation of the file's own axes (nnU-Net: "zyx")
            log.info("feeding every 3-D case's voxel axes in the order %s (file axes x, y, z), as the "
                     "model card says", orientation)
        else:
            log.info("reorienting every 3-D case with an affine to %s, as the model card says", orientation)
    return open_dataset(data, spatial_ndim=card.spatial_ndim, strict=options.strict,
                        groups=options.groups, volume=options.volume, reorient=orientation or False,
                        channels=int(card.channels))


def layer_row(t: HiddenTensor, sized: HiddenTensor | None = None) -> dict[str, Any]:
    """The store's description of one scored tensor (``sized``: the same tensor with its
    dims resolved for the data, which gives the channel count of a symbolic one)."""
    shape = [d if isinstance(d, int) else str(d) for d in (t.shape or ())]
    chans = None
    layout = (t.layout or "NC").upper()
    dims = list((sized or t).shape or ())
    if dims:
        ch_axis = 1 if layout.startswith("NC") else len(dims) - 1
        if ch_axis < len(dims) and isinstance(dims[ch_axis], int):
            chans = dims[ch_axis]
    return {
        "name": t.name, "layer": t.layer, "op": t.op, "depth": int(t.depth),
        "shape": "x".join(str(d) for d in shape), "channels": -1 if chans is None else int(chans),
        "layout": t.layout or "",
    }


def _map_ids(save_maps: tuple[str, ...] | int, ids: Sequence[Any]) -> frozenset[str]:
    all_ids = [str(c) for c in ids]
    if isinstance(save_maps, int):
        return frozenset(all_ids[:save_maps])
    wanted = set(save_maps)
    unknown = sorted(wanted - set(all_ids))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], all_ids, n=3)
        raise ValueError(f"{option('save_maps', 'IDS')} names case(s) not in the dataset: {unknown}; "
                         f"closest: {hint or all_ids[:5]}")
    return frozenset(wanted)


def _reference(options: ScoreOptions, has_masks: bool) -> str:
    if options.guide == "ground_truth" and not has_masks:
        raise ValueError("guide='ground_truth' needs masks, but the dataset has none; "
                         "use guide='prediction' (the default) for label-free runs")
    if options.reference == "ground_truth" and not has_masks:
        raise ValueError("reference='ground_truth' needs masks, but the dataset has none; "
                         "use reference='auto' or 'prediction'")
    if options.reference == "auto":
        return "ground_truth" if has_masks else "prediction"
    return options.reference


def _same_rank(tensors: list[HiddenTensor], rank: int, layers: Any) -> list[HiddenTensor]:
    """The tensors whose rank is the input's: a rank-5 tensor in a 2-D network (a converter's
    Unsqueeze around a transposed convolution, say) is no feature map of the image. Left
    out quietly from ``auto``/``all``; named explicitly, it is an error."""
    keep = [t for t in tensors if len(t.shape) == rank]
    other = [t for t in tensors if len(t.shape) != rank]
    if other:
        if as_selector(layers) not in ("auto", "all"):
            t = other[0]
            raise ValueError(
                f"tensor {t.name!r} has rank {len(t.shape)} (shape {t.shape}); the model's input has rank "
                f"{rank}, so it is no feature map of the image; choose other layers ({option('layers', 'NAMES')})")
        log.info("left out %d tensor(s) whose rank differs from the input's (%d): %s", len(other), rank,
                 ", ".join(t.name for t in other[:5]) + (" ..." if len(other) > 5 else ""))
    if not keep:
        raise ValueError(f"no selected tensor has the input's rank {rank}; list the model's tensors with "
                         "`protoseg inspect` and choose layers of that rank")
    return keep


def _sample_input(dataset: Any, card: ModelCard, look: int = 32) -> tuple[tuple[int, ...], int]:
    """(model input shape of one case, batch first; its spatial voxels), from the card's
    input size or else from the first readable case of the dataset."""
    if card.input_size is not None:
        image = np.zeros((card.channels,) + tuple(card.input_size), dtype=np.float32)
    else:
        image = None
        for i in range(min(len(dataset.ids), look)):
            case = dataset[i]
            if case.ok and np.ndim(case.image) == card.spatial_ndim + 1 \
                    and np.shape(case.image)[0] == card.channels:
                image = np.nan_to_num(np.asarray(case.image, dtype=np.float32))
                break
        if image is None:
            raise ValueError(
                f"the model's hidden tensors have symbolic sizes and none of the first {look} cases "
                f"is readable with {card.channels} channel(s) to take the input size from; fix the "
                f"data or give the size ({option('input_size', 'H,W')})")
    x = card.preprocess(image)
    return (1,) + tuple(int(d) for d in x.shape), int(np.prod(image.shape[1:]))


def build_plan(model: Any, dataset: Any, options: ScoreOptions, *,
               card: ModelCard | None = None, proto: Any = None) -> Plan:
    """Build the :class:`Plan` of a run (sessions included) for ``dataset``.

    Parameters
    ----------
    model : path or onnx.ModelProto
        The ONNX model.
    dataset : Dataset
        An opened dataset (see :func:`open_data`); used for its ids and whether it has masks.
    options : ScoreOptions
        The run's settings.
    card : ModelCard, optional
        An already resolved card (else resolved from ``options.card``).
    proto : onnx.ModelProto, optional
        ``model`` already loaded (the path is still used for the hash and provenance).

    Raises
    ------
    ValueError
        A model without spatial hidden tensors, a guide/reference that needs masks the
        dataset lacks, maps asked for unknown cases.
    """
    model_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    proto = load_model(model) if proto is None else proto
    hidden = spatial_hidden(proto)
    mcard = card if card is not None else resolve_card(proto, options.card)
    threshold = float(mcard.threshold) if options.threshold is None else float(options.threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold!r}")
    has_masks = bool(getattr(dataset, "has_masks", False))
    reference = _reference(options, has_masks)
    map_ids = _map_ids(options.save_maps, dataset.ids)

    # network order: by depth from the input (stable for equal depths)
    selected = sorted(select_tensors(hidden, as_selector(options.layers)), key=lambda t: t.depth)
    selected = _same_rank(selected, mcard.spatial_ndim + 2, options.layers)
    sized, planned_voxels = selected, None
    if any(unresolved(t) for t in selected):
        # symbolic sizes: resolved for one case's input; a batch of larger cases is split
        x_shape, planned_voxels = _sample_input(dataset, mcard)
        axes = [i for i, ch in enumerate(str(mcard.layout).upper()) if ch not in "NC"]
        sized = resolve_shapes(proto, selected, mcard.input_name, x_shape, spatial_axes=axes,
                               provider=options.provider)
    by_name = {t.name: t for t in sized}
    groups = plan_passes(sized, options.batch_size,
                         max_activation_memory=options.activation_budget(),
                         input_size=mcard.input_size)
    # GPU data path (issue 19): scored on the device when onnxruntime's CUDA provider and
    # Numba's GPU both work (provider "cuda" without one of them is an error naming it)
    device = DeviceScorer() if choose_backend(options.provider) == "cuda" else None
    cuda_options = device.ort_options() if device is not None else None
    passes = tuple(Pass(tuple(ts), make_session(expose(proto, ts), provider=options.provider,
                                                optimization=options.optimization,
                                                cuda_options=cuda_options,
                                                deterministic=options.deterministic))
                   for ts in groups)
    if device is not None and any(p.session.provider != "CUDAExecutionProvider" for p in passes):
        device = None  # a session fell back to the CPU: its outputs are on the host
    fixed = passes[0].session.fixed_batch if passes else None
    if fixed is not None and fixed != options.batch_size:
        log.warning("the model's batch size is fixed to %d: each batch of %d runs as chunks of %d",
                    fixed, options.batch_size, fixed)
    order = {t.name: i for i, t in enumerate(selected)}
    rows = sorted((layer_row(t, by_name.get(t.name)) for t in selected), key=lambda r: order[r["name"]])
    return Plan(
        options=options, model=proto, model_path=model_path,
        model_sha256=model_sha256(model_path, proto), card=mcard, passes=passes,
        layers=tuple(rows), layer_index={r["name"]: i for i, r in enumerate(rows)},
        classes=tuple(int(c) for c in mcard.classes), threshold=threshold,
        reference=reference, has_masks=has_masks, map_ids=map_ids, planned_voxels=planned_voxels,
        device=device, concat_groups=concat_blocks(proto, sized),
    )
