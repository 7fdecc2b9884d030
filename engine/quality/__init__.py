"""Label-free quality estimates from SA scores, and how far to trust them (SPEC §4).

Pure functions over arrays: they work on what an :class:`engine.store.Store` returns
(``layer_scores()``, ``unit_scores``, ``layers``, ``baselines()``) and on arrays built by hand;
nothing here reads or writes a store. One concern per module:

- :mod:`.baseline` — :func:`baselines`, the trivial baselines every estimate is reported beside;
- :mod:`.table` — the score table the estimators are computed from (internal);
- :mod:`.estimators` — :func:`estimate_quality` and :data:`ESTIMATORS`;
- :mod:`.calibration` — :func:`calibrate`, :class:`Calibration`, :func:`default_candidates`,
  :func:`candidate_estimates`, :func:`group_folds`;
- :mod:`.triage` — :func:`rank_cases`, :func:`flag_cases`;
- :mod:`.validation` — :func:`validate`, :func:`validation_rows` and the statistics behind
  them (:func:`auroc`, :func:`partial_spearman`, :func:`worst_overlap`, :func:`bootstrap_ci`);
- :mod:`.failure` — the failure-detection benchmark: :func:`failure_benchmark`, :func:`aurc`,
  :func:`e_aurc`, :func:`risk_coverage_curve`, :func:`compare_aurc`, :func:`failure_rows`;
- :mod:`.combined` — the ``combined`` estimator: :func:`fit_combined`, :class:`CombinedModel`,
  :func:`sa_added_value`;
- :mod:`.conformal` — per-case Dice lower bounds (constant or normalised by a label-free
  difficulty scale): :func:`conformal_scores`, :func:`normalized_scores`,
  :func:`conformal_quantile`, :func:`dice_lower_bound`, :func:`conformal_entry`,
  :func:`apply_bound`, :class:`Bound`, :class:`DifficultyModel`, :func:`fit_difficulty`,
  :func:`difficulty_features`, :func:`hidden_layer_sa`, :func:`empirical_coverage`,
  :func:`coverage_interval`.

Examples
--------
>>> import numpy as np
>>> from engine.quality import estimate_quality, flag_cases
>>> est = estimate_quality(np.array([[0.9, 0.7], [np.nan, np.nan]]), None, ["a", "b"],
...                        estimator="all-layers")
>>> flag_cases(est, lowest=1).tolist()
[False, True]
"""
from __future__ import annotations

from engine.quality.baseline import baselines
from engine.quality.calibration import Calibration, calibrate, candidate_estimates, default_candidates, group_folds
from engine.quality.combined import CombinedModel, fit_combined, sa_added_value
from engine.quality.conformal import (
    BOUND_METHODS,
    Bound,
    DifficultyModel,
    apply_bound,
    conformal_entry,
    conformal_quantile,
    conformal_scores,
    coverage_interval,
    dice_lower_bound,
    difficulty_features,
    empirical_coverage,
    fit_difficulty,
    hidden_layer_sa,
    normalized_scores,
)
from engine.quality.estimators import ESTIMATORS, estimate_quality
from engine.quality.failure import aurc, compare_aurc, e_aurc, failure_benchmark, failure_rows, risk_coverage_curve
from engine.quality.triage import flag_cases, rank_cases
from engine.quality.validation import (
    auroc,
    bootstrap_ci,
    partial_spearman,
    validate,
    validation_rows,
    worst_overlap,
)

__all__ = [
    "BOUND_METHODS",
    "ESTIMATORS",
    "Bound",
    "Calibration",
    "CombinedModel",
    "DifficultyModel",
    "apply_bound",
    "aurc",
    "auroc",
    "baselines",
    "bootstrap_ci",
    "calibrate",
    "candidate_estimates",
    "compare_aurc",
    "conformal_entry",
    "conformal_quantile",
    "conformal_scores",
    "coverage_interval",
    "default_candidates",
    "dice_lower_bound",
    "difficulty_features",
    "e_aurc",
    "empirical_coverage",
    "estimate_quality",
    "failure_benchmark",
    "failure_rows",
    "fit_combined",
    "fit_difficulty",
    "flag_cases",
    "group_folds",
    "hidden_layer_sa",
    "normalized_scores",
    "partial_spearman",
    "rank_cases",
    "risk_coverage_curve",
    "sa_added_value",
    "validate",
    "validation_rows",
    "worst_overlap",
]
