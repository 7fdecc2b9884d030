"""onnxruntime sessions: choose the provider, build a session, run batches.

onnxruntime-gpu lists ``CUDAExecutionProvider`` as available even where CUDA cannot load
(no GPU, no CUDA libraries); a session asking for it then falls back to the CPU and prints an
error line. :func:`cuda_usable` probes once, silently, whether CUDA really loads.
:func:`make_session` builds a :class:`Session` on the chosen provider and reports which one
runs; :meth:`Session.run` loops over the batch for models whose batch is fixed to 1, and
binds outputs to CPU memory with IOBinding on CUDA (one device→host copy per tensor).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import option

__all__ = ["cuda_usable", "cuda_provider_options", "make_session", "Session", "PROVIDERS", "OPTIMIZATIONS"]

PROVIDERS = ("auto", "cpu", "cuda")
OPTIMIZATIONS = ("disable", "basic", "extended", "all")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
#: onnxruntime's default logger severity (WARNING), restored after the silent probe.
_ORT_DEFAULT_SEVERITY = 2
#: Severity that hides the provider-bridge ERROR line (3 = ERROR still prints it).
_SILENT = 4

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def _tiny_model_bytes() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """Whether onnxruntime's CUDA execution provider really loads here (cached).

    Returns
    -------
    bool
        ``True`` only when ``CUDAExecutionProvider`` is listed as available *and* a tiny
        session asking for it actually gets it.

    Notes
    -----
    The probe raises onnxruntime's default logger severity to FATAL while it runs (so the
    failed library load prints nothing) and restores the default (WARNING) afterwards.
    ``SessionOptions.log_severity_level`` does not silence that line; severity 3 (ERROR)
    does not either.

    Examples
    --------
    >>> cuda_usable()  # doctest: +SKIP
    False
    """
    import onnxruntime as ort

    if _CUDA not in ort.get_available_providers():
        return False
    _preload_pip_cuda(ort)
    ort.set_default_logger_severity(_SILENT)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = _SILENT
        sess = ort.InferenceSession(_tiny_model_bytes(), opts, providers=[_CUDA, _CPU])
        return _CUDA in sess.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _preload_pip_cuda(ort: Any) -> None:
    """Load CUDA/cuDNN from pip's ``nvidia-*`` wheels before the first CUDA session (their
    provider library has no RPATH: ``onnxruntime.preload_dlls()``); nothing without them."""
    import importlib.util

    preload = getattr(ort, "preload_dlls", None)
    if preload is None or importlib.util.find_spec("nvidia") is None:
        return
    try:
        preload()
    except Exception:  # a partial pip install: the probe below then says CUDA cannot load
        pass


def _np_dtype(ort_type: str) -> Any:
    return _NP_TYPES.get(ort_type)


@dataclass
class Session:
    """An onnxruntime session and what it runs on.

    Built by :func:`make_session`. Attributes are read-only by convention.

    Attributes
    ----------
    provider : str
        The execution provider that runs the model (``"CUDAExecutionProvider"`` or
        ``"CPUExecutionProvider"``).
    optimization : str
        Graph optimisation level (``disable|basic|extended|all``).
    input_names, output_names : list of str
        Graph inputs and outputs (outputs include any exposed hidden tensors).
    input_shapes : dict
        Input name → shape as onnxruntime reports it (``int`` or ``str``/``None`` for
        symbolic dims).
    fixed_batch : int or None
        The batch size fixed in the first input's shape, ``None`` when dynamic.
    """

    ort_session: Any = field(repr=False)
    provider: str
    optimization: str
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, tuple[Any, ...]]
    input_types: dict[str, str] = field(repr=False)
    fixed_batch: int | None
    threads: int | None = None

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch.

        Parameters
        ----------
        feeds : mapping
            Input name → array with the batch on axis 0. Float arrays are cast to the
            input's float type (e.g. float64 → float32).
        outputs : sequence of str, optional
            Outputs to return; default all.

        Returns
        -------
        dict
            Output name → array, batch on axis 0. On a model whose batch is fixed to ``n``
            a batch of B cases runs in chunks of ``n`` (the last one padded with copies of
            its final case, whose outputs are dropped) and the results are concatenated.

        Raises
        ------
        ValueError
            Missing or unknown input names, unknown output names, or inputs with different
            batch sizes.
        """
        missing = [n for n in self.input_names if n not in feeds]
        unknown = [n for n in feeds if n not in self.input_names]
        if missing or unknown:
            raise ValueError(
                f"feeds have inputs {sorted(feeds)}, the model expects {self.input_names}; "
                f"missing {missing}, unknown {unknown}")
        names = list(self.output_names if outputs is None else outputs)
        bad = [n for n in names if n not in self.output_names]
        if bad:
            raise ValueError(f"unknown outputs {bad}; the session's outputs are {self.output_names}")
        arrays: dict[str, np.ndarray] = {}
        for name, value in feeds.items():
            arr = self._as_input(name, value)
            expected = self.input_shapes.get(name) or ()
            if expected and arr.ndim != len(expected):
                raise ValueError(
                    f"input {name!r} has shape {arr.shape}; the model expects rank {len(expected)} "
                    f"(shape {list(expected)}, batch first)")
            arrays[name] = np.ascontiguousarray(arr)
        batches = {a.shape[0] if a.ndim else None for a in arrays.values()}
        if len(batches) != 1 or None in batches:
            raise ValueError(
                f"inputs have batch sizes {sorted(str(b) for b in batches)}; all inputs need the same "
                "batch size on axis 0")
        batch = batches.pop()
        n = self.fixed_batch
        if n is None or batch == n:
            return self._run_once(arrays, names)
        # a fixed batch of n: run chunks of n cases; the last one is padded with copies of
        # its final case, whose outputs are dropped (each case's outputs depend on it alone)
        parts = []
        for start in range(0, batch, n):
            chunk = {k: v[start:start + n] for k, v in arrays.items()}
            m = next(iter(chunk.values())).shape[0]
            if m < n:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], n - m, axis=0)]) for k, v in chunk.items()}
            out = self._run_once(chunk, names)
            parts.append({k: v[:m] for k, v in out.items()} if m < n else out)
        if len(parts) == 1:
            return {k: np.ascontiguousarray(v) for k, v in parts[0].items()}
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in names}

    # --- GPU data path (issue 19, engine.gpu): outputs left on the device -------------------
    def run_device(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None, *,
                   host: Sequence[str] = ()) -> dict[str, Any]:
        """Run one batch and leave the outputs on the GPU (``io.bind_output(name, "cuda")``).

        Returns
        -------
        dict
            Output name → ``onnxruntime.OrtValue`` in CUDA memory (view it with
            :func:`engine.gpu.device_view`), except the names in ``host``: numpy arrays.
            A session not on CUDA, or a model whose batch is fixed to another size (run in
            padded chunks), goes through :meth:`run` instead: every value is a numpy array.
        """
        names = list(self.output_names if outputs is None else outputs)
        sizes = {np.shape(v)[0] for v in feeds.values() if np.ndim(v)}
        if self.provider != _CUDA or (self.fixed_batch is not None and sizes != {self.fixed_batch}):
            return self.run(feeds, names)
        bad = [n for n in names if n not in self.output_names]
        if bad or sorted(feeds) != sorted(self.input_names):
            return self.run(feeds, names)  # raises the usual error
        binding = self.ort_session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(self._as_input(name, value)))
        for name in names:
            binding.bind_output(name, "cpu" if name in host else "cuda")
        self.ort_session.run_with_iobinding(binding)
        return {name: (value.numpy() if name in host else value)
                for name, value in zip(names, binding.get_outputs())}
    # --- end of the GPU data path hook ---------------------------------------------------------

    def _as_input(self, name: str, value: Any) -> np.ndarray:
        """``value`` as an array, a float one cast to the input's float type."""
        arr = np.asarray(value)
        want = _np_dtype(self.input_types[name])
        if want is not None and arr.dtype != want and np.issubdtype(arr.dtype, np.floating) \
                and np.issubdtype(want, np.floating):
            arr = arr.astype(want)
        return arr

    def _run_once(self, arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        sess = self.ort_session
        if self.provider != _CUDA:
            return dict(zip(names, sess.run(names, arrays)))
        binding = sess.io_binding()
        for name, arr in arrays.items():
            binding.bind_cpu_input(name, arr)
        for name in names:
            binding.bind_output(name, "cpu")  # device → host once, into ORT-owned CPU memory
        sess.run_with_iobinding(binding)
        # OrtValue.numpy() on a CPU tensor wraps the same buffer (no second copy)
        return {name: value.numpy() for name, value in zip(names, binding.get_outputs())}


@functools.lru_cache(maxsize=1)
def _shared_cpu_arena() -> bool:
    """Register one process-wide CPU arena allocator with onnxruntime (once).

    Measured (benchmarks/RESULTS.md, multi-pass memory): 5 passes peaked at 3,136 MiB with an
    arena per session and at 1,255 MiB with this shared one, at unchanged speed.
    """
    import onnxruntime as ort

    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                 ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        return True
    except Exception:  # an onnxruntime without the API: per-session arenas, as before
        return False


def cuda_provider_options(cuda_options: Mapping[str, str] | None = None, *,
                          deterministic: bool = False) -> dict[str, str]:
    """onnxruntime CUDA provider options: the given ones, and with ``deterministic`` no TF32
    (float32 matmuls and convolutions in full float32) and a fixed cuDNN algorithm choice
    (``cudnn_conv_algo_search=DEFAULT``) so that a run repeats exactly."""
    out = {str(k): str(v) for k, v in (cuda_options or {}).items()}
    if deterministic:
        out.update({"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"})
    return out


def make_session(
    model: Any,
    *,
    provider: str = "auto",
    optimization: str = "all",
    threads: int | None = None,
    cuda_options: Mapping[str, str] | None = None,
    deterministic: bool = False,
) -> Session:
    """Build an onnxruntime session.

    Parameters
    ----------
    model : onnx.ModelProto, bytes, str or path-like
        The model (a path is passed to onnxruntime as is, so external data loads).
    provider : {"auto", "cpu", "cuda"}
        ``auto`` takes CUDA when :func:`cuda_usable`, else the CPU.
    optimization : {"disable", "basic", "extended", "all"}
        onnxruntime graph optimisation level.
    threads : int, optional
        Intra-op threads (default: onnxruntime's choice, one per physical core).
    cuda_options : mapping of str to str, optional
        CUDA execution provider options (e.g. ``user_compute_stream``, set by the GPU data
        path of :mod:`engine.gpu`); ignored when the session runs on the CPU.
    deterministic : bool
        onnxruntime's deterministic compute, and on CUDA no TF32 and a fixed cuDNN algorithm
        (:func:`cuda_provider_options`): slower, but a run repeats bit for bit.

    Returns
    -------
    Session

    Raises
    ------
    ValueError
        Unknown provider or optimisation level; ``provider="cuda"`` where CUDA cannot load;
        a model onnxruntime cannot load.

    Notes
    -----
    On the CPU, ``session.intra_op.allow_spinning`` is ``"0"``: idle onnxruntime threads
    sleep instead of spinning, leaving the cores to the Numba kernels that run between
    inference calls.

    Examples
    --------
    >>> sess = make_session("unet.onnx", provider="cpu")  # doctest: +SKIP
    >>> sess.provider  # doctest: +SKIP
    'CPUExecutionProvider'
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"provider={provider!r}; expected one of {list(PROVIDERS)}")
    if optimization not in OPTIMIZATIONS:
        raise ValueError(f"optimization={optimization!r}; expected one of {list(OPTIMIZATIONS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads={threads!r}; expected a non-negative integer (0 = onnxruntime's default)")
    if provider == "cuda" and not cuda_usable():
        raise ValueError(
            f"{option('provider', 'cuda')} was asked for but onnxruntime's CUDA execution provider "
            f"cannot load here (providers listed: {ort.get_available_providers()}); use "
            f"{option('provider', 'auto')} or {option('provider', 'cpu')}")
    use_cuda = provider == "cuda" or (provider == "auto" and cuda_usable())
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        opts.intra_op_num_threads = threads
    if deterministic:
        opts.use_deterministic_compute = True
    # 4 = fatal only: a failed run raises, and protoseg says what failed in one line
    opts.log_severity_level = 4
    if not use_cuda:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # one CPU memory arena for all sessions of the process: a run split into several
        # passes (one session each) then peaks like one pass, not like the sum of passes
        if _shared_cpu_arena():
            opts.add_session_config_entry("session.use_env_allocators", "1")
    providers: list[Any] = [_CUDA, _CPU] if use_cuda else [_CPU]
    cuda_opts = cuda_provider_options(cuda_options, deterministic=deterministic)
    if use_cuda and cuda_opts:  # GPU data path (issue 19): e.g. one stream shared with Numba
        providers[0] = (_CUDA, cuda_opts)
    if hasattr(model, "SerializeToString"):
        source: Any = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        source = bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        if not os.path.exists(source):
            raise FileNotFoundError(f"ONNX model file not found: {source!r}; check the path")
    else:
        raise TypeError(f"model must be an onnx.ModelProto, bytes or a path, got {type(model).__name__}")
    try:
        sess = ort.InferenceSession(source, opts, providers=providers)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"onnxruntime cannot load the model ({reason}); check it with "
                         "`protoseg inspect` or re-export it") from None
    inputs = sess.get_inputs()
    first = inputs[0].shape if inputs else []
    fixed = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None
    return Session(
        ort_session=sess,
        provider=sess.get_providers()[0],
        optimization=optimization,
        input_names=[i.name for i in inputs],
        output_names=[o.name for o in sess.get_outputs()],
        input_shapes={i.name: tuple(i.shape) for i in inputs},
        input_types={i.name: i.type for i in inputs},
        fixed_batch=fixed,
        threads=threads,
    )
