"""The kernel benchmark, run as its users run it: ``python -m benchmarks.kernels`` in a fresh
process, on the small ``--quick`` workload, reading what it writes (``--json``, ``--results``).

Imports go one way: benchmarks/ builds on tests/ (the twins of tests/naive.py are its NumPy
column, tests/models.py its models); tests never import benchmarks/. No timing is asserted
(speed lives in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the baseline is the published PyTorch module

pytestmark = pytest.mark.slow  # each test starts Python, torch and the engine afresh

KERNELS = "benchmarks.kernels"
QUICK = ("--quick", "--no-startup")


@pytest.fixture(scope="module")
def quick_check(run_module, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``--quick --check``: every method once per layer and level, compared with the baseline."""
    out = tmp_path_factory.mktemp("kernels") / "check.json"
    proc = run_module(KERNELS, *QUICK, "--check", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_quick_workload_is_what_the_benchmark_claims(quick_check: dict) -> None:
    w = quick_check["workload"]
    assert (w["batch"], w["size"], len(w["layers"])) == (2, 64, 9)
    # float32 C-contiguous channels-first features: the engine's fused kernels are what is timed
    assert w["dtype"] == ["float32"] and w["c_contiguous"]
    # a blob per sample: both prototypes exist, so the scores compared are not all NaN
    assert all(0.0 < f < 1.0 for f in w["foreground_fraction"])
    assert w["reference_is_guide"]


def test_engine_and_twins_agree_with_the_published_module(quick_check: dict) -> None:
    diffs, tol = quick_check["differences"], quick_check["tolerance"]
    assert set(diffs) == {"layer", "unit"}
    for level in diffs.values():
        # baseline-cmp: the published module with argmax replaced by a comparison;
        # numpy: the twins of tests/naive.py; engine: engine.sa_scores
        assert set(level) == {"baseline-cmp", "numpy", "engine"}
        assert all(len(d) == 9 for d in level.values())
        assert level["baseline-cmp"] == [0.0] * 9  # comparing the probabilities gives argmax's labels
        for name in ("numpy", "engine"):
            assert all(d <= tol for d in level[name]), (name, level[name])
    # one float32 near-tie flip moves a Dice by ~1/(|b| + |y|), about 1e-3 on a 64² mask
    assert tol == 2e-3


def test_agreement_check_stops_a_wrong_engine(run_module) -> None:
    proc = run_module(KERNELS, *QUICK, "--check", "--no-numpy", "--inject-error", "0.01")
    assert proc.returncode == 1
    assert ("error: engine disagrees with the baseline at layer level, layer 0 (8, 64): "
            "max |ΔSA| = 0.01 > 0.002") in proc.stderr


@pytest.mark.parametrize("existing", [True, False], ids=["existing-file", "fresh-file"])
def test_timed_run_writes_its_section_and_keeps_the_others(run_module, quick_check: dict, tmp_path: Path,
                                                           existing: bool) -> None:
    results, out = tmp_path / "RESULTS.md", tmp_path / "times.json"
    if existing:
        results.write_text("# Benchmark results\n\n## Pipeline\n\nkeep me\n\n## Kernels\n\nold\n\n## Other\n\nme too\n")
    proc = run_module(KERNELS, *QUICK, "--repeat", "1", "--slow-repeat", "1", "--no-numpy",
                      "--write", "--results", str(results), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n") and text.count("## Kernels") == 1
    assert "### Layer level" in text and "### Unit level" in text and "| **total** |" in text
    if existing:
        assert "old" not in text and "keep me" in text and "me too" in text
        assert text.index("## Pipeline") < text.index("## Kernels") < text.index("## Other")
    data = json.loads(out.read_text())
    assert data["workload"]["sha256"] == quick_check["workload"]["sha256"]  # the same inputs every run
    for level in ("layer", "unit"):
        assert set(data["seconds"][level]) == {"baseline", "baseline-cmp", "engine"}
        assert all(len(t) == 9 and all(math.isfinite(x) and x > 0 for x in t)
                   for t in data["seconds"][level].values())


def test_check_and_write_together_are_refused(run_module) -> None:
    proc = run_module(KERNELS, "--check", "--write")
    assert proc.returncode == 2 and "nothing to --write" in proc.stderr


def test_benchmark_examples_run(run_module) -> None:
    # the documented examples of benchmarks/ (the published module's behaviour at unit level
    # and without background, the workload builders, the phase timer), in their own process
    proc = run_module("pytest", "--doctest-modules", "benchmarks", "-q", "-p", "no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
