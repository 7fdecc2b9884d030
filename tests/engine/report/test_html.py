"""Tests of engine/report/html.py and its template: self-contained, escaped, well formed."""
from __future__ import annotations

import datetime as dt
import re

from engine.report import write_report
from engine.report.build import Figure, Paragraph, Report, Section, Table
from engine.report.html import render_html

from ._synthetic import CONFIG, build_store


def test_html_has_no_external_urls(full_report):
    _, path = full_report
    text = path.read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text)
    assert refs
    assert not [r for r in refs if re.match(r"(?i)(https?:)?//", r)]
    assert "<script" not in text.lower()

def test_escapes_text(tmp_path):
    store = build_store(tmp_path, maps=(), units=False)
    store.config = dict(CONFIG, note="<script>alert(1)</script>")
    text = write_report(store, tmp_path / "out").read_text()
    assert "<script>" not in text
    assert "&lt;script&gt;" in text

def test_html_is_well_formed(full_report):
    from html.parser import HTMLParser

    class Balance(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []
            self.errors: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "img", "br", "hr", "link"):
                self.stack.append(tag)

        def handle_endtag(self, tag):
            if self.stack and self.stack[-1] == tag:
                self.stack.pop()
            else:
                self.errors.append(tag)

    _, path = full_report
    parser = Balance()
    parser.feed(path.read_text())
    assert parser.errors == [] and parser.stack == []
    assert path.read_text().startswith("<!DOCTYPE html>")


def test_render_html_from_sections():
    report = Report(model="m<1>", n_cases=2, n_layers=1, settings="s", tables={}, sections=(
        Section("a", "A & B", (
            Paragraph("x < y"),
            Table("t1", [{"k": 1.5, "v": "<b>"}], ["k", "v"]),
            Table("t2", [{"k": None}, {"k": True}], ["k"]),
            Paragraph("end"),
            Figure("f", 'caption "q"', b"\x89PNG"))),))
    text = render_html(report, written=dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc))
    assert '<nav><a href="#a">A &amp; B</a></nav>' in text
    assert "<title>protoseg report — m&lt;1&gt;</title>" in text
    # consecutive tables side by side; numbers and missing values right-aligned
    assert text.count('<div class="row">') == 1
    assert text.index('<div class="row">') < text.index("t1") < text.index("t2") < text.index(
        "</div>\n</div>\n<p>end</p>")
    assert '<td class="n">1.500</td><td>&lt;b&gt;</td>' in text
    assert '<td class="n">–</td></tr><tr><td>true</td>' in text
    assert "<p>x &lt; y</p>" in text
    assert 'src="data:image/png;base64,iVBORw==" alt="caption &#34;q&#34;"' in text
    assert '<a href="figures/f.svg">SVG</a>' in text
    assert "Written by protoseg on 2026-01-02 03:04 UTC." in text
    assert text.endswith("</html>\n")
