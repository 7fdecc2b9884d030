"""The reversed-axes copy (``engine._kernels.layout.reverse_copy``, 8×8 blocks transposed in
vector registers by ``engine._kernels.simd.transpose8``) against its twin,
``np.ascontiguousarray`` of the reversed view: every dtype pair with a vector path, sizes with
and without whole blocks, values that the casts round, wrap or overflow; and
``engine.datasets._c_order`` taking it only where it applies."""
from __future__ import annotations

import numpy as np
import pytest

import engine.datasets as datasets
from engine._kernels import layout

SOURCES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64]
TARGETS = [np.float32, np.uint8, np.uint16]
# (A, B, C) of the volume: whole blocks only, remainders on one or both axes, fewer than 8
SHAPES = [(16, 3, 8), (17, 2, 11), (8, 1, 23), (5, 4, 6), (24, 2, 9)]


def _values(dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A volume of ``dtype`` whose values exercise the casts: the dtype's extremes, values a
    float32 rounds (2**24 + 1, 0.1), negatives for unsigned targets (NumPy wraps them)."""
    rng = np.random.default_rng(7)  # fixed: the same values in every run
    n = int(np.prod(shape))
    dt = np.dtype(dtype)
    if dt.kind == "f":
        v = rng.normal(size=n) * 1e3
        v[:6] = [0.1, -0.0, 1.0 + 2.0 ** -30, 2.0 ** 24 + 1, 3.4e38 * 2 if dt.itemsize == 8 else 7.0, -2.5]
    else:
        info = np.iinfo(dt)
        v = rng.integers(info.min, int(info.max) + 1, size=n, dtype=np.int64)
        v[:3] = [info.min, info.max, 0]
        if info.max > 2 ** 24:
            v[3] = 2 ** 24 + 1  # rounds to even in float32
    with np.errstate(over="ignore"):
        return v.astype(dt).reshape(shape)


def _fortran(values: np.ndarray) -> np.ndarray:
    """The volume stored first axis fastest, as a NIfTI file holds it."""
    return np.asfortranarray(values)


PAIRS = [(s, t) for s in SOURCES for t in TARGETS if layout.supported(np.dtype(s), np.dtype(t))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("src, dst", PAIRS)
def test_reverse_copy_equals_numpy(src, dst, shape):
    a = _fortran(_values(src, shape))
    out = np.full(shape, 99, dtype=dst)
    layout.reverse_copy(a.T, out)
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.ascontiguousarray(a, dtype=dst)
    assert out.tobytes() == want.tobytes()


def test_supported_pairs():
    assert layout.supported(np.uint8, np.float32) and layout.supported(np.int16, np.uint16)
    assert not layout.supported(np.float64, np.uint8)  # float labels: NumPy's cast
    assert not layout.supported(np.int64, np.float32) and not layout.supported(np.uint8, np.float64)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = layout.reverse_copy

    def spy(m, out):
        calls.append(out.shape)
        return real(m, out)

    monkeypatch.setattr(layout, "reverse_copy", spy)
    return calls


@pytest.mark.parametrize("src, dst", [(np.uint8, np.float32), (np.int16, np.float32), (np.uint8, np.uint8),
                                      (np.float64, np.float32)])
def test_c_order_takes_the_vector_path_for_reversed_volumes(monkeypatch, src, dst):
    calls = _spy(monkeypatch)
    vol = _fortran(_values(src, (19, 5, 10)))
    image = vol[None]  # (1, X, Y, Z) as _to_channels_first gives it
    four = np.moveaxis(np.asfortranarray(np.stack([vol, vol[::-1]], axis=-1)), -1, 0)  # (C, X, Y, Z)
    for a in (vol, image, four):
        with np.errstate(over="ignore"):
            want = np.ascontiguousarray(a, dtype=dst)
        out = datasets._c_order(a, dst)
        assert out.dtype == want.dtype and out.flags.c_contiguous and out.tobytes() == want.tobytes()
    assert calls == [(19, 5, 10), (19, 5, 10), (19, 5, 10), (19, 5, 10)]


@pytest.mark.parametrize("case", ["big-endian", "strided", "float-labels", "int64"])
def test_c_order_falls_back_where_no_vector_path_applies(monkeypatch, case):
    calls = _spy(monkeypatch)
    base = _fortran(_values(np.int16, (18, 4, 12)))
    dst = np.float32
    if case == "big-endian":
        a = base.astype(">i2")
    elif case == "strided":
        a = _fortran(_values(np.int16, (18, 4, 24)))[:, :, ::2]  # reversed strides, not contiguous
    elif case == "float-labels":
        a, dst = np.abs(base).astype(np.float64) % 200, np.uint8
    else:
        a = base.astype(np.int64)
    out = datasets._c_order(a, dst)
    assert out.tobytes() == np.ascontiguousarray(a, dtype=dst).tobytes()
    assert calls == []
