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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MapPanel",
    "fig_compare",
    "fig_maps",
    "fig_risk_coverage",
    "fig_sa_depth",
    "fig_scatter",
    "fig_units",
    "new_figure",
    "save_figure",
    "choose_slices",
]

_CLASS_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_BASELINE_COLOURS = ("#bcbd22", "#17becf", "#e377c2", "#8c564b", "#7f7f7f")


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

    Notes
    -----
    The PNG is the Agg canvas drawn once at ``dpi`` and encoded by Pillow as 8-bit RGB
    (the figures are opaque; RGBA when a pixel is not) at zlib level 6: about 7 % smaller
    than ``savefig``'s RGBA and no slower; level 1 would save a fifth of the encoding time
    of the maps figure for files half as large again (``benchmarks/report_speed.py``),
    and every byte is embedded in ``report.html``. The PNG is encoded in a thread while the SVG
    is drawn (Pillow releases the GIL while it compresses).
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    own_dpi = fig.dpi
    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    opaque = bool((rgba[..., 3] == 255).all())
    # a copy either way: the encoder thread never reads the canvas's own buffer
    im = Image.fromarray(np.ascontiguousarray(rgba[..., :3]) if opaque else rgba.copy())

    def encode() -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="png", compress_level=6, dpi=(dpi, dpi))
        data = buf.getvalue()
        stem.with_suffix(".png").write_bytes(data)
        return data

    # Pillow's zlib encoding releases the GIL: it runs beside the SVG drawing (issue 15:
    # 0.9 s of the demo report's encoding no longer adds to its wall time; same bytes)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="protoseg-png") as pool:
        png_done = pool.submit(encode)
        fig.set_dpi(own_dpi)
        # the layout was computed while drawing the PNG; keep it rather than recompute it
        fig.set_layout_engine("none")
        # SVG keeps glyphs as paths (matplotlib's default), so the file needs no fonts.
        fig.savefig(stem.with_suffix(".svg"), format="svg", metadata={"Date": None})
        return png_done.result()


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


def fig_risk_coverage(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray, bool]],
    *,
    oracle: tuple[np.ndarray, np.ndarray] | None = None,
    random_risk: float | None = None,
    title: str = "",
) -> Any:
    """Risk–coverage curves: the mean risk (1 − Dice) of the cases an estimate trusts most.

    Parameters
    ----------
    curves : sequence of (label, coverage, selective risk, is_baseline)
        One curve per estimator or baseline (:func:`engine.quality.failure.risk_coverage_curve`);
        baselines (and other references, such as the input SA) are drawn dashed.
    oracle : (coverage, selective risk), optional
        The curve of a perfect ranking (dotted black).
    random_risk : float, optional
        The mean risk: the curve of an uninformative estimate (grey line).
    title : str
        Axes title.
    """
    fig = new_figure(8.8, 4.2)
    ax = fig.add_subplot()
    counts = [0, 0]  # estimators, baselines
    for label, cov, risk, baseline in curves:
        palette = _BASELINE_COLOURS if baseline else _CLASS_COLOURS
        colour = palette[counts[baseline] % len(palette)]
        counts[baseline] += 1
        ax.plot(np.asarray(cov, float), np.asarray(risk, float), "--" if baseline else "-",
                color=colour, linewidth=1.0 if baseline else 1.6, label=label)
    if oracle is not None:
        ax.plot(np.asarray(oracle[0], float), np.asarray(oracle[1], float), ":", color="k",
                linewidth=1.2, label="oracle (ranked by the true Dice)")
    if random_risk is not None and np.isfinite(random_risk):
        ax.axhline(random_risk, color="#7f7f7f", linewidth=0.8,
                   label=f"uninformative (mean risk {random_risk:.3f})")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (fraction of cases kept, most trusted first)")
    ax.set_ylabel("selective risk (mean 1 − Dice of the kept cases)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        ax.set_title(title, fontsize=10)
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


def _views(arr: np.ndarray | None, slices: list[int] | None,
           ref_shape: tuple[int, ...] | None = None) -> list[np.ndarray | None]:
    """The 2-D views of ``arr``: itself, or for 3-D its slice on each axis.

    ``slices`` index the reference grid (``ref_shape``); an array on another grid is cut
    at the same relative position.
    """
    if arr is None:
        return [None] * (3 if slices is not None else 1)
    arr = np.asarray(arr)
    if slices is None:
        return [arr]
    out = []
    for a in range(3):
        i = slices[a]
        if ref_shape is not None and arr.shape[a] != ref_shape[a]:
            i = min(arr.shape[a] - 1, i * arr.shape[a] // max(ref_shape[a], 1))
        out.append(np.take(arr, i, axis=a))
    return out


def _outline(mask: np.ndarray | None) -> list[np.ndarray]:
    """The outline of a binary mask as ``(x, y)`` polylines in pixel coordinates.

    The lines ``Axes.contour(mask, levels=[0.5])`` draws (contourpy, which matplotlib
    uses), computed once per view and drawn over every cell as one ``LineCollection``.
    Empty when the mask is empty or full.
    """
    if mask is None:
        return []
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim != 2 or not (m.min() < 0.5 <= m.max()):
        return []
    import contourpy

    return list(contourpy.contour_generator(z=m, line_type="Separate").lines(0.5))


def _colour(values: np.ndarray, cmap: str, lo: float, hi: float) -> np.ndarray:
    """``values`` through a matplotlib colormap as RGB floats; NaN white (as ``imshow``)."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    rgba = matplotlib.colormaps[cmap]((v - lo) / (hi - lo))
    bad = ~np.isfinite(v)
    rgba[bad] = 1.0
    return rgba[..., :3]


def _gray(image: np.ndarray | None, shape: tuple[int, ...],
          window: tuple[float, float]) -> np.ndarray:
    """The input as gray RGB on ``shape`` (black when not recorded)."""
    if image is None:
        return np.zeros((*shape, 3))
    return _colour(_fit(np.asarray(image, dtype=np.float64), shape), "gray", *window)


def _window(image: np.ndarray | None) -> tuple[float, float]:
    """Display range of the input: its 1st to 99th percentile over finite values."""
    if image is None:
        return 0.0, 1.0
    img = np.asarray(image, dtype=np.float64)
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    return float(lo), float(hi if hi > lo else lo + 1)


_RED = np.array([1.0, 0x20 / 255, 0x20 / 255])


def _cell_pair(binary: np.ndarray | None, probability: np.ndarray | None,
               base: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One layer's two cells: its binary map (red, half transparent) over the input, and
    its probability map (magma, 0 black to 1 yellow)."""
    top = base.copy()
    if binary is not None:
        bb = _fit(np.asarray(binary, dtype=bool), shape)
        top[bb] = 0.5 * top[bb] + 0.5 * _RED
    bottom = (np.zeros((*shape, 3)) if probability is None else
              _colour(_fit(np.asarray(probability, dtype=np.float64), shape), "magma", 0.0, 1.0))
    return top, bottom


def fig_maps(
    image: np.ndarray | None,
    reference: np.ndarray | None,
    prediction: np.ndarray | None,
    panels: Sequence[MapPanel],
    *,
    title: str = "",
    affine: np.ndarray | None = None,
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
    affine : ndarray (4, 4), optional
        The voxel → RAS affine of the 3-D arrays (the store's ``CaseGrid``): their slices
        are then drawn in anatomical orientation (sagittal, coronal, axial) with R/L, A/P
        and S/I at the input's edges. Default: axes in array order, unlabelled.

    Notes
    -----
    Columns: the input (with the reference outlined, above the prediction probability),
    then one column per panel. 2-D cases have two rows (binary, probability); 3-D cases two
    rows per axis, each at the slice with the most reference foreground (middle slice when
    the reference is empty). 1-D cases are drawn as curves. With ``affine``, the arrays are
    flipped and permuted to RAS (no resampling) and each slice drawn as radiological
    viewers (ITK-SNAP, 3D Slicer) show it: the patient's right on the left of axial and
    coronal slices, anterior on the left of sagittal ones, superior (anterior in axial
    slices) at the top.

    Every cell is coloured here with matplotlib's colormaps (input: gray between its 1st
    and 99th percentile; probability: magma on [0, 1]; binary map: red at alpha 0.5), each
    axis's cells are drawn as one 8-bit image (``interpolation="none"``: nearest neighbour
    in the PNG, the pixels themselves in the SVG) in one Axes placed by hand, and the
    reference's outline (:func:`_outline`; yellow over the input, cyan over the
    probability) as one line collection. One Axes, ``imshow`` and ``contour`` per cell with
    the constrained layout drew the same content 3-4 times slower (the demo's 33 × 6 cells:
    7.5 s against 2.2 s to draw and save; ``benchmarks/report_speed.py``). Arrays on
    another grid than the reference are shown on the finer of the two (nearest neighbour).
    """
    ref_shape = next((np.shape(a) for a in (reference, prediction, image) if a is not None), None)
    if ref_shape is None:
        ref_shape = next((np.shape(p.binary) for p in panels if p.binary is not None), (1, 1))
    ndim = len(ref_shape)
    if ndim == 1:
        return _fig_maps_1d(image, reference, prediction, panels, title=title)
    from matplotlib.collections import LineCollection

    anatomical = ndim == 3 and affine is not None
    if anatomical:  # to RAS: slice v is then sagittal, coronal, axial (_ANATOMICAL_VIEWS)
        image, reference, prediction = (_to_ras(a, affine) for a in (image, reference, prediction))
        panels = [replace(p, binary=_to_ras(p.binary, affine),
                          probability=_to_ras(p.probability, affine)) for p in panels]
        ref_shape = next((np.shape(a) for a in (reference, prediction, image) if a is not None),
                         next((np.shape(p.binary) for p in panels if p.binary is not None),
                              ref_shape))

    slices = choose_slices(reference if reference is not None else
                           (None if prediction is None else np.asarray(prediction) > 0.5),
                           ref_shape) if ndim == 3 else None
    n_views = 3 if slices is not None else 1
    cols = 1 + len(panels)
    img_v = _views(image, slices, ref_shape)
    ref_v = _views(reference, slices, ref_shape)
    pred_v = _views(prediction, slices, ref_shape)
    bin_v = [_views(p.binary, slices, ref_shape) for p in panels]
    prob_v = [_views(p.probability, slices, ref_shape) for p in panels]
    if anatomical:
        img_v, ref_v, pred_v = (_on_screen(views) for views in (img_v, ref_v, pred_v))
        bin_v, prob_v = [_on_screen(b) for b in bin_v], [_on_screen(p) for p in prob_v]
    window = _window(image)

    mosaics, grids, outlines = [], [], []
    for v in range(n_views):
        shapes = [a.shape for a in (ref_v[v], pred_v[v], img_v[v], *(b[v] for b in bin_v),
                                    *(p[v] for p in prob_v)) if a is not None]
        grid = tuple(int(n) for n in np.max(shapes, axis=0)) if shapes else (1, 1)
        h, w = grid
        gx, gy = max(1, round(0.03 * w)), max(1, round(0.03 * h))
        mosaic = np.ones((2 * h + gy, cols * w + (cols - 1) * gx, 3))
        base = _gray(img_v[v], grid, window)
        first = (base,
                 np.zeros((*grid, 3)) if pred_v[v] is None else _colour(
                     _fit(np.asarray(pred_v[v], dtype=np.float64), grid), "magma", 0.0, 1.0))
        cells = [first] + [_cell_pair(b[v], p[v], base, grid) for b, p in zip(bin_v, prob_v)]
        for c, (top, bottom) in enumerate(cells):
            x0 = c * (w + gx)
            mosaic[:h, x0:x0 + w] = top
            mosaic[h + gy:, x0:x0 + w] = bottom
        mosaics.append(mosaic)
        grids.append((h, w, gx, gy))
        outlines.append(_outline(None if ref_v[v] is None else _fit(ref_v[v], grid)))

    # the layout, in inches: every column has the same pitch; each axis (view) keeps the
    # aspect of its slices (clipped to [1/3, 3]); text goes in the margins
    cell = 1.9 if cols > 6 else 2.3
    pitch = cell + 0.06
    titles = [_wrap(p.label, 22) for p in panels]
    notes = [_wrap(p.note, 26) if p.note else "" for p in panels]
    line8, line6 = 8 * 1.25 / 72, 6 * 1.25 / 72
    n_title = max([t.count("\n") + 1 for t in ["input + reference", *titles]])
    n_note = max([n.count("\n") + 1 for n in notes if n] + [1])
    top = 0.08 + (0.28 if title else 0.0) + n_title * line8 + 0.04
    bottom = 0.06 + max(n_note * line6, 7 * 1.25 / 72) + 0.04
    left, right, vgap = 0.5, 0.12, 0.12
    heights = []
    for h, w, gx, gy in grids:
        cw = pitch * w / (w + gx)  # cell width in inches
        aspect = min(3.0, max(0.33, h / max(w, 1)))
        heights.append((2 * h + gy) * cw * aspect / h)
    fig_w = left + cols * pitch + right
    fig_h = top + sum(heights) + vgap * (n_views - 1) + bottom
    fig = new_figure(fig_w, fig_h)
    fig.set_layout_engine("none")

    def at(x: float, y: float, s: str, **kw: Any) -> None:  # inches from the top left
        fig.text(x / fig_w, 1 - y / fig_h, s, **kw)

    if title:
        at(left + cols * pitch / 2, 0.08, title, ha="center", va="top", fontsize=10)
    y = top
    for v, ((h, w, gx, gy), mosaic, vh) in enumerate(zip(grids, mosaics, heights)):
        width = cols * pitch - pitch * gx / (w + gx)
        ax = fig.add_axes((left / fig_w, 1 - (y + vh) / fig_h, width / fig_w, vh / fig_h))
        # as 8-bit RGBA: resampled (PNG) and encoded (SVG) several times faster than floats,
        # and the Agg draw 3-5x faster than from 8-bit RGB, which matplotlib converts to RGBA
        # and to float on every draw; the same pixels (issue 15)
        rgba = np.empty(mosaic.shape[:2] + (4,), dtype=np.uint8)
        rgba[..., :3] = mosaic * 255 + 0.5
        rgba[..., 3] = 255
        ax.imshow(rgba, aspect="auto", interpolation="none")
        ax.set_axis_off()
        if outlines[v]:  # the reference: yellow over the input, cyan over probabilities
            segs = [line + (c * (w + gx), r * (h + gy)) for r in (0, 1) for c in range(cols)
                    for line in outlines[v]]
            colours = ["yellow"] * (len(segs) // 2) + ["cyan"] * (len(segs) // 2)
            ax.add_collection(LineCollection(segs, colors=colours, linewidths=0.8),
                              autolim=False)
        cw = pitch * w / (w + gx)
        row_h = vh * h / (2 * h + gy)
        where = f"axis {v}, slice {slices[v]}\n" if slices is not None else ""
        if anatomical:
            name, (up, down, lt, rt) = _ANATOMICAL_VIEWS[v]
            where = f"{name}, slice {slices[v]}\n"  # type: ignore[index]
            x0, y_mid = left + 0.03, y + row_h / 2
            for x_, y_, s_, kw in ((left + cw / 2, y + 0.03, up, {"ha": "center", "va": "top"}),
                                   (left + cw / 2, y + row_h - 0.03, down,
                                    {"ha": "center", "va": "bottom"}),
                                   (x0, y_mid, lt, {"ha": "left", "va": "center"}),
                                   (left + cw - 0.03, y_mid, rt, {"ha": "right", "va": "center"})):
                at(x_, y_, s_, fontsize=7, color="white", fontweight="bold", **kw,
                   bbox={"boxstyle": "square,pad=0.1", "fc": "black", "ec": "none", "alpha": 0.6})
        for r, label in enumerate(("binary map", "probability map")):
            yc = y + (vh - row_h / 2 if r else row_h / 2)
            at(left - 0.06, yc, where + label, ha="center", va="bottom", rotation=90,
               fontsize=8, rotation_mode="anchor")
        for c in range(cols):
            xc = left + c * pitch + cw / 2
            if v == 0:
                at(xc, y - 0.04, "input + reference" if c == 0 else titles[c - 1],
                   ha="center", va="bottom", fontsize=8, linespacing=1.1)
            if c and v == n_views - 1 and notes[c - 1]:
                at(xc, y + vh + 0.04, notes[c - 1], ha="center", va="top", fontsize=6,
                   linespacing=1.1)
            for r, missing in enumerate((bin_v, prob_v)):
                if c and missing[c - 1][v] is None:
                    at(xc, y + (vh - row_h / 2 if r else row_h / 2), "not recorded",
                       ha="center", va="center", fontsize=7, color="white")
        if v == n_views - 1:
            at(left + cw / 2, y + vh + 0.04,
               "prediction" if prediction is not None else "prediction not recorded",
               ha="center", va="top", fontsize=7)
        y += vh + vgap
    return fig


#: The views of a RAS volume sliced along axis 0, 1, 2, and the letters at the top, bottom,
#: left and right of each as drawn by :func:`_on_screen` (radiological convention).
_ANATOMICAL_VIEWS = (("sagittal", ("S", "I", "A", "P")), ("coronal", ("S", "I", "R", "L")),
                     ("axial", ("A", "P", "R", "L")))


def _to_ras(arr: np.ndarray | None, affine: np.ndarray) -> np.ndarray | None:
    """A 3-D array flipped and permuted to RAS (:func:`nibabel.orientations.io_orientation`);
    the flips do not depend on the array's size, so maps on a coarser grid follow too."""
    if arr is None or np.ndim(arr) != 3:
        return arr
    from nibabel.orientations import apply_orientation, io_orientation

    return apply_orientation(np.asarray(arr), io_orientation(np.asarray(affine, dtype=np.float64)))


def _on_screen(views: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """Slices of a RAS volume as drawn: rows from superior (axial: anterior) down, columns
    from the patient's right (sagittal: anterior) to the left."""
    return [None if a is None else np.flip(a).T for a in views]


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
