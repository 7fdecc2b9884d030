"""Tests for engine/quality/triage.py: ranking and flagging."""
from __future__ import annotations

import numpy as np
import pytest

from engine.quality import flag_cases, rank_cases


def test_flag_rules():
    e = np.array([0.9, np.nan, 0.2, 0.5, 0.7])
    assert flag_cases(e, threshold=0.6).tolist() == [False, True, True, True, False]
    assert flag_cases(e, lowest=2).tolist() == [False, True, True, False, False]
    assert flag_cases(e, fraction=0.6).tolist() == [False, True, True, True, False]  # ceil(3.0)
    flags, reasons = flag_cases(e, lowest=1, return_reasons=True)
    assert flags.tolist() == [False, True, False, False, False]  # NaN counts towards k
    assert reasons[1] == "estimate undefined" and reasons[0] == ""
    assert rank_cases(e).tolist() == [1, 2, 3, 4, 0]


@pytest.mark.parametrize(
    "kwargs", [{}, {"threshold": 0.5, "lowest": 1}, {"lowest": 1, "fraction": 0.1}, {"fraction": 0.0}, {"lowest": -1}]
)
def test_flag_needs_exactly_one_valid_rule(kwargs):
    with pytest.raises(ValueError):
        flag_cases(np.array([0.1, 0.2]), **kwargs)
