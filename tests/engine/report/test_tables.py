"""Tests of engine/report/tables.py: the summary tables against naive twins."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.report import layer_summary, unit_summary
from engine.status import Status


def test_unit_summary_and_layer_summary_direct():
    u = np.array([[0.9, 0.2, np.nan, 0.5], [0.7, np.nan, np.nan, 0.6]])
    s = unit_summary(u, threshold=0.5)
    assert s["n_above"] == 2 and s["units"] == 4 and s["n_defined"] == 3
    assert s["unit_mean"][1] == pytest.approx(0.2)
    assert s["best_unit"] == 0 and s["best_unit_sa"] == pytest.approx(0.8)
    assert math.isnan(s["unit_mean"][2])
    layers = np.array([(0, "t0", "", "Conv", 1, 3)], dtype=[
        ("index", "i8"), ("name", "O"), ("layer", "O"), ("op", "O"), ("channels", "i8"),
        ("depth", "i8")])
    rows = layer_summary(np.full((3, 1, 1), np.nan), np.full((3, 1, 1), Status.EMPTY_FOREGROUND),
                         layers, [1])
    assert rows[0]["n_used"] == 0 and rows[0]["nan_EMPTY_FOREGROUND"] == 3
    assert math.isnan(rows[0]["mean"]) and rows[0]["layer"] == "t0"

def _naive_layer_stats(s: np.ndarray) -> dict[str, float]:
    vals = [float(v) for v in s if not math.isnan(v)]
    n = len(vals)
    out = {"n_used": n, "mean": math.nan, "sd": math.nan, "median": math.nan}
    if n:
        out["mean"] = sum(vals) / n
        srt = sorted(vals)
        out["median"] = (srt[(n - 1) // 2] + srt[n // 2]) / 2
    if n > 1:
        out["sd"] = math.sqrt(sum((v - out["mean"]) ** 2 for v in vals) / (n - 1))
    return out


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_layer_summary_matches_naive(data):
    n_cases = data.draw(st.integers(0, 9))
    n_layers = data.draw(st.integers(1, 3))
    shape = (n_cases, 1, n_layers)
    values = data.draw(st.lists(st.one_of(st.floats(0, 1), st.just(math.nan)),
                                min_size=n_cases * n_layers, max_size=n_cases * n_layers))
    score = np.array(values, dtype=np.float64).reshape(shape)
    status = np.where(np.isnan(score), int(Status.EMPTY_DICE), 0).astype(np.uint8)
    layers = np.array([(j, f"t{j}", "", "Conv", 1, j) for j in range(n_layers)], dtype=[
        ("index", "i8"), ("name", "O"), ("layer", "O"), ("op", "O"), ("channels", "i8"),
        ("depth", "i8")])
    rows = layer_summary(score, status, layers, [1])
    for j, row in enumerate(rows):
        naive = _naive_layer_stats(score[:, 0, j])
        assert row["n_used"] == naive["n_used"]
        assert row["n_nan"] == row["nan_EMPTY_DICE"] == n_cases - naive["n_used"]
        for key in ("mean", "sd", "median"):
            assert row[key] == pytest.approx(naive[key], nan_ok=True, abs=1e-12)
