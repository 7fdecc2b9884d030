"""Reading and preprocessing one 3-D case (issue 15): before/after CPU per case in one process.

Run as a module::

    python -m benchmarks.case_io [--repeat R] [--folder DIR] [--model ONNX]

Per case of ``--folder`` (default the shipped Colin27 pair, uint8 181×217×181, gzip), with the
model card of ``--model`` (default the shipped deepbrain: 128³ input, linear resize, minmax):

- ``read``: ``open_dataset(folder, spatial_ndim=3)[0]``: both NIfTI files decompressed
  (nibabel's ``gzip`` before, ISA-L's ``igzip`` after) and turned into the C-ordered arrays of
  the ``Case`` (one strided ``np.ascontiguousarray`` before, slabs after);
- ``preprocess``: ``ModelCard.preprocess(case.image)`` (resize, then minmax in float64: a
  float64 copy of the case and its temporaries before, cache-sized chunks after);
- ``labels``: the label check of a batch (``engine.run.batch._labels_in`` against the
  ``np.unique`` it replaced) on the case's mask.

"Before" runs the same engine code with the replaced helpers swapped back in
(:func:`before`): ``_read_nifti_gz`` off (``nibabel.load`` reads every file), ``_c_order`` as
``np.ascontiguousarray``, ``ModelCard._scale`` as :func:`scale_before` (the code it was) and
``_labels_in`` as :func:`labels_before`. Results are asserted identical (arrays bit for bit,
label sets equal). CPU (``time.process_time``) medians of ``repeat`` interleaved rounds after
one warm-up; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import engine.datasets as datasets
import engine.run.batch as batch
from engine.model import card as card_module
from engine.model.card import ModelCard, resolve_model_card

ROOT = Path(__file__).resolve().parents[1]
COLIN27 = ROOT / "cli" / "data" / "colin27"
DEEPBRAIN = ROOT / "cli" / "data" / "deepbrain" / "deepbrain.onnx"


def scale_before(self: ModelCard, x: np.ndarray) -> np.ndarray:
    """``ModelCard._scale`` before issue 15's fused minmax/meanstd (a float64 copy first)."""
    x64 = x.astype(np.float64)
    if self.normalization is not None:
        norm = self.normalization
        out = np.empty_like(x64)
        specs = [norm[c] if len(norm) > 1 else norm[0] for c in range(x64.shape[0])]
        inside = (card_module._nonzero_mask(x64)
                  if any(sp["kind"] == "zscore_nonzero" for sp in specs) else None)
        for c, spec in enumerate(specs):
            if spec["kind"] == "zscore_nonzero":
                out[c] = card_module._zscore_inside(x64[c], inside)
            else:
                out[c] = card_module._normalize_channel(x64[c:c + 1], spec)[0]
        return out.astype(np.float32)
    if self.scaling == "meanstd":
        shape = (-1,) + (1,) * (x.ndim - 1)
        mean = np.asarray(self.mean, dtype=np.float64).reshape(shape)
        std = np.asarray(self.std, dtype=np.float64).reshape(shape)
        return ((x64 - mean) / std).astype(np.float32)
    return card_module._normalize_channel(x64, {"kind": self.scaling}).astype(np.float32)


def labels_before(mask: np.ndarray) -> set[int]:
    """The label check's set of labels before issue 15: ``np.unique``."""
    return {int(v) for v in np.unique(mask)}


@contextlib.contextmanager
def before() -> Iterator[None]:
    """The read, preprocess and label paths as they were before issue 15 (see the module
    docstring); restored on exit."""
    saved = (datasets._read_nifti_gz, datasets._c_order, ModelCard._scale, batch._labels_in)
    datasets._read_nifti_gz = lambda *args, **kwargs: None  # type: ignore[assignment]
    datasets._c_order = lambda a, dtype: np.ascontiguousarray(a, dtype=dtype)  # type: ignore[assignment]
    ModelCard._scale = scale_before  # type: ignore[method-assign]
    batch._labels_in = labels_before  # type: ignore[assignment]
    try:
        yield
    finally:
        (datasets._read_nifti_gz, datasets._c_order, ModelCard._scale, batch._labels_in) = saved


def _one_case(folder: Path, card: ModelCard) -> dict[str, Any]:
    """Read case 0, preprocess it and take its labels; CPU seconds of each step and the results."""
    ds = datasets.open_dataset(folder, spatial_ndim=3)
    t0 = time.process_time()
    case = ds[0]
    t1 = time.process_time()
    x = card.preprocess(case.image)
    t2 = time.process_time()
    labels = batch._labels_in(case.mask) if case.mask is not None else set()
    t3 = time.process_time()
    return {"read": t1 - t0, "preprocess": t2 - t1, "labels": t3 - t2,
            "arrays": (case.image, case.mask, x), "label_set": labels}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name, u, v in zip(("image", "mask", "model input"), a["arrays"], b["arrays"]):
        if u is None and v is None:
            continue
        if u.dtype != v.dtype or u.shape != v.shape or u.tobytes() != v.tobytes() \
                or u.flags.c_contiguous != v.flags.c_contiguous:
            raise AssertionError(f"{name} differs between before and after")
    if a["label_set"] != b["label_set"]:
        raise AssertionError("the mask's label sets differ between before and after")


def measure(folder: Path, card: ModelCard, repeat: int) -> dict[str, tuple[float, float]]:
    """Medians (before, after) of CPU seconds per step, interleaved rounds after a warm-up."""
    def after_case() -> dict[str, Any]:
        return _one_case(folder, card)

    def before_case() -> dict[str, Any]:
        with before():
            return _one_case(folder, card)

    _same(before_case(), after_case())  # warm-up and the identity check
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    order: list[tuple[str, Callable[[], dict[str, Any]]]] = [("before", before_case),
                                                              ("after", after_case)]
    for r in range(repeat):
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            res = fn()
            res.pop("arrays")
            runs[name].append(res)
    out = {}
    for step in ("read", "preprocess", "labels"):
        out[step] = (statistics.median(r[step] for r in runs["before"]),
                     statistics.median(r[step] for r in runs["after"]))
    out["total"] = (statistics.median(sum(r[s] for s in ("read", "preprocess", "labels"))
                                      for r in runs["before"]),
                    statistics.median(sum(r[s] for s in ("read", "preprocess", "labels"))
                                      for r in runs["after"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.case_io", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--folder", type=Path, default=COLIN27, help="a folder of one image/mask pair")
    parser.add_argument("--model", type=Path, default=DEEPBRAIN, help="the ONNX model whose card preprocesses")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: expected a positive number of rounds")
    card = resolve_model_card(args.model)
    res = measure(args.folder, card, args.repeat)
    print(f"{args.folder.name} with the card of {args.model.name} (scaling {card.scaling}, input "
          f"{card.input_size}); CPU ms per case, medians of {args.repeat} interleaved rounds")
    print("| step | before | after | before / after |")
    print("|---|---|---|---|")
    for step, (b, a) in res.items():
        print(f"| {step} | {b * 1e3:.1f} | {a * 1e3:.1f} | {b / a:.2f}x |" if a > 0 else
              f"| {step} | {b * 1e3:.1f} | {a * 1e3:.1f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
