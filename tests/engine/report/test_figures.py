"""Tests of engine/report/figures.py."""
from __future__ import annotations

import numpy as np

from engine.report.figures import fig_units


def test_many_units_drawn_as_histogram():
    fig = fig_units([("few", np.linspace(0, 1, 10)), ("many", np.linspace(0, 1, 200))], 0.5)
    few, many = fig.axes[:2]
    assert few.get_xlabel() == "10 units, sorted by SA"
    assert many.get_xlabel() == "unit SA"
    assert "100/200 units > 0.5 (50%)" in many.get_title()
