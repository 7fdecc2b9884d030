"""The GPU data path: hidden tensors scored where onnxruntime left them, bit-identical to a CPU twin.

Backend choice (:func:`choose_backend`, probed once per process): the scoring backend is
``"cuda"`` when onnxruntime's CUDA execution provider really loads
(:func:`engine.model.session.cuda_usable`) *and* Numba can use the GPU
(``numba.cuda.is_available()``); otherwise ``"cpu"``, as before. ``provider="cuda"`` with
either missing raises :class:`BackendError` naming the missing piece.

Data path (:class:`DeviceScorer`): onnxruntime binds the hidden outputs on the device
(:meth:`engine.model.session.Session.run_device`); each ``OrtValue`` is viewed as a Numba
device array through ``__cuda_array_interface__`` (:func:`cuda_array_interface`,
:func:`device_view`: no copy, the ``OrtValue`` owns the memory); the kernels of
:mod:`engine._kernels.cuda` compute guide weights, prototype partial sums and integer
counts on the device; only the partials (B × C × chunks floats) and the counts come back.
Prototypes, thresholds and Dice are computed from them by the same host code for both
backends.

Bit-identity: the device kernels and their CPU twins (same module) perform the same float
operations in the same order with exact float32 × float32 products (see
:mod:`engine._kernels.cuda`), so a device run equals :func:`score_twin` on the same
features bit for bit. The self-check re-scores the first batch of a run and about 1 % of
the later ones with the twins and stops the run with :class:`DeviceMismatchError` on any
difference. The production CPU kernels (:func:`engine.scores.sa_scores`) use float64
weights and fast-math sums: their decisions agree with the twins' except at near-ties
(|margin| of the order of 1e-7 relative), which is why the self-check compares with the
twins, not with them.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import resize as _resize
from engine._checks import as_array, as_binary_uint8, check_choice, check_not_empty, check_unit_interval
from engine._kernels import counting as _counting
from engine._kernels import cuda as _k
from engine.errors import NonFiniteFeaturesError, option
from engine.scores import SAScores
from engine.status import Status

__all__ = ["BackendError", "DeviceMismatchError", "DeviceTensor", "DeviceScorer", "choose_backend",
           "numba_cuda_usable", "simulated", "cuda_array_interface", "device_view", "score_on_device",
           "score_twin", "compare_traces", "SELF_CHECK_EVERY"]

_CUDA = "CUDAExecutionProvider"
_CHANNELS_LAST = ("NWC", "NHWC", "NDHWC")
#: ``OrtValue.data_type()`` → the array interface's typestr.
_TYPESTR = {"tensor(float)": "<f4", "tensor(double)": "<f8", "tensor(float16)": "<f2",
            "tensor(int64)": "<i8", "tensor(int32)": "<i4", "tensor(uint8)": "|u1",
            "tensor(int8)": "|i1", "tensor(bool)": "|b1"}
#: After the first batch, one batch in this many is re-scored by the CPU twins (about 1 %).
SELF_CHECK_EVERY = 100
_CODES = np.array([int(Status.NONFINITE), int(Status.EMPTY_MASK), int(Status.EMPTY_FOREGROUND),
                   int(Status.EMPTY_BACKGROUND)], dtype=np.uint8)
_OK = int(Status.OK)


class BackendError(ValueError):
    """``provider="cuda"`` was asked for but a piece of the GPU path is missing (named)."""


class DeviceMismatchError(RuntimeError):
    """The self-check found device results that differ from the CPU twins'.

    Attributes: ``tensor`` (the hidden tensor), ``what`` (weights, partials or counts).
    """

    def __init__(self, message: str, *, tensor: str | None = None, what: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.what = what


# --------------------------------------------------------------------------- backend choice
def simulated() -> bool:
    """True when Numba runs CUDA kernels in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def numba_cuda_usable() -> tuple[bool, str]:
    """(usable, why not): whether Numba can launch kernels on a GPU here (probed once).

    The simulator counts as usable (its kernels are exact twins of the device's, only slow).
    """
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - numba always ships numba.cuda (or numba-cuda)
        return False, f"numba.cuda cannot be imported ({type(exc).__name__}: {exc})"
    try:
        if cuda.is_available():
            return True, ""
    except Exception as exc:  # pragma: no cover - driver errors vary
        return False, f"numba.cuda.is_available() failed ({type(exc).__name__})"
    return False, ("numba.cuda.is_available() is False: no GPU, no driver, or no CUDA libraries "
                   "for Numba (install protoseg[gpu], which brings numba-cuda[cu13])")


def choose_backend(provider: str) -> str:
    """The scoring backend for an onnxruntime provider choice: ``"cuda"`` or ``"cpu"``.

    Parameters
    ----------
    provider : {"auto", "cpu", "cuda"}
        As :func:`engine.model.session.make_session` takes it.

    Returns
    -------
    str
        ``"cuda"`` when onnxruntime's CUDA provider really loads and Numba can use the GPU
        (``provider`` "auto" or "cuda"), else ``"cpu"``.

    Raises
    ------
    BackendError
        ``provider="cuda"`` where either piece is missing; the message says which.
    """
    check_choice(provider, "provider", ("auto", "cpu", "cuda"))
    if provider == "cpu":
        return "cpu"
    from engine.model.session import cuda_usable

    ort_ok = cuda_usable()
    if not ort_ok and provider == "auto":  # the usual CPU machine: numba.cuda is never imported
        return "cpu"
    nb_ok, why = numba_cuda_usable()
    if ort_ok and nb_ok:
        return "cuda"
    if provider == "cuda":
        import onnxruntime as ort

        missing = []
        if not ort_ok:
            missing.append("onnxruntime's CUDA execution provider cannot load (providers listed: "
                           f"{ort.get_available_providers()}; install onnxruntime-gpu with "
                           "protoseg[gpu])")
        if not nb_ok:
            missing.append(why)
        raise BackendError(f"{option('provider', 'cuda')} was asked for but " + "; and ".join(missing)
                           + f"; use {option('provider', 'auto')} or {option('provider', 'cpu')}")
    return "cpu"


# --------------------------------------------------------------------------- OrtValue views
def cuda_array_interface(value: Any, *, stream: int | None = None) -> dict[str, Any]:
    """``__cuda_array_interface__`` (version 3) of a device ``OrtValue``, without a copy.

    Parameters
    ----------
    value : onnxruntime.OrtValue
        A tensor on a CUDA device (anything with ``data_ptr()``, ``shape()``,
        ``data_type()``).
    stream : int, optional
        The CUDA stream handle the producer wrote on (None: no synchronisation asked for;
        onnxruntime's ``Run`` synchronises its stream before returning).

    Returns
    -------
    dict
        ``shape``, ``typestr``, ``data`` (pointer, read-only False), ``strides`` None
        (C-contiguous, as onnxruntime allocates), ``version`` 3, ``stream``.

    Raises
    ------
    TypeError
        An element type the interface cannot describe.
    """
    kind = value.data_type()
    if kind not in _TYPESTR:
        raise TypeError(f"OrtValue of type {kind!r} has no array-interface typestr; expected one of "
                        f"{sorted(_TYPESTR)}")
    shape = tuple(int(d) for d in value.shape())
    ptr = int(value.data_ptr())
    return {"shape": shape, "typestr": _TYPESTR[kind], "data": (ptr, False), "strides": None,
            "version": 3, "stream": None if stream is None else int(stream)}


def device_view(value: Any, *, stream: int | None = None) -> Any:
    """A Numba device array over an ``OrtValue``'s memory (no copy; the view keeps it alive).

    Under the simulator (which has no ``from_cuda_array_interface``) the value is copied to a
    simulated device array instead; a host ``numpy.ndarray`` is copied the same way.
    """
    from numba import cuda

    if isinstance(value, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(value))
    if simulated() or not hasattr(cuda, "from_cuda_array_interface"):
        return cuda.to_device(np.ascontiguousarray(value.numpy()))
    desc = cuda_array_interface(value, stream=stream)
    return cuda.from_cuda_array_interface(desc, owner=value, sync=False)


@dataclass(frozen=True)
class DeviceTensor:
    """A batch of one hidden tensor on the device, in its own layout.

    Attributes
    ----------
    array : numba device array
        ``(B, C, *spatial)`` or, with ``channels_last``, ``(B, *spatial, C)``.
    channels_last : bool
    name : str
    owner : object
        What owns the memory (the ``OrtValue``), kept alive with the view.
    """

    array: Any
    channels_last: bool
    name: str
    owner: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.array.shape)

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[1:-1] if self.channels_last else self.shape[2:]

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.channels_last else self.shape[1]

    def to_host(self) -> np.ndarray:
        """The tensor on the host, channels-first view ``(B, C, *spatial)`` (one copy)."""
        arr = self.array.copy_to_host()
        return np.moveaxis(arr, -1, 1) if self.channels_last else arr


# --------------------------------------------------------------------------- geometry (host)
@functools.lru_cache(maxsize=256)
def _axis(n_in: int, n_out: int) -> tuple[Any, ...]:
    """One axis: (i0, i1 int64; w0, w1 float32; taps along the adjoint: ptr, t, w; n corners)."""
    i0, i1, w0, w1 = _resize.linear_weights(n_in, n_out)
    i0 = np.ascontiguousarray(i0, dtype=np.int64)
    i1 = np.ascontiguousarray(i1, dtype=np.int64)
    w0f = np.ascontiguousarray(w0, dtype=np.float32)
    w1f = np.ascontiguousarray(w1, dtype=np.float32)
    ptr, tt, ww = _k.adjoint_taps(i0, i1, w0, w1, n_in)
    out = (i0, i1, w0f, w1f, ptr, tt, ww, 1 if n_in == n_out else 2)
    for a in out[:-1]:
        a.setflags(write=False)
    return out


@dataclass(frozen=True)
class _Geometry:
    src: np.ndarray  # int64[3]
    tgt: np.ndarray  # int64[3]
    identity: bool
    axes: tuple[tuple[Any, ...], ...]  # z, y, x: _axis(...)

    def forward(self) -> tuple[Any, ...]:
        """(iz0, iz1, wz0, wz1, iy0, …, wx1, nz, ny, nx) as the counting kernels take them."""
        out: tuple[Any, ...] = ()
        for a in self.axes:
            out += a[:4]
        return out + tuple(a[7] for a in self.axes)

    def taps(self) -> tuple[Any, ...]:
        out: tuple[Any, ...] = ()
        for a in self.axes:
            out += a[4:7]
        return out


def _pad3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return (1,) * (3 - len(shape)) + tuple(int(s) for s in shape)  # type: ignore[return-value]


def _geometry(src: tuple[int, ...], tgt: tuple[int, ...]) -> _Geometry:
    s3, t3 = _pad3(src), _pad3(tgt)
    return _Geometry(np.array(s3, dtype=np.int64), np.array(t3, dtype=np.int64), s3 == t3,
                     tuple(_axis(a, b) for a, b in zip(s3, t3)))


def _spatial_map(value: Any, name: str, batch: int, nsp: int) -> np.ndarray:
    arr = as_array(value, name)
    if arr.ndim == nsp + 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != nsp + 1 or arr.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B, *spatial) with B = {batch} and {nsp} spatial axes "
                         f"(as the features); received shape {arr.shape}")
    check_not_empty(arr, name)
    return arr


@dataclass(frozen=True)
class _Targets:
    g: np.ndarray  # (B, T) float32/float64
    m: np.ndarray  # (B, T) or (1, 1) dummy
    has_mask: bool
    ref: np.ndarray  # (B, T) uint8
    geo: _Geometry


def _targets(spatial: tuple[int, ...], batch: int, guide: Any, reference: Any, mask: Any,
             resize: str) -> _Targets:
    """Guide, mask and reference on the target grid (area-averaged to the features' grid for
    ``downsample``, as :func:`engine.scores.sa_scores` does), flattened per sample."""
    check_choice(resize, "resize", ("upsample", "downsample"))
    nsp = len(spatial)
    g = _spatial_map(guide, "guide", batch, nsp)
    grid = tuple(int(s) for s in g.shape[1:])
    if g.dtype.kind not in "biuf":
        raise TypeError(f"guide must be boolean or numeric; received dtype {g.dtype}")
    check_unit_interval(g, "guide")
    g = np.ascontiguousarray(g, dtype=np.float64 if g.dtype == np.float64 else np.float32)
    m = None
    if mask is not None:
        m = _spatial_map(mask, "mask", batch, nsp)
        if tuple(m.shape[1:]) != grid:
            raise ValueError(f"mask has spatial shape {tuple(m.shape[1:])} but the guide has {grid}")
        check_unit_interval(m, "mask")
        m = np.ascontiguousarray(m, dtype=g.dtype)
    ref = as_binary_uint8(_spatial_map(reference, "reference", batch, nsp), "reference")
    if tuple(ref.shape[1:]) != grid:
        raise ValueError(f"reference has spatial shape {tuple(ref.shape[1:])} but the guide has {grid}")
    target = grid
    if resize == "downsample" and tuple(spatial) != grid:
        g = _resize.resize_area(g, spatial)
        np.clip(g, 0.0, 1.0, out=g)
        if m is not None:
            m = _resize.resize_area(m, spatial)
            np.clip(m, 0.0, 1.0, out=m)
        ref = np.ascontiguousarray(_resize.resize_area(ref, spatial) >= 0.5 - 1e-12).view(np.uint8)
        target = tuple(spatial)
    g2 = np.ascontiguousarray(g).reshape(batch, -1)
    m2 = np.ones((1, 1), g2.dtype) if m is None else np.ascontiguousarray(m, dtype=g2.dtype).reshape(batch, -1)
    return _Targets(g2, m2, m is not None, np.ascontiguousarray(ref).reshape(batch, -1),
                    _geometry(tuple(spatial), target))


# --------------------------------------------------------------------------- the two backends
class _HostOps:
    """The CPU twins on host arrays."""

    name = "twin"

    def put(self, a: np.ndarray) -> np.ndarray:
        return a

    def get(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def adjoint(self, wf, wb, geo: _Geometry, Wf, Wb) -> None:
        _k.adjoint_twin(wf, wb, geo.tgt, geo.src, *geo.taps(), Wf, Wb)

    def partials(self, F, cl, Wf, Wb, items, out) -> None:
        _k.partials_twin(F, cl, Wf, Wb, items, _k.TPB, out)

    def project(self, F, cl, D, ok, z) -> None:
        _k.project_twin(F, cl, D, ok, z)

    def layer_counts(self, z, mid, ok, ref, geo: _Geometry, npos, tp) -> None:
        _k.layer_counts_twin(z, mid, ok, ref, geo.tgt, geo.src, geo.identity, *geo.forward(), npos, tp)

    def unit_counts(self, F, cl, sign, mid, ref, geo: _Geometry, npos, tp) -> None:
        _k.unit_counts_twin(F, cl, sign, mid, ref, geo.tgt, geo.src, geo.identity, *geo.forward(), npos, tp)


class _DeviceOps:
    """The numba-cuda kernels on device arrays, all on one stream."""

    name = "device"
    _MAX_BLOCKS = 4096
    _MAX_Y = 65535

    def __init__(self, stream: Any = None) -> None:
        from numba import cuda

        self.cuda = cuda
        self.stream = cuda.stream() if stream is None else stream
        self.k = _k.device_kernels()
        self._consts: dict[int, Any] = {}

    def put(self, a: np.ndarray) -> Any:
        return self.cuda.to_device(np.ascontiguousarray(a), stream=self.stream)

    def const(self, a: np.ndarray) -> Any:
        """A read-only geometry array, uploaded once per process (keyed by identity: cached)."""
        key = id(a)
        hit = self._consts.get(key)
        if hit is None or hit[0] is not a:
            hit = (a, self.put(a))
            self._consts[key] = hit
        return hit[1]

    def get(self, a: Any) -> np.ndarray:
        out = a.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return out

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.put(np.zeros(shape, dtype=dtype))

    def _blocks(self, n: int) -> int:
        return max(1, min(self._MAX_BLOCKS, -(-n // _k.TPB)))

    def adjoint(self, wf, wb, geo: _Geometry, Wf, Wb) -> None:
        n = int(Wf.shape[0]) * int(Wf.shape[1])
        taps = tuple(self.const(a) for a in geo.taps())
        self.k["adjoint"][self._blocks(n), _k.TPB, self.stream](
            wf, wb, self.const(geo.tgt), self.const(geo.src), *taps, Wf, Wb)

    def partials(self, F, cl, Wf, Wb, items, out) -> None:
        B, C, K = (int(d) for d in out.shape[:3])
        self.k["partials"][B * C * K, _k.TPB, self.stream](F, cl, Wf, Wb, items, out)

    def project(self, F, cl, D, ok, z) -> None:
        n = int(z.shape[0]) * int(z.shape[1])
        self.k["project"][self._blocks(n), _k.TPB, self.stream](F, cl, D, ok, z)

    def _forward(self, geo: _Geometry) -> tuple[Any, ...]:
        fw = geo.forward()
        return tuple(self.const(a) for a in fw[:12]) + fw[12:]

    def layer_counts(self, z, mid, ok, ref, geo: _Geometry, npos, tp) -> None:
        B, T = (int(d) for d in ref.shape)
        for b0 in range(0, B, self._MAX_Y):  # grid y is the sample (kernel reads blockIdx.y)
            assert b0 == 0, "more than 65535 samples in one batch"
            grid = (self._blocks(T), min(B, self._MAX_Y))
            self.k["layer_counts"][grid, _k.TPB, self.stream](
                z, mid, ok, ref, self.const(geo.tgt), self.const(geo.src), geo.identity,
                *self._forward(geo), npos, tp)

    def unit_counts(self, F, cl, sign, mid, ref, geo: _Geometry, npos, tp) -> None:
        B, C = (int(d) for d in sign.shape)
        T = int(ref.shape[1])
        for off in range(0, B * C, self._MAX_Y):
            grid = (self._blocks(T), min(self._MAX_Y, B * C - off))
            self.k["unit_counts"][grid, _k.TPB, self.stream](
                F, cl, sign, mid, ref, self.const(geo.tgt), self.const(geo.src), geo.identity,
                *self._forward(geo), off, npos, tp)


# --------------------------------------------------------------------------- one driver for both
@dataclass
class _Trace:
    """What one scoring call computed (host arrays); compared bitwise by the self-check."""

    status: np.ndarray
    P: np.ndarray
    N: np.ndarray
    npos: np.ndarray | None
    tp: np.ndarray | None
    upos: np.ndarray | None
    utp: np.ndarray | None
    ny: np.ndarray
    partials: np.ndarray
    Wf: np.ndarray | None = None
    Wb: np.ndarray | None = None


def _flat(F: Any, channels_last: bool) -> Any:
    """(B, C, S) or (B, S, C) view of a (B, C, *sp) / (B, *sp, C) array (host or device)."""
    shape = tuple(int(d) for d in F.shape)
    if channels_last:
        return F.reshape(shape[0], int(np.prod(shape[1:-1])), shape[-1])
    return F.reshape(shape[0], shape[1], int(np.prod(shape[2:])))


def _run(ops: Any, F: Any, channels_last: bool, spatial: tuple[int, ...], tg: _Targets, *, layer: bool,
         unit: bool, record: bool, items: int = _k.ITEMS) -> _Trace:
    """Prototypes, then layer and/or unit counts, with ``ops`` doing the heavy steps."""
    geo = tg.geo
    B, T = tg.g.shape
    Ff = _flat(F, channels_last)
    C = int(Ff.shape[2] if channels_last else Ff.shape[1])
    S = int(np.prod(spatial))
    # guide weights on the target grid and their sums: host, shared by both backends
    wf = np.empty((B, T), dtype=np.float32)
    wb = np.empty((B, T), dtype=np.float32)
    sums = np.empty((B, 3))
    _k.guide_weights(tg.g, tg.m, tg.has_mask, wf, wb, sums)
    if geo.identity:
        Wf_d, Wb_d = ops.put(wf), ops.put(wb)
    else:
        Wf_d, Wb_d = ops.empty((B, S), np.float32), ops.empty((B, S), np.float32)
        ops.adjoint(ops.put(wf), ops.put(wb), geo, Wf_d, Wb_d)
    K = max(1, -(-S // (_k.TPB * items)))
    part_d = ops.empty((B, C, K, 2), np.float64)
    ops.partials(Ff, channels_last, Wf_d, Wb_d, items, part_d)
    partials = ops.get(part_d)
    sf, sb = np.empty((B, C)), np.empty((B, C))
    _k.reduce_partials(partials, sf, sb)
    P, N = np.empty((B, C)), np.empty((B, C))
    status = np.empty(B, dtype=np.uint8)
    _k.finalize(sf, sb, sums, _OK, _CODES, P, N, status)
    ok = (status == _OK).astype(np.uint8)
    ny = tg.ref.sum(axis=1, dtype=np.int64)
    trace = _Trace(status, P, N, None, None, None, None, ny, partials)
    if record:
        trace.Wf, trace.Wb = ops.get(Wf_d), ops.get(Wb_d)
    ref_d = ops.put(tg.ref) if (layer or unit) else None
    if layer:
        D = np.empty((B, C), dtype=np.float32)
        mid = np.empty(B)
        _k.layer_threshold(P, N, ok, D, mid)
        ok_d = ops.put(ok)
        z_d = ops.empty((B, S), np.float64)
        ops.project(Ff, channels_last, ops.put(D), ok_d, z_d)
        npos_d, tp_d = ops.zeros((B,), np.int64), ops.zeros((B,), np.int64)
        ops.layer_counts(z_d, ops.put(mid), ok_d, ref_d, geo, npos_d, tp_d)
        trace.npos, trace.tp = ops.get(npos_d), ops.get(tp_d)
    if unit:
        with np.errstate(invalid="ignore"):
            d = P - N
        sign = np.where(ok[:, None] == 1, np.sign(np.nan_to_num(d)), 0).astype(np.int8)
        mid_u = np.where(ok[:, None] == 1, 0.5 * (P + N), 0.0)
        upos_d, utp_d = ops.zeros((B, C), np.int64), ops.zeros((B, C), np.int64)
        ops.unit_counts(Ff, channels_last, ops.put(sign), ops.put(mid_u), ref_d, geo, upos_d, utp_d)
        trace.upos, trace.utp = ops.get(upos_d), ops.get(utp_d)
    return trace


def _finish(status: np.ndarray, npos: np.ndarray, tp: np.ndarray, ny: np.ndarray, empty: str,
            level: str) -> SAScores:
    shape = npos.shape
    per = 1 if npos.ndim == 1 else shape[1]
    n = npos.size
    score = np.empty(n)
    st = np.empty(n, dtype=np.uint8)
    tpo, fp, fn = (np.empty(n, dtype=np.int64) for _ in range(3))
    _counting.dice_counts(status, np.ascontiguousarray(npos).reshape(-1), np.ascontiguousarray(tp).reshape(-1),
                          ny, per, empty == "one", score, st, tpo, fp, fn)
    return SAScores(score.reshape(shape), st.reshape(shape), tpo.reshape(shape), fp.reshape(shape),
                    fn.reshape(shape), level)


def _results(trace: _Trace, level: str, empty: str, nonfinite: str) -> SAScores | tuple[SAScores, SAScores]:
    if nonfinite == "raise" and (trace.status == int(Status.NONFINITE)).any():
        bad = np.flatnonzero(trace.status == int(Status.NONFINITE))
        raise NonFiniteFeaturesError(
            f"features contain NaN or Inf in sample {int(bad[0])} ({bad.size} sample(s) affected); "
            "fix the input or pass nonfinite='skip' to score such samples as NaN",
            sample=int(bad[0]), n_samples=int(bad.size))
    out = []
    if level in ("layer", "both"):
        out.append(_finish(trace.status, trace.npos, trace.tp, trace.ny, empty, "layer"))
    if level in ("unit", "both"):
        out.append(_finish(trace.status, trace.upos, trace.utp, trace.ny, empty, "unit"))
    return out[0] if len(out) == 1 else (out[0], out[1])


def _check_options(level: str, empty: str, nonfinite: str) -> None:
    check_choice(level, "level", ("layer", "unit", "both"))
    check_choice(empty, "empty", ("nan", "one"))
    check_choice(nonfinite, "nonfinite", ("raise", "skip"))


def score_twin(features: np.ndarray, guide: Any, reference: Any, *, mask: Any = None, level: str = "layer",
               resize: str = "upsample", layout: str = "channels_first", empty: str = "nan",
               nonfinite: str = "raise") -> SAScores | tuple[SAScores, SAScores]:
    """SA scores by the CPU twins of the device kernels (what a device run must equal bitwise).

    Parameters and returns as :func:`engine.scores.sa_scores`; ``features`` must be float32
    (the device path's input type). The numbers equal :func:`score_on_device` on the same
    features bit for bit; they may differ from :func:`engine.scores.sa_scores` at near-ties
    (float32 weights, fixed summation order).
    """
    _check_options(level, empty, nonfinite)
    check_choice(layout, "layout", ("channels_first", "channels_last"))
    F = np.asarray(features)
    if F.dtype != np.float32 or F.ndim not in (3, 4, 5):
        raise TypeError(f"features must be float32 with 1-3 spatial axes; received {F.dtype} {F.shape}")
    cl = layout == "channels_last"
    spatial = tuple(F.shape[1:-1] if cl else F.shape[2:])
    F = np.ascontiguousarray(F)
    tg = _targets(spatial, F.shape[0], guide, reference, mask, resize)
    trace = _run(_HostOps(), F, cl, spatial, tg, layer=level in ("layer", "both"),
                 unit=level in ("unit", "both"), record=False)
    return _results(trace, level, empty, nonfinite)


def score_on_device(features: DeviceTensor, guide: Any, reference: Any, *, mask: Any = None,
                    level: str = "layer", resize: str = "upsample", empty: str = "nan",
                    nonfinite: str = "raise", stream: Any = None) -> SAScores | tuple[SAScores, SAScores]:
    """SA scores of a tensor held on the device (SPEC §1-3), by the numba-cuda kernels.

    Parameters
    ----------
    features : DeviceTensor
        float32 features on the device (see :meth:`DeviceScorer.features`).
    guide, reference, mask, level, resize, empty, nonfinite
        As :func:`engine.scores.sa_scores` (guide, reference and mask are host arrays).
    stream : numba stream, optional
        The stream to launch on (default: a new one).

    Returns
    -------
    SAScores or tuple of SAScores
        Bitwise equal to :func:`score_twin` on the same features.
    """
    return DeviceScorer(stream=stream, self_check=False).sa_scores(
        features, guide, reference, mask=mask, level=level, resize=resize, empty=empty, nonfinite=nonfinite)


# --------------------------------------------------------------------------- the run's scorer
def _first_difference(a: np.ndarray, b: np.ndarray) -> str | None:
    """None when a and b are bitwise equal, else where they first differ."""
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {a.shape} {a.dtype} against {b.shape} {b.dtype}"
    av = a.view(np.uint8).reshape(a.size, -1) if a.size else a.reshape(0, 1).view(np.uint8)
    bv = b.view(np.uint8).reshape(b.size, -1) if b.size else b.reshape(0, 1).view(np.uint8)
    diff = np.flatnonzero((av != bv).any(axis=1))
    if diff.size == 0:
        return None
    i = np.unravel_index(int(diff[0]), a.shape)
    return (f"{diff.size} of {a.size} entries differ, first at {tuple(int(v) for v in i)}: "
            f"device {a[i].item()!r}, CPU twin {b[i].item()!r}")


def compare_traces(device: _Trace, twin: _Trace, *, tensor: str) -> None:
    """Raise :class:`DeviceMismatchError` unless the two traces are bitwise equal."""
    for what in ("Wf", "Wb", "partials", "status", "npos", "tp", "upos", "utp"):
        a, b = getattr(device, what), getattr(twin, what)
        if a is None and b is None:
            continue
        diff = _first_difference(np.asarray(a), np.asarray(b)) if (a is not None and b is not None) \
            else "computed by one side only"
        if diff is not None:
            label = {"Wf": "foreground guide weights", "Wb": "background guide weights",
                     "partials": "prototype partial sums", "status": "sample status",
                     "npos": "layer positives", "tp": "layer true positives", "upos": "unit positives",
                     "utp": "unit true positives"}[what]
            raise DeviceMismatchError(
                f"GPU self-check failed on tensor {tensor!r}: the {label} computed on the device differ "
                f"from the CPU twin's ({diff}); the run stops, as its scores cannot be trusted. Rerun "
                "with provider='cpu' and report this with the GPU model and driver version",
                tensor=tensor, what=what)


class DeviceScorer:
    """Scores hidden tensors on the device for a whole run; self-checks against the CPU twins.

    Parameters
    ----------
    stream : numba stream, optional
        The stream shared with onnxruntime (``user_compute_stream``); default: a new one.
    self_check : bool
        Re-score the first batch and one in :data:`SELF_CHECK_EVERY` later ones with the CPU
        twins (a host copy of those batches' tensors) and stop on any difference.

    Notes
    -----
    Call :meth:`begin_batch` once per batch (the run loop does), then :meth:`sa_scores` per
    tensor and class. ``checked`` counts the tensor scorings compared with the twins.
    """

    def __init__(self, *, stream: Any = None, self_check: bool = True) -> None:
        self.ops = _DeviceOps(stream)
        self.self_check = self_check
        self.batches = 0
        self.checked = 0
        self._check_this = False

    @property
    def stream(self) -> Any:
        return self.ops.stream

    @property
    def stream_handle(self) -> int | None:
        """The stream's CUDA handle (for onnxruntime's ``user_compute_stream``), None if simulated."""
        try:  # numba's Stream.__int__ gives the CUstream handle (ctypes or cuda-python bindings)
            return int(self.ops.stream)
        except (TypeError, ValueError, AttributeError):  # the simulator's streams have none
            return None

    def ort_options(self) -> dict[str, str]:
        """CUDA provider options that make onnxruntime run on this scorer's stream
        (``user_compute_stream``); empty under the simulator (its streams have no handle)."""
        handle = self.stream_handle
        return {} if handle is None else {"user_compute_stream": str(handle)}

    def begin_batch(self) -> bool:
        """Start a batch; returns whether it is self-checked (the first, then 1 in
        :data:`SELF_CHECK_EVERY`)."""
        self._check_this = self.self_check and self.batches % SELF_CHECK_EVERY == 0
        self.batches += 1
        return self._check_this

    def features(self, value: Any, *, name: str, layout: str | None = None) -> DeviceTensor | np.ndarray:
        """A device view of an ``OrtValue`` (or a host array, copied to the device).

        ``layout`` is the tensor's layout from the model card (``"NHWC"`` etc.; None or a
        channels-first one reads it as ``(B, C, *spatial)``). Tensors that are not float32 come
        back as host arrays (channels-first): the caller scores them on the CPU.
        """
        cl = layout is not None and layout.upper() in _CHANNELS_LAST
        kind = value.dtype if isinstance(value, np.ndarray) else value.data_type()
        if kind not in (np.float32, "tensor(float)"):
            arr = value if isinstance(value, np.ndarray) else value.numpy()
            return np.moveaxis(arr, -1, 1) if cl else arr
        return DeviceTensor(device_view(value, stream=self.stream_handle), cl, name, owner=value)

    def sa_scores(self, features: DeviceTensor, guide: Any, reference: Any, *, mask: Any = None,
                  level: str = "layer", resize: str = "upsample", empty: str = "nan",
                  nonfinite: str = "raise") -> SAScores | tuple[SAScores, SAScores]:
        """:func:`engine.scores.sa_scores` for a :class:`DeviceTensor` (see the class notes)."""
        _check_options(level, empty, nonfinite)
        F = features.array
        spatial = features.spatial
        if len(spatial) not in (1, 2, 3) or features.channels < 1:
            raise ValueError(f"tensor {features.name!r} has shape {features.shape}; expected (B, C, *spatial) "
                             "with 1-3 spatial axes")
        tg = _targets(spatial, features.shape[0], guide, reference, mask, resize)
        lay, uni = level in ("layer", "both"), level in ("unit", "both")
        trace = _run(self.ops, F, features.channels_last, spatial, tg, layer=lay, unit=uni,
                     record=self._check_this)
        if self._check_this:
            host = features.array.copy_to_host()
            twin = _run(_HostOps(), host, features.channels_last, spatial, tg, layer=lay, unit=uni, record=True)
            compare_traces(trace, twin, tensor=features.name)
            self.checked += 1
        return _results(trace, level, empty, nonfinite)
