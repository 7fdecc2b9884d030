"""Tests of engine/report/markdown.py."""
from __future__ import annotations

import re

import numpy as np

from engine.report import write_report
from engine.report.build import Figure, Paragraph, Report, Section, Table
from engine.report.markdown import render_markdown

from ._synthetic import build_store


def test_markdown(tmp_path):
    store = build_store(tmp_path, maps=("c1",), channels=(2, 3), spatial=(8, 8),
                        estimates={"paper": np.linspace(0, 1, 7)})
    path = write_report(store, tmp_path / "md", format="md")
    assert path.name == "report.md"
    text = path.read_text()
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert "figures/sa_depth.png" in links
    for link in links:
        assert (tmp_path / "md" / link).exists()
    assert "| class | layer |" in text
    assert not (tmp_path / "md" / "report.html").exists()


def test_render_markdown_from_sections():
    report = Report(model="m", n_cases=2, n_layers=1, settings="s", tables={}, sections=(
        Section("a", "A", (
            Paragraph("one\ntwo"),
            Table("t", [{"k": 0.25, "v": "a|b"}, {"v": "x" * 200}], ["k", "v"]),
            Figure("f", "cap", b""))),))
    lines = render_markdown(report).splitlines()
    assert lines[:3] == ["# protoseg report", "", "Model: m · summarised 2 cases · 1 hidden "
                         "tensor · s"]
    assert "one two" in lines
    assert "| 0.250 | a\\|b |" in lines
    assert f"| – | {'x' * 159}… |" in lines
    assert "![f](figures/f.png)" in lines and "*cap* ([SVG](figures/f.svg))" in lines
