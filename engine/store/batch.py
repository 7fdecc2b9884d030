"""What one scoring batch produced: the one schema shared by the scoring run and the store.

The scoring step (:mod:`engine.run`) builds a :class:`BatchResult` per batch of cases; the
store writer (:meth:`engine.store.StoreWriter.write_batch`) checks it with
:meth:`BatchResult.validate` and writes its fields as they are. This module owns the
meaning of every field; ``docs/store.md`` says where each one lands in the file.

Examples
--------
>>> import numpy as np
>>> layer = ScoreBlock.empty((2, 1, 3))          # 2 cases, 1 class, 3 layers
>>> layer.score[:, 0, 0] = [0.8, 0.6]
>>> result = BatchResult(
...     case_ids=("a", "b"), case_index=np.array([0, 1]), case_status=("ok", "ok"),
...     case_group=("", ""), layer=layer, units={}, input=None,
...     output_dice=np.full((2, 1), np.nan), baselines={}, maps={})
>>> result.validate(classes=[1], layers=[{"channels": 4}] * 3)
"""
from __future__ import annotations

import json
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.status import Status

__all__ = ["SCORE_FIELDS", "ScoreBlock", "BatchResult", "CaseGrid"]

#: The arrays of a :class:`ScoreBlock` and the dtype each is stored with.
SCORE_FIELDS: dict[str, np.dtype[Any]] = {
    "score": np.dtype(np.float64), "status": np.dtype(np.uint8), "tp": np.dtype(np.int64),
    "fp": np.dtype(np.int64), "fn": np.dtype(np.int64)}


@dataclass(frozen=True, eq=False)
class ScoreBlock:
    """SA results on a (cases, classes, n) grid: score float64, status uint8
    (:class:`engine.status.Status`), tp/fp/fn int64.

    ``n`` is the number of layers (layer level), of channels (unit level, one block per
    layer) or of input-SA columns. The block is frozen (its arrays cannot be swapped) but
    the arrays are filled in place, e.g. with :meth:`put`.

    Attributes
    ----------
    score : ndarray of float64, shape (cases, classes, n)
        SA (Dice of the ProtoSeg map against the reference); NaN where undefined.
    status : ndarray of uint8, same shape
        Why a score is (un)defined; a score is finite only with ``Status.OK`` (0).
    tp, fp, fn : ndarray of int64, same shape
        Confusion counts behind the score (0 where not computed).

    Examples
    --------
    >>> block = ScoreBlock.empty((4, 2, 3))
    >>> block.shape, bool(block.status[0, 0, 0] == Status.NOT_COMPUTED)
    ((4, 2, 3), True)
    """

    score: np.ndarray
    status: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> ScoreBlock:
        """A block of ``shape`` where nothing is computed yet.

        Parameters
        ----------
        shape : tuple of int
            Usually (cases, classes, n).

        Returns
        -------
        ScoreBlock
            ``score`` NaN, ``status`` ``Status.NOT_COMPUTED``, counts 0, in the stored
            dtypes.
        """
        shape = tuple(int(s) for s in shape)
        return cls(score=np.full(shape, np.nan, dtype=np.float64),
                   status=np.full(shape, int(Status.NOT_COMPUTED), dtype=np.uint8),
                   tp=np.zeros(shape, dtype=np.int64), fp=np.zeros(shape, dtype=np.int64),
                   fn=np.zeros(shape, dtype=np.int64))

    def put(self, where: Any, res: Any) -> None:
        """Copy a result's five arrays into the block at index ``where``.

        Parameters
        ----------
        where : index
            Any NumPy index of the block's arrays, e.g. ``(rows, k, li)``.
        res : object
            Has ``score, status, tp, fp, fn`` attributes broadcastable to
            ``self.score[where]`` (e.g. :class:`engine.scores.SAScores`).
        """
        for name in SCORE_FIELDS:
            getattr(self, name)[where] = getattr(res, name)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``score`` (every field must have it)."""
        return tuple(np.shape(self.score))

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(field name, array)`` pairs in the order ``score, status, tp, fp, fn``."""
        for name in SCORE_FIELDS:
            yield name, getattr(self, name)

    def _check(self, what: str, expected: tuple[int | None, ...], hint: str) -> None:
        """Check every field's type, shape and values; ``None`` in ``expected`` is free."""
        shapes = {}
        for name, value in self.items():
            arr = _numbers(value, f"{what}.{name}", SCORE_FIELDS[name])
            shapes[name] = arr.shape
            _check_shape(arr, f"{what}.{name}", expected, hint)
        if len(set(shapes.values())) > 1:
            raise ValueError(f"{what} fields have shapes {shapes}, expected one shape for "
                             "score, status, tp, fp and fn")


@dataclass(frozen=True, eq=False)
class CaseGrid:
    """Where a case's voxels lie in space, as the model saw them (before the card resized).

    Its affine and orientations are stored for every case (``/cases/affine``...), and the
    whole grid with the case's saved maps (the ``grid`` attribute of ``/maps/<case>``) so
    that the maps can be written back onto the image's grid for viewers
    (:func:`engine.store.maps_export.export_maps`).

    Attributes
    ----------
    affine : ndarray of float64, shape (4, 4), or None
        Voxel indices → RAS+ millimetres (nibabel's convention) of the arrays given to the
        model, after ``reorient`` when it was set; None when the file had none (PNG...).
    shape : tuple of int
        Their spatial shape (the maps' grid differs when the model card resized the input).
    orientation : str
        Orientation codes of ``affine`` (``"RAS"`` after ``reorient``); ``""`` without.
    file_orientation : str
        Orientation codes of the image file, before any reorientation; ``""`` without.
    format : str
        The image file's format (``"nifti"``, ``"nrrd"``, ``"png"``..., ``"array"``).

    Examples
    --------
    >>> g = CaseGrid(np.eye(4), (8, 8, 8), "RAS", "RAS", "nifti")
    >>> CaseGrid.from_json(g.to_json()).shape
    (8, 8, 8)
    """

    affine: np.ndarray | None
    shape: tuple[int, ...]
    orientation: str = ""
    file_orientation: str = ""
    format: str = ""

    def __post_init__(self) -> None:
        if self.affine is not None:
            affine = np.array(self.affine, dtype=np.float64)
            if affine.shape != (4, 4) or not np.isfinite(affine).all():
                raise ValueError(f"CaseGrid.affine has shape {affine.shape}, expected a finite "
                                 "(4, 4) voxel-to-world matrix or None")
            object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    def to_json(self) -> str:
        """The grid as JSON text (floats round-trip exactly)."""
        return json.dumps({"affine": None if self.affine is None else self.affine.tolist(),
                           "shape": list(self.shape), "orientation": self.orientation,
                           "file_orientation": self.file_orientation, "format": self.format},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CaseGrid:
        """The grid :meth:`to_json` wrote."""
        d = json.loads(text)
        return cls(affine=d.get("affine"), shape=tuple(d.get("shape") or ()),
                   orientation=str(d.get("orientation", "")),
                   file_orientation=str(d.get("file_orientation", "")),
                   format=str(d.get("format", "")))


@dataclass(frozen=True, eq=False)
class BatchResult:
    """Everything one batch of ``nb`` cases produced, in the store's schema.

    Every array has the batch's cases along its first axis, in the order of
    ``case_ids``; ``n_classes`` is the number of scored classes (one-vs-rest) and
    ``n_layers`` the number of scored tensors, both as given to the
    :class:`~engine.store.StoreWriter`. A case that could not be scored keeps its row
    (status NOT_COMPUTED, NaN) and says why in ``case_status``.

    Attributes
    ----------
    case_ids : tuple of str
        The dataset's ids of the batch's cases, each once.
    case_index : ndarray of int64, shape (nb,)
        Each case's position in the dataset; the store keeps cases in this order.
    case_status : tuple of str
        ``"ok"`` or why the case was not scored (``"unreadable"``, ...).
    case_group : tuple of str
        The case's group (subject, site); ``""`` when none.
    layer : ScoreBlock, shape (nb, n_classes, n_layers)
        Layer-level SA.
    units : mapping of int to ScoreBlock
        Layer index → unit-level SA of that layer, shape (nb, n_classes, channels);
        empty when units were not scored. Every batch of a store has the same keys.
    input : ScoreBlock or None
        Input SA (SPEC §5), shape (nb, n_classes, 1 + n_input_channels when there are
        several input channels, else 1); None when not computed.
    output_dice : ndarray of float64, shape (nb, n_classes)
        Dice of the prediction against the ground truth; NaN without ground truth.
    baselines : mapping of str to ndarray
        Name → (nb, n_classes) float64 trivial quality baselines
        (``predicted_fraction``, ...).
    maps : mapping of str to mapping
        Case id (of this batch) → {name: {"binary": bool array, "probability": float
        array} for a ProtoSeg map, or an array (``"_image"``, ``"_prediction"``,
        ``"_reference"``)}; only for the cases whose maps are saved.
    notes : tuple of str
        Things the run should tell the user once (e.g. how mask labels were read); not
        stored in the file: the run logs them, deduplicated across batches.
    no_reference : tuple of str
        Ids of cases that had no mask in a labelled run (their scores that need ground
        truth have status NO_REFERENCE); the run reports how many.
    grids : mapping of str to CaseGrid
        Case id → where its voxels lie (:class:`CaseGrid`); optional. Every case's affine and
        orientations are stored per case (``/cases/affine``, ``/cases/orientation``,
        ``/cases/file_orientation``; NaN and ``""`` for a case without one), and the whole
        grid with the saved maps (the ``grid`` attribute of ``/maps/<case>``).
    label_free : ScoreBlock or None, shape (nb, n_classes, n_layers)
        In a run scored against the ground truth with the prediction as guide: the layer SA
        against the prediction of the cases without a mask (their label-free result; the
        others NOT_COMPUTED). None in other runs; every batch of a run has it or none does.
    """

    case_ids: tuple[str, ...]
    case_index: np.ndarray
    case_status: tuple[str, ...]
    case_group: tuple[str, ...]
    layer: ScoreBlock
    units: Mapping[int, ScoreBlock]
    input: ScoreBlock | None
    output_dice: np.ndarray
    baselines: Mapping[str, np.ndarray]
    maps: Mapping[str, Mapping[str, Any]]
    notes: tuple[str, ...] = ()
    no_reference: tuple[str, ...] = ()
    grids: Mapping[str, CaseGrid] = field(default_factory=dict)
    label_free: ScoreBlock | None = None

    @property
    def n_cases(self) -> int:
        """``nb``, the number of cases in the batch."""
        return len(self.case_ids)

    def validate(self, *, classes: Sequence[int],
                 layers: Sequence[Mapping[str, Any]]) -> None:
        """Check the batch against the run it belongs to.

        Parameters
        ----------
        classes : sequence of int
            The run's scored class labels (only their number is used).
        layers : sequence of dict
            The run's layer dicts, in index order; ``channels`` (when given and not
            negative) is the unit count each ``units`` block must have.

        Raises
        ------
        TypeError
            A field has the wrong type (a dict instead of a :class:`ScoreBlock`, strings
            where numbers belong, ...).
        ValueError
            A shape does not fit (the message gives the expected one), a case id is
            listed twice, counts or statuses are not integers in range, ``units`` names a
            layer index the run does not have, or ``maps`` names a case of another batch.
        """
        ids = _strings(self.case_ids, "BatchResult.case_ids", None)
        nb = len(ids)
        if len(set(ids)) != nb:
            dup = sorted({c for c in ids if ids.count(c) > 1})
            raise ValueError(f"BatchResult.case_ids lists case ids more than once: "
                             f"{dup[:5]}; each case once")
        _strings(self.case_status, "BatchResult.case_status", nb)
        _strings(self.case_group, "BatchResult.case_group", nb)
        index = _numbers(self.case_index, "BatchResult.case_index", np.dtype(np.int64))
        _check_shape(index, "BatchResult.case_index", (nb,), "one dataset position per case")
        n_cls, n_layers = len(classes), len(layers)
        hint = "check the layers and classes given to StoreWriter"
        _block(self.layer, "BatchResult.layer").\
            _check("BatchResult.layer", (nb, n_cls, n_layers), hint)
        if not isinstance(self.units, Mapping):
            raise TypeError(f"BatchResult.units must be a dict layer index -> ScoreBlock, got "
                            f"{type(self.units).__name__}")
        for key, block in self.units.items():
            try:
                li = operator.index(key)
            except TypeError:
                raise TypeError(f"BatchResult.units has key {key!r}; keys are layer indices "
                                "(int)") from None
            if not 0 <= li < n_layers:
                raise ValueError(f"BatchResult.units has unit scores for layer index {li}, "
                                 f"but the store has layers 0..{n_layers - 1}")
            channels = layers[li].get("channels")
            known = channels is not None and int(channels) >= 0
            _block(block, f"BatchResult.units[{li}]")._check(
                f"BatchResult.units[{li}]", (nb, n_cls, int(channels) if known else None),
                f"layer {li} has {channels} channels; " + hint if known else hint)
        if self.label_free is not None:
            _block(self.label_free, "BatchResult.label_free")._check(
                "BatchResult.label_free", (nb, n_cls, n_layers), hint)
        if self.input is not None:
            _block(self.input, "BatchResult.input")._check(
                "BatchResult.input", (nb, n_cls, None), "(cases, classes, input columns)")
        dice = _numbers(self.output_dice, "BatchResult.output_dice", np.dtype(np.float64))
        _check_shape(dice, "BatchResult.output_dice", (nb, n_cls), "(cases, classes)")
        if not isinstance(self.baselines, Mapping):
            raise TypeError(f"BatchResult.baselines must be a dict name -> (cases, classes) "
                            f"array, got {type(self.baselines).__name__}")
        for name, value in self.baselines.items():
            what = f"BatchResult.baselines[{name!r}]"
            if not isinstance(name, str):
                raise TypeError(f"{what}: baseline names must be str")
            _check_shape(_numbers(value, what, np.dtype(np.float64)), what, (nb, n_cls),
                         "(cases, classes)")
        self._validate_maps(set(ids))
        if not isinstance(self.grids, Mapping):
            raise TypeError(f"BatchResult.grids must be a dict case_id -> CaseGrid, got "
                            f"{type(self.grids).__name__}")
        for cid, grid in self.grids.items():
            if str(cid) not in ids:
                raise ValueError(f"BatchResult.grids has case id {cid!r}, not in this batch")
            if not isinstance(grid, CaseGrid):
                raise TypeError(f"BatchResult.grids[{cid!r}] must be a CaseGrid, got "
                                f"{type(grid).__name__}")

    def _validate_maps(self, ids: set[str]) -> None:
        if not isinstance(self.maps, Mapping):
            raise TypeError("BatchResult.maps must be a dict case_id -> {layer: {binary, "
                            f"probability}}}}, got {type(self.maps).__name__}")
        unknown = [c for c in self.maps if str(c) not in ids]
        if unknown:
            raise ValueError(f"BatchResult.maps has case ids not in this batch: "
                             f"{unknown[:5]}; maps belong to the batch of their case")
        for cid, entries in self.maps.items():
            if not isinstance(entries, Mapping):
                raise TypeError(f"BatchResult.maps[{cid!r}] must be a dict name -> map, got "
                                f"{type(entries).__name__}")
            for name, value in entries.items():
                if isinstance(value, Mapping):
                    bad = [str(k) for k, v in value.items()
                           if np.asarray(v).dtype.kind not in "biuf"]
                else:
                    bad = [] if np.asarray(value).dtype.kind in "biuf" else [str(name)]
                if bad:
                    raise TypeError(f"BatchResult.maps[{cid!r}][{name!r}] holds non-numeric "
                                    f"arrays {bad}; maps are bool or float arrays")


def _block(value: Any, what: str) -> ScoreBlock:
    if not isinstance(value, ScoreBlock):
        raise TypeError(f"{what} must be a ScoreBlock, got {type(value).__name__}; build it "
                        "with ScoreBlock.empty(shape) and fill it")
    return value


def _strings(value: Any, what: str, n: int | None) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{what} must be a tuple of str, got {type(value).__name__}")
    items = list(value)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{what} holds {type(bad[0]).__name__} values ({bad[0]!r}), expected "
                        "str")
    if n is not None and len(items) != n:
        raise ValueError(f"{what} has {len(items)} entries, expected {n} cases (one per "
                         "case id)")
    return items


def _numbers(value: Any, what: str, dtype: np.dtype[Any]) -> np.ndarray:
    """``value`` as an array whose values fit ``dtype`` (integral floats fit integers)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{what} holds {arr.dtype} values, expected numbers ({dtype})")
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.dtype.kind == "f":
            ok = bool(np.isfinite(arr).all() and (arr == np.round(arr)).all()
                      and arr.min() >= info.min and arr.max() <= info.max)
        else:
            ok = bool(arr.min() >= info.min and arr.max() <= info.max)
        if not ok:
            raise ValueError(f"{what} holds non-integer, NaN or out-of-range values, "
                             f"expected integers for {dtype}; fill undefined counts with 0 "
                             "and say why in the status")
    return arr


def _check_shape(arr: np.ndarray, what: str, expected: tuple[int | None, ...],
                 hint: str) -> None:
    """Refuse ``arr`` unless its shape is ``expected`` (``None`` entries are free)."""
    nb = expected[0]
    if arr.ndim == 0 or arr.shape[0] != nb:
        raise ValueError(f"{what} has shape {arr.shape}, expected {nb} cases along the first "
                         "axis (one row per case id)")
    if arr.ndim != len(expected) or any(e is not None and s != e
                                        for s, e in zip(arr.shape, expected)):
        want = "(" + ", ".join("n" if e is None else str(e) for e in expected) + \
            ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"{what} has shape {arr.shape}, expected {want}; {hint}")
