"""The pipeline and memory benchmarks, run as their users run them (``python -m
benchmarks.pipeline --quick``, its deepbrain workload on one volume, ``python -m
benchmarks.memory`` on tiny sizes) in fresh
processes, reading what they write (``--json``, ``--results``); and the deeper U-Net of
tests/models.py they score. Tests never import benchmarks/ (it builds on tests/). No timing or
memory figure is asserted (those live in benchmarks/RESULTS.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.model.graph import expose, list_hidden_tensors, select_tensors
from engine.model.session import make_session
from tests.models import HIDDEN_NCHW, deep_unet

OLD_RESULTS = """# Benchmark results

## Kernels

kernel table

## Pipeline

Methods: old text

### U-Net base 4, 32×32, 16 cases

throughput v1

### U-Net base 8, 32×32, 16 cases

other workload

### Memory bounded by the batch

memory v1

### Analysis

why
"""


@pytest.fixture(scope="module")
def runs(run_module, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``--quick`` pipeline run and one tiny memory run (with the tracemalloc child), both
    writing into the same RESULTS file, which already holds older sections."""
    folder = tmp_path_factory.mktemp("pipeline")
    results = folder / "RESULTS.md"
    results.write_text(OLD_RESULTS)
    pipeline = run_module("benchmarks.pipeline", "--quick", "--write", "--results", str(results),
                          "--json", str(folder / "pipeline.json"))
    assert pipeline.returncode == 0, pipeline.stderr[-3000:]
    memory = run_module("benchmarks.memory", "--cases", "8", "24", "--size", "16", "--base", "2", "--trace",
                        "--trace-at", "1", "3", "--write", "--results", str(results),
                        "--json", str(folder / "memory.json"))
    assert memory.returncode == 0, memory.stderr[-3000:]
    return {"results": results.read_text(), "pipeline": json.loads((folder / "pipeline.json").read_text()),
            "memory": json.loads((folder / "memory.json").read_text())}


@pytest.mark.slow
def test_pipeline_exposes_every_named_tensor_and_times_every_phase(runs: dict) -> None:
    unet, deep = runs["pipeline"]["workloads"]
    assert (unet["kind"], unet["base"], unet["size"], unet["n_cases"]) == ("unet", 4, 32, 16)
    assert unet["tensors"] == list(HIDDEN_NCHW)  # every tensor the U-Net's model card names
    assert (deep["kind"], deep["levels"]) == ("deep", 2)
    assert deep["tensors"] == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]  # block outputs only
    for w in (unet, deep):
        assert w["seconds"]["inference"] > 0 and w["batch"] == 8
        assert w["methods"] == ["inference", "files", "layer", "both", "layer_seq", "both_seq"]
        # (a') reads and preprocesses the cases it runs: never faster than nothing, and no phases
        assert w["seconds"]["files"] > 0 and "files" not in w["calls"]
        assert set(w["files_overhead"]) == {"layer", "both", "layer_seq", "both_seq"}
        for method in ("layer", "both", "layer_seq", "both_seq"):
            calls = w["calls"][method]
            # 16 cases read a batch of 8 at a time (one HDF5 open each), two batches of 8
            # written, one store finalised
            assert (calls["read"], calls["write_batch"], calls["finalize"]) == (2, 2, 1)
            # the kernels and the baselines are found wherever the pipeline binds them: a call
            # per tensor and batch, the U-Net's skip concatenation ``cat`` and its two parts
            # (enc1, up) in one
            grouped = 2 if "cat" in w["tensors"] else 0
            assert calls["sa_scores"] >= 2 * (len(w["tensors"]) - grouped) and calls["baselines"] == 2
            # the main thread asked the stages for 2 batches and handed them 2 results
            assert calls["read_wait"] == 2 and calls["store_wait"] >= 2
        for method in ("layer", "both"):  # overlapped: reads and writes ran in their own threads
            assert w["background"][method]["read"] > 0 and w["background"][method]["write_batch"] > 0
            assert w["phases"][method]["read"] == 0 and w["phases"][method]["write_batch"] == 0
        for method in ("layer_seq", "both_seq"):  # PROTOSEG_OVERLAP=0: everything in the main thread
            assert not any(w["background"][method].values())
            assert w["phases"][method]["read"] > 0 and w["phases"][method]["write_batch"] > 0


@pytest.mark.slow
def test_memory_children_report_their_peaks_and_the_trace(runs: dict) -> None:
    mem = runs["memory"]
    assert [r["n_cases"] for r in mem["runs"]] == [8, 24]
    for r in mem["runs"]:
        assert r["rss_mib"][-1][0] == r["n_cases"]  # sampled when the last batch is done
        # Linux syncs per-thread RSS counters lazily: VmHWM may trail VmRSS by a few pages
        assert r["peak_mib"] >= r["peak_before_finalize_mib"] >= max(m for _, m in r["rss_mib"]) - 1.0
    trace = mem["trace"]
    assert trace["n_cases"] == 24 and trace["trace_at"] == [1, 3]
    assert len(trace["growth"]) >= 1 and all(len(row) == 3 for row in trace["growth"])
    assert all(m > 0 for m in trace["traced_mib"])
    assert f"**{mem['ratio']:.3f}**" in runs["results"]
    assert "after batch 1 vs batch 3" in runs["results"] and "sites that grew most" in runs["results"]


@pytest.mark.slow
def test_results_sections_are_merged_not_overwritten(runs: dict) -> None:
    text = runs["results"]
    assert "kernel table" in text and "other workload" in text and "### Analysis\n\nwhy\n" in text
    assert "v1" not in text and "old text" not in text  # the same titles were replaced
    assert text.count("## Pipeline") == 1 and text.count("### Memory") == 1
    assert text.count("### U-Net base 4, 32×32, 16 cases") == 1
    # generated subsections first (the new deep U-Net after the older ones), then the rest
    order = ["## Kernels", "## Pipeline", "### U-Net base 4,", "### U-Net base 8,", "### U-Net base 2, 2 levels",
             "### Memory", "### Analysis"]
    assert [text.index(s) for s in order] == sorted(text.index(s) for s in order)


@pytest.mark.slow
def test_the_deepbrain_workload_scores_colin27_volumes_with_every_tensor(run_module, tmp_path) -> None:
    """One volume, layer level only (about 10 s): the shipped model and data, batch 1."""
    res = run_module("benchmarks.pipeline", "--workload", "deepbrain", "--volumes", "1", "--repeat", "1",
                     "--methods", "files", "sweeps", "layer", "--json", str(tmp_path / "db.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "db.json").read_text())
    assert "--workload deepbrain --volumes 1 --repeat 1 --methods files sweeps layer" in out["command"]
    (w,) = out["workloads"]
    assert (w["kind"], w["n_cases"], w["batch"], w["methods"]) == ("deepbrain", 1, 1,
                                                                    ["inference", "files", "sweeps", "layer"])
    assert "(a') reading + preprocessing + inference" in res.stdout and "Against (a')" in res.stdout
    assert w["seconds"]["files"] > 0 and set(w["files_overhead"]) == {"layer"}
    # (a'') is timed like the baselines (no phases) and has a row of its own
    assert w["seconds"]["sweeps"] > 0 and "sweeps" not in w["calls"] and "sweeps" in w["overhead"]
    assert "| (a'') (a') + the sums and projection passes |" in res.stdout
    assert len(w["tensors"]) == 15 and w["tensors"][0] == "conv3d"
    calls = w["calls"]["layer"]
    assert (calls["read"], calls["inference"], calls["write_batch"], calls["finalize"]) == (1, 1, 1, 1)
    # the input's SA, the 6 tensors scored alone, and 3 skip concatenations each scored with
    # its 2 parts in one sa_scores_concat call (counted as one)
    assert calls["sa_scores"] == 1 + 6 + 3
    assert "### deepbrain 3-D U-Net, Colin27 181×217×181 → 128³, 1 volume\n" in res.stdout


@pytest.mark.slow
def test_the_deepbrain_workload_can_be_built_again_in_its_folder(tmp_path) -> None:
    from benchmarks.pipeline import build_deepbrain

    first = build_deepbrain(tmp_path, volumes=1)
    (tmp_path / "data" / "vol001.nii.gz").write_bytes(b"left over")  # another file of a built name
    again = build_deepbrain(tmp_path, volumes=2)  # the links of the first build are kept
    assert first.tensors == again.tensors and again.n_cases == 2
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert names == ["vol000.nii.gz", "vol000_mask.nii.gz", "vol001.nii.gz", "vol001_mask.nii.gz"]
    colin = Path(__file__).resolve().parents[1] / "cli" / "data" / "colin27" / "colin27.nii.gz"
    assert (tmp_path / "data" / "vol001.nii.gz").read_bytes() == colin.read_bytes()


def test_the_sweeps_method_refuses_channels_first_features(run_module) -> None:
    """(a'') times the channels-last kernels only: the 2-D U-Nets' NCHW tensors get a clear error."""
    res = run_module("benchmarks.pipeline", "--quick", "--deep", "--methods", "sweeps")
    assert res.returncode != 0
    assert "is not stored channels-last; the sweeps method times the channels-last kernels only" in res.stderr


def test_deep_unet_exposes_block_outputs() -> None:
    model = deep_unet(levels=2, base=2, size=16)
    tensors = select_tensors(list_hidden_tensors(model), "auto")
    assert [t.name for t in tensors] == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]
    session = make_session(expose(model, tensors), provider="cpu")
    x = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    out = session.run({"x": x}, outputs=[t.name for t in tensors] + ["prob"])
    assert out["enc1"].shape == (2, 4, 8, 8) and out["bottleneck"].shape == (2, 8, 4, 4)
    assert out["dec0"].shape == (2, 2, 16, 16) and out["prob"].shape == (2, 1, 16, 16)
    assert ((out["prob"] > 0) & (out["prob"] < 1)).all()
    with pytest.raises(ValueError, match="size=18"):
        deep_unet(levels=2, size=18)


def test_phase_timer_counts_a_phase_inside_itself_once() -> None:
    from benchmarks.pipeline import PhaseTimer

    class Owner:
        def outer(self, n):
            return self.inner(n) + self.inner(n)

        def inner(self, n):
            return n

    timer = PhaseTimer()
    with timer.patched([("read", Owner, "outer"), ("read", Owner, "inner"), ("other", Owner, "inner")]):
        assert Owner().outer(2) == 4
        assert Owner().inner(1) == 1
    assert timer.calls["read"] == 2  # outer once (its inner calls not again), one inner alone
    assert timer.calls["other"] == 3  # another phase still counts every call
