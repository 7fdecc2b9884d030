"""engine.scores.reuse_guide_weights: tensors on one grid share the guide's weights (issue 15)."""
from __future__ import annotations

import numpy as np
import pytest

import engine.scores as scores_module
from engine.scores import protoseg, reuse_guide_weights, sa_scores


def _tensors(rng: np.random.Generator) -> list[np.ndarray]:
    """Channels-last tensors of one 3-D U-Net-like case: two on the 16³ guide grid, two on 8³,
    one on 4³ (B = 2)."""
    shapes = [(16, 3), (16, 5), (8, 4), (8, 6), (4, 7)]
    return [rng.standard_normal((2, s, s, s, c)).astype(np.float32) for s, c in shapes]


def _case(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    g = np.zeros((2, 16, 16, 16), np.float32)
    g[0, 3:11, 4:12, 2:9] = 1.0
    g[1, 6:14, 1:9, 5:15] = 1.0
    g[1, 8:10] = 0.25  # a soft band
    y = (rng.random((2, 16, 16, 16)) < 0.4).astype(np.uint8)
    mask = np.ones_like(g)
    mask[:, :2] = 0.0
    return g, y, mask


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = scores_module._cl.guide_weights
    monkeypatch.setattr(scores_module._cl, "guide_weights", lambda *a: (calls.append(1), real(*a))[1])
    return calls


@pytest.mark.parametrize("with_mask", [False, True])
def test_same_scores_and_one_computation_per_grid(counted: list[int], with_mask: bool) -> None:
    rng = np.random.default_rng(11)
    tensors = _tensors(rng)
    g, y, mask = _case(rng)
    m = mask if with_mask else None
    fresh = [sa_scores(f, g, y, mask=m, level="both", layout="channels_last") for f in tensors]
    fresh_maps = [protoseg(f, g, mask=m, layout="channels_last") for f in tensors]
    assert len(counted) == 2 * len(tensors)
    counted.clear()
    with reuse_guide_weights():
        shared = [sa_scores(f, g, y, mask=m, level="both", layout="channels_last") for f in tensors]
        shared_maps = [protoseg(f, g, mask=m, layout="channels_last") for f in tensors]
    assert len(counted) == 3  # the 16³, 8³ and 4³ grids
    for (la, ua), (lb, ub) in zip(fresh, shared):
        for a, b in ((la, lb), (ua, ub)):
            for field in ("score", "tp", "fp", "fn", "status"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for a, b in zip(fresh_maps, shared_maps):
        np.testing.assert_array_equal(a.binary, b.binary)
        np.testing.assert_array_equal(a.foreground, b.foreground)
        np.testing.assert_array_equal(a.probability, b.probability)


def test_another_guide_or_mask_object_is_computed_again(counted: list[int]) -> None:
    rng = np.random.default_rng(5)
    f = _tensors(rng)[2]
    g, y, mask = _case(rng)
    other = g.copy()
    other[0, 3:11, 4:12, 2:9] = 0.0
    other[0, 0:4, 0:4, 0:4] = 1.0
    with reuse_guide_weights():
        a = sa_scores(f, g, y, layout="channels_last")
        b = sa_scores(f, other, y, layout="channels_last")
        c = sa_scores(f, g, y, mask=mask, layout="channels_last")
        d = sa_scores(f, g, y, layout="channels_last")
    assert len(counted) == 3
    np.testing.assert_array_equal(b.score, sa_scores(f, other, y, layout="channels_last").score)
    np.testing.assert_array_equal(c.score, sa_scores(f, g, y, mask=mask, layout="channels_last").score)
    np.testing.assert_array_equal(a.score, d.score)
    assert not np.array_equal(a.tp, b.tp)


def test_the_block_ends_with_its_cache(counted: list[int]) -> None:
    rng = np.random.default_rng(2)
    f = _tensors(rng)[0]
    g, y, _ = _case(rng)
    with reuse_guide_weights():
        sa_scores(f, g, y, layout="channels_last")
        with reuse_guide_weights():  # a nested block starts empty
            sa_scores(f, g, y, layout="channels_last")
        sa_scores(f, g, y, layout="channels_last")
    sa_scores(f, g, y, layout="channels_last")
    assert len(counted) == 3


def test_reference_size_is_counted_once_per_reference_and_grid(monkeypatch):
    """Inside the block, ``|ref|`` is counted for the first tensor on a reference only: the
    identity-grid tensors (counted as projected) take it from the block's cache, the resized
    one's decisions skip it (``count_ref=False``), and the scores equal those computed alone."""
    import engine._kernels.channels_last as _clk
    import engine.scores as _scores

    rng = np.random.default_rng(11)
    g = np.zeros((2, 12, 10, 8), np.float32)
    g[:, 3:9, 2:8, 2:6] = 1
    ref = rng.random(g.shape) > 0.5
    feats = [rng.standard_normal((2, 12, 10, 8, 9), dtype=np.float32),  # identity grid, counted as projected
             rng.standard_normal((2, 6, 5, 4, 5), dtype=np.float32),  # resized: decide()
             rng.standard_normal((2, 12, 10, 8, 8), dtype=np.float32)]
    flags = []
    real, real_count = _clk.decide, _scores._count_ref
    monkeypatch.setattr(_clk, "decide", lambda *a, **k: flags.append(k.get("count_ref", True)) or real(*a, **k))
    monkeypatch.setattr(_scores, "_count_ref", lambda r: flags.append("counted") or real_count(r))
    with reuse_guide_weights():
        shared = [sa_scores(f, g, ref, layout="channels_last") for f in feats]
    assert flags == ["counted", False]
    alone = [sa_scores(f, g, ref, layout="channels_last") for f in feats]
    for s, a in zip(shared, alone):
        np.testing.assert_array_equal(s.score, a.score)
        np.testing.assert_array_equal(s.fn, a.fn)
    flags.clear()
    with reuse_guide_weights():  # another reference object: counted again
        sa_scores(feats[1], g, ref, layout="channels_last")
        sa_scores(feats[0], g, ref, layout="channels_last")
        sa_scores(feats[0], g, ref.copy(), layout="channels_last")
    assert flags == [True, "counted"]
