"""Train the small 2-D lung-CT U-Net shipped in ``cli/data/lungct/`` (issue 20, third network).

Real CT, nothing downloaded at run time: the two chest CT volumes ``lung1`` and ``lung2`` with
their tumour labels from the ``data/`` folder of the pyradiomics 3.0.1 source distribution
(BSD-3), which ``make setup-eval`` puts into ``.cache/pyradiomics/``. The task is lung
segmentation on axial slices, tumour included: target = aerated lung and airways (a fixed
rule on the HU volume, :func:`lung_reference`) united with the packaged tumour label — a
lung mask must contain the lesions in it. Slices are brought to 64×64 (8×8 block means of
the 512×512 HU slices) and normalised like nnU-Net's CT normalisation (clip to
[-1000, 400] HU, then (x + 500) / 500); the exported network does that itself (its input is
HU, :func:`with_ct_input`), so the model card needs only ``resize: true, scaling: none``.

Training: ``lung1`` only (small tumour). Held out: every 4th axial slice of ``lung1``
(``z % 4 == 2``, :func:`split_of`). ``lung2`` (another case: other pixel spacing, more of the
upper abdomen with its gas, a large hilar tumour outside the aerated lung) is never seen: it is
the shifted test domain of ``scripts/evaluate_estimators.py lungct``.

Usage (CPU, fixed seed, about a minute on 2 busy cores)::

    .venv/bin/python scripts/train_lungct.py --out cli/data/lungct/lungct.onnx

``--data DIR`` reads the NRRD files from another folder holding ``lung1_image.nrrd`` etc.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

__all__ = [
    "DATA_DIR",
    "SETUP_COMMAND",
    "CASES",
    "SIZE",
    "CT_NORMALIZATION",
    "find_data",
    "load_ct",
    "lung_reference",
    "block_mean",
    "ct_slices",
    "split_of",
    "normalize",
    "with_ct_input",
    "main",
]

#: Where ``make setup-eval`` extracts the pyradiomics sdist's ``data/`` folder.
DATA_DIR = REPO / ".cache" / "pyradiomics" / "data"
SETUP_COMMAND = "make setup-eval"
CASES = ("lung1", "lung2")
SIZE = (64, 64)
#: nnU-Net's CTNormalization with fixed values: clip to [lo, hi] HU, then (x - mean) / std;
#: applied by the exported network itself (:func:`with_ct_input`).
CT_NORMALIZATION = {"kind": "ct", "clip": [-1000.0, 400.0], "mean": -500.0, "std": 500.0}
#: Axial slices kept: at least this many target pixels on the 64×64 grid.
MIN_LUNG_PIXELS = 25
HIDDEN_LAYERS = ("enc1", "enc2", "enc3", "bottleneck", "up3", "dec3", "up2", "dec2", "up1", "dec1")


def find_data(data: str | Path | None = None) -> Path:
    """The folder holding ``lung{1,2}_{image,label}.nrrd``; never downloads.

    Raises
    ------
    FileNotFoundError
        One line naming the folder searched and the set-up command that fills it.
    """
    folder = Path(data) if data is not None else DATA_DIR
    missing = [f"{c}_{k}.nrrd" for c in CASES for k in ("image", "label") if not (folder / f"{c}_{k}.nrrd").is_file()]
    if missing:
        raise FileNotFoundError(
            f"pyradiomics CT data not found: {folder} lacks {', '.join(missing)}; run `{SETUP_COMMAND}` "
            "(it extracts the pyradiomics 3.0.1 sdist's data/ folder there) or pass --data DIR"
        )
    return folder


def load_ct(folder: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (float32, X×Y×Z as stored, LPS) and tumour label (uint8) of ``case``."""
    import nrrd

    img, _ = nrrd.read(str(folder / f"{case}_image.nrrd"))
    lab, _ = nrrd.read(str(folder / f"{case}_label.nrrd"))
    if img.shape != lab.shape:
        raise ValueError(f"{case}: image {img.shape} and label {lab.shape} differ; use unchanged pyradiomics data")
    return img.astype(np.float32), (lab > 0).astype(np.uint8)


def lung_reference(hu: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """Lung target: aerated lung and airways, holes filled, united with the tumour label.

    Per axial slice, voxels below -400 HU not connected to the slice border (outside air);
    in 3-D, the connected components at least 10 % the size of the largest (both lungs with
    the trachea; bowel gas is smaller and left out); per slice a closing (3 iterations) and
    hole filling (vessels); finally ``| tumour``.
    """
    from scipy import ndimage

    low = hu < -400
    inside = np.zeros(hu.shape, bool)
    for z in range(hu.shape[2]):
        lab, _ = ndimage.label(low[:, :, z])
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        inside[:, :, z] = low[:, :, z] & ~np.isin(lab, border)
    lab, n = ndimage.label(inside)
    if n == 0:
        return tumour.astype(np.uint8)
    sizes = np.asarray(ndimage.sum(inside, lab, range(1, n + 1)))
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes >= 0.1 * sizes.max()
    lung = keep[lab]
    lung = np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(lung[:, :, z], iterations=3))
                     for z in range(lung.shape[2])], axis=2)
    return (lung | (tumour > 0)).astype(np.uint8)


def block_mean(slices: np.ndarray, size: tuple[int, int] = SIZE) -> np.ndarray:
    """``(n, H, W)`` → ``(n, *size)`` by the mean over blocks (H and W multiples of ``size``).

    Block means, not :func:`scipy.ndimage.zoom`: the 512 → 64 reduction is an exact factor and
    averaging is what a larger detector would have measured.
    """
    n, h, w = slices.shape
    if h % size[0] or w % size[1]:
        raise ValueError(f"slices of {h}×{w} are not multiples of {size[0]}×{size[1]}; use the 512×512 pyradiomics CT")
    fy, fx = h // size[0], w // size[1]
    return slices.reshape(n, size[0], fy, size[1], fx).mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


def ct_slices(folder: Path, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial slices of ``case`` on the 64×64 grid: HU ``(n, 64, 64)``, target (uint8), z.

    Slices with fewer than :data:`MIN_LUNG_PIXELS` target pixels are left out.
    """
    hu, tumour = load_ct(folder, case)
    ref = lung_reference(hu, tumour)
    img = block_mean(np.moveaxis(hu, 2, 0))
    msk = (block_mean(np.moveaxis(ref, 2, 0).astype(np.float32)) >= 0.5).astype(np.uint8)
    z = np.flatnonzero(msk.reshape(len(msk), -1).sum(axis=1) >= MIN_LUNG_PIXELS)
    return img[z], msk[z], z


def split_of(z: np.ndarray) -> np.ndarray:
    """``"test"`` for every 4th axial slice (``z % 4 == 2``), else ``"train"`` (5 mm slices)."""
    z = np.asarray(z)
    return np.where(z % 4 == 2, "test", "train")


def normalize(hu: np.ndarray) -> np.ndarray:
    """:data:`CT_NORMALIZATION` in NumPy (training; the exported network applies it itself)."""
    lo, hi = CT_NORMALIZATION["clip"]
    return ((np.clip(hu, lo, hi) - CT_NORMALIZATION["mean"]) / CT_NORMALIZATION["std"]).astype(np.float32)


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, shifts, HU scale/offset and noise (in HU, before normalisation)."""
    n = x.shape[0]
    x, y = x.copy(), y.copy()
    flip = rng.random(n) < 0.5
    x[flip], y[flip] = x[flip, :, ::-1], y[flip, :, ::-1]
    for i in range(n):
        dx, dy = rng.integers(-10, 11, size=2)
        x[i], y[i] = np.roll(x[i], (dx, dy), (0, 1)), np.roll(y[i], (dx, dy), (0, 1))
    x = (x + 1000) * rng.uniform(0.9, 1.1, size=(n, 1, 1)) - 1000 + rng.uniform(-60, 60, size=(n, 1, 1))
    x = x + rng.normal(0, 1, x.shape) * rng.uniform(0, 30, size=(n, 1, 1))
    return normalize(x.astype(np.float32)), y


def with_ct_input(model):
    """``model`` with :data:`CT_NORMALIZATION` as its first operation: it then takes HU.

    The class of ``model`` is swapped for a subclass whose ``forward`` clips and scales the
    input before the U-Net's own ``forward``; modules (and so the exported layer names) are
    unchanged. Baked into the network rather than written into the model card, so that the
    shipped ONNX file needs nothing from the engine beyond ``scaling: none``.
    """
    import torch

    lo, hi = CT_NORMALIZATION["clip"]
    mean, std = CT_NORMALIZATION["mean"], CT_NORMALIZATION["std"]
    base = type(model)

    class CTInput(base):  # type: ignore[misc, valid-type]
        def forward(self, x):
            return base.forward(self, (torch.clamp(x, lo, hi) - mean) / std)

    CTInput.__name__ = CTInput.__qualname__ = f"{base.__name__}CTInput"
    model.__class__ = CTInput
    return model


def export_onnx(model, path: Path, examples: np.ndarray, *, source: str) -> dict:
    """Export with ``exporters.torch.export``: HU input (:func:`with_ct_input`), hidden outputs
    :data:`HIDDEN_LAYERS`, sigmoid output ``prob``.

    The exporter checks ONNX against torch on uniform noise in [0, 1), which this network
    (HU input) clips to one value; the same check is repeated here on ``examples`` (real HU
    slices ``(n, 64, 64)``), every output compared, and recorded as ``max_abs_diff_ct``.
    """
    import onnxruntime as ort
    import torch

    from exporters.torch import export

    model = with_ct_input(model).eval()
    result = export(
        model, torch.zeros(1, 1, *SIZE), path, layers=list(HIDDEN_LAYERS), prediction_activation="sigmoid",
        input_layout="NCHW", input_name="image", output_name="prob", threshold=0.5, source=source,
        preprocessing={"resize": True, "scaling": "none", "mean": None, "std": None},
    )
    x = np.ascontiguousarray(examples, dtype=np.float32)[:, None]
    seen: dict[str, np.ndarray] = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().numpy()))
             for n in HIDDEN_LAYERS]
    try:
        with torch.no_grad():
            seen["prob"] = model(torch.from_numpy(x)).numpy()
    finally:
        for h in hooks:
            h.remove()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"image": x})))
    diff_ct = {}
    for name, value in got.items():
        key = name if name in seen else result.layers.get(name, name)  # output name -> module path
        if key in seen:
            diff_ct[key] = float(np.abs(value - seen[key]).max())
    if set(diff_ct) != {"prob", *HIDDEN_LAYERS}:
        raise RuntimeError(f"ONNX outputs {names} do not cover prob and {HIDDEN_LAYERS}; cannot check the export")
    return {"exporter": f"exporters.torch.export ({result.exporter})", "hidden_layers": len(result.layers),
            "max_abs_diff_exporter_check": {k: float(v) for k, v in result.max_abs_diff.items()},
            "max_abs_diff_ct": diff_ct}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="cli/data/lungct/lungct.onnx", help="ONNX file to write")
    parser.add_argument("--data", default=None, help=f"folder with lung1/lung2 NRRD files (default {DATA_DIR})")
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps (default 500)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: faster than 2 on busy cores)")
    args = parser.parse_args(argv)
    try:
        folder = find_data(args.data)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from train_unet2d import _dice, build_unet, fit

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    hu, y, z = ct_slices(folder, "lung1")
    split = split_of(z)
    train, test = split == "train", split == "test"
    print(f"lung1 slices: {train.sum()} train, {test.sum()} held out", file=sys.stderr)
    model = build_unet(args.width)
    train_seconds = fit(model, hu[train], y[train].astype(np.float32), _augment, rng, steps=args.steps,
                        batch=args.batch, log_every=50)
    result: dict[str, dict[str, float]] = {}
    for name, (images, masks) in {"lung1-heldout": (hu[test], y[test]),
                                  "lung2": ct_slices(folder, "lung2")[:2]}.items():
        with torch.no_grad():
            pt = model(torch.from_numpy(normalize(images))[:, None])[:, 0].numpy()
        per_slice = [_dice(pt[i] > 0.5, masks[i] > 0) for i in range(len(pt))]
        result[name] = {"slices": len(pt), "dice_pooled": round(_dice(pt > 0.5, masks > 0), 4),
                        "dice_median_slice": round(float(np.nanmedian(per_slice)), 4),
                        "dice_min_slice": round(float(np.nanmin(per_slice)), 4),
                        "slices_below_0.8": int(np.sum(np.asarray(per_slice) < 0.8))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = export_onnx(model, out, hu[test], source=f"scripts/train_lungct.py UNet2D(width={args.width})")
    summary = {
        "command": "python scripts/train_lungct.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": "pyradiomics 3.0.1 sdist, data/lung1_*.nrrd (training, held-out slices), data/lung2_*.nrrd (shifted domain)",
        "train_slices": int(train.sum()),
        "test_slices": int(test.sum()),
        "steps": args.steps,
        "batch": args.batch,
        "width": args.width,
        "seed": args.seed,
        "train_seconds": round(train_seconds, 1),
        "dice": result,
        "onnx_bytes": out.stat().st_size,
        **info,
    }
    (out.parent / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
