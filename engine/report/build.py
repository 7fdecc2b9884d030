"""The report's sections, computed once as plain data; the renderers add the markup.

:class:`ReportBuilder` turns a :class:`~engine.report.access.ReportData` into a
:class:`Report`: sections of paragraphs, tables and figures (each figure drawn now and
written as PNG and SVG), and the rows of every CSV/JSON table file.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from engine._json import jsonable, text
from engine.report import figures
from engine.report.access import (CaseMaps, ReportData, added_value, case_maps, coverage_summary,
                                  drawn_map_keys, failure_rows, merge_intervals, validation_rows)
from engine.report.tables import (NAN_STATUSES, correlation_label, correlations, field, fmt,
                                  input_summary, layer_summary, nanmean_rows, plural,
                                  text_column, unit_summary, value_text)
from engine.status import describe

__all__ = [
    "DEFAULT_MAP_CASES",
    "Figure",
    "Paragraph",
    "Report",
    "ReportBuilder",
    "Section",
    "Table",
    "choose_map_cases",
    "model_card_rows",
]

#: Maps are drawn for at most this many cases unless ``max_cases`` says otherwise.
DEFAULT_MAP_CASES = 4
#: Classes whose maps are drawn (multi-class stores).
MAX_MAP_CLASSES = 3
#: Classes with their own unit figure and a sentence on their best and worst layer.
MAX_FIGURE_CLASSES = 4
#: Case rows shown in the HTML/Markdown table (the CSV/JSON tables hold every case).
MAX_CASE_ROWS = 40


@dataclass(frozen=True)
class Paragraph:
    """A sentence or two of plain text."""

    text: str
    kind: ClassVar[str] = "p"


@dataclass(frozen=True)
class Table:
    """A table to show: ``rows`` hold raw values, formatted by the renderer."""

    caption: str
    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[str]
    kind: ClassVar[str] = "table"


@dataclass(frozen=True)
class Figure:
    """A figure already written as ``figures/<name>.png`` and ``.svg``."""

    name: str
    caption: str
    png: bytes = dataclasses.field(repr=False)
    kind: ClassVar[str] = "figure"


Block = Paragraph | Table | Figure


@dataclass(frozen=True)
class Section:
    """One titled part of the report (``id`` is its anchor).

    ``collapsed`` sections are closed until the reader opens them (HTML ``<details>``).
    """

    id: str
    title: str
    blocks: tuple[Block, ...]
    collapsed: bool = False


@dataclass(frozen=True)
class Report:
    """The built report: what the header says, the sections, and the table files' rows."""

    model: str
    n_cases: int
    n_layers: int
    settings: str
    sections: tuple[Section, ...]
    tables: dict[str, list[dict[str, Any]]]


def choose_map_cases(data: ReportData, cases: list[str] | None,
                     max_cases: int | None) -> list[str]:
    """The cases whose maps are drawn: ``cases`` (checked) or the first cases with maps.

    Raises
    ------
    KeyError
        A requested case is not in the store (the message lists the closest ids).
    ValueError
        A requested case has no maps.
    """
    if cases is None:
        return data.map_ids[: DEFAULT_MAP_CASES if max_cases is None else max_cases]
    for c in cases:
        if c not in data.ids:
            close = difflib.get_close_matches(c, data.ids, n=5)
            raise KeyError(f"case {c!r} is not in the store; closest ids: {close}"
                           if close else f"case {c!r} is not in the store "
                           f"({data.n_cases} cases, e.g. {data.ids[:5]})")
        if c not in data.map_ids:
            raise ValueError(
                f"case {c!r} has no maps in the store; cases with maps: {data.map_ids[:10]}"
                "; score again with save_maps including it")
    return cases if max_cases is None else cases[:max_cases]


def _slug(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    return keep.strip("_")[:60] or "x"


def _or_not_recorded(rows: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    return rows or [{key: "not recorded", "value": ""}]


def _display(value: Any) -> str:
    """A setting as text: lists of plain values comma-separated, the rest as value_text."""
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return ", ".join(str(v) for v in value) if value else "none"
    return value_text(value)


#: The model card's fields, grouped as the model card table shows them.
_CARD_PARTS = (
    ("inputs", ("input_name", "layout", "channels", "input_size")),
    ("outputs", ("prediction_output", "prediction_layout", "activation", "classes",
                 "threshold")),
    ("preprocessing", ("resize", "scaling", "mean", "std")),
)


def model_card_rows(card: Mapping[str, Any]) -> list[dict[str, str]]:
    """The model card (``config["model_card"]``) as table rows ``part, field, value``.

    Parts: inputs, outputs, preprocessing, layers (one row per hidden tensor that the
    exporter named: ``tensor → layer (layout)``), then any field not listed here (other).
    The ``assumed`` sentences are left out (shown on their own).
    """
    rows: list[dict[str, str]] = []
    seen = {"assumed", "hidden_layers", "hidden_layouts"}
    for part, keys in _CARD_PARTS:
        for key in keys:
            if key in card:
                seen.add(key)
                value = card[key]
                if key == "prediction_layout" and value is None:
                    value = "as the input"
                elif key in ("mean", "std") and value is None:
                    value = "not used"
                elif key == "input_size" and value is None:
                    value = "any"
                rows.append({"part": part, "field": key, "value": _display(value)})
    named = card.get("hidden_layers") or {}
    layouts = card.get("hidden_layouts") or {}
    if isinstance(named, Mapping) and isinstance(layouts, Mapping):
        for tensor in list(named) + [t for t in layouts if t not in named]:
            value = text(named.get(tensor, tensor))
            if tensor in layouts:
                value += f" ({text(layouts[tensor])})"
            rows.append({"part": "layers", "field": text(tensor), "value": value})
        if not named and not layouts:
            rows.append({"part": "layers", "field": "hidden layers",
                         "value": "not named by an exporter (tensor names are shown)"})
    for key, value in card.items():
        if key not in seen:
            rows.append({"part": "other", "field": text(key), "value": _display(value)})
    return rows


class ReportBuilder:
    """Computes the sections of one report.

    Parameters
    ----------
    data : ReportData
        What the store holds (:func:`engine.report.access.read_report_data`).
    figure_dir : Path
        Where figures are written (``<name>.png`` and ``<name>.svg``).
    unit_threshold : float
        Units above it are counted per layer.
    map_cases : list of str
        The cases whose maps are drawn (:func:`choose_map_cases`).
    """

    def __init__(self, data: ReportData, figure_dir: Path, *, unit_threshold: float,
                 map_cases: list[str]) -> None:
        self.data = data
        self.figure_dir = figure_dir
        self.threshold = unit_threshold
        self.map_cases = map_cases
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.mean_layer_sa = nanmean_rows(data.score, axis=2)  # (n_cases, n_classes)
        # per map case, class index and tensor: "best units: ..." (set by the unit section)
        self.best_units: dict[str, dict[int, dict[str, str]]] = {c: {} for c in map_cases}
        self._figure_names: set[str] = set()

    def build(self) -> Report:
        """Draw every figure and return the report's sections and tables."""
        d = self.data
        self._layer_rows = layer_summary(d.score, d.status, d.layers, d.classes)
        self.tables["layer_summary"] = self._layer_rows
        sections = (self._summary_section(), self._layers_section(), self._unit_section(),
                    self._maps_section(), self._quality_section(),
                    self._validation_section(), self._cases_section(), self._run_section())
        return Report(model=text(jsonable(self._model(), default=str)), n_cases=d.n_cases,
                      n_layers=len(d.layers), settings=self._settings(), sections=sections,
                      tables=self.tables)

    # -- helpers --------------------------------------------------------------------
    def _figure(self, fig: Any, name: str, caption: str) -> Figure:
        stem, i = name, 1
        while name in self._figure_names:  # two case ids may share a file-name slug
            i += 1
            name = f"{stem}-{i}"
        self._figure_names.add(name)
        return Figure(name, caption, figures.save_figure(fig, self.figure_dir / name))

    def _settings(self) -> str:
        cfg = self.data.config
        return (f"guide = {cfg.get('guide', 'not recorded')}, "
                f"reference = {cfg.get('reference', 'not recorded')}, "
                f"resize = {cfg.get('resize', 'not recorded')}")

    def _model(self) -> Any:
        prov, cfg = self.data.provenance, self.data.config
        return prov.get("model") or prov.get("model_path") or cfg.get("model") or "not recorded"

    # -- sections -------------------------------------------------------------------
    def _run_summary(self) -> list[tuple[str, Any]]:
        d = self.data
        prov = d.provenance
        return [
            ("model", self._model()),
            ("model sha256", prov.get("model_sha256") or prov.get("sha256") or "not recorded"),
            ("protoseg version", prov.get("protoseg_version") or prov.get("version")
             or "not recorded"),
            ("provider", prov.get("provider") or "not recorded"),
            ("optimisation", prov.get("optimization") or prov.get("optimisation")
             or "not recorded"),
            ("store version", d.version or "not recorded"),
            ("cases", plural(d.n_cases, "case")),
            ("classes", ", ".join(str(c) for c in d.classes)),
            ("hidden tensors scored", plural(len(d.layers), "hidden tensor")),
            ("unit level", "recorded" if d.has_units else "not recorded"),
        ]

    def _status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for st in text_column(self.data.cases, "status", "ok"):
            counts[st] = counts.get(st, 0) + 1
        return counts

    def _run_section(self) -> Section:
        """Configuration, model card and provenance: last, collapsed."""
        d = self.data
        prov, cfg = d.provenance, d.config
        counts = self._status_counts()
        timings = {k: v for k, v in prov.items()
                   if any(t in k.lower() for t in ("time", "second", "duration", "started",
                                                    "finished", "elapsed"))}
        run_rows = [{"key": k, "value": jsonable(v, default=str)}
                    for k, v in self._run_summary()]
        card = cfg.get("model_card")
        blocks: list[Block] = [
            Paragraph(f"Summarised {plural(d.n_cases, 'case')}, "
                      f"{plural(len(d.layers), 'hidden tensor')}, "
                      f"{plural(d.n_classes, 'class', 'classes')}."),
            Table("Run", [{"key": r["key"], "value": value_text(r["value"])}
                          for r in run_rows], ["key", "value"]),
            Table("Case statuses", [{"case status": k, "cases": v}
                                    for k, v in sorted(counts.items())],
                  ["case status", "cases"]),
            Table("Configuration (settings that change the numbers)",
                  _or_not_recorded([{"setting": k, "value": "see the model card table"
                                     if k == "model_card" and isinstance(card, Mapping)
                                     else _display(v)}
                                    for k, v in cfg.items()], "setting"),
                  ["setting", "value"]),
        ]
        if isinstance(card, Mapping):
            blocks.append(Table("Model card", model_card_rows(card), ["part", "field", "value"]))
            assumed = card.get("assumed")
            if isinstance(assumed, (list, tuple)) and assumed:
                blocks.append(Table("Model card: inferred rather than given",
                                    [{"assumed": text(a)} for a in assumed], ["assumed"]))
        else:
            blocks.append(Paragraph("Model card: not recorded."))
        blocks += [
            Table("Timings", _or_not_recorded(
                [{"item": k, "value": value_text(v)} for k, v in timings.items()], "item"),
                ["item", "value"]),
            Table("Provenance", _or_not_recorded(
                [{"item": k, "value": _display(v)} for k, v in prov.items()
                 if k != "assumed"], "item"),
                ["item", "value"]),
        ]
        self.tables["run"] = (
            run_rows
            + [{"key": f"config.{k}", "value": jsonable(v, default=str)} for k, v in cfg.items()]
            + [{"key": f"provenance.{k}", "value": jsonable(v, default=str)}
               for k, v in prov.items()]
            + [{"key": f"case_status.{k}", "value": v} for k, v in counts.items()])
        return Section("run", "Run configuration and provenance", tuple(blocks),
                       collapsed=True)

    def _data_text(self) -> str:
        prov, cfg = self.data.provenance, self.data.config
        where = prov.get("dataset") or prov.get("data")
        ds = cfg.get("dataset")
        kind = ds.get("kind") if isinstance(ds, Mapping) else None
        if where is None and isinstance(ds, str):
            where = ds
        parts = [text(where)] if where else []
        if kind:
            parts.append(f"({kind})")
        return " ".join(parts) or "not recorded"

    def _cases_text(self) -> str:
        counts = self._status_counts()
        total = plural(self.data.n_cases, "case")
        if not counts:
            return total
        return total + ": " + ", ".join(f"{v} {k}" for k, v in sorted(
            counts.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0])))

    def _dice_rows(self) -> list[dict[str, str]]:
        d = self.data
        rows = []
        for k, cls in enumerate(d.classes[:MAX_FIGURE_CLASSES]):
            if k >= d.dice.shape[1]:
                break
            v = d.dice[:, k]
            ok = v[np.isfinite(v)]
            if not ok.size:
                continue
            rows.append({"key": "output Dice", "value": (
                (f"class {cls}: " if d.n_classes > 1 else "")
                + f"mean {ok.mean():.3f}, median {np.median(ok):.3f} "
                f"({ok.size} of {plural(d.n_cases, 'case')} labelled)")})
        if len(rows) > 1:
            rows = [{"key": "output Dice", "value": "; ".join(r["value"] for r in rows)}]
        if not rows:
            rows.append({"key": "output Dice", "value": "not recorded (no ground truth)"})
        return rows

    def _estimate_rows(self) -> list[dict[str, str]]:
        d = self.data
        if not d.estimates:
            return [{"key": "label-free estimate",
                     "value": "not recorded (run `protoseg estimate`)"}]
        val = validation_rows(d.validation)
        rows = []
        for name, a in d.estimates.items():
            v = a[:, 0]
            ok = v[np.isfinite(v)]
            value = (f"mean {ok.mean():.3f} over {plural(ok.size, 'case')}" if ok.size
                     else "undefined in every case")
            mine = [r for r in val if text(r.get("estimator", "")) == name
                    and r.get("scope", "all") == "all"]
            if mine:
                merged = merge_intervals(mine[0])
                said = []
                for label, keys in (("Spearman ρ", ("spearman", "spearman.r",
                                                    "spearman.value")),
                                    ("Pearson r", ("pearson", "pearson.r", "pearson.value")),
                                    ("AURC", ("aurc",))):
                    key = next((k for k in keys if k in merged), None)
                    if key is not None and merged[key] is not None:
                        said.append(f"{label} = {fmt(merged[key])}")
                value += ("; against the output Dice: " + ", ".join(said) if said
                          else "; validation recorded")
            else:
                value += "; validation not recorded"
            rows.append({"key": f"estimate: {name}", "value": value})
        cov = coverage_summary(d.estimate_info)
        if cov is not None:
            rows.append({"key": "Dice lower bound", "value": (
                f"at {cov['nominal']:.0%} coverage for {cov['rank_by']}: "
                + (f"{cov['covered']} of {plural(cov['n'], 'labelled case')} at or above "
                   "their bound" if cov.get("n") else "not checked (no ground truth)")
                + " (see Validation)")})
        av = added_value(d.estimate_info)
        if av is not None:
            rows.append({"key": "SA beyond the baselines", "value": av["verdict"]})
        return rows

    def _layer_extremes(self) -> list[dict[str, str]]:
        rows = []
        multi = self.data.n_classes > 1
        for c in self.data.classes[:MAX_FIGURE_CLASSES]:
            ranked = [r for r in self._layer_rows if r["class"] == c and np.isfinite(r["mean"])]
            if not ranked:
                continue
            best = max(ranked, key=lambda r: r["mean"])
            worst = min(ranked, key=lambda r: r["mean"])
            if multi:  # one row per class keeps the first screen short
                rows.append({"key": f"best / worst layer, class {c}", "value": (
                    f"{best['layer']} {best['mean']:.3f} (depth {fmt(best['depth'])}) / "
                    f"{worst['layer']} {worst['mean']:.3f} (depth {fmt(worst['depth'])})")})
                continue
            for word, r in (("best", best), ("worst", worst)):
                rows.append({"key": f"{word} layer", "value": (
                    f"{r['layer']}: mean SA {r['mean']:.3f} (depth {fmt(r['depth'])}, "
                    f"{plural(r['n_used'], 'case')})")})
        return rows

    def _summary_section(self) -> Section:
        """The answer first: what was scored, how well, where in depth; the SA figure."""
        d = self.data
        facts = [
            {"key": "model", "value": text(self._model())},
            {"key": "data", "value": self._data_text()},
            {"key": "cases", "value": self._cases_text()},
            {"key": "scored", "value": (
                f"{plural(len(d.layers), 'hidden tensor')}, "
                f"{plural(d.n_classes, 'class', 'classes')} "
                f"({', '.join(str(c) for c in d.classes)}); {self._settings()}")},
            *self._dice_rows(),
            *self._estimate_rows(),
            *self._layer_extremes(),
        ]
        blocks: list[Block] = [Table("At a glance", facts, ["key", "value"])]
        if len(d.layers) == 0 or d.n_cases == 0:
            blocks.append(Paragraph("Layer-level SA: not recorded (no layers or no cases)."))
            return Section("summary", "Summary", tuple(blocks))
        o = d.order
        input_series = [] if d.input_score is None else [
            (f"class {c}", d.input_score[:, k, 0]) for k, c in enumerate(d.classes)]
        fig = figures.fig_sa_depth(
            np.arange(len(o), dtype=np.float64), [d.labels[j] for j in o],
            [(f"class {c}", d.score[:, k, o]) for k, c in enumerate(d.classes)],
            input_series=input_series, title="Layer-level SA by depth")
        blocks.append(self._figure(
            fig, "sa_depth",
            f"Layer-level SA against depth (layers ordered by their depth in the graph): "
            f"mean over cases (line) and interquartile range (band), per class; "
            f"{self._settings()}. Undefined scores (NaN) are left out; see n_nan in the "
            f"layer table. {plural(d.n_cases, 'case')}."))
        return Section("summary", "Summary", tuple(blocks))

    def _layers_section(self) -> Section:
        """Per layer: the distribution of the layer-level SA, undefined scores, input SA."""
        d = self.data
        rows = self._layer_rows
        title = "Layer-level SA"
        blocks: list[Block] = []
        cols = ["class", "layer", "depth", "channels", "mean", "sd", "median", "q25", "q75",
                "n_used", "n_nan"]
        nan_cols = [f"nan_{s.name}" for s in NAN_STATUSES
                    if any(r[f"nan_{s.name}"] for r in rows)]
        if len(d.layers) and d.n_cases:
            blocks.append(Table("Layer summary (tables/layer_summary.csv)", rows,
                                cols + nan_cols))
        if nan_cols:
            blocks.append(Paragraph("Undefined scores by cause: " + "; ".join(
                f"{s.name}: {describe(s)}" for s in NAN_STATUSES if f"nan_{s.name}" in nan_cols)
                + "."))
        if d.input_score is not None:
            irows = input_summary(d.input_score, d.classes)
            self.tables["input_summary"] = irows
            blocks.append(Table("Input SA (tables/input_summary.csv)", irows,
                                ["class", "input", "mean", "sd", "median", "q25", "q75",
                                 "n_used"]))
        else:
            blocks.append(Paragraph("Input SA: not recorded."))
        return Section("layers", title, tuple(blocks))

    def _read_units(self) -> tuple[list[dict[str, Any]], dict[int, list[tuple[str, np.ndarray]]]]:
        """Unit-summary rows and, per class index, each layer's unit means (for figures).

        Also notes each map case's three best units per layer in ``self.best_units``.
        """
        d = self.data
        idx_of = {c: i for i, c in enumerate(d.ids)}
        names = text_column(d.layers, "name")
        indices = [int(v) for v in field(d.layers, "index", 0)]
        rows: list[dict[str, Any]] = []
        panels: dict[int, list[tuple[str, np.ndarray]]] = {k: [] for k in range(d.n_classes)}
        for j in d.order:
            name, index = names[j], indices[j]
            u = d.unit_scores(index)  # (n_cases, n_classes, C)
            if u is None:
                continue
            for k, cls in enumerate(d.classes):
                s = unit_summary(u[:, k, :], threshold=self.threshold)
                panels[k].append((d.labels[j], s["unit_mean"]))
                rows.append({
                    "class": cls, "layer_index": index, "name": name, "layer": d.labels[j],
                    "depth": jsonable(d.depth[j]), "units": s["units"],
                    "n_defined": s["n_defined"], "threshold": self.threshold,
                    "n_above": s["n_above"], "fraction_above": s["fraction_above"],
                    "mean_unit_sa": s["mean_unit_sa"], "best_unit": s["best_unit"],
                    "best_unit_sa": s["best_unit_sa"]})
                for c in self.map_cases:
                    row = u[idx_of[c], k, :]
                    ok = np.flatnonzero(np.isfinite(row))
                    top = ok[np.argsort(-row[ok], kind="stable")][:3]
                    if top.size:
                        self.best_units[c].setdefault(k, {})[name] = "best units: " + ", ".join(
                            f"{t} ({row[t]:.2f})" for t in top)
        return rows, panels

    def _unit_section(self) -> Section:
        d = self.data
        if not d.has_units:
            return Section("units", "Unit SA per layer", (Paragraph(
                "Unit-level SA: not recorded (score with level='unit' or 'both')."),))
        rows, panels = self._read_units()
        if not rows:
            return Section("units", "Unit SA per layer",
                           (Paragraph("Unit-level SA: not recorded for any layer."),))
        self.tables["unit_summary"] = rows
        blocks: list[Block] = []
        for k, cls in enumerate(d.classes[:MAX_FIGURE_CLASSES]):
            fig = figures.fig_units(panels[k], self.threshold,
                                    title=f"Unit SA per layer, class {cls} "
                                          f"(mean over {plural(d.n_cases, 'case')})")
            blocks.append(self._figure(
                fig, f"unit_sa_class{cls}",
                f"Class {cls}: each unit's SA (mean over cases where defined), sorted; "
                f"green bars are above the threshold {self.threshold:g}. Layers with "
                f"more than 96 units are drawn as histograms. {self._settings()}."))
        if d.n_classes > MAX_FIGURE_CLASSES:
            blocks.append(Paragraph(
                f"Unit figures drawn for the first {MAX_FIGURE_CLASSES} of {d.n_classes} "
                "classes; the table covers all."))
        blocks.append(Table(f"Units above {self.threshold:g} (tables/unit_summary.csv)", rows,
                            ["class", "layer", "units", "n_defined", "n_above",
                             "fraction_above", "mean_unit_sa", "best_unit", "best_unit_sa"]))
        return Section("units", "Unit SA per layer", tuple(blocks))

    def _maps_section(self) -> Section:
        d = self.data
        if not d.map_ids:
            return Section("maps", "Segmentation-ability maps", (Paragraph(
                "Maps: not recorded (score with save_maps to keep maps of chosen cases)."),))
        blocks: list[Block] = [Paragraph(
            f"Maps drawn for {len(self.map_cases)} of {plural(len(d.map_ids), 'case')} with "
            f"maps (read "
            f"one case at a time). Red: binary map; colour scale: probability 0 (black) to 1 "
            f"(yellow); yellow/cyan outline: the reference. {self._settings()}.")]
        n_drawn = min(d.n_classes, MAX_MAP_CLASSES)
        if d.n_classes > n_drawn:
            blocks.append(Paragraph(
                f"Maps drawn for the first {n_drawn} of {d.n_classes} classes."))
        keys = d.layer_keys()
        for c in self.map_cases:
            maps = d.maps(c)  # this case only, read once for every class
            if isinstance(maps, CaseMaps):  # only what the figures draw, in one read
                maps.load(drawn_map_keys(maps, keys[1], d.n_classes, d.classes[:n_drawn]))
            blocks += [self._map_figure(c, maps, k, keys) for k in range(n_drawn)]
        return Section("maps", "Segmentation-ability maps", tuple(blocks))

    def _map_figure(self, case: str, maps: Mapping[str, Any], k: int,
                    keys: tuple[dict[str, str], dict[str, float]]) -> Figure:
        d = self.data
        cls = d.classes[k]
        image, ref, pred, panels, note = case_maps(
            maps, *keys, d.n_classes, k, cls, self.best_units.get(case, {}).get(k, {}))
        dice = d.dice[d.ids.index(case), k] if k < d.dice.shape[1] else np.nan
        title = f"case {case}" + (f", class {cls}" if d.n_classes > 1 else "") + (
            f" (output Dice {float(dice):.3f})" if np.isfinite(float(dice)) else "")
        grid = getattr(d.store, "map_grid", lambda _c: None)(case)  # issue 17: orientation labels
        fig = figures.fig_maps(image, ref, pred, panels, title=title,
                               affine=None if grid is None else grid.affine)
        caption = (f"Case {case}, class {cls}: input, prediction and each layer's binary "
                   "and probability maps.")
        if note:
            caption += f" {note}."
        if ref is not None and ref.ndim == 3:
            caption += " 3-D: on each axis, the slice with the most reference foreground."
        name = f"maps_{_slug(case)}" + (f"_class{cls}" if d.n_classes > 1 else "")
        return self._figure(fig, name, caption)

    def _correlate(self, sources: list[tuple[str, np.ndarray]], d0: np.ndarray,
                   rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """Scatter panels of ``sources`` against ``d0``; their correlations go to ``rows``."""
        panels = []
        for label, x in sources:
            c = correlations(x, d0)
            rows.append({"x": label, "y": "output Dice", **c})
            panels.append((x, d0, label, "output Dice", correlation_label(c)))
        return panels

    def _quality_section(self) -> Section:
        d = self.data
        title = "Quality estimate and input SA against output Dice"
        if not np.isfinite(d.dice).any():
            return Section("quality", title, (Paragraph(
                "Output Dice: not recorded (no ground truth), so estimates cannot be "
                "compared with the output's quality here."),))
        blocks: list[Block] = []
        d0 = d.dice[:, 0]
        n_dice = int(np.isfinite(d0).sum())
        draw = n_dice >= 3
        if not draw:
            blocks.append(Paragraph(
                f"Scatter plots need at least 3 cases with ground truth; this store has "
                f"{n_dice}. The values are in the table below."))
        if d.estimates:
            sources = [(f"estimate: {n}", a[:, 0]) for n, a in d.estimates.items()]
        else:
            sources = [("mean layer-level SA (all layers)", self.mean_layer_sa[:, 0])]
        if d.input_score is not None:
            sources.append(("input SA", d.input_score[:, 0, 0]))
        rows: list[dict[str, Any]] = []
        panels = self._correlate(sources, d0, rows)
        src = ("the recorded estimates" if d.estimates else
               "the mean layer-level SA over all layers (no estimates recorded)")
        if draw:
            fig = figures.fig_scatter(
                panels, title=f"Against the output's Dice, class {d.classes[0]}")
            blocks.append(self._figure(
                fig, "sa_vs_dice",
                f"Each point is a case: {src} and the input SA against the output's Dice "
                f"(ground truth). r: Pearson; ρ: Spearman; cases with either value undefined "
                f"are left out."))
        if not d.estimates:
            blocks.append(Paragraph("Quality estimates: not recorded (run `protoseg estimate`)."))
        if d.input_score is None:
            blocks.append(Paragraph("Input SA: not recorded."))
        if d.baselines:
            panels = self._correlate([(f"baseline: {name}", a[:, 0])
                                      for name, a in d.baselines.items()], d0, rows)
            if draw:
                fig = figures.fig_scatter(panels, title="Baselines against the output's Dice")
                blocks.append(self._figure(
                    fig, "baselines_vs_dice",
                    "Trivial baselines against the output's Dice: an estimate is useful "
                    "only where it beats them."))
        blocks.append(Table("Correlations with the output's Dice", rows,
                            ["x", "y", "n", "pearson_r", "spearman_rho", "note"]))
        self.tables["correlations"] = rows
        return Section("quality", title, tuple(blocks))

    def _validation_section(self) -> Section:
        """Validation against the output's Dice, the failure-detection benchmark, the Dice
        lower bounds and whether SA adds to the baselines (each when recorded)."""
        rows = validation_rows(self.data.validation)
        blocks: list[Block] = []
        if rows:
            self.tables["validation"] = rows
            shown = [merge_intervals(r) for r in rows]
            cols: list[str] = []
            for r in shown:
                cols += [k for k in r if k not in cols]
            blocks.append(Table(
                "Validation of each estimate and baseline against the output's Dice, with 95 % "
                "bootstrap intervals (tables/validation.csv)", shown, cols))
        else:
            blocks.append(Paragraph(
                "Validation: not recorded (run `protoseg estimate` on a store with "
                "ground truth)."))
        blocks += self._failure_blocks() + self._bound_blocks() + self._added_value_blocks()
        return Section("validation", "Validation", tuple(blocks))

    def _per_case(self, name: str) -> np.ndarray | None:
        """The per-case values (class 0) of an estimator, baseline or the input SA."""
        d = self.data
        for source in (d.estimates, d.estimate_extras, d.baselines):
            if name in source:
                return source[name][:, 0]
        if name == "input_sa" and d.input_score is not None:
            return d.input_score[:, 0, 0]
        return None

    def _failure_blocks(self) -> list[Block]:
        """AURC, E-AURC and AUROC at each Dice threshold; the risk–coverage curves."""
        d = self.data
        rows = failure_rows(d.validation)
        if not rows:
            return []
        self.tables["failure"] = rows
        thresholds: list[str] = []
        for r in rows:
            thresholds += [k[len("n_bad_"):] for k in r
                           if k.startswith("n_bad_") and k[len("n_bad_"):] not in thresholds]
        shown = [merge_intervals({k: v for k, v in r.items() if not k.startswith("n_bad_")})
                 for r in rows]
        cols = (["estimator", "orientation", "n", "aurc", "e_aurc"]
                + [f"auroc_{t}" for t in thresholds] + ["note"])
        n_bad = rows[0]
        blocks: list[Block] = [
            Paragraph(
                "Failure detection (risk = 1 − Dice): AURC is the area under the "
                "risk–coverage curve, the mean risk of the cases an estimate trusts most "
                "at every coverage (lower is better; "
                f"{fmt(n_bad.get('oracle_aurc'))} for the oracle, "
                f"{fmt(n_bad.get('random_aurc'))} for an uninformative estimate); "
                "E-AURC is its excess over the oracle. auroc_<t>: how well a low (oriented) "
                "estimate flags the cases with Dice < t (0.5 = chance); "
                + ", ".join(f"{plural(n_bad.get(f'n_bad_{t}') or 0, 'case')} below {t}"
                            for t in thresholds)
                + f" of {plural(n_bad.get('n') or 0, 'labelled case')}."),
            Table("Failure detection of each estimate and baseline, with 95 % bootstrap "
                  "intervals (tables/failure.csv)", shown, [c for c in cols if any(
                      c in r for r in shown)]),
        ]
        dice = d.dice[:, 0]
        ok = np.isfinite(dice)
        if int(ok.sum()) < 3:
            return blocks
        from engine.quality.failure import risk_coverage_curve

        risk = 1.0 - dice[ok]
        curves = []
        for r in rows:
            values = self._per_case(r["estimator"])
            if values is None:
                continue
            conf = -values[ok] if r.get("orientation") == "lower is better" else values[ok]
            cov, sel = risk_coverage_curve(conf, risk)
            name = r["estimator"]
            kind = ("estimate: " if name in d.estimates else
                    "baseline: " if name in d.baselines else "")
            curves.append((f"{kind}{name} (AURC {fmt(r.get('aurc'))})", cov, sel,
                           name not in d.estimates))
        if not curves:
            return blocks
        fig = figures.fig_risk_coverage(
            curves, oracle=risk_coverage_curve(-risk, risk), random_risk=float(risk.mean()),
            title=f"Risk–coverage, class {d.classes[0]}")
        blocks.append(self._figure(
            fig, "risk_coverage",
            "Risk–coverage curves: keeping the cases each estimate trusts most (undefined "
            "estimates last), the mean 1 − Dice of the cases kept at each coverage. Lower "
            "is better; the area under each curve is its AURC. Estimates solid, baselines "
            f"and the input SA dashed; {plural(int(ok.sum()), 'labelled case')}."))
        return blocks

    def _coverage_text(self, cov: Mapping[str, Any]) -> str:
        how = ("normalised split conformal: estimate − q · a label-free per-case difficulty scale"
               if cov.get("method") == "normalized" else "split conformal: estimate − q")
        text_ = (f"at {cov['nominal']:.0%} coverage for {cov['rank_by']} ({how}, calibrated on "
                 "labelled cases): ")
        if cov.get("n"):
            text_ += (f"{cov['covered']} of {plural(cov['n'], 'labelled case')} "
                      f"({cov['coverage']:.0%}) have a Dice at or above their bound "
                      f"(nominal {cov['nominal']:.0%})")
        else:
            text_ += "not checked here (no ground truth)"
        if cov.get("expected"):
            lo, hi = cov["expected"]
            text_ += (f"; with {plural(cov['n_calibration'], 'calibration case')} the "
                      f"coverage of exchangeable new cases lies in [{lo:.2f}, {hi:.2f}] "
                      "with 95 % probability")
        text_ += f" ({cov['note']})" if cov.get("note") else ""
        return text_ + (f"; {cov['method_note']}" if cov.get("method_note") else "")

    def _bound_blocks(self) -> list[Block]:
        """The coverage check and the cases ranked by their Dice lower bound."""
        d = self.data
        cov = coverage_summary(d.estimate_info)
        bound = d.estimate_extras.get("dice_lower_bound")
        if cov is None or bound is None:
            return []
        from engine.quality.triage import rank_cases

        b = bound[:, 0]
        scale = d.estimate_extras.get("dice_bound_scale")
        est = self._per_case(text(cov["rank_by"])) if cov.get("rank_by") else None
        dice = d.dice[:, 0]
        groups = text_column(d.cases, "group")
        rows = []
        # ties (bounds clipped to 0) by the estimate, as protoseg estimate ranks them
        for rank, i in enumerate(rank_cases(b, then_by=est), start=1):
            row: dict[str, Any] = {"rank": rank, "id": d.ids[i], "group": groups[i]}
            if est is not None:
                row[f"estimate_{cov['rank_by']}"] = est[i]
            row["dice_lower_bound"] = b[i]
            row["output_dice"] = dice[i]
            row["covered"] = (bool(dice[i] >= (b[i] if np.isfinite(b[i]) else 0.0))
                              if np.isfinite(dice[i]) else None)
            if scale is not None and cov.get("method") == "normalized":
                row["bound_scale"] = scale[i, 0]
            rows.append(row)
        self.tables["triage"] = rows
        shown = rows[:MAX_CASE_ROWS]
        which = (f"the first {len(shown)} of {plural(len(rows), 'case')}" if len(shown) < len(rows)
                 else f"all {plural(len(rows), 'case')}")
        return [
            Paragraph("Coverage check of the Dice lower bound: " + self._coverage_text(cov)
                      + "."),
            Table(f"Cases ranked by their Dice lower bound at {cov['nominal']:.0%} coverage, "
                  f"lowest first ({which}; tables/triage.csv)", shown, list(rows[0])),
        ]

    def _added_value_blocks(self) -> list[Block]:
        """The combined estimator's verdict: does SA add to the baselines?"""
        av = added_value(self.data.estimate_info)
        if av is None:
            return []
        self.tables["added_value"] = [{k: v for k, v in av.items() if k != "ci"}
                                      | {"ci_lo": (av.get("ci") or [None, None])[0],
                                         "ci_hi": (av.get("ci") or [None, None])[1]}]
        lo, hi = (list(av.get("ci") or []) + [None, None])[:2]
        verdict = av["verdict"]
        return [Paragraph(
            f"Does SA add information beyond the baselines? {verdict[0].upper()}{verdict[1:]}. "
            f"Out-of-fold AURC of the combined estimator (SA features and the baselines) "
            f"{fmt(av.get('aurc_a'))}, of the same model on the baselines alone "
            f"{fmt(av.get('aurc_b'))}: difference {fmt(av.get('difference'))} "
            f"[{fmt(lo)}, {fmt(hi)}] (paired bootstrap over {plural(av.get('n') or 0, 'case')}, "
            f"resampling {av.get('resample', 'cases')}; negative = SA helps; fraction of "
            f"replicates where SA does not help {fmt(av.get('p_not_better'), 2)}). "
            f"Out-of-fold Spearman ρ with the output Dice: {fmt(av.get('spearman_oof_combined'))} "
            f"with SA, {fmt(av.get('baselines_spearman_oof'))} without (tables/added_value.csv).")]

    def _case_rows(self) -> list[dict[str, Any]]:
        d = self.data
        groups = text_column(d.cases, "group")
        statuses = text_column(d.cases, "status", "ok")
        defined = np.isfinite(d.score).sum(axis=2)
        multi = d.n_classes > 1
        per_case = ([("estimate_", d.estimates), ("baseline_", d.baselines),
                     ("", d.estimate_extras)])
        rows = []
        for i, cid in enumerate(d.ids):
            row: dict[str, Any] = {"id": cid, "status": statuses[i], "group": groups[i]}
            for k, cls in enumerate(d.classes):
                sfx = f"_class{cls}" if multi else ""
                row[f"output_dice{sfx}"] = d.dice[i, k] if k < d.dice.shape[1] else None
                row[f"mean_layer_sa{sfx}"] = self.mean_layer_sa[i, k]
                row[f"layers_defined{sfx}"] = int(defined[i, k])
                if d.input_score is not None:
                    row[f"input_sa{sfx}"] = d.input_score[i, k, 0]
                for prefix, values in per_case:
                    for name, a in values.items():
                        row[f"{prefix}{name}{sfx}"] = a[i, k] if k < a.shape[1] else a[i, 0]
            rows.append(row)
        return rows

    def _cases_section(self) -> Section:
        d = self.data
        rows = self._case_rows()
        self.tables["cases"] = rows
        key = f"mean_layer_sa_class{d.classes[0]}" if d.n_classes > 1 else "mean_layer_sa"
        order = sorted(range(len(rows)), key=lambda i: (not np.isfinite(rows[i][key]),
                                                        rows[i][key]))
        shown = [rows[i] for i in order[:MAX_CASE_ROWS]]
        return Section("cases", "Cases", (
            Paragraph(f"{plural(len(rows), 'case')} in tables/cases.csv; "
                      + (f"the {len(shown)} with the lowest mean layer-level SA are listed."
                         if len(shown) < len(rows) else
                         "listed here, lowest mean layer-level SA first.")),
            Table("Cases, lowest mean layer-level SA first", shown,
                  list(rows[0]) if rows else ["id"])))
