"""Label-free quality estimates (SPEC §4) from a store's scores: score once, estimate from it.

:func:`estimate_store` reads a store scored with the network's prediction as guide *and*
reference, computes the estimators, ranks and flags cases and — when the store holds the
prediction's true Dice — validates every estimator and baseline; the results are added to
the same store in place (:func:`engine.store.annotate_estimates`), with no model run.
:func:`estimate_dataset` scores first (``score_dataset`` in that mode) and then does the
same, so ``protoseg estimate MODEL DATA`` and ``protoseg estimate run.h5`` agree.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine._checks import check_choice
from engine._json import jsonable
from engine.errors import option
from engine.model.graph import load_model, output_path_tensors
from engine.quality import (
    BOUND_METHODS,
    ESTIMATORS,
    Bound,
    Calibration,
    apply_bound,
    calibrate,
    compare_aurc,
    conformal_entry,
    difficulty_features,
    empirical_coverage,
    estimate_quality,
    failure_benchmark,
    fit_combined,
    flag_cases,
    hidden_layer_sa,
    rank_cases,
    validate,
)
from engine.quality.conformal import DIFFICULTY_FEATURES
from engine.run.loop import score_dataset
from engine.run.plan import model_sha256, resolve_card
from engine.store import Store, annotate_estimates, open_store

__all__ = ["estimate_dataset", "estimate_store", "EstimateOptions", "ESTIMATORS", "EstimateStoreError"]

log = logging.getLogger("protoseg")

class EstimateStoreError(ValueError):
    """The store cannot give label-free estimates (scored with another guide or reference)."""


@dataclass(frozen=True)
class EstimateOptions:
    """Settings of the estimation step (see :func:`estimate_store` for each field)."""

    estimators: tuple[str, ...] = ()
    calibration: Path | None = None
    rank_by: str | None = None
    flag_below: float | None = None
    flag_lowest: int | None = None
    flag_fraction: float | None = None
    dice_threshold: float = 0.8
    worst_fraction: float = 0.1
    n_boot: int = 1000
    folds: int = 5
    seed: int = 0
    coverage: float | None = None
    bound_method: str | None = None

    def __post_init__(self) -> None:
        names = tuple(self.estimators) or (
            ("paper", "all-layers") + (("calibrated",) if self.calibration else ()))
        for e in names:
            check_choice(e, "estimator", ESTIMATORS)
        for e in ("calibrated", "combined"):
            if e in names and not self.calibration:
                raise ValueError(f"estimator {e!r} needs a calibration file "
                                 f"({option('calibration', 'FILE')}): an existing one to apply, or a new "
                                 "path to fit on labelled data")
        if self.coverage is not None:
            if not 0.0 < float(self.coverage) < 1.0:
                raise ValueError(f"coverage={self.coverage!r}; expected a number strictly between 0 and 1 "
                                 "(e.g. 0.9)")
            if not self.calibration:
                raise ValueError(f"Dice lower bounds ({option('coverage', 0.9)}) are calibrated on labelled "
                                 f"cases: give {option('calibration', 'FILE')}")
        if self.bound_method is not None:
            check_choice(self.bound_method, "bound_method", BOUND_METHODS)
            if self.coverage is None:
                raise ValueError(f"{option('bound_method', self.bound_method)} applies to Dice lower bounds: "
                                 f"give {option('coverage', 0.9)} too")
        if len(self.rules) > 1:
            raise ValueError("give at most one flagging rule (flag_below, flag_lowest, flag_fraction)")
        rank_by = self.rank_by or names[0]
        if rank_by not in names:
            raise ValueError(f"rank_by={rank_by!r} is not among the estimators computed {list(names)}")
        object.__setattr__(self, "estimators", names)
        object.__setattr__(self, "rank_by", rank_by)
        if self.calibration is not None:
            object.__setattr__(self, "calibration", Path(self.calibration))

    @property
    def rules(self) -> list[float | int]:
        return [r for r in (self.flag_below, self.flag_lowest, self.flag_fraction) if r is not None]


def _call(cli: str, python: str) -> str:
    """A command for CLI users, a call for Python users (see :func:`engine.errors.option`)."""
    return f"`protoseg {cli}`" if option("x") == "--x" else f"engine.{python}"


def _check_store(st: Store, names: Sequence[str]) -> None:
    cfg = st.config
    if cfg.get("guide") != "prediction" or cfg.get("reference") != "prediction":
        raise EstimateStoreError(
            f"store {st.path} was scored with guide={cfg.get('guide')!r} and reference="
            f"{cfg.get('reference')!r}; label-free estimates need the prediction as both (SPEC §4): "
            f"run {_call('estimate MODEL DATA -o STORE', 'estimate_dataset(model, data, store)')} (or "
            f"score with {option('reference', 'prediction')})")
    if "paper" in names and not st.has_units:
        raise EstimateStoreError(
            f"store {st.path} has no unit-level scores, which the 'paper' estimator averages; "
            f"score with {option('level', 'both')}, or ask only for {option('estimators', 'all-layers')}")


def _exclusions(st: Store, model: Any) -> list[str]:
    """The output-path tensors: recorded at scoring time, else found from the model."""
    recorded = st.config.get("output_path_tensors")
    if recorded is not None:
        return [str(n) for n in recorded]
    candidates = [model] if model is not None else []
    prov_model = st.provenance.get("model")
    if model is None and prov_model and Path(prov_model).is_file():
        candidates.append(prov_model)
    for cand in candidates:
        proto = load_model(cand)
        path = Path(cand) if isinstance(cand, (str, os.PathLike)) else None
        if model_sha256(path, proto) == st.config.get("model_sha256"):
            output = ((st.config.get("model_card") or {}).get("prediction_output")
                      or resolve_card(proto, None).prediction_output)
            return output_path_tensors(proto, output)
    raise EstimateStoreError(
        f"store {st.path} does not record the model's output path and its model file was not "
        f"found; pass the model it was scored with ({option('model', 'MODEL')})")


def _calibration(opts: EstimateOptions, st: Store, ls: Any, units: Any, true_dice: np.ndarray,
                 groups: list[str] | None, exclude: list[str]) -> Calibration | None:
    if opts.calibration is None:
        return None
    if opts.calibration.exists():
        return Calibration.load(opts.calibration)
    if not np.isfinite(true_dice).any():
        raise ValueError(f"calibration file {str(opts.calibration)!r} does not exist and this "
                         "dataset has no ground truth to fit one; fit it on labelled data first")
    cal = calibrate(ls, units, st.layers, true_dice, groups=groups, folds=opts.folds,
                    seed=opts.seed, exclude=exclude)
    base = {k: np.asarray(v)[:, 0] for k, v in st.baselines().items()}
    layer_sa, hidden = hidden_layer_sa(ls, st.layers, exclude=exclude)

    def entry(oof: np.ndarray) -> dict[str, Any]:
        """Conformal scores of out-of-fold estimates, constant and normalised
        (:func:`engine.quality.conformal_entry`); the difficulty features are those the
        store has (the uncertainty baselines only when it holds baselines)."""
        names = [f for f in DIFFICULTY_FEATURES if f not in ("mean_entropy", "uncertain_fraction") or f in base]
        feats = difficulty_features(oof, baselines=base, layer_sa=layer_sa, names=names)
        return conformal_entry(oof, true_dice, feats, groups=groups, folds=opts.folds, seed=opts.seed,
                               layers=hidden if "sa_dispersion" in names else ())

    cal.conformal["calibrated"] = entry(np.asarray(cal.oof_estimate))
    if base:
        kw = dict(groups=groups, folds=opts.folds, seed=opts.seed, exclude=exclude)
        model = fit_combined(ls, units, st.layers, base, true_dice, feature_set="sa+baselines", **kw)
        ref = fit_combined(ls, units, st.layers, base, true_dice, feature_set="baselines", **kw)
        oof = np.asarray(model.oof_estimate)
        cmp = compare_aurc(oof, np.asarray(ref.oof_estimate), true_dice, groups=groups,
                           n_boot=opts.n_boot, seed=opts.seed)
        model.cv["sa_added_value"] = {**cmp, "baselines_spearman_oof": ref.cv["spearman_oof"],
                                      "baselines_alpha": ref.alpha}
        cal.combined = model.to_dict()
        cal.conformal["combined"] = entry(oof)
    else:
        log.warning("store %s holds no baselines: the combined estimator is not fitted", st.path)
    cal.save(opts.calibration)
    log.info("calibration fitted by %d-fold cross-validation and saved to %s", opts.folds,
             opts.calibration)
    return cal


def _bound(opts: EstimateOptions, cal: Calibration | None, values: dict[str, np.ndarray],
           base: dict[str, np.ndarray], ls: Any, layers: Any) -> Bound | None:
    """Per-case Dice lower bound of the ranking estimator at ``opts.coverage`` (None without):
    normalised by the label-free difficulty scale when the calibration holds its model and
    ``opts.bound_method`` allows, else constant (:func:`engine.quality.apply_bound`)."""
    if opts.coverage is None:
        return None
    entry = (cal.conformal if cal is not None else {}).get(opts.rank_by)
    if not entry:
        have = sorted(cal.conformal) if cal is not None else []
        raise ValueError(
            f"the calibration holds no conformal scores for {opts.rank_by!r} (it has: "
            f"{', '.join(have) or 'none'}); rank by one of those ({option('rank_by', have[0] if have else 'combined')}) "
            "or refit the calibration on labelled data with this protoseg")
    est = values[opts.rank_by]
    norm = entry.get("normalized")
    feats = None
    if norm and opts.bound_method != "constant":
        model = norm["difficulty"]
        try:
            layer_sa = (hidden_layer_sa(ls, layers, names=model["layers"])[0]
                        if "sa_dispersion" in model["features"] else None)
            feats = difficulty_features(est, baselines=base, layer_sa=layer_sa, names=model["features"])
        except KeyError as exc:
            raise ValueError(f"the normalised Dice lower bound cannot be computed on this store: "
                             f"{exc.args[0]} (or ask for {option('bound_method', 'constant')})") from None
    return apply_bound(entry, est, opts.coverage, features=feats, method=opts.bound_method)


def _ranking(st: Store, opts: EstimateOptions, values: dict[str, np.ndarray],
             base: dict[str, np.ndarray], input_sa: np.ndarray, flags: np.ndarray,
             reasons: np.ndarray, true_dice: np.ndarray | None,
             bound: Bound | None = None) -> list[dict[str, Any]]:
    cases, n = st.cases, len(st.cases)
    rows = []
    # ranked by the bound when there is one (ties, e.g. bounds clipped to 0, by the estimate);
    # the constant bound (estimate - q) keeps the order of the estimate, the normalised one not
    est = values[opts.rank_by]
    order = rank_cases(est) if bound is None else rank_cases(bound.bound, then_by=est)
    for r, i in enumerate(order, start=1):
        row: dict[str, Any] = {"rank": r, "case": str(cases["id"][i]), "group": str(cases["group"][i])}
        for e in opts.estimators:
            row[e] = values[e][i]
        if bound is not None:
            row["dice_lower_bound"] = bound.bound[i]
            row["bound_scale"] = bound.sigma[i]
        row["predicted_fraction"] = base.get("predicted_fraction", np.full(n, np.nan))[i]
        row["input_sa"] = input_sa[i]
        row["flag"] = bool(flags[i])
        row["reason"] = str(reasons[i])
        row["true_dice"] = None if true_dice is None else true_dice[i]
        rows.append(row)
    return jsonable(rows)


def _validation_rows(validation: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    if not validation:
        return None
    return jsonable([{
        "name": name, "n": res["n"],
        "spearman": res["spearman"]["r"], "spearman_ci": res["spearman"]["ci"],
        "pearson": res["pearson"]["r"], "pearson_ci": res["pearson"]["ci"],
        "partial_spearman": res.get("partial_spearman", {}).get("r", float("nan")),
        "auroc": res["auroc"]["value"],
        **({"aurc": res["failure"]["aurc"]["value"], "aurc_ci": res["failure"]["aurc"]["ci"],
            "e_aurc": res["failure"]["e_aurc"]["value"], "e_aurc_ci": res["failure"]["e_aurc"]["ci"]}
           if "failure" in res else {}),
    } for name, res in validation.items()])


def _estimate(st: Store, opts: EstimateOptions, exclude: list[str]) -> dict[str, Any]:
    """Estimators, flags and validation from an open store; annotates it in place."""
    n = len(st.cases)
    ls = st.layer_scores()
    true_dice = st.output_dice()[:, 0]
    has_truth = bool(np.isfinite(true_dice).any())
    groups = [str(g) for g in st.cases["group"]]
    use_groups = groups if len(set(groups)) > 1 else None
    units = st.unit_scores if st.has_units else None
    cal = _calibration(opts, st, ls, units, true_dice, use_groups, exclude)
    values: dict[str, np.ndarray] = {}
    details: dict[str, Any] = {}
    base = {k: np.asarray(v)[:, 0] for k, v in st.baselines().items()}
    for e in opts.estimators:
        v, details[e] = estimate_quality(ls, units, st.layers, estimator=e,
                                         calibration=cal if e in ("calibrated", "combined") else None,
                                         exclude=exclude, baselines=base, return_details=True)
        values[e] = np.asarray(v, dtype=np.float64)
    bnd = _bound(opts, cal, values, base, ls, st.layers)
    bound = None if bnd is None else bnd.bound
    inp = st.input_scores()
    input_sa = np.asarray(inp["score"])[:, 0, 0] if inp is not None else np.full(n, np.nan)
    # with --coverage the rules apply to the Dice lower bound (a number on the Dice scale)
    est = values[opts.rank_by] if bound is None else bound
    if opts.rules:
        flags, reasons = flag_cases(est, threshold=opts.flag_below, lowest=opts.flag_lowest,
                                    fraction=opts.flag_fraction, return_reasons=True,
                                    then_by=None if bnd is None else values[opts.rank_by])
    else:
        flags, reasons = np.isnan(est), np.where(np.isnan(est), "estimate undefined", "")
    if bnd is not None:  # an undefined bound says why (estimate or difficulty scale undefined)
        reasons = np.where(np.isnan(bnd.bound) & (bnd.reason != ""), bnd.reason, reasons)
    validation = None
    if has_truth:
        validation = validate({**values, **base, "input_sa": input_sa}, true_dice,
                              groups=use_groups, predicted_volume=base.get("predicted_fraction"),
                              dice_threshold=opts.dice_threshold, worst_fraction=opts.worst_fraction,
                              n_boot=opts.n_boot, seed=opts.seed)
        failure = failure_benchmark({**values, **base, "input_sa": input_sa}, true_dice, groups=use_groups,
                                    dice_thresholds=sorted({0.5, 0.7, opts.dice_threshold, 0.9}),
                                    n_boot=opts.n_boot, seed=opts.seed)
        for name, res in failure.items():
            validation[name]["failure"] = res
    coverage_check = None
    if bound is not None and has_truth:
        coverage_check = {**empirical_coverage(bound, true_dice), "nominal": opts.coverage,
                          "method": bnd.method,
                          "note": "on this dataset; in-sample when the calibration was fitted on it"}
    info = {"estimators": list(opts.estimators), "rank_by": opts.rank_by,
            "excluded_output_path": exclude,
            "flag_rule": {"below": opts.flag_below, "lowest": opts.flag_lowest,
                          "fraction": opts.flag_fraction},
            "details": jsonable(details), "calibration": cal.to_dict() if cal else None,
            "dice_threshold": opts.dice_threshold, "coverage": opts.coverage,
            "coverage_check": coverage_check,
            "bound": None if bnd is None else {"method": bnd.method, "q": bnd.q, "note": bnd.note,
                                               "n_calibration": bnd.n_calibration}}
    extra = {} if bnd is None else {"dice_lower_bound": bnd.bound, "dice_bound_scale": bnd.sigma}
    annotate_estimates(st.path, {**values, **extra, "input_sa": input_sa, "flag": flags.astype(np.uint8)},
                       validation=jsonable(validation) if validation else None, info=jsonable(info))
    return {"store": str(st.path), "estimators": list(opts.estimators), "rank_by": opts.rank_by,
            "ranking": _ranking(st, opts, values, base, input_sa, flags, reasons,
                                true_dice if has_truth else None, bnd),
            "coverage": opts.coverage, "coverage_check": jsonable(coverage_check),
            "bound_method": None if bnd is None else bnd.method,
            "bound_note": None if bnd is None else bnd.note,
            "validation": _validation_rows(validation),
            "calibration": jsonable(cal.to_dict()) if cal else None,
            "provider": st.provenance.get("provider")}


def estimate_store(
    store: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | Any = None,
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
    coverage: float | None = None,
    bound_method: str | None = None,
) -> dict[str, Any]:
    """Label-free quality estimate per case from a store scored earlier; no model run.

    The store must have been scored with the network's prediction as guide and reference
    (``protoseg estimate``, ``protoseg demo``, or ``score --reference prediction``; unit
    level for the ``paper`` estimator). Estimates, flags and validation are added to the
    same store in place; an interrupted write leaves the store readable with its scores.

    Parameters
    ----------
    store : path
        A finished store.
    model : path or onnx.ModelProto, optional
        Only for stores written before the output path was recorded: the model they were
        scored with (checked against the stored sha256).
    estimators : list of {"paper", "all-layers", "calibrated", "combined"}, optional
        Default: ``paper`` and ``all-layers``, plus ``calibrated`` when ``calibration`` is given.
        ``combined`` needs a calibration holding a combined model.
    calibration : path, optional
        A calibration JSON file. When it exists it is applied; when it does not, it is
        fitted on this store's ground truth by cross-validation and saved there — the
        ``calibrated`` choice, the ``combined`` ridge model (when the store has baselines;
        with how much SA adds beyond the baselines) and the conformal scores of both.
    rank_by : str, optional
        Estimator used for ranking and flagging (default: the first).
    flag_below, flag_lowest, flag_fraction : optional
        At most one flagging rule (threshold, lowest k, lowest fraction).
    dice_threshold, worst_fraction, n_boot, folds, seed
        Validation and calibration settings.
    coverage : float, optional
        Nominal coverage of a per-case lower bound on Dice for the ranking estimator
        (split conformal, :mod:`engine.quality.conformal`); needs ``calibration``. Cases are
        ranked by the bound (ties by the estimate), the flagging rules apply to it, and it is
        stored as ``dice_lower_bound`` (with its difficulty scale as ``dice_bound_scale``).
    bound_method : {"normalized", "constant"}, optional
        ``normalized`` (the default when the calibration holds it): ``estimate − q · σ`` with
        ``σ`` a label-free per-case difficulty scale; ``constant``: ``estimate − q``. A
        calibration written before the normalised method existed gives the constant bound
        (``bound_note`` says so).

    Returns
    -------
    dict
        ``store``, ``estimators``, ``rank_by``, ``ranking`` (one row per case, least
        supported first; ``dice_lower_bound`` and ``bound_scale`` with ``coverage``),
        ``validation`` (rows, with the failure-detection benchmark's ``aurc`` and ``e_aurc``)
        or None, ``calibration`` (dict) or None, ``coverage``, ``bound_method``,
        ``bound_note`` and ``coverage_check`` (empirical coverage when the data are labelled).

    Raises
    ------
    EstimateStoreError
        The store was scored with another guide or reference, or lacks what an estimator needs.
    """
    opts = EstimateOptions(
        estimators=tuple(estimators or ()), calibration=calibration, rank_by=rank_by,
        flag_below=flag_below, flag_lowest=flag_lowest, flag_fraction=flag_fraction,
        dice_threshold=dice_threshold, worst_fraction=worst_fraction, n_boot=n_boot,
        folds=folds, seed=seed, coverage=coverage, bound_method=bound_method)
    st = open_store(store)
    _check_store(st, opts.estimators)
    return _estimate(st, opts, _exclusions(st, model))


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
    coverage: float | None = None,
    bound_method: str | None = None,
    **score_kwargs: Any,
) -> dict[str, Any]:
    """Score a dataset label-free, then estimate its quality per case (:func:`estimate_store`).

    Scores with the network's prediction as guide *and* reference (SPEC §4) at layer and unit
    level into ``store``, then computes the estimators, ranks and flags, validates against
    the prediction's true Dice when the dataset has masks, and adds all of it to the store.

    Parameters
    ----------
    model, data, store
        As in :func:`engine.score_dataset`.
    estimators, calibration, rank_by, flag_below, flag_lowest, flag_fraction, dice_threshold, \
worst_fraction, n_boot, folds, seed, coverage, bound_method
        As in :func:`estimate_store`.
    **score_kwargs
        Passed to :func:`engine.score_dataset` (layers, batch_size, provider, card, ...);
        ``level``, ``guide``, ``guide_kind`` and ``reference`` are fixed by the method.

    Returns
    -------
    dict
        As :func:`estimate_store`, with ``provider`` the provider that ran.
    """
    for bad in ("level", "guide", "reference", "guide_kind"):
        if bad in score_kwargs:
            raise ValueError(f"estimate_dataset fixes {bad} (guide = reference = the prediction, "
                             "layer and unit level); do not pass it")
    opts = EstimateOptions(
        estimators=tuple(estimators or ()), calibration=calibration, rank_by=rank_by,
        flag_below=flag_below, flag_lowest=flag_lowest, flag_fraction=flag_fraction,
        dice_threshold=dice_threshold, worst_fraction=worst_fraction, n_boot=n_boot,
        folds=folds, seed=seed, coverage=coverage, bound_method=bound_method)
    proto = load_model(model)
    card = resolve_card(proto, score_kwargs.get("card"))
    score_kwargs["card"] = card  # resolved once: score_dataset takes a ready ModelCard as is
    exclude = output_path_tensors(proto, card.prediction_output)
    extra = dict(score_kwargs.pop("extra_config", None) or {})
    extra["mode"] = "estimate"
    summary = score_dataset(model, data, store, level="both", guide="prediction",
                            reference="prediction", extra_config=extra, **score_kwargs)
    result = _estimate(open_store(summary.store), opts, exclude)
    result["provider"] = summary.provider
    return result
