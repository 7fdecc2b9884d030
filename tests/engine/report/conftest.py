"""Fixtures shared by the report tests."""
from __future__ import annotations

import numpy as np
import pytest

from engine.quality import validate
from engine.report import write_report

from ._synthetic import build_store, make_batches


@pytest.fixture(scope="package")
def full_report(tmp_path_factory):
    """A report of a 7-case store with units, maps, estimates and validation."""
    tmp = tmp_path_factory.mktemp("report")
    n = 7
    est = {"paper": np.linspace(0.2, 0.9, n), "all-layers": np.linspace(0.9, 0.3, n)}
    batches, _ = make_batches(n_cases=n)
    dice = np.concatenate([b.output_dice[:, 0] for b in batches])
    groups = np.concatenate([b.case_group for b in batches])
    val = validate(est, dice, groups=groups, n_boot=50, dice_threshold=0.75)
    store = build_store(tmp, n_cases=n, estimates=est, validation=val)
    path = write_report(store, tmp / "out")
    return store, path
