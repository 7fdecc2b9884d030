"""The HTML report: :class:`~engine.report.build.Report` through a Jinja2 template.

``templates/_page.html.j2`` holds the page every HTML file shares (header, sections — a
``collapsed`` one inside a closed ``<details>`` —, tables and figures),
``templates/report.html.j2`` the report's heading and ``templates/report.css`` the style; the
template autoescapes every value, so text from a store (configuration, case ids, layer
names) cannot inject markup. Figures are embedded as PNG data URIs: the file needs no
network and no JavaScript.
"""
from __future__ import annotations

import base64
import datetime as _dt
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np

from engine.report.build import Block, Report
from engine.report.tables import fmt, plural

__all__ = ["render_html", "render_page"]


def _numeric(value: Any) -> bool:
    """Whether a cell is right-aligned: numbers, and missing values (shown as a dash)."""
    if value is None:
        return True
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _runs(blocks: Sequence[Block]) -> list[list[Block]]:
    """The blocks in runs: consecutive tables together (they sit side by side), others alone."""
    runs: list[list[Block]] = []
    for block in blocks:
        if block.kind == "table" and runs and runs[-1][-1].kind == "table":
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("engine.report", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)
_ENV.filters.update(cell=fmt, b64=_base64, runs=_runs, plural=plural)
_ENV.tests["numeric"] = _numeric


def render_html(report: Report, *, written: _dt.datetime | None = None) -> str:
    """The report as one self-contained HTML page.

    Parameters
    ----------
    report : Report
        The built sections (:meth:`engine.report.build.ReportBuilder.build`).
    written : datetime, optional
        The time stated in the footer (default: now, UTC).

    Returns
    -------
    str
        The HTML text.
    """
    return render_page("report.html.j2", written=written, report=report)


def render_page(template: str, *, written: _dt.datetime | None = None, **context: Any) -> str:
    """Render one of this package's page templates (``report.html.j2``, ``compare.html.j2``).

    Parameters
    ----------
    template : str
        The template's file name under ``engine/report/templates``.
    written : datetime, optional
        The time stated in the footer (default: now, UTC).
    **context
        The template's variables.

    Returns
    -------
    str
        The HTML text.
    """
    when = written or _dt.datetime.now(_dt.timezone.utc)
    return _ENV.get_template(template).render(
        written=when.strftime("%Y-%m-%d %H:%M UTC"), **context)
