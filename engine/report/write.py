"""Writing a report folder: :func:`write_report`.

Reads the store (:mod:`engine.report.access`), builds the sections and draws the figures
(:mod:`engine.report.build`), writes every table as CSV and JSON
(:func:`engine.report.tables.write_table`) and renders ``report.html``
(:mod:`engine.report.html`) or ``report.md`` (:mod:`engine.report.markdown`).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from engine.report.access import read_report_data, resolve_store
from engine.report.build import ReportBuilder, choose_map_cases
from engine.report.html import render_html
from engine.report.markdown import render_markdown
from engine.report.tables import write_table

__all__ = ["write_report"]


def _check_options(format: str, unit_threshold: Any, max_cases: Any) -> float:
    """Validate :func:`write_report`'s options; return the threshold as a float."""
    if format not in ("html", "md"):
        raise ValueError(f"format={format!r}; expected 'html' or 'md'")
    try:
        threshold = float(unit_threshold)
    except (TypeError, ValueError):
        raise TypeError(
            f"unit_threshold={unit_threshold!r}; expected a number in [0, 1]") from None
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"unit_threshold={threshold}; expected a number in [0, 1]")
    if max_cases is not None and (not isinstance(max_cases, (int, np.integer))
                                  or isinstance(max_cases, bool) or max_cases < 0):
        raise ValueError(f"max_cases={max_cases!r}; expected a non-negative int or None")
    return threshold


def write_report(
    store_or_path: Any,
    out_dir: str | Path,
    *,
    format: str = "html",
    cases: Iterable[str] | None = None,
    unit_threshold: float = 0.5,
    max_cases: int | None = None,
    estimates: Any = None,
) -> Path:
    """Write the protoseg report of a store: figures, tables and one HTML or Markdown file.

    Parameters
    ----------
    store_or_path : str, Path or Store
        The store written by ``protoseg score`` (path) or an opened :class:`engine.store.Store`.
    out_dir : str or Path
        Folder to write into (created; existing report files are replaced).
    format : {"html", "md"}
        ``"html"``: ``report.html``, one self-contained file (figures embedded as PNG data
        URIs, no network, no JavaScript). ``"md"``: ``report.md``, a Markdown summary with
        tables and relative links to ``figures/*.png``.
    cases : iterable of str, optional
        Case ids whose segmentation-ability maps are drawn (each must have maps in the
        store). Default: the first cases with maps.
    unit_threshold : float
        Units whose mean SA over cases is above this value are counted per layer.
    max_cases : int, optional
        At most this many cases get map figures (default
        :data:`engine.report.build.DEFAULT_MAP_CASES`, 4, when ``cases`` is not given,
        otherwise all given cases). Statistics always use every case.
    estimates : str, Path or Store, optional
        A second store holding the label-free estimates and their validation (the store
        written by ``protoseg estimate``). Its ``estimates()`` and ``validation()`` are
        shown instead of the main store's; estimates are matched to cases by id (NaN for
        cases it lacks).

    Returns
    -------
    Path
        The report file (``out_dir/report.html`` or ``out_dir/report.md``).

    Raises
    ------
    FileNotFoundError
        The store path does not exist.
    TypeError
        ``store_or_path`` is neither a path nor a Store.
    ValueError
        Bad ``format``, ``unit_threshold`` or ``max_cases``; a requested case has no maps.
    KeyError
        A requested case id is not in the store (the message lists the closest ids).

    Notes
    -----
    Figures: SA against layer depth (mean and interquartile band per class), unit SA per
    layer (sorted bars, or a histogram above 96 units), maps for the chosen cases (3-D:
    the slice with the most reference foreground on each axis), the quality estimate(s)
    and the input SA against the output's Dice with Pearson r and Spearman ρ (when the
    store holds ground-truth Dice). Tables are written as CSV and JSON (NaN is ``NaN`` in
    CSV, ``null`` in JSON).

    Examples
    --------
    >>> from engine.report import write_report
    >>> write_report("run.h5", "run-report")          # doctest: +SKIP
    PosixPath('run-report/report.html')
    """
    unit_threshold = _check_options(format, unit_threshold, max_cases)
    store = resolve_store(store_or_path)
    est_store = None if estimates is None else resolve_store(estimates)
    data = read_report_data(store, est_store)
    map_cases = choose_map_cases(data, None if cases is None else [str(c) for c in cases],
                                 max_cases)
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    report = ReportBuilder(data, out / "figures", unit_threshold=unit_threshold,
                           map_cases=map_cases).build()
    for name, rows in report.tables.items():
        write_table(rows, out / "tables" / name)
    if format == "html":
        path = out / "report.html"
        path.write_text(render_html(report), encoding="utf-8")
    else:
        path = out / "report.md"
        path.write_text(render_markdown(report), encoding="utf-8")
    return path
