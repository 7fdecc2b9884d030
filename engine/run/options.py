"""What a scoring run is asked to do: one frozen, validated :class:`ScoreOptions`.

Every setting of :func:`engine.score_dataset` lives here once, checked once at
construction; the plan, the batch function and the loop read its fields and never
re-validate them. Settings that change numbers are copied into the store's configuration
(resume compares them); the others (batch size, provider, progress...) are provenance.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from engine._checks import check_choice
from engine.errors import option
from engine.memory import format_size, memory_limit, parse_size
from engine.model.metadata import check_orientation

__all__ = ["ScoreOptions", "GUIDES", "GUIDE_KINDS", "REFERENCES", "LEVELS", "RESIZES",
           "BEST_UNIT_MAPS", "ACTIVATION_FRACTION", "parse_shard", "dataset_label", "as_selector"]

log = logging.getLogger("protoseg")

GUIDES = ("prediction", "ground_truth")
GUIDE_KINDS = ("hard", "soft")
REFERENCES = ("auto", "ground_truth", "prediction")
LEVELS = ("layer", "unit", "both")
RESIZES = ("upsample", "downsample")
#: Unit maps stored per layer for each case in ``save_maps`` (the best units by unit SA).
BEST_UNIT_MAPS = 3
#: Share of the run's memory budget (``max_memory``, else the automatic limit) that the
#: hidden tensors one pass exposes may take. The rest is for what each exposed tensor costs
#: again downstream — onnxruntime's own buffers, the channels-first copy, the features
#: resized to the input grid, the kernels' work arrays — and for the batch's images and masks.
ACTIVATION_FRACTION = 0.25


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"I/N"`` or ``(I, N)`` → ``(I, N)`` with ``0 <= I < N``; None stays None."""
    if shard is None:
        return None
    if isinstance(shard, str):
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise ValueError(f"shard={shard!r}; expected 'I/N' such as '0/4'") from None
    else:
        i, n = (int(v) for v in shard)
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard {i}/{n}: expected 0 <= I < N")
    return i, n


@dataclass(frozen=True)
class ScoreOptions:
    """The settings of one scoring run (see :func:`engine.score_dataset` for each field).

    Constructing it validates every field; an invalid value raises ``ValueError`` naming
    the field, the value received and the values accepted.
    """

    layers: str | tuple[str, ...] = "auto"
    level: str = "layer"
    guide: str = "prediction"
    guide_kind: str = "hard"
    reference: str = "auto"
    resize: str = "upsample"
    threshold: float | None = None
    batch_size: int = 8
    provider: str = "auto"
    optimization: str = "all"
    card: Any = None
    save_maps: tuple[str, ...] | int = ()
    input_sa: bool = True
    empty: str = "nan"
    nonfinite: str = "raise"
    resume: bool = True
    overwrite: bool = False
    strict: bool = False
    groups: Any = None
    max_activation_memory: int | None = None
    max_memory: int | str | None = None
    max_cases: int | None = None
    shard: tuple[int, int] | None = None
    deterministic: bool = False
    volume: int | None = None
    #: None: as the model card's ``orientation`` says (file order without one); True: to the
    #: card's orientation, else RAS; False: file order; axis codes (``"LPS"``): to those.
    reorient: bool | str | None = None
    extra_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice(self.level, "level", LEVELS)
        check_choice(self.guide, "guide", GUIDES)
        check_choice(self.guide_kind, "guide_kind", GUIDE_KINDS)
        check_choice(self.reference, "reference", REFERENCES)
        check_choice(self.resize, "resize", RESIZES)
        check_choice(self.empty, "empty", ("nan", "one"))
        check_choice(self.nonfinite, "nonfinite", ("raise", "skip"))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)) \
                or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {self.threshold!r}")
        if self.volume is not None:
            if isinstance(self.volume, bool) or not isinstance(self.volume, (int, np.integer)) \
                    or self.volume < 0:
                raise ValueError(f"volume must be a non-negative integer (the time point of a time "
                                 f"series) or None, got {self.volume!r}")
            object.__setattr__(self, "volume", int(self.volume))
        if isinstance(self.reorient, str):
            object.__setattr__(self, "reorient",
                               check_orientation(self.reorient, what="reorient", file_axes=True))
        elif self.reorient is not None:
            object.__setattr__(self, "reorient", bool(self.reorient))
        if not isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(str(s) for s in self.layers))
        if not isinstance(self.save_maps, (int, np.integer)):
            object.__setattr__(self, "save_maps", tuple(str(s) for s in self.save_maps))
        object.__setattr__(self, "shard", parse_shard(self.shard))
        object.__setattr__(self, "batch_size", int(self.batch_size))
        if self.max_memory is not None:
            try:
                object.__setattr__(self, "max_memory", parse_size(self.max_memory))
            except ValueError as exc:
                raise ValueError(f"max_memory: {exc}") from None

    def with_(self, **changes: Any) -> ScoreOptions:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def memory_budget(self) -> tuple[int, str]:
        """Bytes the run may use, and what set that figure (for logs and error messages).

        ``max_memory`` when given, else the automatic limit of
        :func:`engine.memory.memory_limit`: the smallest of ``MemAvailable``, the cgroup
        limit less its usage, and ``RLIMIT_AS``/``RLIMIT_DATA`` less this process's size.
        """
        if self.max_memory is not None:
            return int(self.max_memory), option("max_memory", format_size(int(self.max_memory)))
        lim = memory_limit()
        return lim.bytes, lim.source

    def activation_budget(self) -> int:
        """Bytes of hidden tensors one pass may expose (what the pass planner splits by).

        ``max_activation_memory`` when given (the low-level override), else
        :data:`ACTIVATION_FRACTION` of :meth:`memory_budget`.
        """
        if self.max_activation_memory is not None:
            return int(self.max_activation_memory)
        total, source = self.memory_budget()
        budget = max(1, int(total * ACTIVATION_FRACTION))
        log.info("memory budget %s (%s): up to %s of hidden tensors exposed per pass",
                 format_size(total), source, format_size(budget))
        return budget

    def orientation(self, card_orientation: str | None) -> str | None:
        """The axis codes 3-D cases are brought to before the model, or None (file order).

        Parameters
        ----------
        card_orientation : str or None
            The model card's ``orientation`` (what the model expects).

        Returns
        -------
        str or None
            ``reorient`` None → the card's orientation; True → the card's, else ``"RAS"``;
            False → None; axis codes → those.
        """
        if self.reorient is None:
            return card_orientation
        if self.reorient is True:
            return card_orientation or "RAS"
        if self.reorient is False:
            return None
        return str(self.reorient)

    @property
    def want_layer(self) -> bool:
        return self.level in ("layer", "both")

    @property
    def want_unit(self) -> bool:
        return self.level in ("unit", "both")


def dataset_label(data: str | os.PathLike[str] | Any) -> str:
    """How the dataset is named in the store's configuration."""
    return str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__


def as_selector(layers: str | Sequence[str] | Iterable[str]) -> str | list[str]:
    """The layer selector as :func:`engine.model.graph.select_tensors` takes it."""
    return layers if isinstance(layers, str) else list(layers)
