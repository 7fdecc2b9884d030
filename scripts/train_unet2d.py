"""Train the small 2-D U-Net shipped in ``cli/data/unet2d/`` (issue 7).

Real MRI, nothing downloaded at run time: the MNI152 (ICBM 2009a, symmetric) T1 template
and its grey- and white-matter probability maps are files of the ``nilearn`` package
(``nilearn/datasets/data/``). The task is brain-parenchyma
segmentation on axial slices: target = ``gm + wm > 0.5``. Slices are resized to 128×128
and scaled per slice to [0, 1] (min-max), exactly what the model card tells the engine to do.

Held-out slices: axial slices are grouped in blocks of 5 consecutive slices and every 5th
block (block index % 5 == 2) is never seen in training; ``--split`` files written by
``scripts/evaluate_estimators.py`` use the same rule (:func:`split_of`).

Usage (CPU, fixed seed, a few minutes on 2 cores)::

    .venv/bin/python scripts/train_unet2d.py --out cli/data/unet2d/unet2d.onnx

The files are read from the installed ``nilearn`` package (``make setup-eval`` installs it
with the ``[eval]`` extra); ``--wheel PATH`` reads them from a nilearn wheel on disk instead.
Nothing is downloaded: without either, the script stops and names the set-up command.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "MNI_FILES",
    "SIZE",
    "find_wheel",
    "load_mni",
    "axial_slices",
    "split_of",
    "minmax",
    "resize_slices",
    "build_unet",
    "main",
]

MNI_FILES = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LICENSE_MEMBER_SUFFIX = ".dist-info/licenses/LICENSE"
SIZE = (128, 128)
MIN_BRAIN_PIXELS = 200
HIDDEN_LAYERS = ("enc1", "enc2", "enc3", "bottleneck", "up3", "dec3", "up2", "dec2", "up1", "dec1")


def find_wheel(wheel: str | None) -> Path:
    """Where the MNI152 files are: ``wheel`` when given, else the installed ``nilearn`` package.

    Returns the wheel file, or the folder that holds the installed ``nilearn`` package (its
    ``site-packages``); :func:`load_mni` reads either. Never downloads.

    Raises
    ------
    FileNotFoundError
        One line: the wheel given does not exist, or nilearn is not installed (run
        ``make setup-eval``).
    """
    if wheel is not None:
        path = Path(wheel)
        if not path.is_file():
            raise FileNotFoundError(f"nilearn wheel {path} does not exist; pass an existing .whl or omit --wheel")
        return path
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "nilearn (the MNI152 template) is not installed and no --wheel was given; run `make setup-eval` "
            "(installs the [eval] extra) or pass --wheel PATH to a nilearn wheel on disk"
        )
    return Path(next(iter(spec.submodule_search_locations))).parent


def _source_name(source: Path) -> str:
    """``nilearn-X.Y.Z-….whl`` for a wheel, ``nilearn X.Y.Z (installed)`` for the package."""
    if not source.is_dir():
        return source.name
    info = sorted(source.glob("nilearn-*.dist-info"))
    return f"nilearn {info[0].name[len('nilearn-'):-len('.dist-info')]} (installed)" if info else "nilearn (installed)"


def _nifti_from_bytes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    raw = gzip.decompress(data)
    fh = nib.FileHolder(fileobj=io.BytesIO(raw))
    img = nib.Nifti1Image.from_file_map({"header": fh, "image": fh})
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def load_mni(wheel: Path) -> dict[str, np.ndarray]:
    """Read the MNI152 T1 and the GM/WM maps (scaled to [0, 1]) from a nilearn wheel or package.

    Returns a dict with ``t1`` (raw intensities), ``gm``, ``wm`` (probabilities), ``mask``
    (``gm + wm > 0.5``, uint8), ``affine`` and ``license`` (nilearn's licence text).
    """
    out: dict[str, np.ndarray] = {}
    if wheel.is_dir():  # the installed package (site-packages)
        for key, member in MNI_FILES.items():
            if not (wheel / member).is_file():
                raise KeyError(f"{member} not found under {wheel}; install a nilearn that ships the MNI152 template")
            out[key], out["affine"] = _nifti_from_bytes((wheel / member).read_bytes())
        lic = sorted(wheel.glob("nilearn-*.dist-info/licenses/LICENSE")) + sorted(wheel.glob("nilearn-*.dist-info/LICENSE*"))
        out["license"] = lic[0].read_text() if lic else ""
    else:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            for key, member in MNI_FILES.items():
                if member not in names:
                    raise KeyError(f"{member} not found in {wheel}; use a nilearn wheel that ships the MNI152 template")
                out[key], out["affine"] = _nifti_from_bytes(zf.read(member))
            lic = [n for n in names if n.endswith(LICENSE_MEMBER_SUFFIX)]
            out["license"] = zf.read(lic[0]).decode() if lic else ""
    out["gm"] = out["gm"] / 255.0
    out["wm"] = out["wm"] / 255.0
    out["mask"] = ((out["gm"] + out["wm"]) > 0.5).astype(np.uint8)
    return out


def axial_slices(volume: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Axial slices (last axis) holding at least :data:`MIN_BRAIN_PIXELS` of ``mask``.

    Returns ``(slices (n, X, Y), z indices (n,))``; without a mask every slice is kept.
    """
    z = np.arange(volume.shape[2])
    if mask is not None:
        z = z[mask.reshape(-1, volume.shape[2]).sum(axis=0) >= MIN_BRAIN_PIXELS]
    return np.moveaxis(volume[:, :, z], 2, 0), z


def split_of(z: np.ndarray) -> np.ndarray:
    """``"test"`` for slices in every 5th block of 5 consecutive slices, else ``"train"``."""
    z = np.asarray(z)
    return np.where((z // 5) % 5 == 2, "test", "train")


def minmax(images: np.ndarray) -> np.ndarray:
    """Per-image min-max scaling to [0, 1] (constant images map to 0)."""
    axes = tuple(range(1, images.ndim))
    lo = images.min(axis=axes, keepdims=True)
    hi = images.max(axis=axes, keepdims=True)
    return ((images - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)


def resize_slices(images: np.ndarray, size: tuple[int, int] = SIZE, *, mode: str = "bilinear") -> np.ndarray:
    """Resize ``(n, H, W)`` to ``(n, *size)`` with torch ``interpolate`` (align_corners=False)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(t, size=size, mode=mode, **kw)[:, 0].numpy()


def build_unet(width: int = 8):
    """A 3-level 2-D U-Net: widths ``w, 2w, 4w`` and an ``8w`` bottleneck; sigmoid output."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.act1 = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.act2 = nn.ReLU()

        def forward(self, x):
            return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))

    class UNet2D(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            self.enc1, self.enc2, self.enc3 = Block(1, w), Block(w, 2 * w), Block(2 * w, 4 * w)
            self.pool = nn.MaxPool2d(2)
            self.bottleneck = Block(4 * w, 8 * w)
            self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
            self.dec3 = Block(8 * w, 4 * w)
            self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
            self.dec2 = Block(4 * w, 2 * w)
            self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
            self.dec1 = Block(2 * w, w)
            self.head = nn.Conv2d(w, 1, 1)

        def forward(self, x):
            e1 = self.enc1(x)
            e2 = self.enc2(self.pool(e1))
            e3 = self.enc3(self.pool(e2))
            b = self.bottleneck(self.pool(e3))
            d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
            d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
            d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
            return torch.sigmoid(self.head(d1))

    return UNet2D(width)


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, small shifts, gamma, contrast and noise: enough variety for a shifted domain."""
    n = x.shape[0]
    x, y = x.copy(), y.copy()
    flip = rng.random(n) < 0.5
    x[flip], y[flip] = x[flip, :, ::-1], y[flip, :, ::-1]
    for i in range(n):
        dx, dy = rng.integers(-8, 9, size=2)
        x[i], y[i] = np.roll(x[i], (dx, dy), (0, 1)), np.roll(y[i], (dx, dy), (0, 1))
    gamma = np.exp(rng.normal(0.0, 0.25, size=(n, 1, 1)))
    x = np.clip(x, 0, 1) ** gamma
    x = x * rng.uniform(0.8, 1.2, size=(n, 1, 1)) + rng.normal(0, rng.uniform(0, 0.04, size=(n, 1, 1)), x.shape)
    return minmax(x.astype(np.float32)), y


def fit(model, x: np.ndarray, y: np.ndarray, augment, rng: np.random.Generator, *, steps: int, batch: int,
        log_every: int) -> float:
    """Train ``model`` on slices ``x`` (N, H, W) with targets ``y``: Adam (lr 3e-3, cosine over
    ``steps``), batches of ``batch`` drawn with ``rng`` and passed through ``augment(x, y, rng)``,
    loss BCE + soft Dice. Leaves the model in eval mode; returns the training seconds."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = rng.integers(0, len(x), size=batch)
        xb, yb = augment(x[idx], y[idx], rng)
        p = model(torch.from_numpy(xb)[:, None])
        yt = torch.from_numpy(np.ascontiguousarray(yb))[:, None]
        inter = (p * yt).sum()
        loss = torch.nn.functional.binary_cross_entropy(p, yt) + 1 - 2 * inter / (p.sum() + yt.sum() + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    model.eval()
    return time.perf_counter() - t0


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    inter = np.logical_and(pred, ref).sum()
    total = pred.sum() + ref.sum()
    return float("nan") if total == 0 else 2.0 * inter / total


def export_onnx(model, path: Path, *, source: str) -> dict:
    """Export to ONNX with protoseg metadata naming every ReLU output after its module.

    Uses ``exporters.torch.export`` (hidden outputs :data:`HIDDEN_LAYERS`); without it,
    ``torch.onnx.export`` (TorchScript exporter, opset 17) plus :mod:`engine.model.metadata`
    naming every ReLU output.
    """
    import onnx
    import torch

    from engine.model.metadata import METADATA_KEY, new_metadata

    model.eval()
    dummy = torch.zeros(1, 1, *SIZE)
    try:  # the project's exporter
        from exporters.torch import export as project_export
    except ImportError:  # pragma: no cover - exporters.torch missing in an old checkout
        project_export = None
    if project_export is not None:
        # every block and up-convolution; not "head": it is the output's logits, not a hidden layer
        result = project_export(
            model, dummy, path, layers=list(HIDDEN_LAYERS), prediction_activation="sigmoid",
            input_layout="NCHW", preprocessing={"resize": True, "scaling": "minmax", "mean": None, "std": None},
            input_name="image", output_name="prob", threshold=0.5, source=source,
        )
        return {"exporter": f"exporters.torch.export ({result.exporter})", "hidden_layers": len(result.layers),
                "max_abs_diff": {k: float(v) for k, v in result.max_abs_diff.items()}}
    torch.onnx.export(
        model, (dummy,), str(path), input_names=["image"], output_names=["prob"], opset_version=17,
        dynamic_axes={"image": {0: "batch"}, "prob": {0: "batch"}}, dynamo=False,
    )
    proto = onnx.load(str(path))
    hidden = {}
    for node in proto.graph.node:
        if node.op_type == "Relu":
            # node names look like "/enc1/act2/Relu" -> layer "enc1.act2"
            layer = ".".join(p for p in node.name.split("/")[:-1] if p)
            hidden[node.output[0]] = {"layer": layer, "layout": "NCHW"}
    meta = new_metadata(
        framework="torch",
        source=source,
        input={"name": "image", "layout": "NCHW", "size": list(SIZE)},
        prediction={"output": "prob", "activation": "sigmoid", "layout": "NCHW", "classes": None, "threshold": 0.5},
        preprocessing={"resize": True, "scaling": "minmax", "mean": None, "std": None},
        hidden=hidden,
    )
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return {"exporter": "torch.onnx.export (TorchScript, opset 17)", "hidden_layers": len(hidden)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="cli/data/unet2d/unet2d.onnx", help="ONNX file to write")
    parser.add_argument("--wheel", default=None, help="nilearn wheel on disk (default: the installed nilearn)")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps (default 600)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-weights", action="store_true", help="also save the torch state dict (.pt)")
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    try:
        wheel = find_wheel(args.wheel)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mni = load_mni(wheel)
    images, z = axial_slices(mni["t1"], mni["mask"])
    masks, _ = axial_slices(mni["mask"].astype(np.float32), mni["mask"])
    split = split_of(z)
    x = minmax(resize_slices(images))
    y = (resize_slices(masks) >= 0.5).astype(np.float32)
    train, test = split == "train", split == "test"
    print(f"slices: {train.sum()} train, {test.sum()} held out ({_source_name(wheel)})", file=sys.stderr)

    model = build_unet(args.width)
    t0 = time.perf_counter()  # training through export, as training.json records it
    fit(model, x[train], y[train], _augment, rng, steps=args.steps, batch=args.batch, log_every=100)
    with torch.no_grad():
        pt = model(torch.from_numpy(x[test])[:, None])[:, 0].numpy()
    per_slice = [_dice(pt[i] > 0.5, y[test][i] > 0.5) for i in range(len(pt))]
    pooled = _dice(pt > 0.5, y[test] > 0.5)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.save_weights:
        torch.save(model.state_dict(), out.with_suffix(".pt"))
    info = export_onnx(model, out, source="scripts/train_unet2d.py UNet2D(width=%d)" % args.width)
    summary = {
        "command": "python scripts/train_unet2d.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wheel": _source_name(wheel),
        "train_slices": int(train.sum()),
        "test_slices": int(test.sum()),
        "steps": args.steps,
        "seed": args.seed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "heldout_dice_pooled": round(pooled, 4),
        "heldout_dice_median_slice": round(float(np.nanmedian(per_slice)), 4),
        "heldout_dice_min_slice": round(float(np.nanmin(per_slice)), 4),
        "onnx_bytes": out.stat().st_size,
        **info,
    }
    (out.parent / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
