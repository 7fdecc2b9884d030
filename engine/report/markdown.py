"""The Markdown report: :class:`~engine.report.build.Report` as text.

Tables are Markdown pipe tables (cells escaped and shortened; the full values are in
``tables/*.csv``); figures are relative links to ``figures/<name>.png`` and ``.svg``.
"""
from __future__ import annotations

from typing import Any

from engine._json import text
from engine.report.build import Block, Report
from engine.report.tables import fmt, plural

__all__ = ["render_markdown"]


def _short(value: str, limit: int = 160) -> str:
    """Markdown cells stay short (full values are in tables/*.csv)."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _md(value: Any) -> str:
    """Escape a cell for a Markdown table."""
    return text(value).replace("|", "\\|").replace("\n", " ")


def _block(block: Block) -> list[str]:
    if block.kind == "p":
        return [_md(block.text), ""]
    if block.kind == "figure":
        return [f"![{block.name}](figures/{block.name}.png)", "",
                f"*{_md(block.caption)}* ([SVG](figures/{block.name}.svg))", ""]
    cols = block.columns
    lines = [f"**{_md(block.caption)}**", "",
             "| " + " | ".join(_md(c) for c in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_md(_short(fmt(r.get(c)))) for c in cols) + " |"
              for r in block.rows]
    return lines + [""]


def render_markdown(report: Report) -> str:
    """The report as Markdown.

    Parameters
    ----------
    report : Report
        The built sections (:meth:`engine.report.build.ReportBuilder.build`).

    Returns
    -------
    str
        The Markdown text (figures linked, not embedded).
    """
    lines = ["# protoseg report", "",
             f"Model: {_md(report.model)} · summarised {plural(report.n_cases, 'case')} · "
             f"{plural(report.n_layers, 'hidden tensor')} · {_md(report.settings)}", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        if section.collapsed:
            lines += ["<details><summary>Show</summary>", ""]
        for block in section.blocks:
            lines += _block(block)
        if section.collapsed:
            lines += ["</details>", ""]
    return "\n".join(lines)
