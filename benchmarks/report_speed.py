"""Time `protoseg report` on one store: the figures of a git revision against the working tree.

The baseline is ``engine/report/figures.py`` as committed at ``--baseline`` (default
``HEAD``), loaded from git into its own module and swapped in for the report's drawing;
everything else (reading, tables, rendering, figures the baseline lacks) is today's code.
Both variants run in this process, interleaved, ``--rounds`` times each, after one
warm-up of each (imports, fonts). Wall
and CPU seconds of ``write_report`` per round, the time spent in each section, and the
sizes of ``report.html`` and the figure files are printed as Markdown tables.

    NUMBA_CACHE_DIR=.numba_cache python -m benchmarks.report_speed /tmp/demo-out/demo.h5

(make the store with ``protoseg demo -o /tmp/demo-out``).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import engine.report.build as build
from engine.report import write_report

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("_summary_section", "_layers_section", "_unit_section", "_maps_section",
            "_quality_section", "_validation_section", "_cases_section", "_run_section")


def load_revision(rev: str) -> ModuleType:
    """``engine/report/figures.py`` at git revision ``rev``, as a module of its own."""
    src = subprocess.run(["git", "show", f"{rev}:engine/report/figures.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"_figures_{rev}", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:engine/report/figures.py", "exec"), mod.__dict__)
    return mod


def _drop_new_options(func: Any) -> Any:
    """``func`` called without the keyword arguments its (older) signature lacks."""
    known = set(inspect.signature(func).parameters)

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **{k: v for k, v in kwargs.items() if k in known})

    return call


def timed_sections(seconds: dict[str, float]) -> None:
    """Wrap the builder's sections so that each adds its wall time to ``seconds``."""
    for name in SECTIONS:
        method = getattr(build.ReportBuilder, name)

        def wrapper(self: Any, _m: Any = method, _n: str = name) -> Any:
            t = time.perf_counter()
            try:
                return _m(self)
            finally:
                seconds[_n] = seconds.get(_n, 0.0) + time.perf_counter() - t

        setattr(build.ReportBuilder, name, wrapper)


def run_once(store: str, out: Path, figures_module: ModuleType,
             seconds: dict[str, float]) -> dict[str, float]:
    build.figures = figures_module
    seconds.clear()
    w, c = time.perf_counter(), time.process_time()
    path = write_report(store, out)
    row = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c,
           "html_mb": path.stat().st_size / 1e6}
    for suffix in ("png", "svg"):
        row[f"{suffix}_mb"] = sum(p.stat().st_size for p in (out / "figures").glob(f"*.{suffix}")) / 1e6
    row.update({k.strip("_").removesuffix("_section"): v for k, v in seconds.items()})
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="a store written by `protoseg score` / `protoseg demo`")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default="HEAD", help="git revision of the baseline figures")
    args = ap.parse_args(argv)
    current = build.figures
    old = load_revision(args.baseline)
    for name in current.__all__:
        if not hasattr(old, name):  # figures added since: drawn by today's code in both
            setattr(old, name, getattr(current, name))
        elif inspect.isfunction(getattr(old, name)):  # options added since: left out
            setattr(old, name, _drop_new_options(getattr(old, name)))
    variants = {f"figures.py at {args.baseline}": old, "working tree": current}
    seconds: dict[str, float] = {}
    timed_sections(seconds)
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mod in variants.items():  # warm-up: imports, font cache
            run_once(args.store, Path(tmp) / "warm", mod, seconds)
        for r in range(args.rounds):
            for i, (name, mod) in enumerate(variants.items()):
                rows[name].append(run_once(args.store, Path(tmp) / f"{r}-{i}", mod, seconds))
                print(f"round {r + 1} {name}: {rows[name][-1]['wall']:.2f} s", file=sys.stderr)
    build.figures = current
    load = os.getloadavg()
    print(f"store: {args.store}; {args.rounds} rounds after a warm-up; load average "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n")
    keys = list(rows[next(iter(rows))][0])
    print("| variant | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, rs in rows.items():
        print(f"| {name} | " + " | ".join(
            f"{statistics.median(r[k] for r in rs):.2f}" for k in keys) + " |")
    base, new = rows.values()
    ratios = [b["wall"] / n["wall"] for b, n in zip(base, new)]
    cpu = [b["cpu"] / n["cpu"] for b, n in zip(base, new)]
    print(f"\nmedians of per-round values; baseline / working tree: wall "
          f"{statistics.median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)}), "
          f"CPU {statistics.median(cpu):.2f}x")


if __name__ == "__main__":
    main()
