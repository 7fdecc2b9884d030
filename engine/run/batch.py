"""One batch of cases in, one :class:`engine.store.BatchResult` out: the pure scoring step.

:func:`score_batch` reads nothing but its arguments and writes nothing: in-process runs,
``--shard`` workers and cluster workers all call it the same way. Steps per batch:
preprocess (non-finite inputs stop or are recorded) → run the first pass (with the
prediction) → probability, prediction, ground truth, output Dice, baselines → guide and
reference per class → SA of every tensor, pass by pass (one pass's activations alive at a
time) → input SA (SPEC §5) → saved maps.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.datasets import Case
from engine.errors import CaseError, CaseSkippedWarning, NonFiniteFeaturesError, option
from engine.gpu import DeviceTensor
from engine.quality import baselines as compute_baselines
from engine.quality.baseline import BASELINE_NAMES
from engine.model.activation import ActivationError, check_activation
from engine.model.shapes import accepted_multiple, size_message
from engine.resize import resize_linear, resize_nearest
from engine.run.options import BEST_UNIT_MAPS
from engine.run.plan import Pass, Plan
from engine.scores import dice, protoseg, reuse_guide_weights, sa_scores, sa_scores_concat
from engine.status import Status
from engine.store import BatchResult, ScoreBlock
from engine.store.batch import CaseGrid

__all__ = ["score_batch"]


@dataclass(frozen=True)
class _Inputs:
    """The scorable cases of a batch: model input, channels-first image, their rows."""

    ok: list[int]          # positions (in the batch) of the cases scored
    x: np.ndarray          # model input (len(ok), ...)
    x_cf: np.ndarray       # channels-first image on the reference grid
    status: list[str]      # per case of the batch: "ok" or why not scored
    extent: tuple[int, ...] | None = None  # the padded grid the model saw (card size_multiple)


@dataclass(frozen=True)
class _Targets:
    """Prediction, ground truth, guides and references of the scorable cases."""

    prob: np.ndarray                 # (n_ok, K, *grid) foreground probability per class
    pred: np.ndarray                 # (n_ok, K, *grid) bool
    gt: np.ndarray | None            # (n_ok, K, *grid) bool, None without masks
    guides: list[np.ndarray]         # per class, float32 (n_ok, *grid)
    refs: list[np.ndarray]           # per class, bool (n_ok, *grid)
    extent: tuple[int, ...] | None = None  # the padded grid the features cover (see _Inputs)
    # (class, row) -> guides[class][row:row + 1], one view object for every tensor's maps, so
    # reuse_guide_weights() recognises it (issue 15: 60 guide-weight passes in the demo, now 3)
    map_guides: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def map_guide(self, k: int, j: int) -> np.ndarray:
        """The guide of class ``k`` for the case at row ``j``, ``(1, *grid)``."""
        g = self.map_guides.get((k, j))
        if g is None:
            g = self.map_guides[(k, j)] = self.guides[k][j:j + 1]
        return g


def _batch_names(cases: Sequence[Case], rows: Sequence[int]) -> tuple[str, str]:
    """(case id, path) naming the cases at ``rows`` for an error message."""
    if len(rows) == 1:
        c = cases[rows[0]]
        return str(c.id), str(c.path)
    ids = ", ".join(repr(str(cases[i].id)) for i in rows[:5]) + (" ..." if len(rows) > 5 else "")
    return str(cases[rows[0]].id), f"batch of {len(rows)} cases: {ids}"


def _prepare(plan: Plan, cases: Sequence[Case]) -> tuple[list[str], dict[int, np.ndarray]]:
    """Per case its status, and the model input of each scorable one (by batch position).

    A case the model cannot take (channel count, rank, size) is skipped with a status and a
    warning naming it, or stops the run with ``strict``; non-finite inputs stop the run or
    are recorded (``nonfinite``), checked on the raw image before scaling could hide them.
    """
    status = [str(c.status) for c in cases]
    card, o = plan.card, plan.options
    xs: dict[int, np.ndarray] = {}
    bad: list[int] = []
    for i, c in enumerate(cases):
        if c.status != "ok":
            continue
        image = np.asarray(c.image)
        try:
            if image.ndim == card.spatial_ndim + 1 and image.shape[0] != card.channels:
                kind = "RGB" if image.shape[0] in (3, 4) else f"{image.shape[0]}-channel"
                raise _Unusable("wrong-channels", (
                    f"image is {kind} ({image.shape[0]} channels), the model takes {card.channels}; "
                    "convert it" + (" to greyscale" if card.channels == 1 else "")))
            x = card.preprocess(image)
        except ValueError as exc:
            st = exc.status if isinstance(exc, _Unusable) else "bad-shape"
            if o.strict:
                raise CaseError(f"{exc}; the run stops here ({option('strict')} is set: drop it "
                                "to skip such cases)", case_id=str(c.id), path=str(c.path)) from None
            warnings.warn(CaseSkippedWarning(str(c.id), f"{c.path}: {exc}"), stacklevel=2)
            status[i] = st
            continue
        if not (np.isfinite(image).all() and np.isfinite(x).all()):
            bad.append(i)
            status[i] = "nonfinite-input"
            continue
        xs[i] = x
    if bad and o.nonfinite == "raise":
        first = cases[bad[0]]
        raise CaseError(
            f"the input image holds NaN or Inf ({len(bad)} case(s) in this batch); fix "
            f"the data or pass {option('nonfinite', 'skip')} to record such cases as "
            "NONFINITE and go on", case_id=str(first.id), path=str(first.path))
    return status, xs


class _Unusable(ValueError):
    """A case the model cannot take, with the status it is recorded under."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _groups(plan: Plan, xs: dict[int, np.ndarray],
            sizes: dict[int, tuple[int, ...]] | None = None) -> list[list[int]]:
    """Batch positions in runs of one input shape (and one scored size, when inputs are
    padded; first appearance first), each at most as large as the memory plan allows: a
    model with dynamic sizes was planned for one case's voxels, and a batch of larger cases
    is scored in proportionally smaller parts."""
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, x in xs.items():
        by_shape.setdefault((tuple(x.shape), (sizes or {}).get(i)), []).append(i)
    out: list[list[int]] = []
    for rows in by_shape.values():
        step = len(rows)
        if plan.planned_voxels:
            voxels = int(np.prod(np.shape(plan.card.to_channels_first(xs[rows[0]][None],
                                                                      plan.card.input_name))[2:]))
            if voxels > plan.planned_voxels:
                step = max(1, plan.options.batch_size * plan.planned_voxels // voxels)
        out.extend(rows[j:j + step] for j in range(0, len(rows), step))
    return out


def _scored_sizes(plan: Plan, cases: Sequence[Case], xs: dict[int, np.ndarray]) -> dict[int, tuple[int, ...]]:
    """Per scorable case the grid it is scored on (after any resize to the card's input
    size), when the card pads inputs to a size multiple; empty otherwise."""
    card = plan.card
    if card.size_multiple is None:
        return {}
    return {i: tuple(card.input_size) if card.input_size is not None else
            tuple(int(d) for d in np.shape(cases[i].image)[1:]) for i in xs}


def _run(p: Pass, plan: Plan, x: np.ndarray, cases: Sequence[Case], ok: list[int],
         extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Run one pass; an onnxruntime failure names the cases it ran on (and, for a size
    the model cannot take, the sizes it can)."""
    from engine.run.stages import native_section  # the run's reads and writes go on meanwhile

    try:
        with native_section():
            if plan.device is not None:  # GPU data path (issue 19): hidden outputs stay on the device
                return p.session.run_device({plan.card.input_name: x}, outputs=[t.name for t in p.tensors]
                                            + list(extra), host=list(extra))
            return p.session.run({plan.card.input_name: x}, outputs=[t.name for t in p.tensors] + list(extra))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # onnxruntime raises its own types; keep the message, add the cases
        case_id, where = _batch_names(cases, ok)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaseError(_size_advice(p, plan, x) or f"running the model failed: {reason}",
                        case_id=case_id, path=where) from exc


def _size_advice(p: Pass, plan: Plan, x: np.ndarray) -> str | None:
    """For a model with symbolic spatial dims that failed on ``x``: which sizes it takes."""
    card = plan.card
    layout = str(card.layout).upper()
    axes = [i for i, ch in enumerate(layout) if ch not in "NC"]
    declared = p.session.input_shapes.get(card.input_name) or ()
    if len(declared) != x.ndim or all(isinstance(declared[i], int) for i in axes):
        return None
    m = accepted_multiple(p.session, card.input_name, x.shape, axes)
    return None if m is None else size_message([x.shape[i] for i in axes], m)


def _targets(plan: Plan, cases: Sequence[Case], inp: _Inputs, out0: dict[str, np.ndarray]) -> _Targets:
    """Prediction, ground truth, and per class the guide and the reference."""
    card, o = plan.card, plan.options
    ref_shape = tuple(inp.x_cf.shape[2:])
    pred_name = card.prediction_output
    try:  # probabilities read from raw scores would be made-up numbers: say so instead
        check_activation(out0[pred_name], card.activation, where=f"prediction output {pred_name!r}",
                         layout=card.output_layout)
    except ActivationError as exc:
        case_id, where = _batch_names(cases, inp.ok)
        raise CaseError(str(exc), case_id=case_id, path=where) from None
    prob = card.to_probability({pred_name: out0[pred_name]})  # (B, K, *grid)
    if inp.extent is not None:  # the prediction covers the padded grid: crop it back
        if tuple(prob.shape[2:]) != inp.extent:
            prob = resize_linear(prob, inp.extent)
        prob = np.ascontiguousarray(prob[(slice(None), slice(None)) + tuple(slice(0, n) for n in ref_shape)])
    elif tuple(prob.shape[2:]) != ref_shape:
        prob = resize_linear(prob, ref_shape)
    finite = np.isfinite(prob.reshape(len(inp.ok), -1)).all(axis=1)
    if not finite.all():
        c = cases[inp.ok[int(np.argmax(~finite))]]
        raise CaseError(f"the prediction output {pred_name!r} holds NaN or Inf although the input "
                        "is finite; check the model (its export or its weights)",
                        case_id=str(c.id), path=str(c.path))
    pred = prob > plan.threshold
    gt = _ground_truth(plan, cases, inp.ok, ref_shape) if plan.has_masks else None
    guides, refs = [], []
    for k in range(len(plan.classes)):
        if o.guide == "prediction":
            g = prob[:, k] if o.guide_kind == "soft" else pred[:, k]
        else:
            g = gt[:, k]
        guides.append(np.ascontiguousarray(g, dtype=np.float32))
        refs.append(pred[:, k] if plan.reference == "prediction" else gt[:, k])
    return _Targets(prob, pred, gt, guides, refs, inp.extent)


def _labels_in(mask: np.ndarray) -> set[int]:
    """The labels a mask holds, ``{int(v) for v in np.unique(mask)}``: for unsigned masks of up
    to 16 bits (what datasets give: uint8, uint16) marked by a Numba kernel in one pass on every
    core (:func:`engine._kernels.labels.present_values`; Colin27's 126-label mask: 1.7 ms, 12 ms with
    ``np.bincount`` over chunks, 28 ms with ``np.unique``'s sort, see ``benchmarks/RESULTS.md``);
    other dtypes through ``np.unique``."""
    m = np.asarray(mask)
    if m.dtype.kind != "u" or m.dtype.itemsize > 2 or m.size == 0:
        return {int(v) for v in np.unique(m)}
    from engine._kernels.labels import present_values

    flat = np.ravel(m, order="K")  # contiguous: a view of a C or Fortran mask in memory order, else a copy
    return {int(v) for v in np.flatnonzero(present_values(flat))}


def _labels_note(plan: Plan, cases: Sequence[Case], ok: list[int]) -> tuple[str, ...]:
    """Check mask labels against the scored classes; say how a binary model reads them.

    A multi-class model's masks may hold only background (0) and the scored classes: any
    other value is an error naming the values seen. A binary model takes any non-zero label
    as foreground ({0, 1} and {0, 255} alike); several labels merged so are noted once.
    """
    seen: set[int] = set()
    for i in ok:
        m = cases[i].mask
        if m is None:
            continue
        vals = _labels_in(m)
        if not plan.binary_model:
            extra = sorted(vals - set(plan.classes) - {0})
            if extra:
                c = cases[i]
                raise CaseError(
                    f"mask {c.mask_path or c.path} holds label(s) {extra} that are not background (0) "
                    f"or a scored class {list(plan.classes)}; pass the classes to score ({option('classes', 'A,B')}) "
                    "or remap the masks' labels", case_id=str(c.id), path=str(c.mask_path or c.path))
        seen |= vals - {0}
    if plan.binary_model and len(seen) > 1:
        labels = (str(sorted(seen)) if len(seen) <= 8 else
                  f"{min(seen)}..{max(seen)} ({len(seen)} distinct values)")
        return (f"assumed: mask labels {labels} are merged into one foreground (binary model); "
                f"use a multi-class model card ({option('classes', 'A,B')}) to score them apart",)
    return ()


def _ground_truth(plan: Plan, cases: Sequence[Case], ok: list[int],
                  ref_shape: tuple[int, ...]) -> np.ndarray:
    """Per class the reference mask on the input grid (any label for a binary model)."""
    gt = np.zeros((len(ok), len(plan.classes)) + ref_shape, dtype=bool)
    for j, i in enumerate(ok):
        m = cases[i].mask
        if m is None:
            continue
        m = np.asarray(m)
        if tuple(m.shape) != ref_shape:
            m = resize_nearest(m, ref_shape)
        for k, cls in enumerate(plan.classes):
            gt[j, k] = (m > 0) if plan.binary_model else (m == cls)
    return gt


def _no_reference(plan: Plan, cases: Sequence[Case], ok: list[int], blocks: Sequence[ScoreBlock],
                  out_dice: np.ndarray) -> tuple[str, ...]:
    """Cases without a mask in a labelled run: NaN with NO_REFERENCE wherever the ground
    truth is needed (reference, guide, output Dice); label-free results stay. Returns their ids."""
    if not plan.has_masks:
        return ()
    rows = [i for i in ok if cases[i].mask is None]
    if not rows:
        return ()
    out_dice[rows] = np.nan
    if plan.reference == "ground_truth" or plan.options.guide == "ground_truth":
        for blk in blocks:
            blk.score[rows] = np.nan
            blk.status[rows] = int(Status.NO_REFERENCE)
            blk.tp[rows] = 0
            blk.fp[rows] = 0
            blk.fn[rows] = 0
    return tuple(str(cases[i].id) for i in rows)


def _put_sa(layer: ScoreBlock, units: dict[int, ScoreBlock], res: Any, level: str,
            where: tuple[Any, int, int], nb: int) -> None:
    """File one ``sa_scores`` result under (cases, class, layer index)."""
    rows, k, li = where
    lres, ures = res if level == "both" else ((res, None) if level == "layer" else (None, res))
    if lres is not None:
        layer.put((rows, k, li), lres)
    if ures is not None:
        if li not in units:
            units[li] = ScoreBlock.empty((nb, layer.score.shape[1], ures.score.shape[1]))
        units[li].put((rows, k), ures)


def _label_free_wanted(plan: Plan) -> bool:
    """A labelled run scores against the ground truth; its cases without a mask then get
    their label-free layer SA (prediction guide, prediction reference) in a block of their own."""
    return plan.has_masks and plan.reference == "ground_truth" and plan.options.guide == "prediction"


def _score_label_free(plan: Plan, cases: Sequence[Case], ok: list[int], t: Any, feats: Any,
                      tg: _Targets, block: ScoreBlock) -> None:
    """Layer SA against the prediction for the scorable cases without a mask."""
    rows = [j for j, i in enumerate(ok) if cases[i].mask is None]
    if not rows:
        return
    o, li = plan.options, plan.layer_index[t.name]
    sel: Any = rows if len(rows) < len(ok) else slice(None)  # every case: views, no copies
    f = feats.to_host() if isinstance(feats, DeviceTensor) else feats
    f = f if isinstance(sel, slice) else np.ascontiguousarray(f[sel])
    for k in range(len(plan.classes)):
        res = sa_scores(f, tg.guides[k][sel], tg.pred[sel, k], level="layer", resize=o.resize,
                        empty=o.empty, nonfinite="skip", extent=tg.extent)
        block.put(([ok[j] for j in rows], k, li), res)


def _score_tensor(plan: Plan, cases: Sequence[Case], ok: list[int], t: Any, feats: np.ndarray,
                  tg: _Targets, layer: ScoreBlock, units: dict[int, ScoreBlock], nb: int) -> None:
    o = plan.options
    level = o.level
    li = plan.layer_index[t.name]
    # GPU data path (issue 19): a tensor left on the device is scored there
    if isinstance(feats, DeviceTensor) and tg.extent is not None:
        feats = feats.to_host()  # padded inputs are scored on the host (extent)
    score = plan.device.sa_scores if isinstance(feats, DeviceTensor) else functools.partial(
        sa_scores, extent=tg.extent)
    for k in range(len(plan.classes)):
        try:
            res = score(feats, tg.guides[k], tg.refs[k], level=level, resize=o.resize,
                        empty=o.empty, nonfinite=o.nonfinite)
        except NonFiniteFeaturesError as exc:
            raise _nonfinite_error(cases, ok, exc, t.name, t.layer) from exc
        _put_sa(layer, units, res, level, (ok, k, li), nb)


def _nonfinite_error(cases: Sequence[Case], ok: list[int], exc: NonFiniteFeaturesError, name: str,
                     layer_name: str) -> CaseError:
    """The error naming the case and tensor whose features hold NaN or Inf."""
    c = cases[ok[exc.sample]]
    return CaseError(f"tensor {name!r} (layer {layer_name}): {exc}", case_id=str(c.id), path=str(c.path),
                     tensor=name)


def _pass_groups(plan: Plan, p: Any) -> dict[str, tuple[str, ...]]:
    """The pass's concatenations scored from their parts: every member in the pass, on the CPU."""
    if plan.device is not None or not plan.concat_groups:
        return {}
    names = {t.name for t in p.tensors}
    return {w: parts for w, parts in plan.concat_groups.items() if w in names and names.issuperset(parts)}


def _score_concat(plan: Plan, cases: Sequence[Case], ok: list[int], whole: str, parts: tuple[str, ...],
                  out: dict[str, Any], tg: _Targets, layer: ScoreBlock, units: dict[int, ScoreBlock],
                  nb: int) -> None:
    """Score a concatenation and its parts in one call (:func:`engine.scores.sa_scores_concat`):
    the concatenation's features are not read again."""
    o = plan.options
    level = o.level
    feats = [plan.card.to_channels_first(out[n], n) for n in parts]
    cat = plan.card.to_channels_first(out[whole], whole)
    for k in range(len(plan.classes)):
        try:
            each, res = sa_scores_concat(feats, tg.guides[k], tg.refs[k], whole=cat, level=level,
                                         resize=o.resize, empty=o.empty, nonfinite=o.nonfinite,
                                         extent=tg.extent)
        except NonFiniteFeaturesError as exc:
            block = getattr(exc, "block", None)
            name = whole if block is None else parts[block]
            raise _nonfinite_error(cases, ok, exc, name, plan.layers[plan.layer_index[name]]["layer"]) from exc
        for name, r in zip((*parts, whole), (*each, res)):
            _put_sa(layer, units, r, level, (ok, k, plan.layer_index[name]), nb)


def _tensor_maps(plan: Plan, t: Any, feats: np.ndarray, tg: _Targets, j: int,
                 unit_row: ScoreBlock | None, row: int) -> dict[str, Any]:
    """Saved maps of one tensor for the case at row ``j`` of the scorable cases."""
    o, nk = plan.options, len(plan.classes)
    entry: dict[str, Any] = {}
    for k in range(nk):
        suffix = "" if nk == 1 else f"[class {plan.classes[k]}]"
        r = protoseg(feats[j:j + 1], tg.map_guide(k, j), resize=o.resize, nonfinite="skip",
                     extent=tg.extent)
        entry[t.name + suffix] = {"binary": r.binary[0], "probability": _map16(r.probability[0])}
        if unit_row is None:
            continue
        # the best units of this layer for this case (by unit SA), drawn by reports
        scores = unit_row.score[row, k]
        best = [int(u) for u in np.argsort(np.where(np.isfinite(scores), -scores, np.inf))
                [:BEST_UNIT_MAPS] if np.isfinite(scores[u])]
        for u in best:
            r = protoseg(feats[j:j + 1, u:u + 1], tg.map_guide(k, j), resize=o.resize,
                         nonfinite="skip", extent=tg.extent)
            entry[f"{t.name}#unit{u}{suffix}"] = {"binary": r.binary[0],
                                                  "probability": _map16(r.probability[0])}
    return entry


def _map16(prob: np.ndarray) -> np.ndarray:
    """Probability maps are stored as float16: they are drawn, never scored, and a 128³ map
    compresses 3x smaller and writes 1.4x faster than in float32 (measured on the demo).

    float32 maps are converted by :func:`engine._kernels.half.float16_bits`, the bits of
    ``np.asarray(prob, dtype=np.float16)`` without NumPy's per-element underflow flag, which
    made the cast of a sigmoid map's near-zero background 3-25x slower (26 ms per 128³ map on
    average in ``protoseg demo``, 60 maps; issue 15).
    """
    p = np.asarray(prob)
    if p.dtype != np.float32:
        return np.asarray(p, dtype=np.float16)
    from engine._kernels.half import float16_bits

    p = np.ascontiguousarray(p)
    out = np.empty(p.shape, dtype=np.float16)
    float16_bits(p.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16))
    return out


def _input_columns(plan: Plan) -> int:
    """Input-SA columns: all channels together, then one per channel when there are several."""
    c = int(plan.card.channels)
    return 1 + (c if c > 1 else 0)


def _input_sa(plan: Plan, inp: _Inputs, tg: _Targets, block: ScoreBlock) -> None:
    """SA of the raw input channels (SPEC §5) into ``block``: all channels, then each when
    there are several (see :func:`_input_columns`)."""
    o, nk = plan.options, len(plan.classes)
    c_in = inp.x_cf.shape[1]
    n_in = 1 + (c_in if c_in > 1 else 0)
    for k in range(nk):
        res = sa_scores(inp.x_cf, tg.guides[k], tg.refs[k], level="both" if c_in > 1 else "layer",
                        resize="upsample", empty=o.empty, nonfinite="skip")
        lres, ures = res if c_in > 1 else (res, None)
        block.put((inp.ok, k, 0), lres)
        if ures is not None:
            block.put((inp.ok, k, slice(1, n_in)), ures)


@dataclass
class _Acc:
    """What a batch accumulates, part by part (rows are the cases' batch positions)."""

    layer: ScoreBlock
    units: dict[int, ScoreBlock]
    out_dice: np.ndarray
    base: dict[str, np.ndarray]
    maps: dict[str, dict[str, Any]]
    input: ScoreBlock | None
    notes: list[str] = field(default_factory=list)
    no_ref: list[str] = field(default_factory=list)
    label_free: ScoreBlock | None = None


def _score_part(plan: Plan, cases: Sequence[Case], inp: _Inputs, acc: _Acc) -> None:
    """Score the cases ``inp.ok`` (one input shape) into ``acc``."""
    nb, nk = len(cases), len(plan.classes)
    ok = inp.ok
    if plan.has_masks:
        acc.notes.extend(_labels_note(plan, cases, ok))
    if inp.extent is not None:
        acc.notes.append(f"padded: images whose size is not a multiple of {list(plan.card.size_multiple)} "
                         "are padded with zeros at the end of each axis for the model; their scores, "
                         "maps and prediction are on the image's own grid")
    first = plan.passes[0]
    out = _run(first, plan, inp.x, cases, ok, extra=[plan.card.prediction_output])
    tg = _targets(plan, cases, inp, out)
    if tg.gt is not None:
        for k in range(nk):
            acc.out_dice[ok, k] = dice(tg.pred[:, k], tg.gt[:, k], empty=plan.options.empty, batch=True)
    for k in range(nk):
        for name, val in compute_baselines(tg.prob[:, k], threshold=plan.threshold).items():
            acc.base.setdefault(name, np.full((nb, nk), np.nan))[ok, k] = val
    map_rows = [j for j, i in enumerate(ok) if str(cases[i].id) in plan.map_ids]
    for p in plan.passes:
        if p is not first:  # one pass's activations alive at a time
            out = _run(p, plan, inp.x, cases, ok)
        groups = _pass_groups(plan, p)  # concatenations scored with their parts, at the first met
        group_of = {n: w for w, parts in groups.items() for n in (w, *parts)}
        done: set[str] = set()
        for t in p.tensors:
            if plan.device is None:
                feats = plan.card.to_channels_first(out[t.name], t.name)
            else:  # GPU data path (issue 19): a device view of the OrtValue, no copy
                feats = plan.device.features(out[t.name], name=t.name, layout=plan.card.layout_of(t.name))
            w = group_of.get(t.name)
            if w is None:
                _score_tensor(plan, cases, ok, t, feats, tg, acc.layer, acc.units, nb)
            elif t.name not in done:
                _score_concat(plan, cases, ok, w, groups[w], out, tg, acc.layer, acc.units, nb)
                done.update((w, *groups[w]))
            if acc.label_free is not None:
                _score_label_free(plan, cases, ok, t, feats, tg, acc.label_free)
            if map_rows and isinstance(feats, DeviceTensor):
                feats = feats.to_host()  # maps are drawn on the host (saved cases only)
            for j in map_rows:
                acc.maps.setdefault(str(cases[ok[j]].id), {}).update(_tensor_maps(
                    plan, t, feats, tg, j, acc.units.get(plan.layer_index[t.name]), ok[j]))
            del feats
        del out
    if acc.input is not None:
        _input_sa(plan, inp, tg, acc.input)
    for j in map_rows:
        entry = acc.maps.setdefault(str(cases[ok[j]].id), {})
        entry["_image"] = np.asarray(inp.x_cf[j, 0], dtype=np.float32)
        entry["_prediction"] = np.asarray(tg.prob[j], dtype=np.float32)
        if tg.gt is not None and cases[ok[j]].mask is not None:
            entry["_reference"] = tg.gt[j]
    blocks = [acc.layer, *acc.units.values()] + ([acc.input] if acc.input is not None else [])
    acc.no_ref.extend(_no_reference(plan, cases, ok, blocks, acc.out_dice))


def score_batch(plan: Plan, cases: Sequence[Case], index: Sequence[int]) -> BatchResult:
    """Score one batch of cases with a plan.

    Parameters
    ----------
    plan : Plan
        From :func:`engine.run.plan.build_plan`.
    cases : sequence of Case
        The cases, read by the dataset (unreadable ones keep their status and get NaN).
    index : sequence of int
        Each case's position in the dataset (stored; the store is kept in this order).

    Returns
    -------
    BatchResult
        Everything the batch produced, in the store's schema.

    Raises
    ------
    CaseError
        A case with NaN/Inf in its input, prediction or features (with ``nonfinite="raise"``),
        or a model run that failed; the error names the case id and its file.
    """
    nb, nk = len(cases), len(plan.classes)
    acc = _Acc(layer=ScoreBlock.empty((nb, nk, len(plan.layers))), units={},
               out_dice=np.full((nb, nk), np.nan),
               base={name: np.full((nb, nk), np.nan) for name in BASELINE_NAMES}, maps={},
               input=ScoreBlock.empty((nb, nk, _input_columns(plan))) if plan.options.input_sa else None,
               label_free=ScoreBlock.empty((nb, nk, len(plan.layers))) if _label_free_wanted(plan) else None)
    status, xs = _prepare(plan, cases)
    if plan.device is not None:  # GPU data path (issue 19): the self-check picks its batches
        plan.device.begin_batch()
    sizes = _scored_sizes(plan, cases, xs)
    for rows in _groups(plan, xs, sizes):  # one input shape per part: mixed sizes, planned memory
        x = np.stack([xs[i] for i in rows])
        x_cf = plan.card.to_channels_first(x, plan.card.input_name)
        extent = None
        if sizes and tuple(x_cf.shape[2:]) != sizes[rows[0]]:  # padded (size_multiple): crop back
            extent = tuple(x_cf.shape[2:])
            x_cf = x_cf[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes[rows[0]])]
        with reuse_guide_weights():  # a part's tensors on one grid share the guide's weights
            _score_part(plan, cases, _Inputs(rows, x, x_cf, status, extent), acc)
    layer, units, input_block = acc.layer, acc.units, acc.input
    nonfinite_rows = [i for i in range(nb) if status[i] == "nonfinite-input"]
    if nonfinite_rows:
        for blk in [layer, *units.values()] + ([input_block] if input_block is not None else []):
            blk.status[nonfinite_rows] = int(Status.NONFINITE)
    notes = tuple(dict.fromkeys(acc.notes))
    out_dice, base, maps, no_ref = acc.out_dice, acc.base, acc.maps, tuple(acc.no_ref)
    return BatchResult(
        case_ids=tuple(str(c.id) for c in cases),
        case_index=np.asarray(index, dtype=np.int64),
        case_status=tuple(status),
        case_group=tuple("" if c.group is None else str(c.group) for c in cases),
        layer=layer, units=units, input=input_block, output_dice=out_dice,
        baselines=base, maps=maps, notes=notes, no_reference=no_ref, label_free=acc.label_free,
        # where every case's voxels lie (stored per case; with the saved maps, for viewers)
        grids={str(c.id): _case_grid(c) for c in cases},
    )


def _case_grid(case: Case) -> CaseGrid:
    """Where a case's voxels lie as the model saw them (before any resizing): its affine
    (None when the file had none, or a non-finite one), shape, orientations and format."""
    affine = getattr(case, "affine", None)
    if affine is not None and (np.shape(affine) != (4, 4) or not np.isfinite(affine).all()):
        affine = None
    return CaseGrid(affine, np.shape(case.image)[1:] if case.image is not None else (),
                    getattr(case, "orientation", "") if affine is not None else "",
                    getattr(case, "file_orientation", ""), getattr(case, "source_format", ""))
