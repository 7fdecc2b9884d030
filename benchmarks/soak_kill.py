"""Soak test: SIGKILL a scoring run at random points, resume it, compare with an uninterrupted run.

Run as a module (not part of the test suite; issue 13, "Tests")::

    python -m benchmarks.soak_kill [--kills 20] [--seed S] [--cases N] [--size S] [--base B]
        [--batch-size B] [--write [--results PATH]] [--keep DIR]

Workload: a folder of ``--cases`` ``.npy`` image/mask pairs (one smooth blob each) and the
two-level test U-Net of :func:`tests.models.unet` (2-D, ``size``×``size``, protoseg metadata),
scored with ``protoseg score MODEL DATA -o STORE --level both --maps 2 -b B``, each run a fresh
``protoseg`` process.

1. One uninterrupted run gives the reference store and its wall time ``T``.
2. Rounds: a fresh store; run, and SIGKILL the process after a random delay (seeded; every
   delay is printed), then run the same command again (the resume), and so on until a run ends
   on its own before its kill; compare that store with the reference. Rounds go on until
   ``--kills`` kills have landed; the last round ends with a run that completes. Each delay is
   uniform in ``[0, 1.3 E)``, ``E`` the run's expected time from the phases of the reference
   run (watched on disk): its start-up ``S`` (until ``run.json`` appears), its scoring ``A - S``
   (until every part is published), its assembly and exit ``T - A``; a resume is expected to
   take ``S``, the share of ``A - S`` it has left to score, and ``T - A`` (a run on a finished
   store only ``S`` and the exit). So kills land in proportion to how long each phase lasts —
   start-up, scoring (between and inside part writes), the final assembly — and about one run
   in four ends on its own. Every run starts with its own start-up, so most kills find every
   part already published: the resumes' start-up and the assembly are most of the time.
3. After every kill, each published part must open and be marked complete (a part is written
   under a temporary name and renamed when whole); every resumed run must exit 0 on its own,
   never discard a damaged part and print no traceback. Each completed store must equal the
   reference: every dataset (scores, statuses, case ids and order, Dice, baselines, maps) bit
   for bit (NaN where NaN), the configuration equal, no parts folder or lock left behind.

Exit status 0 when every comparison is equal and no check failed. ``--write`` puts the
figures (kills, resumes, rounds, wall time, equal or not) and the command into the
``## Soak: SIGKILL and resume`` section of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from benchmarks import pipeline
from tests import models

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Soak: SIGKILL and resume"


def build_workload(folder: Path, *, n_cases: int, size: int, base: int) -> tuple[Path, Path]:
    """The model and a folder of ``case<i>.npy`` / ``case<i>_mask.npy`` pairs."""
    model = models.save(models.unet(batch="N", size=size, base=base, metadata=True),
                        folder / "unet.onnx")
    data = folder / "cases"
    data.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_cases):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.12, 0.25) * size
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
        image = (blob * rng.uniform(0.6, 1.0) + 0.15 * rng.standard_normal((size, size)))
        np.save(data / f"case{i}.npy", image.astype(np.float32))
        np.save(data / f"case{i}_mask.npy", blob.astype(np.uint8))
    return model, data


def command(model: Path, data: Path, store: Path, batch: int) -> list[str]:
    return [sys.executable, "-m", "cli.main", "score", str(model), str(data), "-o", str(store),
            "--level", "both", "--maps", "2", "-b", str(batch)]


def run_to_end(cmd: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=_env())
    return res.returncode, res.stderr, time.perf_counter() - t0


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    return env


def damaged_parts(parts: Path) -> list[str]:
    """Published parts that do not open or are not marked complete (must never happen)."""
    bad = []
    for part in sorted(parts.glob("part-*.h5")) if parts.is_dir() else []:
        try:
            with h5py.File(part, "r") as f:
                if int(f.attrs.get("complete", 0)) != 1:
                    bad.append(part.name)
        except OSError:
            bad.append(part.name)
    return bad


def compare(store: Path, ref: Path) -> list[str]:
    """Every difference between two stores' datasets and configurations (empty: equal)."""
    diffs: list[str] = []
    with h5py.File(store, "r") as a, h5py.File(ref, "r") as b:
        names_a: list[str] = []
        names_b: list[str] = []
        a.visit(names_a.append)
        b.visit(names_b.append)
        if names_a != names_b:
            diffs.append(f"other elements: {sorted(set(names_a) ^ set(names_b))[:5]}")
        for name in names_b:
            if name not in a or not isinstance(b[name], h5py.Dataset):
                continue
            x, y = a[name][()], b[name][()]
            if np.asarray(x).dtype.kind == "f":
                same = np.array_equal(x, y, equal_nan=True)
            else:
                same = np.array_equal(x, y)
            if not same:
                diffs.append(name)
        for key in ("config", "run", "n_cases"):
            va, vb = a.attrs.get(key), b.attrs.get(key)
            if isinstance(va, (bytes, str)) and key != "n_cases":
                va, vb = json.loads(va), json.loads(vb)
            if va != vb:
                diffs.append(f"attribute {key}")
    return diffs


#: Kill delays are uniform in [0, STRETCH × the run's expected time).
STRETCH = 1.3
PHASES = ("no part published yet", "some parts published",
          "every part published (a resume's start-up or the final assembly)",
          "the store written")


def watched_run(cmd: list[str], store: Path, n_batches: int) -> tuple[int, str, dict[str, float]]:
    """Run to the end, noting when ``run.json``, the last part and the store appear."""
    parts = Path(str(store) + ".parts")
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env())
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if "start" not in marks and (parts / "run.json").exists():
            marks["start"] = now
        if "parts" not in marks and parts.is_dir() and \
                len(list(parts.glob("part-*.h5"))) >= n_batches:
            marks["parts"] = now
        if "store" not in marks and store.exists():
            marks["store"] = now
        time.sleep(0.005)
    _, err = proc.communicate()
    marks["end"] = time.perf_counter() - t0
    marks.setdefault("store", marks["end"])
    marks.setdefault("parts", marks["store"])
    marks.setdefault("start", 0.0)
    return proc.returncode, err, marks


def soak(model: Path, data: Path, work: Path, *, kills: int, seed: int, batch: int,
         ref: Path, marks: dict[str, float], n_batches: int) -> dict[str, Any]:
    rng = random.Random(seed)
    phases = dict.fromkeys(PHASES, 0)
    store = work / "soak.h5"
    parts = Path(str(store) + ".parts")
    cmd = command(model, data, store, batch)
    landed, runs, rounds, failures = 0, 0, 0, []
    equal_rounds, log = 0, []
    t0 = time.perf_counter()
    while landed < kills:
        rounds += 1
        for p in (store, parts, work / f".{store.name}.lock"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        first = True
        while True:
            n_done = len(list(parts.glob("part-*.h5"))) if parts.is_dir() else 0
            left = 0.0 if store.exists() else max(0.0, 1.0 - n_done / n_batches)
            if store.exists():  # finished (maybe with parts left to remove): start-up only
                expected = marks["start"] + (marks["end"] - marks["store"])
            else:
                expected = (marks["start"] + left * (marks["parts"] - marks["start"])
                            + marks["end"] - marks["parts"])
            delay = rng.uniform(0.0, STRETCH * expected) if landed < kills else None
            runs += 1
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, env=_env())
            try:
                proc.wait(timeout=delay)
                ended = True
            except subprocess.TimeoutExpired:
                ended = False
            if not ended:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                landed += 1
                n_parts = len(list(parts.glob("part-*.h5"))) if parts.is_dir() else 0
                temps = len(list(parts.glob(".*.tmp-*"))) if parts.is_dir() else 0
                bad = damaged_parts(parts)
                where = ("store written, parts not yet removed" if store.exists() and n_parts else
                         "store written" if store.exists() else f"{n_parts} parts published")
                phase = (PHASES[3] if store.exists() else PHASES[0] if n_parts == 0 else
                         PHASES[2] if n_parts >= n_batches else PHASES[1])
                phases[phase] += 1
                line = (f"kill {landed:2d} (round {rounds}): {delay:6.3f} s after start, {where}"
                        + (f", {temps} temporary file(s) left" if temps else ""))
                print(line, flush=True)
                log.append(line)
                if bad:
                    failures.append(f"kill {landed}: damaged published parts {bad}")
                first = False
                continue
            _, err = proc.communicate()
            what = "run" if first else "resume"
            if proc.returncode != 0 or "Traceback" in err or "discarding damaged part" in err:
                failures.append(f"round {rounds}: the {what} exited {proc.returncode}: "
                                f"{err.strip().splitlines()[-1:] or ''}")
                break
            diffs = compare(store, ref)
            leftovers = [p.name for p in (parts, work / f".{store.name}.lock") if p.exists()]
            if diffs or leftovers:
                failures.append(f"round {rounds}: differs from the reference in {diffs[:5]}"
                                + (f"; left behind: {leftovers}" if leftovers else ""))
            else:
                equal_rounds += 1
            line = (f"round {rounds}: completed by a {what}"
                    + (" (no kill landed)" if first else "") + ", store "
                    + ("equal to the reference" if not diffs else f"DIFFERS in {diffs[:3]}"))
            print(line, flush=True)
            log.append(line)
            break
    return {"kills": landed, "runs": runs, "resumes": runs - rounds, "rounds": rounds,
            "equal_rounds": equal_rounds, "failures": failures, "phases": phases,
            "marks": marks,
            "seconds": round(time.perf_counter() - t0, 1), "log": log}


def format_section(res: dict[str, Any], info: dict[str, Any], cmd: str, a: argparse.Namespace,
                   t_ref: float) -> str:
    ok = not res["failures"] and res["equal_rounds"] == res["rounds"]
    lines = [
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, shared with other jobs; {info['date']}. "
        f"Workload: {a.cases} cases of {a.size}×{a.size} (`.npy` folder), `tests.models.unet` base "
        f"{a.base}, `protoseg score --level both --maps 2 -b {a.batch_size}`, each run a fresh "
        f"process; each kill delay uniform in [0, {STRETCH} × the run's expected time), from the "
        f"uninterrupted run's phases (start-up {res['marks']['start']:.1f} s, scoring until "
        f"{res['marks']['parts']:.1f} s, assembly and exit until {t_ref:.1f} s) and the share "
        f"left to score; seed {a.seed}.", "",
        "| kills | resumes | rounds | runs | stores equal to the uninterrupted run | failed checks "
        "| soak wall s | uninterrupted s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {res['kills']} | {res['resumes']} | {res['rounds']} | {res['runs']} | "
        f"{res['equal_rounds']} of {res['rounds']} | {len(res['failures'])} | {res['seconds']:.0f} | "
        f"{t_ref:.1f} |", "",
        "What the kills left on disk: " + ", ".join(f"{n}: {k}" for k, n in res["phases"].items())
        + ".", "",
        ("**Equal**: every completed store matched the uninterrupted run bit for bit (scores, "
         "statuses, case order, Dice, baselines, maps, configuration); no published part was ever "
         "damaged, no resume failed, no parts folder or lock was left." if ok else
         "**Not equal / failed**: " + "; ".join(res["failures"][:5])),
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = pipeline.RESULTS) -> None:
    """Put ``text`` into ``path`` as its own ``##`` section (replacing an older one)."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(SECTION + "\n")
    if start >= 0:
        nxt = old.find("\n## ", start + 1)
        new = old[:start] + text + (old[nxt:] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak_kill",
                                description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="default: drawn, and printed")
    p.add_argument("--cases", type=int, default=240)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--base", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--write", action="store_true", help="write the figures into --results")
    p.add_argument("--results", type=Path, default=pipeline.RESULTS, metavar="PATH")
    p.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it")
    a = p.parse_args(argv)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 31)
    print(f"seed {a.seed}", flush=True)
    work = a.keep or Path(tempfile.mkdtemp(prefix="protoseg-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model, data = build_workload(work, n_cases=a.cases, size=a.size, base=a.base)
        ref = work / "ref.h5"
        rc, err, _ = run_to_end(command(model, data, ref, a.batch_size))  # warms the Numba cache
        if rc != 0:
            print(err, file=sys.stderr)
            return 2
        ref.unlink()
        n_batches = -(-a.cases // a.batch_size)
        rc, err, marks = watched_run(command(model, data, ref, a.batch_size), ref, n_batches)
        if rc != 0:
            print(err, file=sys.stderr)
            return 2
        t_ref = marks["end"]
        print(f"uninterrupted run: {t_ref:.2f} s (start-up {marks['start']:.2f} s, every part "
              f"published at {marks['parts']:.2f} s, store at {marks['store']:.2f} s)", flush=True)
        res = soak(model, data, work, kills=a.kills, seed=a.seed, batch=a.batch_size, ref=ref,
                   marks=marks, n_batches=n_batches)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = not res["failures"] and res["equal_rounds"] == res["rounds"]
    print(f"\n{res['kills']} kills, {res['resumes']} resumes, {res['rounds']} rounds, "
          f"{res['runs']} runs in {res['seconds']:.0f} s; completed stores equal to the "
          f"uninterrupted run: {res['equal_rounds']} of {res['rounds']}; failed checks: "
          f"{len(res['failures'])}", flush=True)
    print("kills left: " + ", ".join(f"{n}: {k}" for k, n in res["phases"].items()), flush=True)
    for f in res["failures"]:
        print("  " + f)
    cmd = (f"python -m benchmarks.soak_kill --kills {a.kills} --seed {a.seed} --cases {a.cases} "
           f"--size {a.size} --base {a.base} --batch-size {a.batch_size}")
    if a.write:
        write_section(format_section(res, pipeline.machine(), cmd, a, t_ref), a.results)
        print(f"wrote {a.results}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
