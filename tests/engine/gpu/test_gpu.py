"""The GPU path's host side, without a GPU: backend choice, OrtValue views, the adjoint
taps, the CPU twins against the production kernels and a NumPy reference, the self-check's
comparison. The device kernels themselves run in :mod:`.test_simulator`."""
from __future__ import annotations

import numpy as np
import pytest

from engine import gpu
from engine._kernels import cuda as K
from engine.resize import linear_weights, resize_linear
from engine.scores import sa_scores
from engine.status import Status


class FakeOrtValue:
    """What :func:`engine.gpu.cuda_array_interface` reads from an onnxruntime OrtValue."""

    def __init__(self, arr: np.ndarray, kind: str = "tensor(float)", ptr: int = 0x7F00_0000_1000) -> None:
        self.arr, self.kind, self.ptr = arr, kind, ptr

    def data_ptr(self) -> int:
        return self.ptr

    def shape(self) -> list[int]:
        return list(self.arr.shape)

    def data_type(self) -> str:
        return self.kind

    def numpy(self) -> np.ndarray:
        return self.arr


# --------------------------------------------------------------------------- OrtValue views
def test_cuda_array_interface_from_an_ortvalue():
    v = FakeOrtValue(np.zeros((2, 8, 4, 4), np.float32))
    desc = gpu.cuda_array_interface(v, stream=1234)
    assert desc == {"shape": (2, 8, 4, 4), "typestr": "<f4", "data": (0x7F00_0000_1000, False),
                    "strides": None, "version": 3, "stream": 1234}
    assert gpu.cuda_array_interface(v)["stream"] is None
    assert gpu.cuda_array_interface(FakeOrtValue(np.zeros(3), "tensor(float16)"))["typestr"] == "<f2"


def test_cuda_array_interface_refuses_unknown_types():
    with pytest.raises(TypeError, match="tensor\\(string\\)"):
        gpu.cuda_array_interface(FakeOrtValue(np.zeros(3), "tensor(string)"))


def test_device_view_is_zero_copy_with_the_ortvalue_as_owner(monkeypatch):
    from numba import cuda

    seen = {}

    def fake(desc, owner=None, sync=True):
        seen.update(desc=desc, owner=owner, sync=sync)
        return "view"

    monkeypatch.setattr(cuda, "from_cuda_array_interface", fake, raising=False)
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    v = FakeOrtValue(np.zeros((1, 2, 3), np.float32), ptr=4096)
    assert gpu.device_view(v, stream=7) == "view"
    assert seen["owner"] is v and seen["sync"] is False
    assert seen["desc"]["data"] == (4096, False) and seen["desc"]["stream"] == 7


# --------------------------------------------------------------------------- backend choice
def _probe(monkeypatch, ort_ok: bool, nb_ok: bool) -> None:
    import engine.model.session as session

    monkeypatch.setattr(session, "cuda_usable", lambda: ort_ok)
    monkeypatch.setattr(gpu, "numba_cuda_usable", lambda: (nb_ok, "" if nb_ok else "numba.cuda.is_available() is False"))


@pytest.mark.parametrize("ort_ok, nb_ok, want", [(True, True, "cuda"), (True, False, "cpu"),
                                                 (False, True, "cpu"), (False, False, "cpu")])
def test_auto_takes_cuda_only_when_both_pieces_work(monkeypatch, ort_ok, nb_ok, want):
    _probe(monkeypatch, ort_ok, nb_ok)
    assert gpu.choose_backend("auto") == want
    assert gpu.choose_backend("cpu") == "cpu"


@pytest.mark.parametrize("ort_ok, nb_ok, names", [
    (False, True, ["onnxruntime's CUDA execution provider"]),
    (True, False, ["numba.cuda.is_available() is False"]),
    (False, False, ["onnxruntime's CUDA execution provider", "numba.cuda"]),
])
def test_provider_cuda_names_the_missing_piece(monkeypatch, ort_ok, nb_ok, names):
    _probe(monkeypatch, ort_ok, nb_ok)
    with pytest.raises(gpu.BackendError) as info:
        gpu.choose_backend("cuda")
    msg = str(info.value)
    assert all(n in msg for n in names) and "use provider='auto' or provider='cpu'" in msg
    if ort_ok:
        assert "onnxruntime's CUDA" not in msg


def test_no_gpu_here_means_cpu():
    assert gpu.choose_backend("auto") == "cpu"  # this machine: no GPU, no simulator


# --------------------------------------------------------------------------- host-side numbers
@pytest.mark.parametrize("n_in, n_out", [(3, 7), (7, 3), (5, 5), (1, 4), (23, 181)])
def test_adjoint_taps_are_the_transpose_of_the_linear_weights(n_in, n_out):
    i0, i1, w0, w1 = linear_weights(n_in, n_out)
    ptr, tt, ww = K.adjoint_taps(i0, i1, w0, w1, n_in)
    R = np.zeros((n_out, n_in))
    np.add.at(R, (np.arange(n_out), i0), w0.astype(np.float32))
    np.add.at(R, (np.arange(n_out), i1), w1.astype(np.float32))
    Rt = np.zeros((n_in, n_out))
    for j in range(n_in):
        for k in range(ptr[j], ptr[j + 1]):
            Rt[j, tt[k]] += ww[k]
        assert np.all(np.diff(tt[ptr[j]:ptr[j + 1]][:np.count_nonzero((i0 == j) & (w0 != 0))]) > 0)
    assert np.array_equal(Rt, R.T)


@pytest.mark.parametrize("src, grid", [((4, 5), (9, 11)), ((2, 3, 4), (5, 6, 7)), ((8, 6), (5, 4)), ((6,), (6,))])
def test_twin_adjoint_matches_materialised_resize(src, grid):
    rng = np.random.default_rng(0)
    B = 2
    wf = rng.random((B,) + grid).astype(np.float32)
    geo = gpu._geometry(src, grid)
    S = int(np.prod(src))
    Wf, Wb = np.empty((B, S), np.float32), np.empty((B, S), np.float32)
    flat = wf.reshape(B, -1)
    K.adjoint_twin(flat, flat, geo.tgt, geo.src, *geo.taps(), Wf, Wb)
    # <R x, w> = <x, Rᵀ w> for the basis vectors x: Rᵀ w materialised through resize_linear
    basis = np.eye(S, dtype=np.float64).reshape((S, 1) + src)
    up = resize_linear(basis, grid).reshape(S, -1)  # R e_s on the grid
    want = flat.astype(np.float64) @ up.T
    np.testing.assert_allclose(Wf, want, rtol=3e-7, atol=1e-7)
    assert np.array_equal(Wf, Wb)


@pytest.mark.parametrize("shape_f, grid, level", [
    ((3, 4, 6, 7), (12, 14), "both"), ((2, 3, 4, 5, 6), (8, 10, 12), "both"),
    ((2, 5, 9, 8), (9, 8), "layer"), ((2, 2, 9, 10), (5, 6), "unit")])
def test_twin_scores_equal_the_production_kernels_away_from_ties(shape_f, grid, level):
    rng = np.random.default_rng(1)
    F = rng.normal(size=shape_f).astype(np.float32)
    g = rng.random((shape_f[0],) + grid) < 0.4
    ref = rng.random((shape_f[0],) + grid) < 0.5
    got = gpu.score_twin(F, g, ref, level=level)
    want = sa_scores(F, g, ref, level=level)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        for what in ("score", "status", "tp", "fp", "fn"):
            assert np.array_equal(getattr(a, what), getattr(b, what), equal_nan=True), what


def test_twin_statuses_and_nonfinite_error():
    F = np.ones((2, 1, 4), np.float32)
    F[1, 0, 0] = np.inf
    g = np.array([[0, 0, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="sample 1"):
        gpu.score_twin(F, g, g)
    res = gpu.score_twin(F, g, g, nonfinite="skip")
    assert res.status.tolist() == [int(Status.OK), int(Status.NONFINITE)]
    res = gpu.score_twin(F[:1], np.zeros((1, 4)), g[:1], level="unit")
    assert res.status.tolist() == [[int(Status.EMPTY_FOREGROUND)]]


def test_twin_downsample_matches_production():
    rng = np.random.default_rng(2)
    F = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    g = rng.random((2, 8, 8)) < 0.5
    got = gpu.score_twin(F, g, g, level="both", resize="downsample")
    want = sa_scores(F, g, g, level="both", resize="downsample")
    for a, b in zip(got, want):
        assert np.array_equal(a.tp, b.tp) and np.array_equal(a.fp, b.fp) and np.array_equal(a.fn, b.fn)


def test_partials_twin_tree_order():
    # lane sums then the stride-halving tree: the twin's partial equals that order, computed here
    rng = np.random.default_rng(3)
    S, tpb, items = 300, 8, 4
    F = rng.normal(size=(1, 1, S)).astype(np.float32)
    W = rng.random((1, S)).astype(np.float32)
    K_ = -(-S // (tpb * items))
    out = np.empty((1, 1, K_, 2))
    K.partials_twin(F, False, W, W, items, tpb, out)
    for k in range(K_):
        lanes = []
        for lane in range(tpb):
            acc = 0.0
            for i in range(items):
                s = k * tpb * items + lane + i * tpb
                if s < S:
                    acc += float(F[0, 0, s]) * float(W[0, s])
            lanes.append(acc)
        stride = tpb // 2
        while stride:
            for lane in range(stride):
                lanes[lane] = lanes[lane] + lanes[lane + stride]
            stride //= 2
        assert out[0, 0, k, 0] == lanes[0] and out[0, 0, k, 1] == lanes[0]


def test_compare_traces_reports_the_first_difference():
    t = gpu._Trace(np.zeros(1, np.uint8), np.zeros((1, 1)), np.zeros((1, 1)), np.array([3]), np.array([2]),
                   None, None, np.array([4]), np.zeros((1, 1, 1, 2)))
    u = gpu._Trace(**{**t.__dict__, "npos": np.array([4])})
    gpu.compare_traces(t, gpu._Trace(**t.__dict__), tensor="x")
    with pytest.raises(gpu.DeviceMismatchError, match="layer positives.*device 3, CPU twin 4") as info:
        gpu.compare_traces(t, u, tensor="conv1")
    assert info.value.tensor == "conv1" and info.value.what == "npos"
    neg = gpu._Trace(**{**t.__dict__, "partials": -t.partials})  # -0.0 against 0.0: one bit
    with pytest.raises(gpu.DeviceMismatchError, match="partial sums"):
        gpu.compare_traces(t, neg, tensor="x")
