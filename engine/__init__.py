"""protoseg engine: ProtoSeg segmentation-ability scores for any ONNX model.

The public names below are imported lazily, so ``import engine`` stays fast and never
imports torch or TensorFlow. See ``docs/architecture.md`` for how the modules fit.
"""
from __future__ import annotations

from engine._lazy import lazy_getattr
from engine._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # kernels' public drivers (SPEC §1-3)
    "protoseg": "engine.scores",
    "sa_scores": "engine.scores",
    "sa_scores_concat": "engine.scores",
    "dice": "engine.scores",
    "reuse_guide_weights": "engine.scores",
    "ProtoSegResult": "engine.scores",
    "SAScores": "engine.scores",
    "Status": "engine.status",
    "resize_linear": "engine.resize",
    "resize_nearest": "engine.resize",
    "resize_area": "engine.resize",
    "describe": "engine.status",
    # ONNX graph tools and the runner
    "HiddenTensor": "engine.model.graph",
    "load_model": "engine.model.graph",
    "list_hidden_tensors": "engine.model.graph",
    "select_tensors": "engine.model.graph",
    "expose": "engine.model.graph",
    "plan_passes": "engine.model.graph",
    "require_hidden": "engine.model.graph",
    "concat_blocks": "engine.model.graph",
    "Session": "engine.model.session",
    "make_session": "engine.model.session",
    "cuda_usable": "engine.model.session",
    "ModelCard": "engine.model.card",
    "resolve_model_card": "engine.model.card",
    # data in, results out
    "Case": "engine.datasets",
    "open_dataset": "engine.datasets",
    "Dataset": "engine.datasets",
    "DatasetError": "engine.datasets",
    "score_dataset": "engine.run",
    "estimate_dataset": "engine.run",
    "estimate_store": "engine.run",
    "RunSummary": "engine.run",
    "ScoreOptions": "engine.run",
    "CaseError": "engine.errors",
    "OutOfMemoryError": "engine.errors",
    "CaseSkippedWarning": "engine.errors",
    "Store": "engine.store",
    "StoreWriter": "engine.store",
    "open_store": "engine.store",
    "merge_parts": "engine.store",
    "StoreConfigError": "engine.store",
    "StoreExistsError": "engine.store",
    "StoreVersionError": "engine.store",
    "StoreWriteError": "engine.store",
    "BatchResult": "engine.store",
    # label-free estimation and validation (SPEC §4)
    "estimate_quality": "engine.quality",
    "calibrate": "engine.quality",
    "Calibration": "engine.quality",
    "flag_cases": "engine.quality",
    "rank_cases": "engine.quality",
    "baselines": "engine.quality",
    "validate": "engine.quality",
    # reports
    "write_report": "engine.report",
    "compare_stores": "engine.report.compare",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr("engine", globals(), _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
