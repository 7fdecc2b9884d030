"""Figures of the protoseg report (issue 6), drawn with matplotlib's Agg canvas.

Used by :mod:`engine.report.build`. Every function takes plain arrays and strings
and returns a :class:`matplotlib.figure.Figure` built on a ``FigureCanvasAgg``, so
drawing never touches pyplot or the global backend. No function reads a store.
matplotlib is imported inside the functions that draw: ``import engine.report`` stays fast.
"""
from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MapPanel",
    "fig_compare",
    "fig_maps",
    "fig_sa_depth",
    "fig_scatter",
    "fig_units",
    "new_figure",
    "save_figure",
    "choose_slices",
]

_CLASS_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def new_figure(width: float, height: float) -> Any:
    """Return a matplotlib ``Figure`` with its own Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, stem: Path, *, dpi: int = 110) -> bytes:
    """Write ``stem.png`` and ``stem.svg`` and return the PNG bytes.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        A figure made by :func:`new_figure`.
    stem : Path
        Output path without suffix.
    dpi : int
        Resolution of the PNG.

    Returns
    -------
    bytes
        The PNG file's content (for embedding as a data URI).
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    png = buf.getvalue()
    stem.with_suffix(".png").write_bytes(png)
    # the layout was computed while drawing the PNG; keep it rather than recompute it
    fig.set_layout_engine("none")
    # SVG keeps glyphs as paths (matplotlib's default), so the file needs no fonts.
    fig.savefig(stem.with_suffix(".svg"), format="svg", metadata={"Date": None})
    return png


def _quantile_band(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise mean, 25th and 75th percentile over finite entries (NaN where none)."""
    n_cols = matrix.shape[1]
    mean = np.full(n_cols, np.nan)
    q25 = np.full(n_cols, np.nan)
    q75 = np.full(n_cols, np.nan)
    for j in range(n_cols):
        col = matrix[:, j]
        col = col[np.isfinite(col)]
        if col.size:
            mean[j] = col.mean()
            q25[j], q75[j] = np.percentile(col, [25, 75])
    return mean, q25, q75


def fig_sa_depth(
    x: np.ndarray,
    tick_labels: Sequence[str],
    series: Sequence[tuple[str, np.ndarray]],
    *,
    input_series: Sequence[tuple[str, np.ndarray]] = (),
    title: str = "",
) -> Any:
    """SA against layer depth: mean per layer with the interquartile band, one line per class.

    Parameters
    ----------
    x : ndarray, shape (n_layers,)
        Position of each layer on the x axis (its depth).
    tick_labels : sequence of str
        Layer names, one per entry of ``x``.
    series : sequence of (label, ndarray (n_cases, n_layers))
        Per class, the SA of every case and layer (NaN = undefined, ignored).
    input_series : sequence of (label, ndarray (n_cases,))
        Per class, the input SA, drawn as a point with its IQR left of the first layer.
    title : str
        Axes title.
    """
    n_layers = len(x)
    width = min(16.0, max(6.5, 0.32 * n_layers + 3.0))
    fig = new_figure(width, 4.4)
    ax = fig.add_subplot()
    x = np.asarray(x, dtype=float)
    step = float(np.min(np.diff(np.unique(x)))) if np.unique(x).size > 1 else 1.0
    for i, (label, matrix) in enumerate(series):
        colour = _CLASS_COLOURS[i % len(_CLASS_COLOURS)]
        mean, q25, q75 = _quantile_band(np.asarray(matrix, dtype=float))
        ax.fill_between(x, q25, q75, color=colour, alpha=0.2, linewidth=0,
                        label=f"{label}: interquartile range")
        ax.plot(x, mean, "-o", color=colour, markersize=3.5, label=f"{label}: mean")
    for i, (label, values) in enumerate(input_series):
        colour = _CLASS_COLOURS[i % len(_CLASS_COLOURS)]
        mean, q25, q75 = _quantile_band(np.asarray(values, dtype=float)[:, None])
        xi = (x.min() if n_layers else 0.0) - step
        ax.errorbar([xi], mean, yerr=[[mean[0] - q25[0]], [q75[0] - mean[0]]]
                    if np.isfinite(mean[0]) else None,
                    fmt="s", color=colour, mfc="white", capsize=3, label=f"{label}: input SA")
    ticks = list(x)
    labels = [lab if len(lab) <= 28 else lab[:12] + "…" + lab[-15:] for lab in tick_labels]
    if input_series:
        ticks = [(x.min() if n_layers else 0.0) - step] + ticks
        labels = ["input"] + labels
    if len(ticks) <= 40:
        ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layer, ordered by depth")
    ax.set_ylabel("SA score (Dice)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def fig_compare(
    curve_a: tuple[np.ndarray, np.ndarray],
    curve_b: tuple[np.ndarray, np.ndarray],
    diff: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    labels: tuple[str, str] = ("A", "B"),
    ticks: tuple[Sequence[float], Sequence[str]] | None = None,
    xlabel: str = "layer, ordered by depth",
    title: str = "",
) -> Any:
    """Two SA-against-depth curves overlaid, and their paired difference with its interval.

    Parameters
    ----------
    curve_a, curve_b : (x, mean SA)
        Each store's mean layer-level SA at its layers' positions.
    diff : (x, mean, lo, hi)
        At each matched layer pair: the mean paired difference B − A and its 95 % interval.
    labels : (str, str)
        Legend names of the two stores.
    ticks : (positions, labels), optional
        x tick marks (layer names when the layers match by name).
    xlabel, title : str
        Axis label and figure title.
    """
    n = max(len(curve_a[0]), len(curve_b[0]), 1)
    width = min(16.0, max(7.0, 0.32 * n + 3.5))
    fig = new_figure(width, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    for (x, y), label, colour, marker in ((curve_a, labels[0], _CLASS_COLOURS[0], "o"),
                                          (curve_b, labels[1], _CLASS_COLOURS[1], "s")):
        top.plot(np.asarray(x, float), np.asarray(y, float), "-" + marker, color=colour,
                 markersize=3.5, label=label)
    top.set_ylabel("mean SA (Dice)")
    top.set_ylim(-0.02, 1.02)
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8, loc="best")
    x, mean, lo, hi = (np.asarray(v, dtype=float) for v in diff)
    bottom.axhline(0.0, color="k", linewidth=0.8)
    bottom.fill_between(x, lo, hi, color="#7f7f7f", alpha=0.3, linewidth=0,
                        label="95 % bootstrap interval")
    bottom.plot(x, mean, "-o", color="#333333", markersize=3.5,
                label=f"mean difference {labels[1]} − {labels[0]}")
    bottom.set_ylabel("paired difference")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=8, loc="best")
    bottom.set_xlabel(xlabel)
    if ticks is not None and len(ticks[0]) <= 40:
        short = [t if len(t) <= 28 else t[:12] + "…" + t[-15:] for t in ticks[1]]
        bottom.set_xticks(list(ticks[0]), short, rotation=60, ha="right", fontsize=8)
    if title:
        top.set_title(title, fontsize=10)
    return fig


def fig_units(
    panels: Sequence[tuple[str, np.ndarray]],
    threshold: float,
    *,
    max_bars: int = 96,
    title: str = "",
) -> Any:
    """Per layer, the units' SA sorted as bars (histogram when there are many units).

    Parameters
    ----------
    panels : sequence of (layer label, ndarray (C,))
        Per layer, one SA value per unit (mean over cases; NaN = undefined in every case).
    threshold : float
        Units with SA above it are counted; drawn as a dashed line.
    max_bars : int
        Layers with more units than this are drawn as a histogram.
    title : str
        Figure title.
    """
    n = len(panels)
    cols = min(4, max(1, n))
    rows = int(np.ceil(n / cols)) if n else 1
    fig = new_figure(3.3 * cols + 0.5, 2.5 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, (label, values) in zip(axes.ravel(), panels):
        values = np.asarray(values, dtype=float)
        finite = values[np.isfinite(values)]
        n_above = int(np.count_nonzero(finite > threshold))
        frac = n_above / values.size if values.size else float("nan")
        if values.size <= max_bars:
            order = np.sort(finite)[::-1]
            k = int(np.count_nonzero(order > threshold))
            if order.size <= 24:
                ax.bar(np.arange(order.size), order, width=0.85,
                       color=np.where(order > threshold, "#2ca02c", "#9e9e9e"))
            else:  # one artist per colour instead of one rectangle per unit: fast to draw
                edges = np.arange(order.size + 1) - 0.5
                if k:
                    ax.stairs(order[:k], edges[: k + 1], fill=True, color="#2ca02c")
                if k < order.size:
                    ax.stairs(order[k:], edges[k:], fill=True, color="#9e9e9e")
            ax.axhline(threshold, color="k", linestyle="--", linewidth=0.8)
            ax.set_ylim(0, 1.02)
            ax.set_xticks([])
            ax.set_xlim(-0.6, max(order.size, 1) - 0.4)
            ax.set_xlabel(f"{values.size} units, sorted by SA", fontsize=8)
            ax.set_ylabel("unit SA", fontsize=8)
        else:
            ax.hist(finite, bins=np.linspace(0, 1, 26), color="#9e9e9e", edgecolor="white")
            ax.axvline(threshold, color="k", linestyle="--", linewidth=0.8)
            ax.set_xlim(0, 1)
            ax.set_xlabel("unit SA", fontsize=8)
            ax.set_ylabel("units", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{label}\n{n_above}/{values.size} units > {threshold:g} ({frac:.0%})",
                     fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def fig_scatter(
    panels: Sequence[tuple[np.ndarray, np.ndarray, str, str, str]],
    *,
    title: str = "",
) -> Any:
    """Scatter plots, one per panel: ``(x, y, xlabel, ylabel, panel title)``."""
    n = len(panels)
    cols = min(3, max(1, n))
    rows = int(np.ceil(n / cols)) if n else 1
    fig = new_figure(3.8 * cols + 0.4, 3.5 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, (xv, yv, xlabel, ylabel, ptitle) in zip(axes.ravel(), panels):
        xv = np.asarray(xv, dtype=float)
        yv = np.asarray(yv, dtype=float)
        ok = np.isfinite(xv) & np.isfinite(yv)
        many = int(ok.sum()) > 1500
        # thousands of points: rasterise the markers so the SVG stays small and fast
        ax.scatter(xv[ok], yv[ok], s=4 if many else 14, alpha=0.35 if many else 0.7,
                   color="#1f77b4", edgecolors="none", rasterized=many)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.set_title(ptitle, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


@dataclass
class MapPanel:
    """One row of the maps figure: a layer's binary and probability maps over the input."""

    label: str
    binary: np.ndarray | None
    probability: np.ndarray | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _fit(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resample of ``arr`` to ``shape`` (display only)."""
    if arr.shape == tuple(shape):
        return arr
    idx = tuple(
        np.minimum((np.arange(n_out) + 0.5) * n_in / n_out, n_in - 1).astype(np.intp)
        for n_in, n_out in zip(arr.shape, shape)
    )
    return arr[np.ix_(*idx)]


def choose_slices(volume_fg: np.ndarray | None, shape: tuple[int, ...]) -> list[int]:
    """For a 3-D volume, the slice with most foreground on each axis (middle slice if none)."""
    out = []
    for axis in range(3):
        mid = shape[axis] // 2
        if volume_fg is None or not np.any(volume_fg):
            out.append(mid)
            continue
        other = tuple(a for a in range(3) if a != axis)
        counts = np.asarray(volume_fg, dtype=bool).sum(axis=other)
        out.append(int(np.argmax(counts)))
    return out


def _views(arr: np.ndarray | None, slices: list[int] | None) -> list[np.ndarray | None]:
    if arr is None:
        return [None] * (3 if slices is not None else 1)
    if slices is None:
        return [arr]
    return [np.take(arr, slices[a], axis=a) for a in range(3)]


def _contour(ax: Any, mask: np.ndarray | None, colour: str) -> None:
    if mask is None:
        return
    m = np.asarray(mask, dtype=float)
    if m.ndim == 2 and m.min() < 0.5 <= m.max():
        ax.contour(m, levels=[0.5], colors=colour, linewidths=0.8)


def _show_image(ax: Any, image: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if image is None:
        ax.imshow(np.zeros(shape), cmap="gray", vmin=0, vmax=1)
        return
    img = _fit(np.asarray(image, dtype=float), shape)
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")


def _not_recorded(ax: Any) -> None:
    ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes,
            fontsize=7, color="white")


def _draw_input(ax_b: Any, ax_p: Any, image: np.ndarray | None, reference: np.ndarray | None,
                prediction: np.ndarray | None, shape: tuple[int, ...]) -> None:
    """The first column: the input with the reference outlined, the prediction below."""
    _show_image(ax_b, image, shape)
    _contour(ax_b, reference, "yellow")
    if prediction is not None:
        ax_p.imshow(_fit(np.asarray(prediction, dtype=float), shape), cmap="magma",
                    vmin=0, vmax=1, interpolation="nearest")
    else:
        _show_image(ax_p, None, shape)
    _contour(ax_p, reference, "cyan")
    ax_p.set_xlabel("prediction" if prediction is not None else "prediction not recorded",
                    fontsize=7)


def _draw_panel(ax_b: Any, ax_p: Any, binary: np.ndarray | None,
                probability: np.ndarray | None, image: np.ndarray | None,
                reference: np.ndarray | None, shape: tuple[int, ...]) -> None:
    """One layer's column: its binary map in red over the input, its probability map below."""
    from matplotlib.colors import ListedColormap

    shape_c = next((a.shape for a in (binary, probability) if a is not None), shape)
    ref_c = None if reference is None else _fit(reference, shape_c)
    _show_image(ax_b, image, shape_c)
    if binary is not None:
        bb = np.asarray(binary, dtype=bool)
        ax_b.imshow(np.ma.masked_where(~bb, np.ones(bb.shape)),
                    cmap=ListedColormap(["#ff2020"]), alpha=0.5, vmin=0, vmax=1,
                    interpolation="nearest")
    else:
        _not_recorded(ax_b)
    _contour(ax_b, ref_c, "yellow")
    if probability is not None:
        ax_p.imshow(np.asarray(probability, dtype=float), cmap="magma", vmin=0, vmax=1,
                    interpolation="nearest")
    else:
        _show_image(ax_p, None, shape_c)
        _not_recorded(ax_p)
    _contour(ax_p, ref_c, "cyan")


def fig_maps(
    image: np.ndarray | None,
    reference: np.ndarray | None,
    prediction: np.ndarray | None,
    panels: Sequence[MapPanel],
    *,
    title: str = "",
) -> Any:
    """Segmentation-ability maps of one case over its input.

    Parameters
    ----------
    image : ndarray (*spatial) or None
        The input image (one channel) on the reference grid.
    reference, prediction : ndarray (*spatial) or None
        Reference mask (outlined in every panel) and the model's prediction probability.
    panels : sequence of MapPanel
        One column per layer (or unit): its binary map (red over the input) and its
        probability map.
    title : str
        Figure title.

    Notes
    -----
    Columns: the input (with the reference outlined, above the prediction probability),
    then one column per panel. 2-D cases have two rows (binary, probability); 3-D cases two
    rows per axis, each at the slice with the most reference foreground (middle slice when
    the reference is empty). 1-D cases are drawn as curves.
    """
    ref_shape = next((np.shape(a) for a in (reference, prediction, image) if a is not None), None)
    if ref_shape is None:
        ref_shape = next((np.shape(p.binary) for p in panels if p.binary is not None), (1, 1))
    ndim = len(ref_shape)
    if ndim == 1:
        return _fig_maps_1d(image, reference, prediction, panels, title=title)
    slices = choose_slices(reference if reference is not None else
                           (None if prediction is None else np.asarray(prediction) > 0.5),
                           ref_shape) if ndim == 3 else None
    n_views = 3 if slices is not None else 1
    cols = 1 + len(panels)
    rows = 2 * n_views
    cell = 1.9 if cols > 6 else 2.3
    aspects = []
    for v in range(n_views):
        shp = [n for a, n in enumerate(ref_shape) if slices is None or a != v]
        aspects.append(min(3.0, max(0.33, shp[0] / max(shp[1], 1))))
    fig = new_figure(cell * cols + 0.6, sum(2 * cell * a for a in aspects) + 1.1)
    axes = fig.subplots(rows, cols, squeeze=False)
    img_v = _views(image, slices)
    ref_v = _views(reference, slices)
    pred_v = _views(prediction, slices)
    for v in range(n_views):
        rb, rp = 2 * v, 2 * v + 1
        where = f"axis {v}, slice {slices[v]}\n" if slices is not None else ""
        shape_v = next(a.shape for a in (ref_v[v], pred_v[v], img_v[v], np.zeros((1, 1)))
                       if a is not None)
        _draw_input(axes[rb, 0], axes[rp, 0], img_v[v], ref_v[v], pred_v[v], shape_v)
        axes[rb, 0].set_ylabel(where + "binary map", fontsize=8)
        axes[rp, 0].set_ylabel(where + "probability map", fontsize=8)
        if v == 0:
            axes[rb, 0].set_title("input + reference", fontsize=8)
        for c, panel in enumerate(panels, start=1):
            _draw_panel(axes[rb, c], axes[rp, c], _views(panel.binary, slices)[v],
                        _views(panel.probability, slices)[v], img_v[v], ref_v[v], shape_v)
            if v == 0:
                axes[rb, c].set_title(_wrap(panel.label, 22), fontsize=8)
            if v == n_views - 1 and panel.note:
                axes[rp, c].set_xlabel(_wrap(panel.note, 26), fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=True)) or text


def _fig_maps_1d(
    image: np.ndarray | None,
    reference: np.ndarray | None,
    prediction: np.ndarray | None,
    panels: Sequence[MapPanel],
    *,
    title: str = "",
) -> Any:
    rows = 1 + len(panels)
    fig = new_figure(7.0, 1.5 * rows + 0.6)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    if image is not None:
        axes[0].plot(np.asarray(image, dtype=float), color="k", linewidth=0.8, label="input")
    if prediction is not None:
        axes[0].plot(np.asarray(prediction, dtype=float), color="#d62728", label="prediction")
    if reference is not None:
        axes[0].fill_between(np.arange(len(reference)), 0, np.asarray(reference, dtype=float),
                             color="gold", alpha=0.3, step="mid", label="reference")
    axes[0].legend(fontsize=7)
    for ax, panel in zip(axes[1:], panels):
        if panel.probability is not None:
            ax.plot(np.asarray(panel.probability, dtype=float), color="#7b3294",
                    label="probability")
        if panel.binary is not None:
            ax.fill_between(np.arange(len(panel.binary)), 0,
                            np.asarray(panel.binary, dtype=float), color="#ff2020",
                            alpha=0.35, step="mid", label="binary")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(panel.label, fontsize=8)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
