"""Layer-level counts on an identity grid counted as they are projected (issue 15).

``channels_last.project_counts`` decides ``F·(P-N) > mid`` without storing the source-grid map
``z``, eight positions at a time (``engine._kernels.simd.project_count_rows``, from eight
channels on; fewer keep the two-step path, which is faster there). It must give the counts of
the two-step path it replaces on an identity grid (``prototypes(want_z=True)`` then
``decide``), for whole and partial blocks of channels, a tile cut short, a sample whose
prototypes are undefined, exact ties (strictly greater counts), 1 and 2 threads, and through
``sa_scores`` with and without a ``reuse_guide_weights`` block (where ``|ref|`` comes from the
block's cache).
"""
from __future__ import annotations

import numpy as np
import pytest

from engine._kernels import channels_last as cl
from engine._kernels._common import _EMPTY_FOREGROUND, _OK
from engine.scores import reuse_guide_weights, sa_scores
from tests.engine.test_binary_guide_sums import SPATIAL, _features, _guide, _identity_weights
from tests.engine.test_guide_weights_parallel import _threads


def _prototypes(F: np.ndarray, g: np.ndarray, want_z: bool) -> tuple[np.ndarray, ...]:
    """``channels_last.prototypes`` on the identity grid: (P, N, status, mid, z)."""
    B, S, C = F.shape
    m = np.ones((1, 1, 1, 1), np.float32)
    gw = cl.guide_weights(g, m, False, True, SPATIAL, _identity_weights())
    P, N = np.empty((B, C)), np.empty((B, C))
    status, mid, bad = np.empty(B, np.uint8), np.empty(B), np.zeros(B, np.int64)
    z = np.empty((B, S if want_z else 0))
    cl.prototypes(F, g, m, False, gw, want_z, P, N, status, mid, bad, z)
    return P, N, status, mid, z


def _two_step(F: np.ndarray, g: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, ...]:
    """(P, N, status, mid, npos, tp, ny) the way they were counted before: z stored, then decided."""
    P, N, status, mid, z = _prototypes(F, g, True)
    npos, tp, ny = (np.zeros(F.shape[0], np.int64) for _ in range(3))
    none = np.empty((0, 0, 0, 0))
    cl.decide(z, mid, status, ref, True, False, True, SPATIAL, SPATIAL, _identity_weights(), npos, tp, ny,
              none.astype(np.bool_), none.astype(np.float32))
    return P, N, status, mid, npos, tp, ny


def _fused(F: np.ndarray, g: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, ...]:
    """(status, npos, tp) counted as projected (``project_counts``)."""
    B = F.shape[0]
    P, N, status, mid, _ = _prototypes(F, g, False)
    npos = np.full(B, -1, np.int64)
    tp = np.full(B, -1, np.int64)
    cl.project_counts(F, P, N, status, mid, ref.reshape(B, -1), npos, tp)
    return status, npos, tp


def _reference(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A reference that agrees with the guide on most positions (uint8)."""
    ref = (g > 0.5).astype(np.uint8)
    flip = rng.random(ref.shape) < 0.1
    ref[flip] = 1 - ref[flip]
    return ref


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("C", [8, 15, 16, 37])
def test_counts_equal_the_two_step_path(C: int, threads: int) -> None:
    rng = np.random.default_rng(C)
    g = _guide("band")
    F = _features(rng, C)
    ref = _reference(g, rng)
    want = _two_step(F, g, ref)
    with _threads(threads):
        status, npos, tp = _fused(F, g, ref)
    assert (status == _OK).all() and (want[4] > 0).all() and (want[5] > 0).all()
    np.testing.assert_array_equal(npos, want[4])
    np.testing.assert_array_equal(tp, want[5])


@pytest.mark.parametrize("C", [8, 11])
def test_ties_are_not_positives(C: int) -> None:
    """Exact ties: the foreground alternates (2, 1, 0, ...) and (6, -1, 0, ...) (mean P = (4, 0,
    ...)), the background is 0 (N = 0), so mid = 8 and every (2, 1, 0, ...) position has z = 8
    exactly, in any order of summation. A tie is no positive on either path (``z > mid``):
    the vector compare (eight positions) and the last positions' scalar one."""
    rng = np.random.default_rng(3)
    g = _guide("blob")
    B, S = 2, int(np.prod(SPATIAL))
    gf = g.reshape(B, -1)
    F = np.zeros((B, S, C), np.float32)
    for b in range(B):
        gf[b, -1] = 1.0  # the last position (the last tile's one position after its groups of eight) ties
        fg = np.flatnonzero(gf[b] > 0.5)
        if len(fg) % 2:  # an even number of foreground positions: pairs of the two points
            gf[b, fg[0]] = 0.0
            fg = fg[1:]
        F[b, fg[1::2], :2] = (2.0, 1.0)  # fg[-1] = S - 1 among them
        F[b, fg[0::2], :2] = (6.0, -1.0)
    ref = _reference(g, rng)
    P, N, status, mid, npos, tp, _ = _two_step(F, g, ref)
    np.testing.assert_array_equal(mid, [8.0, 8.0])
    z = (F.astype(np.float64) @ (P - N)[:, :, None])[..., 0]
    assert ((z == 8.0).sum(axis=1) > 100).all(), "the case must hold exact ties"
    _, npos2, tp2 = _fused(F, g, ref)
    np.testing.assert_array_equal(npos2, npos)
    np.testing.assert_array_equal(tp2, tp)
    np.testing.assert_array_equal(npos2, (z > 8.0).sum(axis=1))
    assert (z[:, -1] == 8.0).all()


def test_a_sample_without_prototypes_has_no_positives() -> None:
    rng = np.random.default_rng(5)
    g = _guide("blob")
    g[1] = 0.0  # no foreground in sample 1
    F = _features(rng, 8)
    ref = _reference(g, rng)
    status, npos, tp = _fused(F, g, ref)
    assert status[0] == _OK and status[1] == _EMPTY_FOREGROUND
    assert npos[1] == 0 and tp[1] == 0 and npos[0] == _two_step(F, g, ref)[4][0]


@pytest.mark.parametrize("reuse", [False, True])
def test_sa_scores_on_an_identity_grid(reuse: bool) -> None:
    """Through ``sa_scores``: the scores of the counts of the two-step path (with ``|ref|``
    counted, or taken from the block's cache for the second tensor)."""
    rng = np.random.default_rng(11)
    g = _guide("band")
    ref = _reference(g, rng) > 0
    feats = [_features(rng, C).reshape(2, *SPATIAL, C) for C in (4, 8, 12)]
    want = []
    for f in feats:
        _, _, status, _, npos, tp, ny = _two_step(f.reshape(2, -1, f.shape[-1]), g, ref.astype(np.uint8))
        want.append(np.where(status == _OK, 2.0 * tp / (npos + ny), np.nan))
    if reuse:
        with reuse_guide_weights():
            got = [sa_scores(f, g, ref, layout="channels_last").score for f in feats]
    else:
        got = [sa_scores(f, g, ref, layout="channels_last").score for f in feats]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_fewer_than_eight_channels_are_refused() -> None:
    rng = np.random.default_rng(2)
    g = _guide("blob")
    F = _features(rng, 3)
    with pytest.raises(ValueError, match="at least 8 channels; received 3"):
        _fused(F, g, _reference(g, rng))
