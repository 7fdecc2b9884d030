"""GPU check: zero-copy device scoring, bitwise equal to the CPU twins; how fast is each path?

Run on a machine with a GPU (under 5 minutes on one GPU)::

    python -m benchmarks.gpu_check                 # exit 0 also where CUDA is not usable
    python -m benchmarks.gpu_check --require-cuda  # exit 1 there
    python -m benchmarks.gpu_check --simulate      # no GPU: Numba's CUDA simulator, ORT on CPU

Steps (each prints a line; any mismatch makes the exit status 1):

1. build a small 2-D U-Net (``tests/models.py``) exposing its hidden tensors; run it on the
   CUDA provider on the scorer's stream (``user_compute_stream``) with the hidden outputs
   bound on the device, and check **zero-copy**: each Numba view's device pointer equals the
   ``OrtValue``'s ``data_ptr()``;
2. score every hidden tensor on the device (layer and unit level) and with the CPU twins of
   the kernels on a host copy: counts, statuses and scores must be **bitwise** equal; the
   production CPU kernels (``engine.sa_scores``) are compared too (informative: they may
   differ at near-ties);
3. onnxruntime's CUDA features against its CPU features (TF32, cuDNN algorithms): max
   relative |ΔF| and the layer decisions that flip because of it (reported, not asserted);
4. time a 3-D workload: onnxruntime alone, + device scoring, + host copy and CPU scoring;
5. the pipeline: :func:`engine.run.batch.score_batch` with the device backend (its self-check
   on) against the CPU backend.

``--simulate`` runs the same steps with ``NUMBA_ENABLE_CUDASIM=1`` (set here before Numba is
imported) and onnxruntime on the CPU, on tiny shapes: the simulator has no zero-copy views
(tensors are copied; step 1 says so), no FMA effects, and runs ~10⁵× slower than the twins,
so its timings mean nothing. The test suite runs it (``tests/engine/gpu/test_gpu_check.py``),
so the script is known to work before any GPU time is spent.
"""
from __future__ import annotations

import os
import sys

if "--simulate" in sys.argv[1:]:  # before numba is imported, by anything
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: python benchmarks/gpu_check.py
    sys.path.insert(0, str(ROOT))

from engine import gpu, sa_scores  # noqa: E402
from engine.model.card import resolve_model_card  # noqa: E402
from engine.model.graph import expose, list_hidden_tensors  # noqa: E402
from engine.model.session import make_session  # noqa: E402
from tests.models import save, unet  # noqa: E402

__all__ = ["main"]

_FIELDS = ("score", "status", "tp", "fp", "fn")


def _images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Blobs on a noisy background, (n, 1, *shape) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) / s for s in shape], indexing="ij")
    out = np.empty((n, 1) + shape, np.float32)
    for i in range(n):
        c, r = rng.uniform(0.3, 0.7, len(shape)), rng.uniform(0.15, 0.3)
        blob = (sum((g - ci) ** 2 for g, ci in zip(grids, c)) < r * r).astype(np.float32)
        out[i, 0] = np.clip(0.6 * blob + 0.2 + 0.1 * rng.normal(size=shape), 0, 1)
    return out


def _same(a: Any, b: Any) -> bool:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return all(np.array_equal(getattr(x, f), getattr(y, f), equal_nan=True) for x, y in pairs for f in _FIELDS)


def _n_diff(a: Any, b: Any) -> int:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return int(sum(np.count_nonzero(~((x.tp == y.tp) & (x.fp == y.fp))) for x, y in pairs))


class _Model:
    """A U-Net with its hidden tensors exposed, its card and one session on ``provider``."""

    def __init__(self, ndim: int, size: int, base: int, provider: str, cuda_options: dict[str, str]) -> None:
        self.proto = unet(ndim=ndim, size=size, base=base, batch="N", metadata=True)
        self.card = resolve_model_card(self.proto)
        self.tensors = [t for t in list_hidden_tensors(self.proto) if len(t.shape or ()) == ndim + 2]
        self.names = [t.name for t in self.tensors]
        self.session = make_session(expose(self.proto, self.tensors), provider=provider, cuda_options=cuda_options)

    def device_run(self, x: np.ndarray) -> dict[str, Any]:
        pred = self.card.prediction_output
        return self.session.run_device({self.card.input_name: x}, outputs=self.names + [pred], host=[pred])

    def guide(self, out: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        pred = self.card.to_probability({self.card.prediction_output: out[self.card.prediction_output]})[:, 0]
        ref = pred > self.card.threshold
        return ref.astype(np.float32), ref


def _sync(scorer: gpu.DeviceScorer) -> None:
    scorer.stream.synchronize()


def _check_zero_copy_and_bitwise(m: _Model, scorer: gpu.DeviceScorer, images: np.ndarray, sim: bool,
                                 level: str) -> bool:
    out = m.device_run(images)
    g, ref = m.guide(out)
    ok, copied, n_prod = True, 0, 0
    for t in m.tensors:
        value = out[t.name]
        feats = scorer.features(value, name=t.name, layout=m.card.layout_of(t.name))
        if not isinstance(feats, gpu.DeviceTensor):
            print(f"  {t.name}: not float32 ({feats.dtype}); scored on the CPU")
            continue
        if isinstance(value, np.ndarray) or sim:
            copied += 1
        else:
            ptr = feats.array.__cuda_array_interface__["data"][0]
            if ptr != value.data_ptr():
                print(f"  {t.name}: NOT zero-copy (view at {ptr:#x}, OrtValue at {value.data_ptr():#x})")
                ok = False
        dev = scorer.sa_scores(feats, g, ref, level=level)
        host = np.ascontiguousarray(feats.array.copy_to_host())
        twin = gpu.score_twin(host, g, ref, level=level,
                              layout="channels_last" if feats.channels_last else "channels_first")
        if not _same(dev, twin):
            print(f"  {t.name}: MISMATCH between the device and the CPU twin")
            ok = False
        prod = sa_scores(feats.to_host(), g, ref, level=level)
        n_prod += _n_diff(dev, prod)
    zc = (f"zero-copy not checkable under the simulator ({copied} tensors copied)" if sim
          else "zero-copy: every view's pointer is the OrtValue's" if ok else "zero-copy FAILED")
    print(f"[1-2] {len(m.tensors)} hidden tensors, level {level}: {zc}; device vs CPU twin "
          f"{'bitwise equal' if ok else 'DIFFERENT'}; scores differing from the production CPU kernels "
          f"(near-ties, informative): {n_prod}")
    return ok


def _tf32_report(m: _Model, images: np.ndarray) -> None:
    """ORT's CUDA features against its CPU features, and the layer decisions that flip."""
    cpu = make_session(expose(m.proto, m.tensors), provider="cpu")
    pred = m.card.prediction_output
    a = cpu.run({m.card.input_name: images})
    b = m.session.run({m.card.input_name: images})
    g, ref = m.guide({pred: a[pred]})
    worst, flips, total = 0.0, 0, 0
    for name in m.names:
        fa, fb = m.card.to_channels_first(a[name], name), m.card.to_channels_first(b[name], name)
        worst = max(worst, float(np.max(np.abs(fa - fb)) / (np.max(np.abs(fa)) + 1e-12)))
        ra = gpu.score_twin(np.ascontiguousarray(fa), g, ref)
        rb = gpu.score_twin(np.ascontiguousarray(fb), g, ref)
        flips += int(np.sum(np.abs(ra.tp - rb.tp) + np.abs(ra.fp - rb.fp)))
        total += int(np.prod(ref.shape))
    print(f"[3] onnxruntime CUDA vs CPU features: max relative |dF| {worst:.2e}; layer decisions flipped "
          f"{flips} of {total * len(m.names)} (TF32/cuDNN; reported, not asserted)")


def _timings(m: _Model, scorer: gpu.DeviceScorer, images: np.ndarray, batch: int, level: str, sim: bool) -> None:
    pred = m.card.prediction_output
    rows = []

    def ort_alone() -> None:
        for s in range(0, len(images), batch):
            m.device_run(images[s:s + batch])
        _sync(scorer)

    def device() -> None:
        for s in range(0, len(images), batch):
            out = m.device_run(images[s:s + batch])
            g, ref = m.guide(out)
            for t in m.tensors:
                scorer.sa_scores(scorer.features(out[t.name], name=t.name, layout=m.card.layout_of(t.name)),
                                 g, ref, level=level)

    def host_cpu() -> None:
        for s in range(0, len(images), batch):
            out = m.session.run({m.card.input_name: images[s:s + batch]})
            g, ref = m.guide({pred: out[pred]})
            for name in m.names:
                sa_scores(m.card.to_channels_first(out[name], name), g, ref, level=level)

    for label, fn in (("onnxruntime alone (outputs on the device)", ort_alone),
                      ("+ device scoring", device), ("host copy + CPU scoring", host_cpu)):
        if not sim:  # warm-up: CUDA/cuDNN initialisation, kernel compilation
            fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        rows.append((label, dt, len(images) / dt))
    shape = "x".join(str(d) for d in images.shape[2:])
    print(f"[4] 3-D U-Net {shape}, {len(images)} cases, batch {batch}, level {level}, provider "
          f"{m.session.provider}{' (SIMULATED: times mean nothing)' if sim else ''}")
    print("    | path | seconds | cases/s |")
    print("    |---|---:|---:|")
    for label, dt, rate in rows:
        print(f"    | {label} | {dt:.3f} | {rate:.2f} |")


def _pipeline(sim: bool, images: np.ndarray, size: int, base: int, batch: int, level: str) -> bool:
    """score_batch with the device backend (self-check on) against the CPU backend."""
    from engine.run.options import ScoreOptions
    from engine.run.plan import build_plan, open_data
    from engine.run.batch import score_batch

    with tempfile.TemporaryDirectory() as tmp:
        model_path = save(unet(ndim=2, size=size, base=base, batch="N", metadata=True), Path(tmp) / "unet.onnx")
        data_path = Path(tmp) / "data.npz"
        np.savez(data_path, images=images)
        base_opts = ScoreOptions(level=level, batch_size=batch, provider="cpu", input_sa=False)
        card = resolve_model_card(model_path)
        dataset = open_data(data_path, card, base_opts)
        cpu_plan = build_plan(model_path, dataset, base_opts, card=card)
        if sim:
            dev_plan = dataclasses.replace(cpu_plan, device=gpu.DeviceScorer(self_check=True))
        else:
            dev_plan = build_plan(model_path, dataset, base_opts.with_(provider="cuda"), card=card)
        cases = [dataset[i] for i in range(len(dataset))]
        idx = list(range(len(cases)))
        try:
            res_dev = score_batch(dev_plan, cases, idx)
        except gpu.DeviceMismatchError as exc:
            print(f"[5] pipeline: {exc}")
            return False
        res_cpu = score_batch(cpu_plan, cases, idx)
    a, b = res_dev.layer.score, res_cpu.layer.score
    m = np.isfinite(a) & np.isfinite(b)
    diff = float(np.max(np.abs(a[m] - b[m]))) if m.any() else 0.0
    same_nan = bool(np.array_equal(np.isnan(a), np.isnan(b)))
    print(f"[5] pipeline (score_batch): backend {dev_plan.backend}, self-check compared "
          f"{dev_plan.device.checked} tensor scorings with the CPU twins (all equal); layer scores against "
          f"the CPU backend: max |diff| {diff:.2e}, same undefined cases: {same_nan}")
    return dev_plan.backend == "cuda" and dev_plan.device.checked > 0 and same_nan and diff <= 0.01


def main(argv: list[str] | None = None) -> int:
    """Run the check; return the exit status (0 ok, 1 mismatch or required CUDA missing)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true",
                        help="Numba's CUDA simulator and onnxruntime on the CPU (no GPU; tiny shapes)")
    parser.add_argument("--require-cuda", action="store_true", help="exit 1 when CUDA is not usable")
    parser.add_argument("--cases", type=int, default=None)
    parser.add_argument("--size3d", type=int, default=None, help="edge of the 3-D timing workload")
    args = parser.parse_args(argv)
    sim = args.simulate
    print(f"onnxruntime {ort.__version__}; providers listed: {ort.get_available_providers()}; "
          f"{'SIMULATOR (NUMBA_ENABLE_CUDASIM=1)' if sim else 'device run'}")
    if not sim:
        try:
            backend = gpu.choose_backend("cuda")
        except gpu.BackendError as exc:
            print(f"GPU path not usable here: {exc}")
            return 1 if args.require_cuda else 0
        assert backend == "cuda"
    # sizes: tiny under the simulator (every thread is a Python thread), real ones on a GPU
    size2, base, level2 = (8, 2, "both") if sim else (128, 16, "both")
    size3 = args.size3d or (6 if sim else 96)
    cases = args.cases or (1 if sim else 16)
    batch = 1 if sim else 4
    provider = "cpu" if sim else "cuda"

    scorer = gpu.DeviceScorer(self_check=False)
    opts = scorer.ort_options()
    print(f"scorer stream handle: {scorer.stream_handle}; onnxruntime CUDA options: {opts or 'none'}")
    m2 = _Model(2, size2, base, provider, opts)
    ok = _check_zero_copy_and_bitwise(m2, scorer, _images(2 if sim else 8, (size2, size2)), sim, level2)
    if not sim:
        _tf32_report(m2, _images(8, (size2, size2), seed=1))
    m3 = _Model(3, size3, base, provider, opts)
    _timings(m3, scorer, _images(cases, (size3,) * 3, seed=2), batch, "layer", sim)
    ok = _pipeline(sim, _images(2 if sim else 8, (size2, size2), seed=3), size2, base, 2 if sim else 4,
                   "layer") and ok
    print("RESULT:", "OK - device scores are bitwise equal to the CPU twins" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
