"""engine.resize against the literal twin (tests/naive.py) and torch.nn.functional.interpolate."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import resize
from tests import naive

SETTINGS = settings(max_examples=25, deadline=None)

shapes = st.integers(1, 3).flatmap(
    lambda nd: st.tuples(
        st.lists(st.integers(1, 7), min_size=nd, max_size=nd),
        st.lists(st.integers(1, 9), min_size=nd, max_size=nd),
    )
)


def _torch_linear(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    torch = pytest.importorskip("torch")
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
    t = torch.from_numpy(np.ascontiguousarray(x))
    out = torch.nn.functional.interpolate(t, size=tuple(shape), mode=mode, align_corners=False)
    return out.numpy()


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1))
def test_twin_resize_matches_torch(sizes: tuple[list[int], list[int]], seed: int) -> None:
    src, dst = sizes
    x = np.random.default_rng(seed).normal(size=(2, 3, *src))
    np.testing.assert_allclose(naive.resize_linear(x, tuple(dst)), _torch_linear(x, tuple(dst)), rtol=0, atol=1e-12)


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1))
def test_resize_linear_matches_twin(sizes: tuple[list[int], list[int]], seed: int) -> None:
    src, dst = sizes
    x = np.random.default_rng(seed).normal(size=(2, *src))
    np.testing.assert_allclose(resize.resize_linear(x, tuple(dst)), naive.resize_linear(x, tuple(dst)), atol=1e-12)


@pytest.mark.parametrize(
    "src,dst",
    [((23,), (181,)), ((28,), (217,)), ((23, 28), (181, 217)), ((5, 6, 7), (18, 11, 23)), ((181, 217), (23, 28))],
)
def test_resize_linear_matches_torch_odd_ratios(src: tuple[int, ...], dst: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).normal(size=(1, 2, *src))
    np.testing.assert_allclose(resize.resize_linear(x, dst), _torch_linear(x, dst), atol=1e-12)


def test_resize_linear_float32_close_to_torch_float32() -> None:
    x = np.random.default_rng(1).normal(size=(1, 1, 23, 28)).astype(np.float32)
    out = resize.resize_linear(x, (181, 217))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _torch_linear(x, (181, 217)), atol=1e-5)


@SETTINGS
@given(shapes)
def test_resize_nearest_matches_torch_and_twin(sizes: tuple[list[int], list[int]]) -> None:
    torch = pytest.importorskip("torch")
    src, dst = sizes
    x = np.arange(np.prod(src), dtype=np.float32).reshape(1, 1, *src)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=tuple(dst), mode="nearest").numpy()
    np.testing.assert_array_equal(resize.resize_nearest(x, tuple(dst)), expected)
    np.testing.assert_array_equal(naive.resize_nearest(x, tuple(dst)), expected)


@pytest.mark.parametrize("n_in,n_out", [(181, 128), (128, 181), (217, 23), (3, 7), (100, 300)])
def test_nearest_indices_match_torch(n_in: int, n_out: int) -> None:
    torch = pytest.importorskip("torch")
    x = torch.arange(n_in, dtype=torch.float32).reshape(1, 1, n_in)
    expected = torch.nn.functional.interpolate(x, size=n_out, mode="nearest").numpy().ravel().astype(np.int64)
    np.testing.assert_array_equal(resize.nearest_indices(n_in, n_out), expected)


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1))
def test_resize_area_matches_twin(sizes: tuple[list[int], list[int]], seed: int) -> None:
    src, dst = sizes
    x = np.random.default_rng(seed).random(size=(2, *src))
    np.testing.assert_allclose(resize.resize_area(x, tuple(dst)), naive.resize_area(x, tuple(dst)), atol=1e-12)


def test_resize_area_matches_torch_area_for_integer_ratios() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).random(size=(1, 1, 12, 18))
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(4, 6), mode="area").numpy()
    np.testing.assert_allclose(resize.resize_area(x, (4, 6)), expected, atol=1e-12)


def test_area_matrix_rows_sum_to_one_and_preserve_mass() -> None:
    a = resize.area_matrix(181, 23)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    # every input cell is covered exactly once in total
    np.testing.assert_allclose(a.sum(axis=0) * 181 / 23, 1.0, atol=1e-12)


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1))
def test_adjoint_is_transpose(sizes: tuple[list[int], list[int]], seed: int) -> None:
    src, dst = sizes
    rng = np.random.default_rng(seed)
    x = rng.normal(size=src)
    w = rng.normal(size=dst)
    lhs = float((resize.adjoint_linear(w, tuple(src)) * x).sum())
    rhs = float((w * naive.resize_linear(x, tuple(dst))).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


def test_linear_weights_identity_and_cached_readonly() -> None:
    i0, i1, w0, w1 = resize.linear_weights(5, 5)
    assert i0.tolist() == list(range(5)) and i1.tolist() == list(range(5))
    assert w0.tolist() == [1.0] * 5 and w1.tolist() == [0.0] * 5
    assert resize.linear_weights(23, 181)[0] is resize.linear_weights(23, 181)[0]
    with pytest.raises(ValueError):
        resize.linear_weights(23, 181)[2][0] = 3.0


def test_column_sums_equal_adjoint_of_ones() -> None:
    np.testing.assert_allclose(resize.linear_column_sums(7, 19), resize.adjoint_linear(np.ones(19), (7,)), atol=1e-12)


@pytest.mark.parametrize("n_in,n_out", [(0, 3), (3, 0), (-1, 2)])
def test_bad_sizes_raise(n_in: int, n_out: int) -> None:
    with pytest.raises(ValueError, match="n_in"):
        resize.linear_weights(n_in, n_out)


def test_bad_target_shape_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        resize.resize_linear(np.zeros((3, 4)), (2, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        resize.resize_nearest(np.zeros((3, 4)), (0, 2))


# --------------------------------------------------------------------------- the Numba resize
def _resize_linear_numpy(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The axis-by-axis NumPy resize that ``resize_linear`` replaced: its exact twin.

    Each resized axis in turn (first to last) becomes ``take(x, i0)·w0 + take(x, i1)·w1`` in
    float64 with :func:`engine.resize.linear_weights`; axes of unchanged size are skipped;
    float32 inputs give float32 results (rounded once at the end).
    """
    array = np.asarray(array)
    out_dtype = np.float32 if array.dtype == np.float32 else np.float64
    out = array.astype(np.float64, copy=False)
    first = array.ndim - len(shape)
    for k, n_out in enumerate(shape):
        axis = first + k
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        i0, i1, w0, w1 = resize.linear_weights(n_in, n_out)
        bshape = [1] * out.ndim
        bshape[axis] = n_out
        with np.errstate(invalid="ignore"):  # Inf·0 is NaN, in the kernel as here
            out = np.take(out, i0, axis=axis) * w0.reshape(bshape) + np.take(out, i1, axis=axis) * w1.reshape(bshape)
    return np.asarray(out, dtype=out_dtype)


@st.composite
def resize_cases(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, ...]]:
    """1-3 resized axes (up, down or unchanged each), 0-2 leading (channel/batch) axes, float32,
    float64 or integer data, some non-contiguous, some holding NaN and Inf."""
    nd = draw(st.integers(1, 3))
    hi = 9 if nd < 3 else 6
    src = tuple(draw(st.lists(st.integers(1, hi), min_size=nd, max_size=nd)))
    dst = tuple(draw(st.lists(st.integers(1, 2 * hi), min_size=nd, max_size=nd)))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["float32", "float64", "int16", "bool"]))
    if kind == "int16":
        x = rng.integers(-300, 300, size=lead + src).astype(np.int16)
    elif kind == "bool":
        x = rng.random(lead + src) > 0.5
    else:
        x = (rng.normal(size=lead + src) * 10.0).astype(kind)
        if draw(st.booleans()) and x.size > 1:
            flat = x.reshape(-1)
            flat[rng.integers(0, x.size)] = np.nan
            flat[rng.integers(0, x.size)] = np.inf
    if draw(st.booleans()):  # a non-contiguous view holding the same values
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        x = big[..., ::2]
    return x, dst


@settings(max_examples=60, deadline=None)
@given(resize_cases())
def test_resize_linear_kernel_is_bit_identical_to_numpy_twin(case: tuple[np.ndarray, tuple[int, ...]]) -> None:
    x, dst = case
    out = resize.resize_linear(x, dst)
    expected = _resize_linear_numpy(x, dst)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)  # NaN where the twin has NaN, every bit otherwise
    if np.isfinite(x).all():
        np.testing.assert_allclose(out, naive.resize_linear(x, dst), rtol=1e-6 if x.dtype == np.float32 else 1e-12,
                                   atol=1e-4 if x.dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("src,dst", [
    ((181, 217, 181), (128, 128, 128)),  # Colin27 into deepbrain's input grid
    ((128, 128, 128), (181, 217, 181)),  # its prediction back to the reference grid
    ((23, 28), (181, 217)),
    ((256, 256), (64, 300)),
])
def test_resize_linear_kernel_on_real_sizes(src: tuple[int, ...], dst: tuple[int, ...]) -> None:
    x = np.random.default_rng(3).random((1, *src), dtype=np.float32)
    np.testing.assert_array_equal(resize.resize_linear(x, dst), _resize_linear_numpy(x, dst))


def test_resize_linear_does_not_depend_on_the_thread_count() -> None:
    numba = pytest.importorskip("numba")
    x = np.random.default_rng(4).normal(size=(2, 19, 23, 17))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = resize.resize_linear(x, (31, 7, 40))
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = resize.resize_linear(x, (31, 7, 40))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
