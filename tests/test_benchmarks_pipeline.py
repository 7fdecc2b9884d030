"""Smoke tests of the pipeline and memory benchmarks: workload builders, phase timer, one tiny
scoring run and the RESULTS.md section writers. No timing or memory figure is asserted (those
live in benchmarks/RESULTS.md)."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import memory, pipeline
from tests.models import HIDDEN_NCHW


def test_make_images_blob_and_mask():
    images, masks = pipeline.make_images(3, 16, seed=2)
    assert images.shape == (3, 1, 16, 16) and images.dtype == np.float32
    assert masks.shape == (3, 16, 16) and masks.dtype == np.uint8
    for img, m in zip(images, masks):
        assert 0 < m.sum() < m.size  # neither empty nor full: both prototypes exist
        assert img[0][m == 1].mean() > img[0][m == 0].mean() + 0.3  # the mask is the bright blob
    again, _ = pipeline.make_images(3, 16, seed=2)
    np.testing.assert_array_equal(again, images)


@pytest.mark.parametrize("n,size", [(0, 16), (2, 4)])
def test_make_images_rejects_bad_sizes(n, size):
    with pytest.raises(ValueError, match=f"n_cases={n}"):
        pipeline.make_images(n, size)


def test_build_workload_reads_back(tmp_path):
    from engine.datasets import open_dataset

    w = pipeline.build_workload(tmp_path, n_cases=5, size=16, base=2)
    assert w.model.is_file() and w.data.is_file()
    assert w.tensors == list(HIDDEN_NCHW)  # every block output the model card names
    ds = open_dataset(w.data)
    assert len(ds) == 5 and ds.has_masks
    images, masks = pipeline.make_images(5, 16)
    np.testing.assert_array_equal(ds[4].image, images[4])
    np.testing.assert_array_equal(ds[4].mask, masks[4])


def test_deep_unet_exposes_block_outputs(tmp_path):
    w = pipeline.build_workload(tmp_path, n_cases=2, size=16, base=2, kind="deep", levels=2)
    assert w.tensors == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]
    session, batches, outputs = pipeline._prepared_batches(w)
    out = session.run(batches[0], outputs=outputs)
    assert out["enc1"].shape == (2, 4, 8, 8) and out["bottleneck"].shape == (2, 8, 4, 4)
    assert out["dec0"].shape == (2, 2, 16, 16) and out["prob"].shape == (2, 1, 16, 16)
    assert ((out["prob"] > 0) & (out["prob"] < 1)).all()
    with pytest.raises(ValueError, match="size=18"):
        pipeline.deep_unet(levels=2, size=18)


def test_build_workload_rejects_odd_size(tmp_path):
    with pytest.raises(ValueError, match="size=15"):
        pipeline.build_workload(tmp_path, n_cases=2, size=15, base=2)


class _Owner:
    def f(self, x):
        return x + 1


def test_phase_timer_counts_and_restores():
    original = _Owner.__dict__["f"]
    timer = pipeline.PhaseTimer()
    with timer.patched([("f", _Owner, "f")]):
        assert _Owner().f(1) == 2
        assert _Owner().f(2) == 3
        assert _Owner.__dict__["f"] is not original
    assert _Owner.__dict__["f"] is original
    assert timer.calls["f"] == 2 and timer.seconds["f"] >= 0.0


def test_tiny_runs_score_every_case(tmp_path):
    from engine.store import open_store

    w = pipeline.build_workload(tmp_path, n_cases=10, size=16, base=2)
    session, batches, outputs = pipeline._prepared_batches(w)
    assert [b["x"].shape[0] for b in batches] == [8, 2]
    assert pipeline.time_inference(session, batches, outputs)[0] > 0
    timer = pipeline.PhaseTimer()
    wall, cpu = pipeline.time_pipeline(w, tmp_path / "s.h5", level="both", timer=timer)
    assert wall > 0 and cpu >= 0
    assert timer.calls["read"] == 10 and timer.calls["write_batch"] == 2 and timer.calls["finalize"] == 1
    st = open_store(tmp_path / "s.h5")
    assert len(st.cases) == 10 and st.has_units
    assert np.isfinite(st.layer_scores()["score"]).any()


def test_memory_child_run_reports_peak(tmp_path):
    model, data = memory.build_workload(tmp_path, n_cases=16, size=16, base=2)
    res = memory.child_run(str(model), str(data), str(tmp_path / "m.h5"), 16, every=1)
    assert res["n_cases"] == 16
    assert [d for d, _ in res["rss_mib"]] == [8, 16]
    # Linux syncs per-thread RSS counters lazily: VmHWM may trail VmRSS by a few pages
    assert res["peak_mib"] >= res["peak_before_finalize_mib"] >= max(m for _, m in res["rss_mib"]) - 1.0


def test_memory_child_run_traces_growth(tmp_path):
    model, data = memory.build_workload(tmp_path, n_cases=24, size=16, base=2)
    res = memory.child_run(str(model), str(data), str(tmp_path / "t.h5"), 24, trace=True, trace_at=(1, 3))
    assert len(res["growth"]) >= 1 and all(len(row) == 3 for row in res["growth"])
    assert all(m > 0 for m in res["traced_mib"])
    text = memory.format_section([res, res], {"cpu": "x", "cores": 2, "date": "d", "workload": "w"},
                                 "cmd", res)
    assert "**1.000**" in text and "sites that grew most" in text


def test_sections_keep_other_content(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Kernels\n\nkernel table\n")
    monkeypatch.setattr(pipeline, "RESULTS", path)
    pipeline.write_section("## Pipeline\n\n### U-Net base 4\n\nthroughput v1\n", path)
    memory.write_subsection("### Memory bounded by the batch\n\nmemory v1\n")
    path.write_text(path.read_text() + "\n### Analysis\n\nwhy\n")
    pipeline.write_section("## Pipeline\n\n### U-Net base 4\n\nthroughput v2\n", path)
    pipeline.write_section("## Pipeline\n\n### U-Net base 8\n\nother workload\n", path)
    memory.write_subsection("### Memory bounded by the batch\n\nmemory v2\n")
    text = path.read_text()
    assert "kernel table" in text and "throughput v2" in text and "memory v2" in text
    assert "### Analysis\n\nwhy\n" in text and "other workload" in text
    assert text.index("base 4") < text.index("base 8") < text.index("### Memory") < text.index("### Analysis")
    assert "v1" not in text
    assert text.count("## Pipeline") == 1 and text.count("### Memory") == 1
    assert text.index("## Kernels") < text.index("## Pipeline") < text.index("### Memory")
