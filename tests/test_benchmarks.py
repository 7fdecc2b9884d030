"""Smoke tests of the kernel benchmark: workload builder, baselines and correctness gate on tiny
shapes. No timing is asserted (speed lives in benchmarks/RESULTS.md)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import kernels  # noqa: E402
from benchmarks._baseline import naive_sa, reference_sa, upsample_naive  # noqa: E402

TINY = ((3, 4), (2, 8), (5, 3), (1, 16))


def tiny() -> kernels.Workload:
    return kernels.build_workload(batch=2, size=16, layers=TINY, seed=1)


def test_workload_shapes_and_guide():
    w = tiny()
    assert [f.shape for f in w.features] == [(2, c, s, s) for c, s in TINY]
    assert all(f.dtype == np.float32 and f.flags.c_contiguous for f in w.features)
    assert w.guide.shape == w.reference.shape == (2, 16, 16)
    assert set(np.unique(w.guide)) == {0.0, 1.0}  # a blob: both classes present
    np.testing.assert_array_equal(w.reference, w.guide > 0.5)
    again = kernels.build_workload(batch=2, size=16, layers=TINY, seed=1)
    np.testing.assert_array_equal(again.features[0], w.features[0])


def test_workload_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch=0"):
        kernels.build_workload(batch=0, size=16, layers=TINY)
    with pytest.raises(ValueError, match="layers"):
        kernels.build_workload(batch=1, size=16, layers=((0, 4),))


@pytest.mark.parametrize("n_in,n_out", [(4, 16), (3, 16), (5, 7), (16, 16), (7, 3)])
def test_naive_upsample_matches_interpolate(n_in, n_out):
    x = np.random.default_rng(0).standard_normal((2, 3, n_in, n_in + 1))
    ours = upsample_naive(x, (n_out, n_out + 2))
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(n_out, n_out + 2), mode="bilinear", align_corners=False
    ).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_baselines_agree_and_single_channel_is_a_midpoint_threshold():
    w = tiny()
    # a C = 1 channel equal to the guide itself segments the guide perfectly
    f = w.guide[:, None].copy()
    for fn in (reference_sa, naive_sa):
        np.testing.assert_allclose(fn(f, w.guide, w.reference, level="layer"), 1.0)
    # unit level = each channel run alone at layer level
    f = w.features[0]
    units = reference_sa(f, w.guide, w.reference, level="unit")
    alone = np.stack(
        [reference_sa(np.ascontiguousarray(f[:, c : c + 1]), w.guide, w.reference) for c in range(f.shape[1])],
        axis=1,
    )
    np.testing.assert_allclose(units, alone, atol=1e-12)
    # comparing the two probabilities gives the argmax's labels
    np.testing.assert_array_equal(reference_sa(f, w.guide, w.reference, level="unit", decision="compare"), units)
    np.testing.assert_allclose(naive_sa(f, w.guide, w.reference, level="unit"), units, atol=kernels.QUICK_TOLERANCE)


def test_guide_without_background():
    f = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    g = np.ones((1, 8, 8), np.float32)
    assert np.isnan(naive_sa(f, g, g > 0)).all()  # SPEC: undefined prototype -> NaN
    # the published module silently maps everything to background: Dice 0 with a non-empty reference
    np.testing.assert_array_equal(reference_sa(f, g, g > 0, level="unit"), 0.0)


def test_gate_rejects_a_wrong_method():
    w = tiny()
    methods = kernels.method_functions(numpy=False)
    methods["engine"] = lambda f, g, r, level: reference_sa(f, g, r, level=level) + 1e-3
    with pytest.raises(AssertionError, match="engine vs baseline"):
        kernels.check_agreement(w, methods=methods, levels=("layer",))


def test_engine_agrees_with_baseline_on_tiny_workload():
    pytest.importorskip("engine.scores")
    w = tiny()
    diffs = kernels.check_agreement(w, tol=kernels.QUICK_TOLERANCE)
    assert set(diffs) == {"layer", "unit"}
    assert all(len(d) == len(TINY) for level in diffs.values() for d in level.values())


def test_write_section_keeps_other_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Pipeline\n\nkeep me\n\n## Kernels\n\nold\n\n## Other\n\nme too\n")
    kernels._write_section("## Kernels\n\nnew table\n", path)
    text = path.read_text()
    assert "new table" in text and "old" not in text
    assert text.index("## Pipeline") < text.index("## Kernels") < text.index("## Other")
    assert "keep me" in text and "me too" in text
    fresh = tmp_path / "fresh.md"
    kernels._write_section("## Kernels\n\nt\n", fresh)
    assert fresh.read_text().startswith("# Benchmark results") and "## Kernels" in fresh.read_text()
