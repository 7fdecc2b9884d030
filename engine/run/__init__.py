"""The scoring run, in stages that hand each other frozen dataclasses.

- :mod:`engine.run.options` — :class:`ScoreOptions`, every setting validated once.
- :mod:`engine.run.plan` — :class:`Plan`, built once: model, card, passes and sessions.
- :mod:`engine.run.batch` — :func:`score_batch`, the pure step: a plan and cases in, an
  :class:`engine.store.BatchResult` out (what in-process runs, shards and cluster workers call).
- :mod:`engine.run.loop` — :func:`score_dataset`: the loop with resume and provenance.
- :mod:`engine.run.estimate` — :func:`estimate_store` (estimates from a store's scores)
  and :func:`estimate_dataset` (score label-free, then estimate).
"""
from __future__ import annotations

from engine.run.batch import score_batch
from engine.run.estimate import EstimateOptions, EstimateStoreError, estimate_dataset, estimate_store
from engine.run.loop import RunSummary, run_plan, score_dataset
from engine.run.options import ScoreOptions
from engine.run.plan import Plan, build_plan

__all__ = ["ScoreOptions", "Plan", "build_plan", "score_batch", "score_dataset", "run_plan",
           "RunSummary", "estimate_dataset", "estimate_store", "EstimateOptions",
           "EstimateStoreError"]
