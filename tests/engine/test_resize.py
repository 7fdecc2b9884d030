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
