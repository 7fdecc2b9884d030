"""Tests for engine/quality/baseline.py: the label-free baselines against a naive twin."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.quality import baselines

# ----------------------------------------------------------------------------- naive twin


def naive_baselines(p: np.ndarray, threshold: float, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """One case and class at a time, straight from the definitions."""
    B, K = p.shape[:2]
    out = {k: np.full((B, K), np.nan) for k in ("predicted_fraction", "soft_dice", "uncertain_fraction", "mean_entropy")}
    for b in range(B):
        for k in range(K):
            sel = np.ones(p.shape[2:], bool) if mask is None else mask[b].astype(bool)
            v = p[b, k][sel]
            if v.size == 0:
                continue
            pred = v > threshold
            out["predicted_fraction"][b, k] = pred.mean()
            den = v.sum() + pred.sum()
            out["soft_dice"][b, k] = 2 * (v * pred).sum() / den if den > 0 else np.nan
            out["uncertain_fraction"][b, k] = np.mean((v > 0.1) & (v < 0.9))
            h = [0.0 if q in (0.0, 1.0) else -(q * np.log2(q) + (1 - q) * np.log2(1 - q)) for q in v]
            out["mean_entropy"][b, k] = np.mean(h)
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 2), st.integers(1, 5), st.integers(1, 6),
    st.sampled_from([0.3, 0.5, 0.7]), st.booleans(), st.integers(0, 2**31 - 1),
)
def test_baselines_match_naive(B, K, H, W, threshold, use_mask, seed):
    rng = np.random.default_rng(seed)
    p = rng.random((B, K, H, W))
    p[rng.random(p.shape) < 0.3] = 0.0
    p[rng.random(p.shape) < 0.2] = 1.0
    mask = (rng.random((B, H, W)) < 0.6).astype(np.uint8) if use_mask else None
    got = baselines(p, threshold=threshold, mask=mask, class_axis=True)
    if K == 1:  # the pipeline's per-class call
        per_class = baselines(p[:, 0], threshold=threshold, mask=mask)
        for k in got:
            np.testing.assert_array_equal(per_class[k], got[k][:, 0])
    want = naive_baselines(p, threshold, mask)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=k)


def test_baselines_known_values_without_class_axis():
    p = np.array([[[0.0, 1.0], [0.5, 0.5]]])  # one case, 2x2, no class axis
    got = baselines(p)
    assert got["predicted_fraction"].shape == (1,)
    assert got["predicted_fraction"][0] == pytest.approx(0.25)  # only the 1.0 is > 0.5
    assert got["uncertain_fraction"][0] == pytest.approx(0.5)
    assert got["mean_entropy"][0] == pytest.approx(0.5)  # two positions of 1 bit, two of 0
    assert got["soft_dice"][0] == pytest.approx(2 * 1.0 / (2.0 + 1.0))


def test_baselines_empty_prediction_soft_dice_is_nan_not_one():
    got = baselines(np.zeros((2, 1, 4, 4)), class_axis=True)
    assert np.all(np.isnan(got["soft_dice"]))
    assert np.all(got["predicted_fraction"] == 0)


def test_baselines_tolerate_float_rounding_only():
    p = np.array([[1.0 + 1e-7, -1e-7, 0.7, 0.2]], dtype=np.float64)
    got = baselines(p)
    assert got["predicted_fraction"][0] == pytest.approx(0.5)
    assert got["mean_entropy"][0] < 1  # clipped, no NaN from log of a negative number
    with pytest.raises(ValueError, match="range"):
        baselines(np.array([[1.01, 0.5]]))


def test_baselines_empty_mask_gives_nan():
    mask = np.zeros((1, 3, 3), np.uint8)
    got = baselines(np.full((1, 1, 3, 3), 0.7), mask=mask, class_axis=True)
    assert all(np.isnan(v).all() for v in got.values())


@pytest.mark.parametrize(
    "p, kwargs, match",
    [
        (np.full((1, 1, 3, 3), 1.5), {}, "outside"),
        (np.full((1, 1, 3, 3), np.nan), {}, "outside"),
        (np.full((1, 1, 3, 3), 0.5), {"threshold": 1.0}, "threshold"),
        (np.full((1, 3), 0.5), {}, "shape"),
        (np.full((1, 1, 3, 3), 0.5), {"mask": np.ones((2, 2))}, "mask"),
    ],
)
def test_baselines_bad_input(p, kwargs, match):
    with pytest.raises(ValueError, match=match):
        baselines(p, class_axis=True, **kwargs)


def _long_probabilities() -> tuple[np.ndarray, np.ndarray]:
    """Two cases of 2 chunks and an odd remainder (the vector loop's body and its tail),
    with exact 0 and 1, values float32 resizing overshoots by, and every region of p."""
    rng = np.random.default_rng(7)  # fixed: the same values on every run
    n = 2 * 65536 + 1003
    p = rng.random((2, 1, n))
    p[rng.random(p.shape) < 0.1] = 0.0
    p[rng.random(p.shape) < 0.1] = 1.0
    p[0, 0, :5] = [1.0 + 1e-7, -1e-7, 0.1, 0.9, 0.5]
    mask = (rng.random((2, n)) < 0.8).astype(np.uint8)
    return p, mask


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_baselines_match_naive_over_whole_chunks(dtype):
    p, mask = _long_probabilities()
    p = p.astype(dtype)
    got = baselines(p, threshold=0.5, mask=mask, class_axis=True)
    want = naive_baselines(np.clip(p.astype(np.float64), 0.0, 1.0), 0.5, mask)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=0, err_msg=k)


def test_baselines_do_not_depend_on_the_thread_count():
    import numba

    p, mask = _long_probabilities()
    before = numba.get_num_threads()
    runs = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            runs.append(baselines(p, mask=mask, class_axis=True))
    finally:
        numba.set_num_threads(before)
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), k


def test_baselines_error_names_the_range_of_the_finite_values():
    p = np.array([[0.25, np.nan, 1.5, np.inf, 0.5]])
    with pytest.raises(ValueError, match=r"range 0\.25 to 1\.5\)"):
        baselines(p)


def test_baselines_of_a_confident_output_match_naive():
    """Mostly exact 0s and 1s (a trained network's output): blocks without any entropy are
    skipped; the few positions strictly inside (0, 1), at block edges and in the chunk's
    last partial block, must still count."""
    n = 65536 + 4 * 32 + 7
    p = np.zeros((1, 1, n))
    p[0, 0, 1000:40000] = 1.0
    inner = [31, 32, 63, 64, 5000, 39999, 65536 + 33, n - 1]
    p[0, 0, inner] = np.linspace(0.05, 0.95, len(inner))
    got = baselines(p, class_axis=True)
    want = naive_baselines(p, 0.5, None)
    assert got["mean_entropy"][0, 0] > 0
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=0, err_msg=k)
