"""Reports: one self-contained HTML (or Markdown) file with the paper's figures (issue 6).

:func:`write_report` reads a protoseg store (:func:`engine.store.open_store`) and writes::

    out_dir/
      report.html | report.md       the report (HTML: every figure embedded as a PNG data URI)
      figures/<name>.png, .svg      every figure, both formats
      tables/<name>.csv, .json      layer_summary, unit_summary, input_summary, cases, run,
                                    correlations, validation (each when recorded)

See ``docs/report.md`` for every figure, table column and definition.

The report reads only what it draws: per-layer score arrays (small: cases x classes x
layers), each layer's unit scores one layer at a time, and the maps of at most a few
chosen cases, lazily. It states how many cases it summarised.

Modules, each importing only those before it: :mod:`~engine.report.tables` (the summary
tables, also used by the CLI), :mod:`~engine.report.figures` (matplotlib),
:mod:`~engine.report.access` (reading the store), :mod:`~engine.report.build` (the sections
as plain data), :mod:`~engine.report.html` and :mod:`~engine.report.markdown` (renderers)
and :mod:`~engine.report.write` (the folder). :mod:`~engine.report.compare` compares two
stores (:func:`compare_stores`, ``protoseg compare``).
"""
from __future__ import annotations

from engine.report.build import DEFAULT_MAP_CASES
from engine.report.compare import compare_stores
from engine.report.tables import layer_summary, unit_summary
from engine.report.write import write_report

__all__ = ["DEFAULT_MAP_CASES", "compare_stores", "layer_summary", "unit_summary", "write_report"]
