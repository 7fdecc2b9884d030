"""Memory benchmark: peak RSS of a scoring run is bounded by the batch (issue 3, item 5).

Run as a module::

    python -m benchmarks.memory [--cases 200 2000] [--size 64] [--base 8] [--trace [--trace-at 10 100]]
        [--write [--results PATH]] [--json PATH]

Workload: the two-level test U-Net of :func:`tests.models.unet` (2-D, ``size``×``size``,
``base``/``2*base`` channels, protoseg metadata, every named block output exposed) and one
HDF5 file of ``max(cases)`` synthetic cases (images and masks, see
:func:`benchmarks.pipeline.make_images`), which :func:`engine.open_dataset` reads one case at a
time. For each size N, a fresh Python process runs
``score_dataset(model, data, store, level="both", batch_size=8, max_cases=N)`` into a new
store and reports its peak resident set (``VmHWM`` from ``/proc/self/status``, read at the end
inside the child), the peak before ``finalize`` and the resident set every few batches. The
target: peak for the largest N within 10 % of the peak for the smallest. One unreported
child with a single batch runs first, so that compiling or loading the Numba cache is not
charged to the first measured size.

``--trace`` (or a missed target) runs one more child under :mod:`tracemalloc` and prints the
allocation sites whose live size grew most between batch 10 and batch 100 (``--trace-at``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import pipeline
from engine.run import score_dataset

__all__ = ["build_workload", "proc_status_mib", "child_run", "measure", "format_section", "main"]

BATCH = 8
TARGET = 1.10
SECTION = "## Pipeline"
SUBSECTION = "### Memory bounded by the batch"


def build_workload(folder: str | os.PathLike[str], *, n_cases: int = 2000, size: int = 64,
                   base: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Write ``unet.onnx`` and ``data.h5`` (``n_cases`` cases) into ``folder``.

    Parameters
    ----------
    folder : path
        Output folder (created).
    n_cases, size, base : int
        Cases in the HDF5 file, image side (even, >= 8), first-level U-Net channels.
    seed : int
        Seed of weights and images.

    Returns
    -------
    model, data : pathlib.Path
        The ONNX file and the HDF5 dataset.

    Raises
    ------
    ValueError
        Sizes out of range (see :func:`benchmarks.pipeline.build_workload`).

    Examples
    --------
    >>> model, data = build_workload(tmp_path, n_cases=3, size=16, base=2)  # doctest: +SKIP
    """
    w = pipeline.build_workload(folder, n_cases=n_cases, size=size, base=base, seed=seed)
    return w.model, w.data


def proc_status_mib(key: str = "VmHWM") -> float:
    """A memory field of ``/proc/self/status`` in MiB (``VmHWM`` = peak RSS, ``VmRSS`` = now).

    Returns NaN where ``/proc`` is not available.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child_run(model: str, data: str, store: str, n_cases: int, *, trace: bool = False,
              every: int = 25, trace_at: tuple[int, int] = (10, 100)) -> dict[str, Any]:
    """Score ``n_cases`` cases in this process and return its memory figures.

    Parameters
    ----------
    model, data, store : str
        ONNX model, HDF5 dataset, store to write (replaced).
    n_cases : int
        ``max_cases`` of the run.
    trace : bool
        Record :mod:`tracemalloc` snapshots after the batches ``trace_at`` and return the 15
        allocation sites (file:line) whose live size grew most between them.
    every : int
        Sample ``VmRSS`` every ``every`` batches.
    trace_at : (int, int)
        Batch numbers of the two snapshots (default: after batch 10 and batch 100).

    Returns
    -------
    dict
        ``n_cases``, ``peak_mib`` (VmHWM at the end), ``peak_before_finalize_mib``,
        ``rss_mib`` (list of [cases done, VmRSS]), ``seconds``, and with ``trace`` ``growth``
        (list of [site, bytes grown, count grown]), ``traced_mib`` at both snapshots and
        ``trace_at``.
    """
    rss: list[list[float]] = []
    snaps: dict[int, Any] = {}
    state = {"before_finalize": float("nan")}
    if trace:
        tracemalloc.start(10)

    def progress(done: int, total: int) -> None:
        nb = done // BATCH
        if done and (nb % every == 0 or done == total):
            rss.append([done, round(proc_status_mib("VmRSS"), 1)])
        if done == total:
            state["before_finalize"] = proc_status_mib("VmHWM")
        if trace and done in (trace_at[0] * BATCH, trace_at[1] * BATCH):
            gc.collect()
            snaps[nb] = tracemalloc.take_snapshot()

    t0 = time.perf_counter()
    score_dataset(model, data, store, level="both", batch_size=BATCH, provider="cpu",
                  max_cases=int(n_cases), overwrite=True, resume=False, progress=progress)
    out: dict[str, Any] = {
        "n_cases": int(n_cases),
        "peak_mib": round(proc_status_mib("VmHWM"), 1),
        "peak_before_finalize_mib": round(state["before_finalize"], 1),
        "rss_mib": rss,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if trace and len(snaps) == 2:
        first, last = trace_at
        diff = snaps[last].compare_to(snaps[first], "lineno")
        out["trace_at"] = [first, last]
        out["growth"] = [[str(s.traceback[0]), s.size_diff, s.count_diff] for s in diff[:15]]
        out["traced_mib"] = [round(sum(s.size for s in snaps[k].statistics("filename")) / 2**20, 2)
                             for k in (first, last)]
    return out


def _child(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory --child")
    p.add_argument("--child", action="store_true")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("store")
    p.add_argument("n_cases", type=int)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--trace-at", type=int, nargs=2, default=(10, 100))
    a = p.parse_args(argv)
    res = child_run(a.model, a.data, a.store, a.n_cases, trace=a.trace, trace_at=tuple(a.trace_at))
    print("RESULT " + json.dumps(res))
    return 0


def measure(model: Path, data: Path, n_cases: int, folder: Path, *, trace: bool = False,
            trace_at: tuple[int, int] = (10, 100)) -> dict[str, Any]:
    """Run :func:`child_run` in a fresh interpreter; add the parent's view of its peak RSS."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", str(model), str(data),
           str(folder / f"store_{n_cases}{'_trace' if trace else ''}.h5"), str(n_cases)]
    if trace:
        cmd += ["--trace", "--trace-at", str(trace_at[0]), str(trace_at[1])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"child run with {n_cases} cases failed (exit {proc.returncode}): " + " | ".join(tail))
    res = json.loads(lines[-1][len("RESULT "):])
    # ru_maxrss of waited-for children is a running maximum (KiB on Linux): a cross-check only
    res["children_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1)
    return res


def format_section(runs: Sequence[dict[str, Any]], info: dict[str, Any], command: str,
                   trace: dict[str, Any] | None) -> str:
    """The memory table (a ``###`` subsection of the ``## Pipeline`` section)."""
    small, large = runs[0], runs[-1]
    ratio = large["peak_mib"] / small["peak_mib"]
    lines = [
        SUBSECTION, "",
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, shared with other jobs; {info['date']}. "
        f"Each size runs `score_dataset(level=\"both\", batch_size={BATCH}, max_cases=N)` in a fresh "
        f"process on one lazily read HDF5 file ({info['workload']}); peak = `VmHWM` read inside the "
        "child at the end (finalize included); an unreported one-batch child runs first to fill the "
        "Numba cache.", "",
        "| cases | peak RSS MiB | peak before finalize MiB | RSS during the run MiB (cases: MiB) | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        samples = ", ".join(f"{int(d)}: {m:.0f}" for d, m in r["rss_mib"])
        lines.append(f"| {r['n_cases']} | {r['peak_mib']:.1f} | {r['peak_before_finalize_mib']:.1f} | "
                     f"{samples} | {r['seconds']:.0f} |")
    verdict = "met" if ratio <= TARGET else "**missed**"
    lines += ["", f"Peak ratio {large['n_cases']} / {small['n_cases']} cases: **{ratio:.3f}** "
              f"(target ≤ {TARGET:.2f}: {verdict})."]
    if trace and trace.get("growth"):
        first, last = trace["trace_at"]
        lines += ["", f"tracemalloc, live Python allocations after batch {first} vs batch {last}: "
                  f"{trace['traced_mib'][0]} → {trace['traced_mib'][1]} MiB; sites that grew most:", "",
                  "| site | bytes grown | blocks grown |", "|---|---|---|"]
        lines += [f"| `{site}` | {size:+,} | {count:+,} |" for site, size, count in trace["growth"][:10]]
    return "\n".join(lines) + "\n"


def write_subsection(text: str, path: Path = pipeline.RESULTS) -> None:
    """Put ``text`` into ``path`` inside ``## Pipeline`` (replacing an older memory subsection)."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start = old.find(SUBSECTION + "\n")
    if start >= 0:
        nxt = [i for i in (old.find("\n### ", start + 1), old.find("\n## ", start + 1)) if i >= 0]
        end = min(nxt) + 1 if nxt else len(old)
        new = old[:start] + text + ("\n" + old[end:] if end < len(old) else "")
    else:
        sec = old.find(SECTION + "\n")
        if sec < 0:
            new = old.rstrip("\n") + "\n\n" + SECTION + "\n\n" + text
        else:
            nxt = old.find("\n## ", sec + len(SECTION))
            if nxt < 0:
                new = old.rstrip("\n") + "\n\n" + text
            else:
                new = old[:nxt + 1].rstrip("\n") + "\n\n" + text + "\n" + old[nxt + 1:]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv:
        return _child(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, nargs="+", default=[200, 2000])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--base", type=int, default=8)
    p.add_argument("--trace", action="store_true", help="always run the tracemalloc child")
    p.add_argument("--trace-at", type=int, nargs=2, default=[10, 100], metavar=("FIRST", "LAST"),
                   help="batches after which the tracemalloc child takes its two snapshots (default 10 100); "
                        "it runs when the largest --cases reaches LAST batches")
    p.add_argument("--write", action="store_true", help="write the table into the --results file")
    p.add_argument("--results", type=Path, default=pipeline.RESULTS, metavar="PATH",
                   help="the Markdown file --write updates (default benchmarks/RESULTS.md)")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="also write every child's figures (and the trace) as JSON")
    a = p.parse_args(argv)
    sizes = sorted(set(a.cases))
    if len(sizes) < 2 or sizes[0] < 1:
        raise SystemExit(f"--cases {a.cases}: give at least two different positive sizes, e.g. 200 2000")
    first, last = a.trace_at
    if not 1 <= first < last:
        p.error(f"--trace-at {first} {last}: expected two batch numbers 1 <= FIRST < LAST, e.g. 10 100")
    info = pipeline.machine()
    info["workload"] = (f"`tests.models.unet` 2-D base {a.base}, {a.size}×{a.size}, every named "
                        "block output exposed")
    folder = Path(tempfile.mkdtemp(prefix="protoseg-mem-"))
    try:
        model, data = build_workload(folder, n_cases=sizes[-1], size=a.size, base=a.base)
        # an unreported first child loads (or, after a kernel edit, recompiles) the Numba cache,
        # whose compiler memory would otherwise inflate whichever size runs first
        warm = measure(model, data, BATCH, folder)
        print(f"warm-up child: {warm['seconds']} s, peak {warm['peak_mib']} MiB", flush=True)
        runs = []
        for n in sizes:
            r = measure(model, data, n, folder)
            print(json.dumps(r), flush=True)
            runs.append(r)
        ratio = runs[-1]["peak_mib"] / runs[0]["peak_mib"]
        print(f"peak ratio {sizes[-1]}/{sizes[0]}: {ratio:.3f} (target <= {TARGET})", flush=True)
        trace = None
        if (a.trace or ratio > TARGET) and sizes[-1] >= last * BATCH:
            trace = measure(model, data, last * BATCH, folder, trace=True, trace_at=(first, last))
            for site, size, count in trace.get("growth", []):
                print(f"{size:+12,d} B {count:+8,d} blocks  {site}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    command = ("python -m benchmarks.memory --cases " + " ".join(map(str, sizes)) +
               f" --size {a.size} --base {a.base}" + (" --trace" if a.trace else "") +
               (f" --trace-at {first} {last}" if a.trace_at != [10, 100] else "") +
               (" --write" if a.write else ""))
    text = format_section(runs, info, command, trace)
    print(text)
    if a.write:
        write_subsection(text, a.results)
    if a.json:
        a.json.write_text(json.dumps({"command": command, "info": info, "warm_up": warm, "runs": runs,
                                     "ratio": ratio, "target": TARGET, "trace": trace}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
