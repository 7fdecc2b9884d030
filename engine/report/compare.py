"""Comparing two stores scored on the same cases: :func:`compare_stores` (issue 18).

Two checkpoints of one network, or two networks, scored with the same settings on the same
cases: which layers gained or lost segmentation ability, by how much, how sure, and in which
cases. Layers are matched by name (same network) or by relative depth (different
networks); per matched layer the paired difference B − A over cases gets a bootstrap 95 %
interval. The result is a :class:`Comparison` (rows), and, given a folder, the same as a
page in the report's style with a figure and CSV/JSON tables::

    out_dir/
      compare.html                one self-contained file (figures as PNG data URIs)
      figures/sa_compare.png/.svg both SA curves and the difference band
                                  (sa_compare_class<c> for multi-class stores)
      tables/<name>.csv/.json     layers, changed_cases, cases, settings, and when both
                                  stores hold unit-level SA: units (and unit_diff)

See ``docs/report.md`` ("Comparing two stores") for every column and definition.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine._json import jsonable, text
from engine.errors import option
from engine.report import figures
from engine.report.access import optional, resolve_store
from engine.report.build import Block, Figure, Paragraph, Section, Table, model_card_rows
from engine.report.html import render_page
from engine.report.tables import (field, fmt, layer_labels, plural, text_column,
                                  unit_summary, value_text, write_table)

__all__ = [
    "Comparison",
    "ComparisonPage",
    "StoresDifferError",
    "UNCOMPARED_SETTINGS",
    "compare_stores",
    "match_layers",
    "paired_difference",
    "settings_difference",
]

#: Configuration keys that describe the model or what was kept, not how the numbers were
#: computed: they may differ between the two stores of a comparison.
UNCOMPARED_SETTINGS = frozenset({
    "model", "model_sha256", "model_card", "layers", "output_path_tensors", "saved_maps",
    "level", "n_cases", "input_sa", "hidden_layers",
})
#: Classes with their own comparison figure.
MAX_FIGURE_CLASSES = 4
#: Rows of the HTML tables of cases and units (the CSV/JSON tables hold all of them).
MAX_SHOWN_ROWS = 40
#: Bootstrap replicates drawn at once (bounds the memory of one draw to about 32 MB).
_BLOCK = 1 << 22


class StoresDifferError(ValueError):
    """The two stores hold other cases, or were scored with settings that change the numbers.

    Attributes
    ----------
    differences : list of str
        One short phrase per difference.
    """

    def __init__(self, message: str, *, differences: Sequence[str]) -> None:
        super().__init__(message)
        self.differences = list(differences)


# ----------------------------------------------------------------------------- settings
def _short(value: Any) -> str:
    said = repr(value)
    return said if len(said) <= 60 else said[:57] + "..."


def _dataset_difference(a: Any, b: Any, same_ids: bool) -> str | None:
    """Whether two configurations' ``dataset`` entries name other data; None when the same.

    Manifest summaries (``kind, cases, ids_sha256, fingerprint``) are the same data when
    kind and fingerprint agree, wherever the data lay; older stores recorded a path.
    """
    if a == b:
        return None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.get("kind") == b.get("kind") and a.get("fingerprint") == b.get("fingerprint"):
            return None
        if same_ids:
            return "dataset: the same case ids but other files (fingerprints differ)"
        return None  # the case ids already say it
    return f"dataset={_short(a)} in A, {_short(b)} in B"


def settings_difference(config_a: Mapping[str, Any], config_b: Mapping[str, Any], *,
                        same_ids: bool = True) -> list[str]:
    """The settings that change the numbers and differ between two stores, one phrase each.

    Parameters
    ----------
    config_a, config_b : mapping
        The stores' ``config`` dicts.
    same_ids : bool
        Whether the two stores hold the same case ids (then a dataset whose fingerprint
        differs is named: same ids, other files).

    Returns
    -------
    list of str
        E.g. ``["threshold=0.5 in A, 0.6 in B"]``; empty when they agree.

    Notes
    -----
    Every key is compared but :data:`UNCOMPARED_SETTINGS` (the model, its card, the layers
    scored, which maps were kept, the level): these describe what is compared, not how.
    The dataset is compared by content (its fingerprint), as resuming a store does
    (:func:`engine.store.runinfo.dataset_difference`), not by the path it was read from.
    """
    out = []
    data = _dataset_difference(config_a.get("dataset"), config_b.get("dataset"), same_ids)
    if data:
        out.append(data)
    for key in sorted((set(config_a) | set(config_b)) - UNCOMPARED_SETTINGS - {"dataset"}):
        a, b = config_a.get(key, "<unset>"), config_b.get(key, "<unset>")
        if jsonable(a) != jsonable(b):
            out.append(f"{key}={_short(a)} in A, {_short(b)} in B")
    return out


# ----------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class _Layers:
    """One store's layer table as the comparison uses it."""

    index: np.ndarray      # store layer index of each row
    name: list[str]        # tensor names
    label: list[str]       # display labels
    channels: np.ndarray
    order: np.ndarray      # rows by depth (ties by index)
    rel: np.ndarray        # relative depth of each row, 0 (first) .. 1 (last), by rank

    @classmethod
    def of(cls, layers: np.ndarray) -> _Layers:
        n = len(layers)
        depth = np.asarray(field(layers, "depth", 0), dtype=np.float64)
        if not np.all(np.isfinite(depth)):
            depth = np.arange(n, dtype=np.float64)
        order = np.lexsort((np.arange(n), depth))
        rel = np.empty(n)
        rel[order] = np.arange(n) / (n - 1) if n > 1 else 0.5
        return cls(index=np.asarray(field(layers, "index", 0), dtype=np.int64)
                   if layers.dtype.names and "index" in layers.dtype.names
                   else np.arange(n), name=text_column(layers, "name"),
                   label=layer_labels(layers),
                   channels=np.asarray(field(layers, "channels", -1), dtype=np.int64),
                   order=order, rel=rel)


def match_layers(names_a: Sequence[str], names_b: Sequence[str], rel_a: np.ndarray,
                 rel_b: np.ndarray, *, match: str = "auto") -> tuple[str, list[tuple[int, int]]]:
    """Pair the layers of two stores: by name, or by relative depth.

    Parameters
    ----------
    names_a, names_b : sequence of str
        Tensor names of each store's layers.
    rel_a, rel_b : ndarray
        Relative depth of each layer, 0 (first by depth) to 1 (last).
    match : {"auto", "name", "depth"}
        ``"auto"``: by name when every layer of the store with fewer layers has a
        namesake in the other, else by relative depth.

    Returns
    -------
    (str, list of (int, int))
        ``"name"`` or ``"depth"``, and the pairs (row in A, row in B), ordered by depth.

    Raises
    ------
    ValueError
        ``match`` is unknown, or ``"name"`` finds no common name.

    Notes
    -----
    By depth, each layer of the store with fewer layers (A when equal) is paired with the
    layer of the other whose relative depth ``rank / (n_layers - 1)`` is nearest (the
    first on ties). The ranks count only the scored layers, as the SA-against-depth
    figure's x axis does. The shorter store's layers therefore each get a different partner.
    """
    if match not in ("auto", "name", "depth"):
        raise ValueError(f"match={match!r}; expected 'auto', 'name' or 'depth'")
    pos_b = {n: j for j, n in enumerate(names_b)}
    if match == "auto":
        short, other = (names_a, names_b) if len(names_a) <= len(names_b) else (names_b, names_a)
        match = "name" if short and set(short) <= set(other) else "depth"
    if match == "name":
        pairs = [(i, pos_b[n]) for i, n in enumerate(names_a) if n in pos_b]
        if not pairs:
            raise ValueError(
                f"no layer name is in both stores (A: {list(names_a)[:5]}, B: "
                f"{list(names_b)[:5]}); match the layers by relative depth instead "
                f"({option('match', 'depth')})")
        pairs.sort(key=lambda p: (rel_a[p[0]], p[0]))
        return "name", pairs
    if not len(names_a) or not len(names_b):
        raise ValueError("a store has no scored layers; there is nothing to compare")
    swap = len(names_b) < len(names_a)
    rs, rt = (rel_b, rel_a) if swap else (rel_a, rel_b)
    pairs = []
    for i in np.argsort(rs, kind="stable"):
        j = int(np.argmin(np.abs(rt - rs[i])))
        pairs.append((j, int(i)) if swap else (int(i), j))
    return "depth", pairs


# ----------------------------------------------------------------------------- statistics
def paired_difference(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, Any]:
    """Mean paired difference ``b - a`` over the cases where both are finite, with a
    bootstrap percentile interval.

    Parameters
    ----------
    a, b : ndarray, shape (n_cases,)
        The two stores' SA of one layer (pair) in the same cases (NaN = undefined).
    n_boot : int
        Bootstrap replicates (0: no interval).
    seed : int
        Seed of ``numpy.random.default_rng``; every call starts from it, so a layer's
        interval does not depend on the other layers.
    alpha : float
        1 − the interval's coverage.

    Returns
    -------
    dict
        ``n`` (paired cases), ``mean_a``, ``mean_b``, ``mean_diff`` (= ``mean_b - mean_a``),
        ``sd_diff`` (ddof=1), ``ci_lo``, ``ci_hi``, ``n_higher`` / ``n_lower`` (cases where
        B is above / below A).

    Notes
    -----
    With ``d`` the ``m`` finite paired differences, replicate ``r`` is the mean of
    ``d[idx[r]]`` where ``idx = rng.integers(0, m, size=(n_boot, m))`` (drawn in blocks
    of at most 2**22 indices for large ``m``); the interval is the ``alpha/2`` and
    ``1 - alpha/2`` quantiles of the replicates (``numpy.quantile``, linear). Written in
    NumPy rather than with ``scipy.stats.bootstrap`` so the draw is exactly reproducible
    from the seed with plain NumPy, as :mod:`engine.quality.validation` does.

    Examples
    --------
    >>> r = paired_difference(np.array([0.2, 0.4, 0.6]), np.array([0.3, 0.5, 0.7]))
    >>> round(r["mean_diff"], 6), r["n"]
    (0.1, 3)
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d = b[ok] - a[ok]
    m = int(d.size)
    out: dict[str, Any] = {"n": m, "mean_a": math.nan, "mean_b": math.nan,
                           "mean_diff": math.nan, "sd_diff": math.nan, "ci_lo": math.nan,
                           "ci_hi": math.nan, "n_higher": int((d > 0).sum()),
                           "n_lower": int((d < 0).sum())}
    if not m:
        return out
    out.update(mean_a=float(a[ok].mean()), mean_b=float(b[ok].mean()),
               mean_diff=float(d.mean()))
    if m > 1:
        out["sd_diff"] = float(d.std(ddof=1))
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        rows = max(1, _BLOCK // m)
        reps = np.concatenate([d[rng.integers(0, m, size=(min(rows, n_boot - s), m))].mean(1)
                               for s in range(0, n_boot, rows)])
        out["ci_lo"], out["ci_hi"] = (float(q) for q in
                                      np.quantile(reps, [alpha / 2, 1 - alpha / 2]))
    return out


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_stores` found, as rows (each list is one table file).

    Attributes
    ----------
    a, b : str
        The two stores (paths as given, or their repr).
    match : str
        ``"name"`` or ``"depth"``: how the layers were paired.
    cases : tuple of str
        The case ids compared (in A's order); ``only_a`` / ``only_b`` the others.
    classes : tuple of int
        The classes compared (those of both stores).
    differences : tuple of str
        The settings (and cases) that differ; empty unless ``allow_different``.
    layers, changed, case_rows, units, unit_diff, settings : list of dict
        The tables ``layers``, ``changed_cases``, ``cases``, ``units``, ``unit_diff`` and
        ``settings`` (see ``docs/report.md``).
    unmatched_a, unmatched_b : tuple of str
        Layers of each store left without a partner.
    n_boot, seed : int
        The bootstrap's replicates and seed.
    path : Path or None
        ``compare.html`` when written.
    """

    a: str
    b: str
    match: str
    cases: tuple[str, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    classes: tuple[int, ...]
    differences: tuple[str, ...]
    layers: list[dict[str, Any]]
    changed: list[dict[str, Any]]
    case_rows: list[dict[str, Any]]
    units: list[dict[str, Any]]
    unit_diff: list[dict[str, Any]]
    settings: list[dict[str, Any]]
    unmatched_a: tuple[str, ...]
    unmatched_b: tuple[str, ...]
    n_boot: int
    seed: int
    path: Path | None = None

    @property
    def match_text(self) -> str:
        """How the layers were paired, in words."""
        n = len({(r["layer_a"], r["layer_b"]) for r in self.layers})
        if self.match == "name":
            return f"by name ({plural(n, 'layer')} in both)"
        return (f"by relative depth ({plural(n, 'pair')}: each layer of the store with "
                "fewer layers to the nearest in depth of the other)")

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """The table files' rows, by file name (``units``/``unit_diff`` only when recorded)."""
        out = {"layers": self.layers, "changed_cases": self.changed, "cases": self.case_rows,
               "settings": self.settings}
        if self.units:
            out["units"] = self.units
        if self.unit_diff:
            out["unit_diff"] = self.unit_diff
        return out

    def as_json(self) -> dict[str, Any]:
        """A JSON-safe summary (NaN as null): what ``protoseg compare --json`` prints."""
        return jsonable({
            "a": self.a, "b": self.b, "match": self.match, "match_text": self.match_text,
            "n_cases": len(self.cases), "only_a": list(self.only_a),
            "only_b": list(self.only_b), "classes": list(self.classes),
            "differences": list(self.differences), "n_boot": self.n_boot, "seed": self.seed,
            "unmatched_a": list(self.unmatched_a), "unmatched_b": list(self.unmatched_b),
            "layers": self.layers, "changed_cases": self.changed, "units": self.units,
            "html": None if self.path is None else str(self.path),
        }, default=str)


@dataclass(frozen=True)
class ComparisonPage:
    """What ``templates/compare.html.j2`` shows."""

    label_a: str
    label_b: str
    n_cases: int
    match_text: str
    sections: tuple[Section, ...]


# ----------------------------------------------------------------------------- reading
def _label(store: Any, given: Any) -> str:
    path = getattr(store, "path", None)
    return str(given) if isinstance(given, (str, Path)) else str(path or repr(store))


def _model_name(store: Any) -> str:
    prov = dict(getattr(store, "provenance", None) or {})
    cfg = dict(getattr(store, "config", None) or {})
    return text(prov.get("model") or cfg.get("model") or "not recorded")


def _ids_text(ids: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(c) for c in ids[:limit])
    return shown + (f", ... {len(ids) - limit} more" if len(ids) > limit else "")


def _refuse(la: str, lb: str, differences: list[str], n_common: int) -> StoresDifferError:
    return StoresDifferError(
        f"{la} (A) and {lb} (B) differ: {'; '.join(differences)}; compare them anyway with "
        f"{option('allow_different')}" + (f" (on their {plural(n_common, 'common case')})"
                                          if n_common else ""),
        differences=differences)


def _scores(store: Any, take: np.ndarray, n_classes: int, n_layers: int) -> np.ndarray:
    ls = optional(store, "layer_scores")
    if ls is None or "score" not in ls:
        return np.full((take.size, n_classes, n_layers), np.nan)
    s = np.asarray(ls["score"], dtype=np.float64).reshape(-1, n_classes, n_layers)
    return s[take]


def _units(store: Any, index: int, take: np.ndarray) -> np.ndarray | None:
    if not getattr(store, "has_units", False):
        return None
    us = optional(store, "unit_scores", int(index))
    if us is None or "score" not in us:
        return None
    return np.asarray(us["score"], dtype=np.float64)[take]


# ----------------------------------------------------------------------------- compare
def compare_stores(
    a: Any,
    b: Any,
    out_dir: str | Path | None = None,
    *,
    allow_different: bool = False,
    match: str = "auto",
    n_boot: int = 2000,
    seed: int = 0,
    top_cases: int = 3,
    unit_threshold: float = 0.5,
) -> Comparison:
    """Compare the SA of two stores scored on the same cases, layer by layer.

    Parameters
    ----------
    a, b : str, Path or Store
        The two stores (``protoseg score``): two checkpoints of one network, or two
        networks. Differences are B − A.
    out_dir : str or Path, optional
        Write ``compare.html``, ``figures/`` and ``tables/`` there (created).
    allow_different : bool
        Compare stores on different cases (on the common ones) or scored with different
        settings, instead of refusing.
    match : {"auto", "name", "depth"}
        How layers are paired (:func:`match_layers`): ``"auto"`` by name when the layers
        of the store with fewer layers all have a namesake in the other, else by relative
        depth.
    n_boot : int
        Bootstrap replicates of each interval (>= 0; 0: no interval).
    seed : int
        Seed of the bootstrap (:func:`paired_difference`).
    top_cases : int
        Per layer pair, this many cases with the largest absolute change are listed.
    unit_threshold : float
        In the per-unit summary, units whose mean SA is above it are counted.

    Returns
    -------
    Comparison
        Every table's rows; ``path`` is ``out_dir/compare.html`` when written.

    Raises
    ------
    StoresDifferError
        (a ``ValueError``) The stores hold other cases or were scored with settings that
        change the numbers (:func:`settings_difference`), and ``allow_different`` is
        False; the message names each difference. Also, whatever ``allow_different``,
        when they share no case or no class.
    ValueError
        Bad ``match``, ``n_boot``, ``top_cases`` or ``unit_threshold``; no layer pair.
    FileNotFoundError
        A store path does not exist.

    Notes
    -----
    Cases are matched by id. For each class and layer pair, over the cases where both
    SAs are finite: ``mean_a``, ``mean_b`` and the mean paired difference
    ``mean_diff = mean(SA_B - SA_A) = mean_b - mean_a`` with its bootstrap 95 % percentile
    interval (:func:`paired_difference`). Per unit (both stores with unit-level SA): when
    the layers are paired by name and have the same channel count, unit ``u`` of A is
    compared with unit ``u`` of B (``unit_diff``: mean over the paired cases, no
    interval); otherwise only each layer's unit summary
    (:func:`engine.report.tables.unit_summary`) is set side by side (``units``).

    Examples
    --------
    >>> from engine.report.compare import compare_stores
    >>> c = compare_stores("epoch10.h5", "epoch50.h5", "cmp/")   # doctest: +SKIP
    >>> [(r["layer_a"], round(r["mean_diff"], 3)) for r in c.layers]  # doctest: +SKIP
    """
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 0:
        raise ValueError(f"n_boot={n_boot!r}; expected an int >= 0")
    if not isinstance(top_cases, (int, np.integer)) or isinstance(top_cases, bool) \
            or top_cases < 0:
        raise ValueError(f"top_cases={top_cases!r}; expected an int >= 0")
    if not 0.0 <= float(unit_threshold) <= 1.0:
        raise ValueError(f"unit_threshold={unit_threshold!r}; expected a number in [0, 1]")
    if match not in ("auto", "name", "depth"):
        raise ValueError(f"match={match!r}; expected 'auto', 'name' or 'depth'")
    sa, sb = resolve_store(a, caller="compare_stores"), resolve_store(b, caller="compare_stores")
    la, lb = _label(sa, a), _label(sb, b)
    ids_a = text_column(np.asarray(sa.cases), "id")
    ids_b = text_column(np.asarray(sb.cases), "id")
    set_a, set_b = set(ids_a), set(ids_b)
    common = [c for c in ids_a if c in set_b]
    only_a = [c for c in ids_a if c not in set_b]
    only_b = [c for c in ids_b if c not in set_a]
    differences = []
    if only_a or only_b:
        said = []
        if only_a:
            said.append(f"{plural(len(only_a), 'case')} only in A ({_ids_text(only_a)})")
        if only_b:
            said.append(f"{plural(len(only_b), 'case')} only in B ({_ids_text(only_b)})")
        differences.append("other cases: " + ", ".join(said))
    cfg_a = dict(getattr(sa, "config", None) or {})
    cfg_b = dict(getattr(sb, "config", None) or {})
    differences += settings_difference(cfg_a, cfg_b, same_ids=not (only_a or only_b))
    classes_a = [int(c) for c in sa.classes]
    classes_b = [int(c) for c in sb.classes]
    if classes_a != classes_b and not any("classes=" in d for d in differences):
        differences.append(f"classes={classes_a} in A, {classes_b} in B")
    if not common:
        raise StoresDifferError(
            f"{la} (A) and {lb} (B) share no case (A: {_ids_text(ids_a)}; B: "
            f"{_ids_text(ids_b)}); score both on the same data", differences=differences)
    if differences and not allow_different:
        raise _refuse(la, lb, differences, len(common))
    classes = [c for c in classes_a if c in classes_b]
    if not classes:
        raise StoresDifferError(f"{la} (A) scored classes {classes_a} and {lb} (B) "
                                f"{classes_b}: no class in common", differences=differences)

    pos_a = {c: i for i, c in enumerate(ids_a)}
    pos_b = {c: i for i, c in enumerate(ids_b)}
    take_a = np.array([pos_a[c] for c in common], dtype=np.intp)
    take_b = np.array([pos_b[c] for c in common], dtype=np.intp)
    lay_a = _Layers.of(np.asarray(sa.layers))
    lay_b = _Layers.of(np.asarray(sb.layers))
    how, pairs = match_layers(lay_a.name, lay_b.name, lay_a.rel, lay_b.rel, match=match)
    score_a = _scores(sa, take_a, len(classes_a), len(lay_a.name))
    score_b = _scores(sb, take_b, len(classes_b), len(lay_b.name))
    ka = [classes_a.index(c) for c in classes]
    kb = [classes_b.index(c) for c in classes]
    multi = len(classes) > 1

    layer_rows: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for k, cls in enumerate(classes):
        for i, j in pairs:
            x, y = score_a[:, ka[k], i], score_b[:, kb[k], j]
            r = paired_difference(x, y, n_boot=n_boot, seed=seed)
            d = y - x
            ok = np.flatnonzero(np.isfinite(d))
            top = ok[np.argsort(-np.abs(d[ok]), kind="stable")][:top_cases]
            for rank, t in enumerate(top, start=1):
                changed.append({"class": cls, "layer_a": lay_a.label[i],
                                "layer_b": lay_b.label[j], "rank": rank, "case": common[t],
                                "sa_a": x[t], "sa_b": y[t], "diff": d[t]})
            layer_rows.append({
                "class": cls, "layer_a": lay_a.label[i], "name_a": lay_a.name[i],
                "layer_b": lay_b.label[j], "name_b": lay_b.name[j],
                "depth_a": round(float(lay_a.rel[i]), 4), "depth_b": round(float(lay_b.rel[j]), 4),
                "channels_a": int(lay_a.channels[i]), "channels_b": int(lay_b.channels[j]),
                **r,
                "differs": bool(np.isfinite(r["ci_lo"]) and (r["ci_lo"] > 0 or r["ci_hi"] < 0)),
                "most_changed": ", ".join(f"{common[t]} ({d[t]:+.3f})" for t in top),
            })

    # per case: mean over the paired layers of each store
    ia = [i for i, _ in pairs]
    jb = [j for _, j in pairs]
    status_a = text_column(np.asarray(sa.cases), "status", "ok")
    status_b = text_column(np.asarray(sb.cases), "status", "ok")
    case_rows = []
    for n, cid in enumerate(common):
        row: dict[str, Any] = {"id": cid, "status_a": status_a[take_a[n]],
                               "status_b": status_b[take_b[n]]}
        for k, cls in enumerate(classes):
            sfx = f"_class{cls}" if multi else ""
            x, y = score_a[n, ka[k], ia], score_b[n, kb[k], jb]
            both = np.isfinite(x) & np.isfinite(y)
            row[f"mean_sa_a{sfx}"] = float(x[both].mean()) if both.any() else math.nan
            row[f"mean_sa_b{sfx}"] = float(y[both].mean()) if both.any() else math.nan
            row[f"diff{sfx}"] = row[f"mean_sa_b{sfx}"] - row[f"mean_sa_a{sfx}"]
            row[f"layers_in_both{sfx}"] = int(both.sum())
        case_rows.append(row)

    units, unit_diff = _compare_units(sa, sb, lay_a, lay_b, pairs, how, take_a, take_b,
                                      classes, ka, kb, unit_threshold)
    settings = _settings_rows(cfg_a, cfg_b, dict(getattr(sa, "provenance", None) or {}),
                              dict(getattr(sb, "provenance", None) or {}))
    paired_a = {i for i, _ in pairs}
    paired_b = {j for _, j in pairs}
    result = Comparison(
        a=la, b=lb, match=how, cases=tuple(common), only_a=tuple(only_a),
        only_b=tuple(only_b), classes=tuple(classes), differences=tuple(differences),
        layers=layer_rows, changed=changed, case_rows=case_rows, units=units,
        unit_diff=unit_diff, settings=settings,
        unmatched_a=tuple(lay_a.label[i] for i in range(len(lay_a.name)) if i not in paired_a),
        unmatched_b=tuple(lay_b.label[j] for j in range(len(lay_b.name)) if j not in paired_b),
        n_boot=int(n_boot), seed=int(seed))
    if out_dir is None:
        return result
    return _write(result, Path(out_dir), sa, sb, score_a, score_b, lay_a, lay_b, ka, kb)


def _compare_units(sa: Any, sb: Any, lay_a: _Layers, lay_b: _Layers,
                   pairs: list[tuple[int, int]], how: str, take_a: np.ndarray,
                   take_b: np.ndarray, classes: list[int], ka: list[int], kb: list[int],
                   threshold: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per pair, both unit summaries side by side; per unit when the units correspond."""
    units: list[dict[str, Any]] = []
    unit_diff: list[dict[str, Any]] = []
    if not (getattr(sa, "has_units", False) and getattr(sb, "has_units", False)):
        return units, unit_diff
    for i, j in pairs:  # one layer of each store in memory at a time
        ua = _units(sa, lay_a.index[i], take_a)
        ub = _units(sb, lay_b.index[j], take_b)
        if ua is None or ub is None:
            continue
        by_index = how == "name" and ua.shape[2] == ub.shape[2]
        for k, cls in enumerate(classes):
            x, y = ua[:, ka[k], :], ub[:, kb[k], :]
            s_a, s_b = unit_summary(x, threshold=threshold), unit_summary(y, threshold=threshold)
            units.append({
                "class": cls, "layer_a": lay_a.label[i], "layer_b": lay_b.label[j],
                "units_a": s_a["units"], "units_b": s_b["units"], "threshold": threshold,
                "n_above_a": s_a["n_above"], "n_above_b": s_b["n_above"],
                "fraction_above_a": s_a["fraction_above"],
                "fraction_above_b": s_b["fraction_above"],
                "mean_unit_sa_a": s_a["mean_unit_sa"], "mean_unit_sa_b": s_b["mean_unit_sa"],
                "best_unit_a": s_a["best_unit"], "best_unit_sa_a": s_a["best_unit_sa"],
                "best_unit_b": s_b["best_unit"], "best_unit_sa_b": s_b["best_unit_sa"],
                "units_matched": "by index" if by_index else "no (summary only)",
            })
            if not by_index:
                continue
            ok = np.isfinite(x) & np.isfinite(y)
            n = ok.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                ma = np.where(ok, x, 0.0).sum(axis=0) / n
                mb = np.where(ok, y, 0.0).sum(axis=0) / n
            for u in range(x.shape[1]):
                unit_diff.append({"class": cls, "layer": lay_a.label[i], "unit": u,
                                  "n": int(n[u]), "mean_a": float(ma[u]) if n[u] else math.nan,
                                  "mean_b": float(mb[u]) if n[u] else math.nan,
                                  "diff": float(mb[u] - ma[u]) if n[u] else math.nan})
    return units, unit_diff


def _settings_rows(cfg_a: Mapping[str, Any], cfg_b: Mapping[str, Any],
                   prov_a: Mapping[str, Any], prov_b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Both stores' configuration and provenance side by side."""
    rows = []
    for where, x, y in (("config", cfg_a, cfg_b), ("provenance", prov_a, prov_b)):
        for key in list(x) + [k for k in y if k not in x]:
            if key in ("model_card", "assumed"):
                continue
            va, vb = x.get(key), y.get(key)
            same = jsonable(va, default=str) == jsonable(vb, default=str)
            rows.append({"item": f"{where}.{key}", "a": value_text(va), "b": value_text(vb),
                         "same": same, "compared": where == "config"
                         and key not in UNCOMPARED_SETTINGS})
    return rows


# ----------------------------------------------------------------------------- writing
def _figure_data(score: np.ndarray, k: int, lay: _Layers) -> tuple[np.ndarray, np.ndarray]:
    """(relative depth, mean SA over the cases where finite) of every layer, by depth."""
    s = score[:, k, :][:, lay.order]
    ok = np.isfinite(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, s, 0.0).sum(0) / ok.sum(0)
    return lay.rel[lay.order], mean


def _write(c: Comparison, out: Path, sa: Any, sb: Any, score_a: np.ndarray,
           score_b: np.ndarray, lay_a: _Layers, lay_b: _Layers, ka: list[int],
           kb: list[int]) -> Comparison:
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for name, rows in c.tables().items():
        write_table(rows, out / "tables" / name)
    multi = len(c.classes) > 1
    figs: list[Block] = []
    for k, cls in enumerate(c.classes[:MAX_FIGURE_CLASSES]):
        rows = [r for r in c.layers if r["class"] == cls]
        if c.match == "name":
            pos = np.arange(len(rows), dtype=np.float64)
            curve_a = (pos, np.array([r["mean_a"] for r in rows]))
            curve_b = (pos, np.array([r["mean_b"] for r in rows]))
            ticks: Any = (pos, [r["layer_a"] for r in rows])
            xlabel = "layer (matched by name), ordered by depth"
        else:
            curve_a = _figure_data(score_a, ka[k], lay_a)
            curve_b = _figure_data(score_b, kb[k], lay_b)
            pos = np.array([r["depth_a"] if len(lay_a.name) <= len(lay_b.name) else r["depth_b"]
                            for r in rows])
            ticks, xlabel = None, "relative depth (0: first scored layer, 1: last)"
        fig = figures.fig_compare(
            curve_a, curve_b,
            (pos, [r["mean_diff"] for r in rows], [r["ci_lo"] for r in rows],
             [r["ci_hi"] for r in rows]),
            labels=("A", "B"), ticks=ticks, xlabel=xlabel,
            title="Layer-level SA of A and B" + (f", class {cls}" if multi else "")
            + f" ({plural(len(c.cases), 'case')})")
        name = f"sa_compare_class{cls}" if multi else "sa_compare"
        figs.append(Figure(name, (
            f"Top: mean layer-level SA of A ({c.a}) and B ({c.b})"
            + (" over the cases where both are defined" if c.match == "name" else
               ", each over its own layers at their relative depth")
            + f"; bottom: the mean paired difference B − A per layer pair with its bootstrap "
            f"95 % interval ({c.n_boot} replicates, seed {c.seed}). Layers matched "
            f"{c.match_text}."), figures.save_figure(fig, out / "figures" / name)))
    page = ComparisonPage(label_a=c.a, label_b=c.b, n_cases=len(c.cases),
                          match_text=c.match_text,
                          sections=_sections(c, sa, sb, figs))
    path = out / "compare.html"
    path.write_text(render_page("compare.html.j2", page=page), encoding="utf-8")
    return dataclasses.replace(c, path=path)


def _sections(c: Comparison, sa: Any, sb: Any, figs: list[Block]) -> tuple[Section, ...]:
    multi = len(c.classes) > 1
    n_pairs = len({(r["layer_a"], r["layer_b"]) for r in c.layers})
    higher = [r for r in c.layers if r["differs"] and r["mean_diff"] > 0]
    lower = [r for r in c.layers if r["differs"] and r["mean_diff"] < 0]
    cases = plural(len(c.cases), "case") + (" (all of both stores)" if not (c.only_a or c.only_b)
                                            else f" in both; {len(c.only_a)} only in A, "
                                            f"{len(c.only_b)} only in B")
    facts = [
        {"key": "A", "value": f"{c.a} (model {_model_name(sa)})"},
        {"key": "B", "value": f"{c.b} (model {_model_name(sb)})"},
        {"key": "cases", "value": cases},
        {"key": "classes", "value": ", ".join(str(x) for x in c.classes)},
        {"key": "layers matched", "value": c.match_text},
        {"key": "settings", "value": "the same" if not c.differences else
         "compared although they differ: " + "; ".join(c.differences)},
        {"key": "layers that differ", "value": (
            f"{len(higher) + len(lower)} of {plural(len(c.layers), 'layer pair')}"
            + (" × class" if multi else "") + f" (95 % interval excludes 0): B higher in "
            f"{len(higher)}, lower in {len(lower)}")},
    ]
    finite = [r for r in c.layers if np.isfinite(r["mean_diff"])]
    if finite:
        up = max(finite, key=lambda r: r["mean_diff"])
        down = min(finite, key=lambda r: r["mean_diff"])
        for word, r in (("largest gain (B − A)", up), ("largest loss (B − A)", down)):
            if (r is up and r["mean_diff"] <= 0) or (r is down and r["mean_diff"] >= 0):
                continue
            facts.append({"key": word + (f", class {r['class']}" if multi else ""), "value": (
                f"{_pair(r, c.match)}: {r['mean_diff']:+.3f} [{fmt(r['ci_lo'])}, "
                f"{fmt(r['ci_hi'])}], mean SA {r['mean_a']:.3f} → {r['mean_b']:.3f}")})
    summary = Section("summary", "Summary", (Table("At a glance", facts, ["key", "value"]),
                                             *figs))
    layer_cols = (["class"] if multi else []) + (
        ["layer_a", "depth_a"] if c.match == "name" else
        ["layer_a", "depth_a", "layer_b", "depth_b"]) + [
        "mean_a", "mean_b", "mean_diff", "ci_lo", "ci_hi", "n", "n_higher", "n_lower",
        "most_changed"]
    layer_blocks: list[Block] = [
        Paragraph(f"Per layer pair, over the cases where both SAs are defined: the mean of "
                  f"each and the mean paired difference B − A with its bootstrap 95 % "
                  f"interval ({c.n_boot} replicates, seed {c.seed}); n_higher / n_lower: "
                  "cases where B is above / below A; the cases that changed most, with "
                  "their change."),
        Table("Layers (tables/layers.csv)", c.layers, layer_cols)]
    if c.unmatched_a or c.unmatched_b:
        layer_blocks.append(Paragraph(
            f"Without a partner: {plural(len(c.unmatched_a), 'layer')} of A"
            + (f" ({', '.join(c.unmatched_a[:8])}{', …' if len(c.unmatched_a) > 8 else ''})"
               if c.unmatched_a else "")
            + f", {plural(len(c.unmatched_b), 'layer')} of B"
            + (f" ({', '.join(c.unmatched_b[:8])}{', …' if len(c.unmatched_b) > 8 else ''})"
               if c.unmatched_b else "") + "."))
    layers = Section("layers", "Per layer", tuple(layer_blocks))
    if not c.units:
        unit_blocks: tuple[Block, ...] = (Paragraph(
            "Unit-level SA: not compared (both stores need it: score with level='unit' or "
            "'both')."),)
    else:
        unit_cols = (["class"] if multi else []) + [
            *(["layer_a"] if c.match == "name" else ["layer_a", "layer_b"]),
            "units_a", "units_b", "n_above_a", "n_above_b",
            "mean_unit_sa_a", "mean_unit_sa_b", "best_unit_a", "best_unit_sa_a",
            "best_unit_b", "best_unit_sa_b", "units_matched"]
        blocks: list[Block] = [Table(
            f"Units above {c.units[0]['threshold']:g} in each store (tables/units.csv)",
            c.units, unit_cols)]
        if c.unit_diff:
            shown = sorted((r for r in c.unit_diff if np.isfinite(r["diff"])),
                           key=lambda r: -abs(r["diff"]))[:MAX_SHOWN_ROWS]
            blocks.append(Paragraph(
                f"Units matched by index (same layer name and channel count): "
                f"{plural(len(c.unit_diff), 'unit')} in tables/unit_diff.csv; the "
                f"{len(shown)} with the largest change are listed."))
            blocks.append(Table("Units that changed most", shown,
                                (["class"] if multi else []) +
                                ["layer", "unit", "mean_a", "mean_b", "diff", "n"]))
        else:
            blocks.append(Paragraph("Units are not matched one to one (layers paired by depth "
                                    "or with other channel counts): summaries only."))
        unit_blocks = tuple(blocks)
    units = Section("units", "Per unit", unit_blocks)
    key = f"diff_class{c.classes[0]}" if multi else "diff"
    ranked = sorted(c.case_rows, key=lambda r: (not np.isfinite(r[key]), -abs(r[key])
                                                if np.isfinite(r[key]) else 0))
    shown_cases = ranked[:MAX_SHOWN_ROWS]
    cases_sec = Section("cases", "Cases", (
        Table("Cases that changed most per layer pair (tables/changed_cases.csv)",
              c.changed, (["class"] if multi else []) + (
                  ["layer_a"] if c.match == "name" else ["layer_a", "layer_b"])
              + ["rank", "case", "sa_a", "sa_b", "diff"]),
        Paragraph(f"{plural(len(c.case_rows), 'case')} in tables/cases.csv (mean SA over the "
                  "paired layers defined in both); "
                  + (f"the {len(shown_cases)} that changed most are listed."
                     if len(shown_cases) < len(c.case_rows) else "largest change first.")),
        Table("Cases, largest change first", shown_cases,
              list(c.case_rows[0]) if c.case_rows else ["id"])))
    run_blocks: list[Block] = [Table(
        "Configuration and provenance of A and B (tables/settings.csv); compared: the "
        "settings that must agree", c.settings, ["item", "a", "b", "same", "compared"])]
    for who, st in (("A", sa), ("B", sb)):
        card = dict(getattr(st, "config", None) or {}).get("model_card")
        if isinstance(card, Mapping):
            run_blocks.append(Table(f"Model card of {who}", model_card_rows(card),
                                    ["part", "field", "value"]))
    run = Section("run", "Run configuration and provenance", tuple(run_blocks), collapsed=True)
    return (summary, layers, units, cases_sec, run)


def _pair(row: Mapping[str, Any], how: str) -> str:
    if how == "name":
        return str(row["layer_a"])
    return f"{row['layer_a']} (A) / {row['layer_b']} (B)"
