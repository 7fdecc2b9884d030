"""Tests of engine/report/figures.py."""
from __future__ import annotations

import re

import numpy as np

from engine.report.figures import fig_units


def test_many_units_drawn_as_histogram():
    fig = fig_units([("few", np.linspace(0, 1, 10)), ("many", np.linspace(0, 1, 200))], 0.5)
    few, many = fig.axes[:2]
    assert few.get_xlabel() == "10 units, sorted by SA"
    assert many.get_xlabel() == "unit SA"
    assert "100/200 units > 0.5 (50%)" in many.get_title()


def test_map_mosaic_as_rgba_draws_the_same_pixels(tmp_path):
    """fig_maps hands each axis's mosaic to imshow as 8-bit RGBA (issue 15: the Agg draw 3-5x
    faster than from RGB): the PNG and the SVG's pixels are those of the RGB image."""
    from engine.report.figures import new_figure, save_figure

    rgb = np.random.default_rng(3).integers(0, 256, (41, 97, 3), dtype=np.uint8)
    rgba = np.empty((41, 97, 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = 255
    out = {}
    for name, img in (("rgb", rgb), ("rgba", rgba)):
        fig = new_figure(6.0, 3.0)
        fig.set_layout_engine("none")
        ax = fig.add_axes((0.05, 0.1, 0.9, 0.8))
        ax.imshow(img, aspect="auto", interpolation="none")
        ax.set_axis_off()
        out[name] = save_figure(fig, tmp_path / name)
    assert out["rgb"] == out["rgba"]
    assert (tmp_path / "rgba.png").read_bytes() == out["rgba"]  # written by the encoder thread
    images = [re.findall(rb'xlink:href="data:image/png;base64,([^"]+)"', (tmp_path / f"{n}.svg").read_bytes())
              for n in ("rgb", "rgba")]
    assert images[0] and images[0] == images[1]
