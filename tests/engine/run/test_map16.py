"""``engine.run.batch._map16`` gives the bits of NumPy's float16 cast (issue 15)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.run.batch import _map16


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


def _every_float32_exponent(rng: np.random.Generator) -> np.ndarray:
    """Each of the 256 exponents with both signs: mantissas 0, 1, all-ones, random, and those
    around float16's rounding point (the 13 dropped bits at, just below and above one half)."""
    mant = [0, 1, 0x7FFFFF, 0x1000, 0x0FFF, 0x1001, 0x3000, 0x2FFF, 0x3001, 0x2000, 0x7FF000,
            0x400000, 0x000800, 0x0007FF, *rng.integers(0, 1 << 23, 200).tolist()]
    exps = np.arange(256, dtype=np.uint32)
    sign = np.array([0, 1], dtype=np.uint32)
    bits = (sign[:, None, None] << 31) | (exps[None, :, None] << 23) | np.array(mant, np.uint32)[None, None, :]
    return bits.reshape(-1).view(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_as_numpy_cast_everywhere(dtype):
    with np.errstate(all="ignore"):  # overflow to inf warns, as NumPy's cast does
        x = _every_float32_exponent(np.random.default_rng(0)).astype(dtype)
        want = np.asarray(x, dtype=np.float16)
        got = _map16(x)
    assert got.dtype == np.float16 and got.shape == x.shape
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_every_subnormal_result_and_its_ties():
    """All float32 values between float16's rounding boundaries below 2⁻¹⁴: each half-step
    (a tie), and its float32 neighbours."""
    k = np.arange(0, 2049, dtype=np.float64)  # half-steps of 2⁻²⁴ up to 2⁻¹⁴
    ties = (k * 2.0 ** -25).astype(np.float32)
    x = np.concatenate([ties, np.nextafter(ties, np.float32(1)), np.nextafter(ties, np.float32(0)), -ties])
    with np.errstate(all="ignore"):
        want = np.asarray(x, dtype=np.float16)
        got = _map16(x)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_sigmoid_map_3d_and_non_float():
    rng = np.random.default_rng(1)
    d = rng.normal(0, 30, (16, 18, 20)).astype(np.float32)
    with np.errstate(over="ignore"):
        prob = (1 / (1 + np.exp(-d))).astype(np.float32)
    prob[0, 0, :3] = [np.nan, np.inf, -0.0]
    with np.errstate(all="ignore"):
        want = np.asarray(prob, dtype=np.float16)
        got, view = _map16(prob), _map16(prob[:, ::2, 1:])
    np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(_bits(view), _bits(want[:, ::2, 1:]))  # a strided view
    ints = np.arange(5, dtype=np.int32)
    np.testing.assert_array_equal(_map16(ints), ints.astype(np.float16))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_random_float32(values):
    x = np.array(values, dtype=np.float32)
    with np.errstate(all="ignore"):
        want = np.asarray(x, dtype=np.float16)
        got = _map16(x)
    np.testing.assert_array_equal(_bits(got), _bits(want))
