"""The scoring run: an ONNX model and a dataset in, a resumable HDF5 store out.

Per batch: read cases → preprocess → run the model (in one or more passes over the
exposed hidden tensors) → turn the output into the prediction → ProtoSeg SA scores for
every exposed tensor and for the input (SPEC §5) → publish the batch → release it.
Memory is bounded by the batch: nothing accumulates across batches except per-case
scalars held by the store writer's parts on disk.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine._checks import check_choice
from engine.status import Status

__all__ = ["score_dataset", "estimate_dataset", "output_path_tensors", "RunSummary", "GUIDES",
           "REFERENCES", "LEVELS", "RESIZES", "ESTIMATORS"]

log = logging.getLogger("protoseg")

GUIDES = ("prediction", "ground_truth")
REFERENCES = ("auto", "ground_truth", "prediction")
LEVELS = ("layer", "unit", "both")
RESIZES = ("upsample", "downsample")
GUIDE_KINDS = ("hard", "soft")
#: Unit maps stored per layer for each case in ``save_maps`` (the best units by unit SA).
BEST_UNIT_MAPS = 3


@dataclass
class RunSummary:
    """What a finished (or resumed) run did; returned by :func:`score_dataset`."""

    store: Path
    provider: str
    n_cases: int
    n_scored: int
    n_skipped_done: int
    n_failed: int
    passes: int
    seconds: float
    assumed: list[str] = field(default_factory=list)


def _sha256(path: Path | None, proto: Any) -> str:
    h = hashlib.sha256()
    if path is not None and path.is_file():
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(proto.SerializeToString())
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _class_reference(mask: np.ndarray, cls: int, binary_model: bool) -> np.ndarray:
    """Ground truth for one scored class: any label for a binary model, else label == cls."""
    return (mask > 0) if binary_model else (mask == cls)


def score_dataset(
    model: str | os.PathLike[str] | Any,
    data: str | os.PathLike[str] | Any,
    store: str | os.PathLike[str],
    *,
    layers: str | Sequence[str] = "auto",
    level: str = "layer",
    guide: str = "prediction",
    guide_kind: str = "hard",
    reference: str = "auto",
    resize: str = "upsample",
    threshold: float | None = None,
    batch_size: int = 8,
    provider: str = "auto",
    optimization: str = "all",
    card: Any = None,
    save_maps: Iterable[str] | int = (),
    input_sa: bool = True,
    empty: str = "nan",
    nonfinite: str = "raise",
    resume: bool = True,
    overwrite: bool = False,
    strict: bool = False,
    groups: Any = None,
    max_activation_memory: int | None = None,
    max_cases: int | None = None,
    shard: str | tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> RunSummary:
    """Score every hidden layer of an ONNX segmentation model on a dataset.

    Parameters
    ----------
    model : path or onnx.ModelProto
        The ONNX model (ideally exported by :mod:`exporters`, whose metadata names the
        layers and describes the prediction; otherwise what is inferred is reported).
    data : path or Dataset
        A dataset accepted by :func:`engine.open_dataset` (folder of image/mask pairs,
        one HDF5/NPZ file, or a single image).
    store : path
        The HDF5 store to write. Work in progress lives in ``<store>.parts/``.
    layers : str or list of str, optional
        Hidden tensors to score: ``"auto"`` (the layers an exporter exposed and named,
        else every hidden tensor), ``"all"``, names, layer names, globs, ``re:`` or ``op:``
        selectors (see :func:`engine.select_tensors`).
    level : {"layer", "unit", "both"}
        Layer-level SA (all channels of a tensor), unit-level SA (each channel), or both.
    guide : {"prediction", "ground_truth"}
        Where the prototypes come from. The default, the network's own prediction, needs
        no ground truth (SPEC §2).
    guide_kind : {"hard", "soft"}
        With ``guide="prediction"``: the thresholded prediction (default) or the
        foreground probability itself as soft weights.
    reference : {"auto", "ground_truth", "prediction"}
        What the ProtoSeg map is scored against. ``"auto"``: ground truth when the dataset
        has masks, else the thresholded prediction.
    resize : {"upsample", "downsample"}
        SPEC §3: features to the input grid (default) or guide/reference to each tensor's grid.
    threshold : float, optional
        Probability threshold for the prediction (default: the model card's, else 0.5).
    batch_size : int
        Cases per model run; bounds memory.
    provider : {"auto", "cpu", "cuda"}
        onnxruntime execution provider; ``auto`` takes CUDA only when it can really load.
    optimization : {"disable", "basic", "extended", "all"}
        onnxruntime graph optimisation level (recorded).
    card : dict, path or ModelCard, optional
        Model-card overrides (a dict of fields, a TOML file path, or a ready ModelCard).
    save_maps : list of case ids or int
        Cases whose SA and probability maps are stored (an int n: the first n cases).
    input_sa : bool
        Also score the raw input channels (SPEC §5).
    empty : {"nan", "one"}
        Dice when map and reference are both empty.
    nonfinite : {"raise", "skip"}
        NaN/Inf in a hidden tensor: stop with an error naming tensor and case, or score NaN
        with status NONFINITE and go on.
    resume : bool
        Continue an interrupted run made with the same settings (default): the same call
        after a crash or a kill picks up where it stopped, and on a finished store it
        does nothing. ``False`` refuses an existing store or unfinished run.
    overwrite : bool
        Replace an existing store (or unfinished run), whatever its settings.
    strict : bool
        Unreadable cases stop the run instead of being skipped with a status.
    groups : mapping or path, optional
        Case id → group (subject, site), passed to the dataset reader.
    max_activation_memory : int, optional
        Bytes of hidden tensors per batch before the selection is split into passes.
    max_cases : int, optional
        Score only the first ``max_cases`` cases.
    shard : "I/N" or (I, N), optional
        Score only the cases whose dataset index ``i`` has ``i % N == I``: N workers (or
        machines) each write their own store, and :func:`engine.merge_parts` joins them
        in dataset order. The shard is provenance, not configuration, so shards merge.
    progress : callable, optional
        ``progress(done, total)`` after each batch.

    Returns
    -------
    RunSummary
        The store path, the provider that ran, and case counts.

    Raises
    ------
    ValueError
        Bad options, a model without spatial hidden tensors, a store made with other
        settings (unless ``overwrite``), non-finite features with ``nonfinite="raise"``.
    FileNotFoundError
        Model or data missing.

    Examples
    --------
    >>> summary = score_dataset("model.onnx", "cases/", "run.h5", level="both")  # doctest: +SKIP
    >>> engine.open_store(summary.store).layer_table()  # doctest: +SKIP
    """
    from engine.datasets import open_dataset
    from engine.model.graph import expose, list_hidden_tensors, load_model, plan_passes, select_tensors
    from engine.model.session import make_session
    from engine.store import StoreWriter

    check_choice(level, "level", LEVELS)
    check_choice(guide, "guide", GUIDES)
    check_choice(guide_kind, "guide_kind", GUIDE_KINDS)
    check_choice(reference, "reference", REFERENCES)
    check_choice(resize, "resize", RESIZES)
    check_choice(empty, "empty", ("nan", "one"))
    check_choice(nonfinite, "nonfinite", ("raise", "skip"))
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    t_start = time.perf_counter()
    started = _now()

    model_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    proto = load_model(model)
    hidden = list_hidden_tensors(proto)
    if not hidden:
        raise ValueError(
            "the model has no hidden tensors that can hold spatial features (float, rank >= 3); "
            "check that this is a segmentation network, or export it with protoseg's exporters"
        )
    mcard = _resolve_card(proto, card)
    if threshold is None:
        threshold = float(mcard.threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold!r}")
    for msg in mcard.assumed:
        log.warning("assumed: %s", msg)

    # network order: by depth from the input (stable for equal depths)
    selected = sorted(select_tensors(hidden, layers), key=lambda t: t.depth)
    passes = plan_passes(selected, batch_size, max_activation_memory=max_activation_memory,
                         input_size=mcard.input_size)
    pred_name = mcard.prediction_output
    sessions = []
    for tensors in passes:
        exposed = expose(proto, tensors)
        sessions.append((tensors, make_session(exposed, provider=provider, optimization=optimization)))
    ran_provider = sessions[0][1].provider

    dataset = data if hasattr(data, "ids") and hasattr(data, "__getitem__") else open_dataset(
        data, spatial_ndim=mcard.spatial_ndim, strict=strict, groups=groups)
    n_total = len(dataset) if max_cases is None else min(len(dataset), int(max_cases))
    has_masks = bool(getattr(dataset, "has_masks", False))
    if guide == "ground_truth" and not has_masks:
        raise ValueError("guide='ground_truth' needs masks, but the dataset has none; "
                         "use guide='prediction' (the default) for label-free runs")
    if reference == "ground_truth" and not has_masks:
        raise ValueError("reference='ground_truth' needs masks, but the dataset has none; "
                         "use reference='auto' or 'prediction'")
    ref_mode = ("ground_truth" if has_masks else "prediction") if reference == "auto" else reference

    classes = [int(c) for c in mcard.classes]
    binary_model = len(classes) == 1
    if isinstance(save_maps, (int, np.integer)):
        map_ids = set(list(dataset.ids)[: int(save_maps)])
    else:
        map_ids = {str(s) for s in save_maps}
        unknown = map_ids - set(map(str, dataset.ids))
        if unknown:
            import difflib

            hint = difflib.get_close_matches(sorted(unknown)[0], list(map(str, dataset.ids)), n=3)
            raise ValueError(f"--maps names case(s) not in the dataset: {sorted(unknown)}; "
                             f"closest: {hint or list(dataset.ids)[:5]}")

    layer_rows = []
    for tensors in passes:
        for t in tensors:
            layer_rows.append(_layer_row(t))
    order = {t.name: i for i, t in enumerate(selected)}
    layer_rows.sort(key=lambda r: order[r["name"]])
    layer_index = {r["name"]: i for i, r in enumerate(layer_rows)}

    config = {
        "model_sha256": _sha256(model_path, proto),
        "layers": [r["name"] for r in layer_rows],
        "level": level,
        "guide": guide,
        "guide_kind": guide_kind,
        "reference": ref_mode,
        "resize": resize,
        "threshold": threshold,
        "classes": classes,
        "empty": empty,
        "nonfinite": nonfinite,
        "input_sa": bool(input_sa),
        "model_card": mcard.to_dict(),
        "dataset": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
        "n_cases": n_total,
        "saved_maps": sorted(map_ids),
    }
    if extra_config:
        config.update(extra_config)
    writer = StoreWriter(store, config=config, layers=layer_rows, classes=classes,
                         resume=resume and not overwrite, overwrite=overwrite)
    done = set(writer.done_ids())
    shard_spec = _parse_shard(shard)
    mine = range(n_total) if shard_spec is None else range(shard_spec[0], n_total, shard_spec[1])
    todo = [i for i in mine if str(dataset.ids[i]) not in done]
    n_skipped_done = len(mine) - len(todo)
    if n_skipped_done:
        log.info("resuming: %d of %d cases already scored", n_skipped_done, n_total)

    from engine.scores import dice, protoseg, sa_scores

    try:
        from engine.estimation import baselines as _baselines
    except ImportError:  # pragma: no cover - estimation module is part of the package
        _baselines = None

    n_failed = 0
    n_done = n_skipped_done
    if progress:
        progress(n_done, len(mine))
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        cases = [dataset[i] for i in idx]
        batch = _score_batch(
            cases, sessions, mcard, layer_index, len(layer_rows), classes, binary_model,
            pred_name=pred_name, level=level, guide=guide, guide_kind=guide_kind,
            ref_mode=ref_mode, resize=resize, threshold=threshold, empty=empty,
            nonfinite=nonfinite, input_sa=input_sa, map_ids=map_ids, has_masks=has_masks,
            sa_scores=sa_scores, protoseg=protoseg, dice=dice, baselines=_baselines,
        )
        batch["case_index"] = np.asarray(idx, dtype=np.int64)
        n_failed += int(np.sum(np.asarray(batch["case_status"]) != "ok"))
        writer.write_batch(batch)
        n_done += len(idx)
        del batch, cases
        if progress:
            progress(n_done, len(mine))

    provenance = {
        "protoseg_version": __version__,
        "model": str(model_path) if model_path else "<in-memory model>",
        "model_sha256": config["model_sha256"],
        "provider": ran_provider,
        "optimization": optimization,
        "passes": len(passes),
        "batch_size": int(batch_size),
        "shard": None if shard_spec is None else f"{shard_spec[0]}/{shard_spec[1]}",
        "started": started,
        "finished": _now(),
        "seconds": round(time.perf_counter() - t_start, 3),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "assumed": list(mcard.assumed),
    }
    path = writer.finalize(provenance)
    return RunSummary(
        store=Path(path), provider=ran_provider, n_cases=len(mine), n_scored=len(todo),
        n_skipped_done=n_skipped_done, n_failed=n_failed, passes=len(passes),
        seconds=time.perf_counter() - t_start, assumed=list(mcard.assumed),
    )


def _resolve_card(proto: Any, card: Any) -> Any:
    """A ModelCard from: a ready card, a TOML path, an overrides dict (its optional
    ``"_toml"`` key names a TOML file the overrides apply on top of), or None."""
    from engine.model.card import ModelCard, resolve_model_card

    if isinstance(card, ModelCard):
        return card
    if isinstance(card, (str, os.PathLike)):
        return resolve_model_card(proto, toml=card)
    if isinstance(card, dict) and "_toml" in card:
        rest = {k: v for k, v in card.items() if k != "_toml"}
        return resolve_model_card(proto, toml=card["_toml"], overrides=rest or None)
    return resolve_model_card(proto, overrides=card)


def _parse_shard(shard: Any) -> tuple[int, int] | None:
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


def _layer_row(t: Any) -> dict[str, Any]:
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


def _nan_block(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {
        "score": np.full(shape, np.nan),
        "status": np.full(shape, int(Status.NOT_COMPUTED), dtype=np.uint8),
        "tp": np.zeros(shape, dtype=np.int64),
        "fp": np.zeros(shape, dtype=np.int64),
        "fn": np.zeros(shape, dtype=np.int64),
    }


def _put(block: dict[str, np.ndarray], where: tuple, res: Any) -> None:
    block["score"][where] = res.score
    block["status"][where] = res.status
    block["tp"][where] = res.tp
    block["fp"][where] = res.fp
    block["fn"][where] = res.fn


def _score_batch(cases, sessions, card, layer_index, n_layers, classes, binary_model, *,
                 pred_name, level, guide, guide_kind, ref_mode, resize, threshold, empty,
                 nonfinite, input_sa, map_ids, has_masks, sa_scores, protoseg, dice, baselines):
    """Score one batch of cases; returns the batch dict of docs/architecture.md."""
    from engine.resize import resize_nearest

    nb = len(cases)
    nk = len(classes)
    status = np.array([c.status for c in cases], dtype=object)
    ok = [i for i, c in enumerate(cases) if c.status == "ok"]
    batch: dict[str, Any] = {
        "case_ids": np.array([str(c.id) for c in cases], dtype=object),
        "case_status": status,
        "case_group": np.array(["" if c.group is None else str(c.group) for c in cases], dtype=object),
    }
    layer_block = _nan_block((nb, nk, n_layers))
    unit_blocks: dict[int, dict[str, np.ndarray]] = {}
    out_dice = np.full((nb, nk), np.nan)
    base: dict[str, np.ndarray] = {}
    maps: dict[str, Any] = {}
    input_block = None

    if ok:
        # preprocess: model input per case, plus the channels-first image on the reference grid
        xs = []
        for i in ok:
            xs.append(card.preprocess(cases[i].image))
        x = np.stack(xs).astype(np.float32, copy=False)
        bad = ~np.isfinite(x.reshape(len(ok), -1)).all(axis=1)
        if bad.any():
            first = str(cases[ok[int(np.argmax(bad))]].id)
            if nonfinite == "raise":
                raise ValueError(
                    f"case {first!r}: the input image holds NaN or Inf ({int(bad.sum())} case(s) "
                    "in this batch); fix the data or pass nonfinite='skip' (--nonfinite skip) to "
                    "record such cases as NONFINITE and go on")
            for j in np.flatnonzero(bad):
                status[ok[j]] = "nonfinite-input"
            keep = np.flatnonzero(~bad)
            x = x[keep]
            ok = [ok[j] for j in keep]
    if ok:
        x_cf = card.to_channels_first(x, card.input_name)  # (B, C, *ref grid)
        ref_shape = tuple(x_cf.shape[2:])

        # the first pass also yields the prediction; the other passes run one at a time in
        # the scoring loop below, so that one pass's activations are alive at a time
        tensors0, sess0 = sessions[0]
        out0 = sess0.run({card.input_name: x}, outputs=[t.name for t in tensors0] + [pred_name])
        prob = card.to_probability({pred_name: out0[pred_name]})  # (B, K, *grid)
        if tuple(prob.shape[2:]) != ref_shape:
            from engine.resize import resize_linear

            prob = resize_linear(prob, ref_shape)
        finite = np.isfinite(prob.reshape(len(ok), -1)).all(axis=1)
        if not finite.all():
            first = str(cases[ok[int(np.argmax(~finite))]].id)
            raise ValueError(
                f"case {first!r}: the prediction output {pred_name!r} holds NaN or Inf although the "
                "input is finite; check the model (its export or its weights)")
        pred = prob > threshold  # (B, K, *ref)

        gt = None
        if has_masks:
            gt = np.zeros((len(ok), nk) + ref_shape, dtype=bool)
            for j, i in enumerate(ok):
                m = cases[i].mask
                if m is None:
                    gt[j] = False
                    continue
                m = np.asarray(m)
                if tuple(m.shape) != ref_shape:
                    m = resize_nearest(m, ref_shape)
                for k, cls in enumerate(classes):
                    gt[j, k] = _class_reference(m, cls, binary_model)
            for k in range(nk):
                out_dice[ok, k] = dice(pred[:, k], gt[:, k], empty=empty, batch=True)

        if baselines is not None:
            for k in range(nk):
                for name, val in baselines(prob[:, k], threshold=threshold).items():
                    base.setdefault(name, np.full((nb, nk), np.nan))[ok, k] = val

        # guide and reference per class
        guides, refs = [], []
        for k in range(nk):
            if guide == "prediction":
                g = prob[:, k] if guide_kind == "soft" else pred[:, k]
            else:
                g = gt[:, k]
            guides.append(np.ascontiguousarray(g, dtype=np.float32))
            refs.append(pred[:, k] if ref_mode == "prediction" else gt[:, k])

        want_unit = level in ("unit", "both")
        want_layer = level in ("layer", "both")
        sa_level = "both" if (want_unit and want_layer) else ("unit" if want_unit else "layer")
        map_rows = [j for j, i in enumerate(ok) if str(cases[i].id) in map_ids]

        for p, (tensors, sess) in enumerate(sessions):
            out = out0 if p == 0 else sess.run({card.input_name: x}, outputs=[t.name for t in tensors])
            out0 = None
            for t in tensors:
                li = layer_index[t.name]
                feats = card.to_channels_first(out[t.name], t.name)
                for k in range(nk):
                    try:
                        res = sa_scores(feats, guides[k], refs[k], level=sa_level, resize=resize,
                                        empty=empty, nonfinite=nonfinite)
                    except ValueError as exc:
                        import re as _re

                        msg = str(exc)
                        m = _re.search(r"sample (\\d+)", msg)
                        where = f"case {str(cases[ok[int(m.group(1))]].id)!r}, " if m else ""
                        raise ValueError(f"{where}tensor {t.name!r} (layer {t.layer}): {msg}") from None
                    lres, ures = (res if sa_level == "both" else
                                  ((res, None) if sa_level == "layer" else (None, res)))
                    if lres is not None:
                        _put(layer_block, (ok, k, li), lres)
                    if ures is not None:
                        ub = unit_blocks.get(li)
                        if ub is None:
                            ub = unit_blocks[li] = _nan_block((nb, nk, feats.shape[1]))
                        _put(ub, (ok, k), ures)
                for j in map_rows:
                    cid = str(cases[ok[j]].id)
                    entry = maps.setdefault(cid, {})
                    for k in range(nk):
                        suffix = "" if nk == 1 else f"[class {classes[k]}]"
                        r = protoseg(feats[j:j + 1], guides[k][j:j + 1], resize=resize,
                                     nonfinite="skip")
                        entry[t.name + suffix] = {"binary": r.binary[0],
                                                  "probability": _map16(r.probability[0])}
                        ub = unit_blocks.get(li)
                        if ub is None:
                            continue
                        # the best units of this layer for this case (by unit SA), drawn by reports
                        row = ub["score"][ok[j], k]
                        best = [int(u) for u in np.argsort(np.where(np.isfinite(row), -row, np.inf))
                                [:BEST_UNIT_MAPS] if np.isfinite(row[u])]
                        for u in best:
                            r = protoseg(feats[j:j + 1, u:u + 1], guides[k][j:j + 1], resize=resize,
                                         nonfinite="skip")
                            entry[f"{t.name}#unit{u}{suffix}"] = {"binary": r.binary[0],
                                                                  "probability": _map16(r.probability[0])}
                del feats
            del out

        if input_sa:
            c_in = x_cf.shape[1]
            n_in = 1 + (c_in if c_in > 1 else 0)
            input_block = _nan_block((nb, nk, n_in))
            for k in range(nk):
                res = sa_scores(x_cf, guides[k], refs[k], level="both" if c_in > 1 else "layer",
                                resize="upsample", empty=empty, nonfinite="skip")
                lres, ures = res if c_in > 1 else (res, None)
                _put(input_block, (ok, k, 0), lres)
                if ures is not None:
                    _put(input_block, (ok, k, slice(1, n_in)), ures)

        for j in map_rows:
            cid = str(cases[ok[j]].id)
            entry = maps.setdefault(cid, {})
            entry["_image"] = np.asarray(x_cf[j, 0], dtype=np.float32)
            entry["_prediction"] = np.asarray(prob[j], dtype=np.float32)
            if gt is not None:
                entry["_reference"] = gt[j]
    if input_block is None and input_sa:
        input_block = _nan_block((nb, nk, 1))

    nonfinite_rows = [i for i in range(nb) if status[i] == "nonfinite-input"]
    if nonfinite_rows:
        for blk in [layer_block, *unit_blocks.values()] + ([input_block] if input_block else []):
            blk["status"][nonfinite_rows] = int(Status.NONFINITE)
    for key, arr in layer_block.items():
        batch[f"layer_{key}"] = arr
    for li, blk in unit_blocks.items():
        for key, arr in blk.items():
            batch[f"unit/{li}/{key}"] = arr
    if input_block is not None:
        for key, arr in input_block.items():
            batch[f"input_{key}"] = arr
    batch["output_dice"] = out_dice
    batch["baselines"] = base
    batch["maps"] = maps
    return batch


def _map16(prob: np.ndarray) -> np.ndarray:
    """Probability maps are stored as float16: they are drawn, never scored, and a 128³ map
    compresses 3x smaller and writes 1.4x faster than in float32 (measured on the demo)."""
    return np.asarray(prob, dtype=np.float16)


# ------------------------------------------------------------------ estimation (SPEC §4)
_OUTPUT_PATH_OPS = {"Sigmoid", "Softmax", "LogSoftmax", "Transpose", "Identity", "Reshape",
                    "Squeeze", "Unsqueeze", "Cast", "Flatten"}
ESTIMATORS = ("paper", "all-layers", "calibrated")


def output_path_tensors(model: Any, output: str) -> list[str]:
    """Tensors that are the prediction in another form (logits before the final activation).

    Walks back from ``output`` through activation and layout ops; the tensors met are the
    output itself, not hidden layers, so the ``paper`` estimator leaves them out.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    names: list[str] = []
    cur = output
    while cur in producer and producer[cur].op_type in _OUTPUT_PATH_OPS:
        node = producer[cur]
        cur = node.input[0]
        names.append(cur)
    return names


def estimate_dataset(
    model: str | os.PathLike[str] | Any,
    data: str | os.PathLike[str] | Any,
    store: str | os.PathLike[str],
    *,
    estimators: Sequence[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    rank_by: str | None = None,
    flag_below: float | None = None,
    flag_lowest: int | None = None,
    flag_fraction: float | None = None,
    dice_threshold: float = 0.8,
    worst_fraction: float = 0.1,
    n_boot: int = 1000,
    folds: int = 5,
    seed: int = 0,
    **score_kwargs: Any,
) -> dict[str, Any]:
    """Label-free quality estimate per case (mean SA), with baselines and validation.

    Scores the dataset with the network's prediction as guide *and* reference (SPEC §4) at
    layer and unit level, then computes the estimators, ranks cases (least supported
    first), flags by one rule, and — when the dataset has ground truth — validates every
    estimator and baseline against the prediction's true Dice. Everything is written into
    the store (``Store.estimates()``, ``Store.validation()``).

    Parameters
    ----------
    model, data, store
        As in :func:`score_dataset`.
    estimators : list of {"paper", "all-layers", "calibrated"}, optional
        Default: ``paper`` and ``all-layers``, plus ``calibrated`` when ``calibration`` is
        given.
    calibration : path, optional
        A calibration JSON file. When it exists it is loaded and applied; when it does not,
        it is fitted on this dataset's ground truth by cross-validation and saved there.
    rank_by : str, optional
        Estimator used for ranking and flagging (default: the first).
    flag_below, flag_lowest, flag_fraction : optional
        At most one flagging rule (threshold, lowest k, lowest fraction).
    dice_threshold, worst_fraction, n_boot, folds, seed
        Validation and calibration settings.
    **score_kwargs
        Passed to :func:`score_dataset` (layers, batch_size, provider, card, ...).

    Returns
    -------
    dict
        ``store``, ``estimators``, ``rank_by``, ``ranking`` (one row per case, least
        supported first), ``validation`` (rows) or None, ``calibration`` (dict) or None.
    """
    from engine.estimation import (Calibration, _nan_to_none, calibrate, estimate_quality, flag_cases,
                                   rank_cases)
    from engine.model.graph import load_model
    from engine.store import open_store
    from engine.validation import validate

    for bad in ("level", "guide", "reference", "guide_kind"):
        if bad in score_kwargs:
            raise ValueError(f"estimate_dataset fixes {bad} (guide = reference = the prediction, "
                             "layer and unit level); do not pass it")
    names = list(estimators) if estimators else (
        ["paper", "all-layers"] + (["calibrated"] if calibration else []))
    for e in names:
        check_choice(e, "estimator", ESTIMATORS)
    if "calibrated" in names and not calibration:
        raise ValueError("estimator 'calibrated' needs a calibration file (--calibration FILE): "
                         "an existing one to apply, or a new path to fit on labelled data")
    rules = [r for r in (flag_below, flag_lowest, flag_fraction) if r is not None]
    if len(rules) > 1:
        raise ValueError("give at most one flagging rule (flag_below, flag_lowest, flag_fraction)")
    rank_by = rank_by or names[0]
    if rank_by not in names:
        raise ValueError(f"rank_by={rank_by!r} is not among the estimators computed {names}")

    proto = load_model(model)
    mcard = _resolve_card(proto, score_kwargs.get("card"))
    score_kwargs["card"] = mcard  # resolved once: score_dataset takes a ready ModelCard as is
    exclude = output_path_tensors(proto, mcard.prediction_output)
    summary = score_dataset(proto if not isinstance(model, (str, os.PathLike)) else model, data, store,
                            level="both", guide="prediction", reference="prediction",
                            extra_config={"mode": "estimate"}, **score_kwargs)
    st = open_store(summary.store)
    cases = st.cases
    n = len(cases)
    ls = st.layer_scores()
    true_dice = st.output_dice()[:, 0]
    has_truth = bool(np.isfinite(true_dice).any())
    groups = [str(g) for g in cases["group"]]
    use_groups = groups if len(set(groups)) > 1 else None

    cal = None
    if calibration is not None:
        cpath = Path(calibration)
        if cpath.exists():
            cal = Calibration.load(cpath)
        else:
            if not has_truth:
                raise ValueError(f"calibration file {str(cpath)!r} does not exist and this dataset "
                                 "has no ground truth to fit one; fit it on labelled data first")
            cal = calibrate(ls, st.unit_scores, st.layers, true_dice, groups=use_groups,
                            folds=folds, seed=seed, exclude=exclude)
            cal.save(cpath)
            log.info("calibration fitted by %d-fold cross-validation and saved to %s", folds, cpath)

    values: dict[str, np.ndarray] = {}
    details: dict[str, Any] = {}
    for e in names:
        v, d = estimate_quality(ls, st.unit_scores, st.layers, estimator=e,
                                calibration=cal if e == "calibrated" else None,
                                exclude=exclude, return_details=True)
        values[e] = np.asarray(v, dtype=np.float64)
        details[e] = d
    base = {k: np.asarray(v)[:, 0] for k, v in st.baselines().items()}
    inp = st.input_scores()
    input_sa = np.asarray(inp["score"])[:, 0, 0] if inp is not None else np.full(n, np.nan)

    est = values[rank_by]
    if rules:
        flags, reasons = flag_cases(est, threshold=flag_below, lowest=flag_lowest,
                                    fraction=flag_fraction, return_reasons=True)
    else:
        flags = np.isnan(est)
        reasons = np.where(flags, "estimate undefined", "")
    order = rank_cases(est)

    validation = None
    if has_truth:
        validation = validate({**values, **base, "input_sa": input_sa}, true_dice,
                              groups=use_groups, predicted_volume=base.get("predicted_fraction"),
                              dice_threshold=dice_threshold, worst_fraction=worst_fraction,
                              n_boot=n_boot, seed=seed)
    info = {"estimators": names, "rank_by": rank_by, "excluded_output_path": exclude,
            "flag_rule": {"below": flag_below, "lowest": flag_lowest, "fraction": flag_fraction},
            "details": _nan_to_none(details), "calibration": cal.to_dict() if cal else None,
            "dice_threshold": dice_threshold}
    st.write_estimates({**values, "input_sa": input_sa, "flag": flags.astype(np.uint8)},
                       validation=_nan_to_none(validation) if validation else None, info=info)

    ranking = []
    for r, i in enumerate(order, start=1):
        row = {"rank": r, "case": str(cases["id"][i]), "group": groups[i]}
        for e in names:
            row[e] = _f(values[e][i])
        row["predicted_fraction"] = _f(base.get("predicted_fraction", np.full(n, np.nan))[i])
        row["input_sa"] = _f(input_sa[i])
        row["flag"] = bool(flags[i])
        row["reason"] = str(reasons[i])
        row["true_dice"] = _f(true_dice[i]) if has_truth else None
        ranking.append(row)
    vrows = None
    if validation:
        vrows = []
        for name, res in validation.items():
            vrows.append({
                "name": name, "n": res["n"],
                "spearman": _f(res["spearman"]["r"]), "spearman_ci": res["spearman"]["ci"],
                "pearson": _f(res["pearson"]["r"]), "pearson_ci": res["pearson"]["ci"],
                "partial_spearman": _f(res.get("partial_spearman", {}).get("r", float("nan"))),
                "auroc": _f(res["auroc"]["value"]),
            })
    return {"store": str(summary.store), "estimators": names, "rank_by": rank_by,
            "ranking": ranking, "validation": vrows,
            "calibration": cal.to_dict() if cal else None, "provider": summary.provider}


def _f(v: Any) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None
