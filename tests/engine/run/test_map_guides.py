"""Saved maps share the guide's weights across a part's tensors (issue 15)."""
from __future__ import annotations

import numpy as np

import engine._kernels.channels_last as cl
from engine.run.batch import _Targets
from engine.scores import protoseg, reuse_guide_weights


def _targets(rng: np.random.Generator) -> _Targets:
    g = (rng.random((2, 12, 10, 8)) > 0.6).astype(np.float32)
    return _Targets(prob=g[:, None], pred=g[:, None] > 0, gt=None, guides=[g], refs=[g > 0])


def test_map_guide_is_one_view_per_class_and_row():
    tg = _targets(np.random.default_rng(0))
    a, b = tg.map_guide(0, 1), tg.map_guide(0, 1)
    assert a is b and np.shares_memory(a, tg.guides[0])
    np.testing.assert_array_equal(a, tg.guides[0][1:2])
    assert tg.map_guide(0, 0) is not a


def test_maps_of_a_part_compute_the_guide_weights_once_per_grid(monkeypatch):
    """Channels-last tensors on a coarser grid, maps of row 1 as ``_tensor_maps`` draws them:
    the layer and unit maps of every tensor pay for the guide's weights once, and equal the
    maps computed without sharing."""
    rng = np.random.default_rng(1)
    tg = _targets(rng)
    tensors = [rng.standard_normal((2, 6, 5, 4, c)).astype(np.float32) for c in (3, 5)]
    calls = []
    real = cl.guide_weights
    monkeypatch.setattr(cl, "guide_weights", lambda *a: calls.append(1) or real(*a))

    def maps(guide):
        out = []
        for f in tensors:
            cf = np.moveaxis(f, -1, 1)  # the channels-first view the card hands out
            out.append(protoseg(cf[1:2], guide(), nonfinite="skip"))
            out += [protoseg(cf[1:2, u:u + 1], guide(), nonfinite="skip") for u in (0, 2)]
        return out

    with reuse_guide_weights():
        shared = maps(lambda: tg.map_guide(0, 1))
    assert len(calls) == 1
    calls.clear()
    alone = maps(lambda: tg.guides[0][1:2])
    assert len(calls) == len(alone) == 6
    for s, a in zip(shared, alone):
        np.testing.assert_array_equal(s.binary, a.binary)
        np.testing.assert_array_equal(s.probability.view(np.uint32), a.probability.view(np.uint32))
