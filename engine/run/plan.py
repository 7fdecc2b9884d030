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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.datasets import open_dataset
from engine.errors import option
from engine.model.card import ModelCard, resolve_model_card
from engine.model.graph import (HiddenTensor, expose, list_hidden_tensors, load_model, output_path_tensors,
                                plan_passes, select_tensors)
from engine.model.session import Session, make_session
from engine.run.options import ScoreOptions, as_selector, dataset_label

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

    @property
    def provider(self) -> str:
        """The onnxruntime provider that runs the model."""
        return self.passes[0].session.provider

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
            "input_sa": bool(o.input_sa),
            "model_card": self.card.to_dict(),
            "dataset": dataset_label(data),
            "n_cases": n_cases,
            "saved_maps": sorted(self.map_ids),
            # the prediction in another form (logits...): estimates leave these out
            "output_path_tensors": output_path_tensors(self.model, self.card.prediction_output),
        }
        config.update(o.extra_config)
        return config


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
    """The dataset: a ready one (anything with ``ids`` and ``__getitem__``) or opened from a path."""
    if hasattr(data, "ids") and hasattr(data, "__getitem__"):
        return data
    return open_dataset(data, spatial_ndim=card.spatial_ndim, strict=options.strict,
                        groups=options.groups)


def layer_row(t: HiddenTensor) -> dict[str, Any]:
    """The store's description of one scored tensor."""
    shape = [d if isinstance(d, int) else str(d) for d in (t.shape or ())]
    chans = None
    layout = (t.layout or "NC").upper()
    if shape:
        ch_axis = 1 if layout.startswith("NC") else len(shape) - 1
        if ch_axis < len(shape) and isinstance(shape[ch_axis], int):
            chans = shape[ch_axis]
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
    groups = plan_passes(selected, options.batch_size,
                         max_activation_memory=options.max_activation_memory,
                         input_size=mcard.input_size)
    passes = tuple(Pass(tuple(ts), make_session(expose(proto, ts), provider=options.provider,
                                                optimization=options.optimization))
                   for ts in groups)
    order = {t.name: i for i, t in enumerate(selected)}
    rows = sorted((layer_row(t) for p in passes for t in p.tensors), key=lambda r: order[r["name"]])
    return Plan(
        options=options, model=proto, model_path=model_path,
        model_sha256=model_sha256(model_path, proto), card=mcard, passes=passes,
        layers=tuple(rows), layer_index={r["name"]: i for i, r in enumerate(rows)},
        classes=tuple(int(c) for c in mcard.classes), threshold=threshold,
        reference=reference, has_masks=has_masks, map_ids=map_ids,
    )
