"""Concatenations scored from their parts (``sa_scores_concat``, issue 15).

The concatenation's prototypes and unit scores are its blocks' side by side, its layer map
the sum of theirs: every result must equal ``sa_scores`` on ``np.concatenate`` (the data
are continuous random values, so no decision ties to the last bit of float64 and the
comparison is exact), and the blocks' results ``sa_scores`` on each block.
"""
from __future__ import annotations

import numpy as np
import pytest

import engine._kernels.channels_last as cl
from engine.errors import NonFiniteFeaturesError
from engine.scores import reuse_guide_weights, sa_scores, sa_scores_concat
from engine.status import Status


def _same(a, b) -> None:
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert x.level == y.level
        np.testing.assert_array_equal(x.score, y.score)
        np.testing.assert_array_equal(x.status, y.status)
        for f in ("tp", "fp", "fn"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def _guide(rng, shape, kind):
    g = np.zeros(shape, np.float32)
    sl = tuple(slice(s // 4, 3 * s // 4) for s in shape[1:])
    g[(slice(None),) + sl] = 1
    if kind == "soft":
        g = np.clip(g * 0.8 + rng.random(shape, dtype=np.float32) * 0.2, 0, 1)
    return g


CASES = [  # (feature grid, guide grid, channels per block)
    ((9, 8, 7), (9, 8, 7), (3, 5)),        # identity grid, 3-D
    ((5, 4, 4), (9, 8, 7), (4, 2, 3)),     # resized, three blocks
    ((6, 7), (12, 13), (2, 6)),            # 2-D, resized
    ((16, 12), (16, 12), (1, 1)),          # single-channel blocks
]


@pytest.mark.parametrize("level", ["layer", "unit", "both"])
@pytest.mark.parametrize("grid,target,chans", CASES)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_channels_last_equals_direct(grid, target, chans, level, kind):
    rng = np.random.default_rng(len(grid) * 10 + sum(chans))
    B = 3
    blocks = [np.maximum(rng.standard_normal((B, *grid, c), dtype=np.float32), 0) for c in chans]
    g = _guide(rng, (B, *target), kind)
    ref = rng.random((B, *target)) > 0.5
    each, whole = sa_scores_concat(blocks, g, ref, level=level, layout="channels_last")
    _same(whole, sa_scores(np.concatenate(blocks, axis=-1), g, ref, level=level, layout="channels_last"))
    assert len(each) == len(blocks)
    for b, r in zip(blocks, each):
        _same(r, sa_scores(b, g, ref, level=level, layout="channels_last"))


def test_channels_first_views_of_channels_last_memory_take_the_fast_path(monkeypatch):
    """The model card hands out channels-first views of NDHWC outputs: the blocks' maps are
    kept and added, the concatenation is never swept (no ``project_range`` call for it)."""
    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((2, 6, 6, 5, c), dtype=np.float32) for c in (3, 4)]
    whole = np.concatenate(blocks, axis=-1)
    g = _guide(rng, (2, 6, 6, 5), "hard")
    ref = rng.random(g.shape) > 0.4
    swept = []
    real = cl.prototypes
    monkeypatch.setattr(cl, "prototypes", lambda F, *a: swept.append(F.shape[-1]) or real(F, *a))
    views = [np.moveaxis(b, -1, 1) for b in blocks]
    each, res = sa_scores_concat(views, g, ref, whole=np.moveaxis(whole, -1, 1), level="both")
    assert swept == [3, 4]  # the blocks only
    _same(res, sa_scores(np.moveaxis(whole, -1, 1), g, ref, level="both"))


@pytest.mark.parametrize("give_whole", [False, True])
def test_channels_first_contiguous_scores_the_whole_directly(give_whole):
    rng = np.random.default_rng(4)
    blocks = [rng.standard_normal((2, c, 10, 9), dtype=np.float32) for c in (2, 3)]
    whole = np.concatenate(blocks, axis=1)
    g = _guide(rng, (2, 20, 18), "soft")
    ref = rng.random(g.shape) > 0.5
    each, res = sa_scores_concat(blocks, g, ref, whole=whole if give_whole else None, level="both")
    _same(res, sa_scores(whole, g, ref, level="both"))
    for b, r in zip(blocks, each):
        _same(r, sa_scores(b, g, ref, level="both"))


def test_mask_and_extent_equal_direct():
    rng = np.random.default_rng(5)
    blocks = [rng.standard_normal((2, 5, 6, 4, c), dtype=np.float32) for c in (2, 3)]
    g = _guide(rng, (2, 9, 11, 7), "hard")
    mask = np.ones_like(g)
    mask[:, :2] = 0
    ref = rng.random(g.shape) > 0.5
    kw = dict(mask=mask, level="both", layout="channels_last", extent=(10, 12, 8))
    each, res = sa_scores_concat(blocks, g, ref, **kw)
    _same(res, sa_scores(np.concatenate(blocks, axis=-1), g, ref, **kw))
    _same(each[1], sa_scores(blocks[1], g, ref, **kw))


def test_undefined_prototypes_keep_their_status():
    rng = np.random.default_rng(6)
    blocks = [rng.standard_normal((3, 6, 5, c), dtype=np.float32) for c in (2, 2)]
    g = _guide(rng, (3, 6, 5), "hard")
    g[1] = 0  # no foreground in sample 1
    g[2] = 1  # no background in sample 2
    ref = g > 0
    each, res = sa_scores_concat(blocks, g, ref, level="both", layout="channels_last")
    direct = sa_scores(np.concatenate(blocks, axis=-1), g, ref, level="both", layout="channels_last")
    _same(res, direct)
    assert res[0].status[1] == Status.EMPTY_FOREGROUND and res[0].status[2] == Status.EMPTY_BACKGROUND
    assert np.isnan(res[0].score[1:]).all()


def test_nonfinite_block_names_itself_or_is_skipped():
    rng = np.random.default_rng(7)
    blocks = [rng.standard_normal((3, 6, 5, c), dtype=np.float32) for c in (2, 3)]
    blocks[1][1, 2, 3, 0] = np.nan
    g = _guide(rng, (3, 6, 5), "hard")
    ref = g > 0
    with pytest.raises(NonFiniteFeaturesError) as info:
        sa_scores_concat(blocks, g, ref, layout="channels_last")
    assert info.value.block == 1 and info.value.sample == 1
    each, res = sa_scores_concat(blocks, g, ref, level="both", layout="channels_last", nonfinite="skip")
    direct = sa_scores(np.concatenate(blocks, axis=-1), g, ref, level="both", layout="channels_last",
                       nonfinite="skip")
    _same(res, direct)
    assert res[0].status[1] == Status.NONFINITE and (res[1].status[1] == Status.NONFINITE).all()
    assert each[0][0].status[1] == Status.OK  # the finite block keeps its own score


def test_thread_count_does_not_change_the_scores():
    import numba

    rng = np.random.default_rng(8)
    blocks = [np.maximum(rng.standard_normal((1, 40, 30, 20, c), dtype=np.float32), 0) for c in (8, 8)]
    g = _guide(rng, (1, 80, 60, 40), "hard")
    ref = rng.random(g.shape) > 0.5
    before = numba.get_num_threads()
    out = []
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            with reuse_guide_weights():
                out.append(sa_scores_concat(blocks, g, ref, level="both", layout="channels_last")[1])
    finally:
        numba.set_num_threads(before)
    for r in out[1:]:
        _same(r, out[0])


def test_bad_blocks_get_one_line_errors():
    rng = np.random.default_rng(9)
    a = rng.random((1, 4, 4, 2), dtype=np.float32)
    g = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="blocks is empty"):
        sa_scores_concat([], g, g > 0, layout="channels_last")
    with pytest.raises(ValueError, match="share their batch and spatial shape"):
        sa_scores_concat([a, a[:, :3]], g, g > 0, layout="channels_last")
    with pytest.raises(ValueError, match="whole has shape"):
        sa_scores_concat([a, a], g, g > 0, whole=a, layout="channels_last")
    with pytest.raises(TypeError, match="reference is required"):
        sa_scores_concat([a, a], g, None, layout="channels_last")
