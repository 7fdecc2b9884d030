"""Cold start: ``protoseg demo`` with a fresh Numba cache against the same demo with a warm one.

Run as a module::

    python -m benchmarks.coldstart [--rounds N] [--root PATH] [--check] [--json PATH] [--profile]
                                   [--warm-against PATH]

Each round runs, in subprocesses, ``protoseg demo -o OUT --json`` (the whole demo: scoring,
estimates and the HTML report) first with ``NUMBA_CACHE_DIR`` pointing at an empty folder
(every kernel the demo meets is compiled), then again with that folder now filled (every kernel
loaded from the cache). The compile overhead is ``cold - warm``; issue 15 asks for it to stay
under 10 s. Wall and CPU seconds (user + system of the subprocess) are reported: CPU seconds
are the fairer figure on a shared machine. ``--root`` runs the demo of another checkout (for
example ``git archive HEAD`` unpacked elsewhere) with the same interpreter, to compare before
and after on the same machine in one call. ``--check`` runs one round and only verifies that
the cold and warm runs give the same results (exit status 1 otherwise). ``--profile`` runs one
cold demo with a listener on Numba's ``numba:compile`` events and prints the compile CPU
seconds of each top-level kernel (its callees included) and of each function alone.
``--warm-against PATH`` times warm demos only: ``--root`` (after) and ``PATH`` (before, e.g.
``git archive HEAD`` unpacked elsewhere), each with its own cache folder filled by a first
run, ``--rounds`` rounds in alternating order, and reports the medians and before/after ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["demo_run", "round_trip", "compile_profile", "warm_pair", "main"]

ROOT = Path(__file__).resolve().parent.parent


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:  # pragma: no cover - not Linux
        return "?"


def demo_run(cache: Path, out: Path, *, root: Path = ROOT) -> dict[str, Any]:
    """One ``protoseg demo`` in a subprocess with ``NUMBA_CACHE_DIR=cache``.

    Returns wall and CPU seconds, the load average before, and the demo's JSON result (its
    ``seconds`` field, the scoring time, is dropped: it is a timing, not a result).

    Raises
    ------
    RuntimeError
        If the demo fails; the message holds the end of its stderr.
    """
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(root)}
    code = "import sys; from cli.main import cli; sys.exit(cli.main(sys.argv[1:]))"
    load = _load()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "demo", "-o", str(out), "--json"], env=env, cwd=str(root),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"protoseg demo failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    result.pop("seconds", None)
    for key in ("store", "report"):
        result.pop(key, None)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load, "result": result}


_PROFILE = """
import collections, json, sys, time
from numba.core import event
stack, rows = [], []

class Compiles(event.Listener):
    def on_start(self, ev):
        d = ev.data["dispatcher"]
        stack.append([d.py_func.__module__ + "." + d.py_func.__qualname__, time.process_time(), 0.0])

    def on_end(self, ev):
        name, t0, inner = stack.pop()
        dt = time.process_time() - t0
        if stack:
            stack[-1][2] += dt
        rows.append((name, dt, dt - inner, len(stack)))

event.register("numba:compile", Compiles())
from cli.main import cli
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    print("PROFILE " + json.dumps(rows))
"""


def compile_profile(*, root: Path = ROOT) -> list[tuple[str, float, float, int]]:
    """One cold demo with Numba's compile events recorded: (function, CPU s with its callees,
    CPU s alone, nesting depth) per compilation, in the order they ended."""
    with tempfile.TemporaryDirectory(prefix="protoseg-coldstart-") as tmp:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(tmp) / "numba"), "PYTHONPATH": str(root)}
        proc = subprocess.run([sys.executable, "-c", _PROFILE, "demo", "-o", str(Path(tmp) / "out"), "--json"],
                              env=env, cwd=str(root), capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"protoseg demo failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return [tuple(r) for r in json.loads(line[-1][len("PROFILE "):])]


def round_trip(*, root: Path = ROOT) -> dict[str, Any]:
    """A cold demo (empty cache folder) then a warm one (the same folder, now filled)."""
    with tempfile.TemporaryDirectory(prefix="protoseg-coldstart-") as tmp:
        cache = Path(tmp) / "numba"
        cache.mkdir()
        cold = demo_run(cache, Path(tmp) / "cold", root=root)
        warm = demo_run(cache, Path(tmp) / "warm", root=root)
        n_files = sum(1 for p in cache.rglob("*.nbc"))
    return {"cold": cold, "warm": warm, "cache_files": n_files,
            "same_results": cold["result"] == warm["result"]}


def warm_pair(after: Path, before: Path, rounds: int) -> dict[str, Any]:
    """Warm demos of two checkouts interleaved: a filling run of each, then ``rounds`` rounds
    (before first in even rounds, after first in odd ones). Returns each tree's runs, the
    medians, the per-round before/after ratios' medians, and whether every JSON result agrees."""
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    roots = {"before": before, "after": after}
    with tempfile.TemporaryDirectory(prefix="protoseg-warm-") as tmp:
        caches = {k: Path(tmp) / f"numba-{k}" for k in roots}
        for k in roots:
            caches[k].mkdir()
            demo_run(caches[k], Path(tmp) / f"fill-{k}", root=roots[k])
        for r in range(rounds):
            for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
                out = demo_run(caches[k], Path(tmp) / f"{k}{r}", root=roots[k])
                runs[k].append(out)
                print(f"round {r} {k}: wall {out['wall']:.2f} s, CPU {out['cpu']:.2f} s, "
                      f"load {out['load']}", flush=True)
    first = runs["before"][0]["result"]
    return {
        "runs": runs,
        "median": {k: {w: statistics.median(o[w] for o in v) for w in ("wall", "cpu")}
                   for k, v in runs.items()},
        "ratio_wall": statistics.median(b["wall"] / a["wall"] for b, a in zip(runs["before"], runs["after"])),
        "ratio_cpu": statistics.median(b["cpu"] / a["cpu"] for b, a in zip(runs["before"], runs["after"])),
        "same_results": all(o["result"] == first for v in runs.values() for o in v),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.coldstart", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="cold + warm pairs (medians are reported)")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose demo runs (default: this one)")
    ap.add_argument("--check", action="store_true", help="one round; exit 1 unless cold and warm results agree")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write the measurements as JSON")
    ap.add_argument("--profile", action="store_true", help="one cold demo: compile CPU seconds per kernel")
    ap.add_argument("--warm-against", type=Path, metavar="PATH",
                    help="warm demos only: --root (after) against PATH (before), interleaved")
    a = ap.parse_args(argv)
    if a.warm_against is not None:
        pair = warm_pair(a.root.resolve(), a.warm_against.resolve(), max(1, a.rounds))
        for k in ("before", "after"):
            m = pair["median"][k]
            print(f"{k}: median wall {m['wall']:.2f} s, CPU {m['cpu']:.2f} s")
        print(f"before/after (median of the rounds): {pair['ratio_wall']:.3f}x wall, "
              f"{pair['ratio_cpu']:.3f}x CPU; same results: {pair['same_results']}")
        if a.json:
            a.json.write_text(json.dumps(pair, indent=1))
        return 0 if pair["same_results"] else 1
    if a.profile:
        rows = compile_profile(root=a.root.resolve())
        alone: dict[str, float] = {}
        for name, _, own, _ in rows:
            alone[name] = alone.get(name, 0.0) + own
        top = [(name, incl) for name, incl, _, depth in rows if depth == 0]
        print(f"compile CPU s, load {_load()}: total {sum(i for _, i in top):.1f}")
        print("| top-level kernel (callees included) | CPU s |")
        print("|---|---|")
        for name, incl in sorted(top, key=lambda r: -r[1]):
            print(f"| {name} | {incl:.2f} |")
        print("| function alone (all its compilations) | CPU s |")
        print("|---|---|")
        for name, own in sorted(alone.items(), key=lambda r: -r[1])[:15]:
            print(f"| {name} | {own:.2f} |")
        return 0
    rounds = [round_trip(root=a.root.resolve()) for _ in range(1 if a.check else max(1, a.rounds))]

    def med(kind: str, what: str) -> float:
        return statistics.median(r[kind][what] for r in rounds)

    summary = {
        "root": str(a.root.resolve()),
        "rounds": rounds,
        "cold_wall": med("cold", "wall"), "warm_wall": med("warm", "wall"),
        "cold_cpu": med("cold", "cpu"), "warm_cpu": med("warm", "cpu"),
        "overhead_wall": statistics.median(r["cold"]["wall"] - r["warm"]["wall"] for r in rounds),
        "overhead_cpu": statistics.median(r["cold"]["cpu"] - r["warm"]["cpu"] for r in rounds),
        "ratio_wall": statistics.median(r["cold"]["wall"] / r["warm"]["wall"] for r in rounds),
        "same_results": all(r["same_results"] for r in rounds),
        "cache_files": rounds[0]["cache_files"],
    }
    print(f"root {summary['root']}; rounds {len(rounds)}; load before each run: "
          + ", ".join(f"{r['cold']['load']}/{r['warm']['load']}" for r in rounds))
    print("| | wall s | CPU s |")
    print("|---|---|---|")
    print(f"| cold (fresh Numba cache) | {summary['cold_wall']:.1f} | {summary['cold_cpu']:.1f} |")
    print(f"| warm | {summary['warm_wall']:.1f} | {summary['warm_cpu']:.1f} |")
    print(f"| cold - warm (compile) | {summary['overhead_wall']:.1f} | {summary['overhead_cpu']:.1f} |")
    print(f"cold/warm {summary['ratio_wall']:.2f}x wall; {summary['cache_files']} cached kernels; "
          f"same results cold and warm: {summary['same_results']}")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    return 0 if summary["same_results"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
