"""GPU check: does the CUDA provider run, do its scores equal the CPU's, how fast is each?

Run on a machine with a GPU (under 5 minutes; degrades gracefully without one)::

    python -m benchmarks.gpu_check              # exit 0 also where CUDA is not usable
    python -m benchmarks.gpu_check --require-cuda --cases 64

It builds a small 2-D U-Net (``tests/models.py``: 16/32 channels, 128×128, dynamic batch),
exposes all its hidden tensors, and for the same synthetic images runs, on the CPU and on
CUDA: inference alone, then inference + layer-level SA of every hidden tensor
(``engine.sa_scores``, guide = reference = the thresholded prediction; the kernels run on
the CPU after a host copy). It prints the provider each session really used, the largest
differences between the two runs (hidden tensors, probabilities, decisions, SA scores), and
cases/s for both. When ``engine.score_dataset`` works it also runs the whole pipeline on
both providers and compares the stores' layer scores.

CUDA may use TF32 convolutions (onnxruntime's default on Ampere and later), so tensors
differ at ~1e-3 relative; the check passes when SA scores differ by at most ``--tol``
(default 0.01) and the mean absolute score difference is below ``--tol / 10``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: python benchmarks/gpu_check.py
    sys.path.insert(0, str(ROOT))

from engine import open_store, sa_scores, score_dataset  # noqa: E402
from engine.model.card import resolve_model_card  # noqa: E402
from engine.model.graph import expose, list_hidden_tensors  # noqa: E402
from engine.model.session import cuda_usable, make_session  # noqa: E402
from tests.models import save, unet  # noqa: E402

__all__ = ["main"]


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Blobs on a noisy background, (n, 1, size, size) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        out[i, 0] = np.clip(0.6 * blob + 0.2 + 0.1 * rng.normal(size=(size, size)), 0, 1)
    return out


def _run_provider(provider: str, model: Any, card: Any, tensors: list[Any], images: np.ndarray,
                  batch: int) -> dict[str, Any]:
    sess = make_session(expose(model, tensors), provider=provider)
    names = [t.name for t in tensors]
    pred_name = card.prediction_output
    # warm-up (CUDA initialisation, cuDNN algorithm search)
    sess.run({card.input_name: images[:batch]})
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        sess.run({card.input_name: images[s:s + batch]})
    t_inf = time.perf_counter() - t0

    scores = np.full((len(images), len(names)), np.nan)
    first_out: dict[str, np.ndarray] = {}
    probs = []

    def score_batch(s: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        out = sess.run({card.input_name: images[s:s + batch]})
        prob = card.to_probability({pred_name: out[pred_name]})[:, 0]
        pred = prob > card.threshold
        for j, name in enumerate(names):
            feats = card.to_channels_first(out[name], name)
            res = sa_scores(feats, pred.astype(np.float32), pred, level="layer")
            scores[s:s + batch, j] = res.score
        return out, prob

    score_batch(0)  # warm-up: Numba kernels load from cache / compile
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        out, prob = score_batch(s)
        probs.append(prob)
        if s == 0:
            first_out = {k: np.array(v) for k, v in out.items()}
    t_all = time.perf_counter() - t0
    return {"provider": sess.provider, "scores": scores, "prob": np.concatenate(probs),
            "first": first_out, "cases_per_s_inference": len(images) / t_inf,
            "cases_per_s_with_sa": len(images) / t_all}


def _pipeline(provider: str, model_path: Path, data_path: Path, work: Path, batch: int) -> np.ndarray:
    store = work / f"scores_{provider}.h5"
    score_dataset(model_path, data_path, store, provider=provider, batch_size=batch, overwrite=True)
    st = open_store(store)
    return np.asarray(st.layer_scores()["score"], dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    """Run the check; return the exit status (0 ok, 1 mismatch or required CUDA missing)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--require-cuda", action="store_true", help="exit 1 when CUDA is not usable")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the score_dataset comparison")
    parser.add_argument("--self-test", action="store_true",
                        help="without a GPU: compare the CPU with itself through the same code path")
    args = parser.parse_args(argv)

    print(f"onnxruntime {ort.__version__}; providers listed: {ort.get_available_providers()}")
    usable = cuda_usable()
    model = unet(ndim=2, size=args.size, base=16, batch="N", metadata=True)
    card = resolve_model_card(model)
    tensors = list_hidden_tensors(model)
    images = _images(args.cases, args.size)
    print(f"model: 2-D U-Net {args.size}x{args.size}, {len(tensors)} hidden tensors exposed; "
          f"{args.cases} cases, batch {args.batch}")

    cpu = _run_provider("cpu", model, card, tensors, images, args.batch)
    print(f"CPU : provider {cpu['provider']}: {cpu['cases_per_s_inference']:.1f} cases/s inference, "
          f"{cpu['cases_per_s_with_sa']:.1f} cases/s inference + layer SA")
    other = "cuda"
    if args.self_test:
        print("self-test: the second run is on the CPU too (checks this script, not CUDA)")
        other, usable = "cpu", True
    if not usable:
        print("CUDA provider not usable here (onnxruntime lists it, but it cannot load: no GPU or "
              "no CUDA/cuDNN libraries); CPU numbers only")
        return 1 if args.require_cuda else 0

    gpu = _run_provider(other, model, card, tensors, images, args.batch)
    ran_cuda = gpu["provider"] == "CUDAExecutionProvider" or args.self_test
    print(f"CUDA: provider {gpu['provider']}: {gpu['cases_per_s_inference']:.1f} cases/s inference, "
          f"{gpu['cases_per_s_with_sa']:.1f} cases/s inference + layer SA")
    print(f"speed-up CUDA/CPU: inference {gpu['cases_per_s_inference'] / cpu['cases_per_s_inference']:.2f}x, "
          f"with SA {gpu['cases_per_s_with_sa'] / cpu['cases_per_s_with_sa']:.2f}x")
    worst_rel = 0.0
    for name, a in cpu["first"].items():
        b = gpu["first"][name]
        rel = float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
        worst_rel = max(worst_rel, rel)
    flips = float(np.mean((cpu["prob"] > card.threshold) != (gpu["prob"] > card.threshold)))
    both = np.isfinite(cpu["scores"]) & np.isfinite(gpu["scores"])
    same_nan = bool(np.array_equal(np.isnan(cpu["scores"]), np.isnan(gpu["scores"])))
    diff = np.abs(cpu["scores"][both] - gpu["scores"][both]) if both.any() else np.zeros(1)
    print(f"max relative tensor difference (first batch): {worst_rel:.2e}; prediction decisions "
          f"differing: {flips:.2e}; SA scores: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}, "
          f"same undefined cases: {same_nan}; defined scores {int(both.sum())}/{both.size}")
    ok = ran_cuda and same_nan and diff.max() <= args.tol and diff.mean() <= args.tol / 10

    if not args.no_pipeline:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                model_path = save(model, work / "unet.onnx")
                data_path = work / "data.npz"
                np.savez(data_path, images=images)
                t0 = time.perf_counter()
                s_cpu = _pipeline("cpu", model_path, data_path, work, args.batch)
                t1 = time.perf_counter()
                s_gpu = _pipeline(other, model_path, data_path, work, args.batch)
                t2 = time.perf_counter()
            m = np.isfinite(s_cpu) & np.isfinite(s_gpu)
            pd = float(np.max(np.abs(s_cpu[m] - s_gpu[m]))) if m.any() else 0.0
            print(f"pipeline (score_dataset): CPU {args.cases / (t1 - t0):.1f} cases/s, CUDA "
                  f"{args.cases / (t2 - t1):.1f} cases/s; layer scores max |diff| {pd:.2e}")
            ok = ok and pd <= args.tol
        except Exception as exc:  # the pipeline is optional here; report, do not hide
            print(f"pipeline comparison skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    what = "the two CPU runs match (self-test)" if args.self_test else "CUDA ran and scores match the CPU run"
    print("RESULT:", f"OK - {what}" if ok else "MISMATCH or CUDA did not run")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
