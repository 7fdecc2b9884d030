"""engine._kernels.vmath.log, the branch-free logarithm the baselines vectorise, against np.log."""
from __future__ import annotations

import numpy as np
import pytest

from engine._kernels.vmath import log_into


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in units of the last place of ``want`` (log(1) = 0 has its own test)."""
    return np.abs(got - want) / np.spacing(np.abs(want))


def _log(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    log_into(x, out)
    return out


def _values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261207)  # fixed: the same values on every run
    tiny = np.array([5e-324, 1e-320, 2.2250738585072009e-308, 2.2250738585072014e-308])
    edges = np.array([np.sqrt(2.0), np.sqrt(2.0) / 2, np.nextafter(np.sqrt(2.0), 0), np.nextafter(np.sqrt(2.0), 3),
                      0.5, 2.0, 0.75, np.nextafter(1.0, 0), np.nextafter(1.0, 2), 1e300, 1.7976931348623157e308])
    return {
        "uniform (0, 1)": rng.random(200_000) + 1e-300,
        "float32 probabilities and 1 - p": np.concatenate([
            (p := rng.random(100_000).astype(np.float32).astype(np.float64)), 1.0 - p[p < 1.0]]),
        "near 1": 1.0 + rng.uniform(-1e-6, 1e-6, 100_000),
        "every exponent": np.exp(rng.uniform(-744.0, 709.0, 200_000)),
        "subnormals": rng.uniform(0.0, 2.2250738585072014e-308, 10_000) + 5e-324,
        "powers of two": np.ldexp(1.0, np.arange(-1074, 1024)),
        "edges": np.concatenate([tiny, edges]),
    }


@pytest.mark.parametrize("name", list(_values()))
def test_log_is_within_one_ulp_of_numpy(name):
    x = _values()[name]
    x = x[(x != 1.0) & (x > 0)]
    got, want = _log(x), np.log(x)
    assert np.isfinite(got).all()
    worst = int(np.argmax(_ulps(got, want)))
    assert _ulps(got, want).max() <= 1.0, f"{name}: log({x[worst]!r}) = {got[worst]!r}, np.log gives {want[worst]!r}"


def test_log_of_one_is_zero_and_signs_follow_the_input():
    assert _log(np.array([1.0]))[0] == 0.0
    x = np.array([0.25, 0.999, 1.001, 4.0])
    assert np.array_equal(np.sign(_log(x)), [-1.0, -1.0, 1.0, 1.0])
