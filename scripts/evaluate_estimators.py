"""Honest evaluation of the label-free quality estimators on real MRI (issue 7).

One command per experiment; each builds its cases from real volumes, scores them with
:func:`engine.score_dataset` (layer and unit level, guide = reference = prediction), computes
the estimators (``paper``, ``all-layers``, cross-validated ``calibrated``) and the trivial
baselines, validates every one against the output's true Dice, writes JSON/Markdown under
``--out`` and (``--docs``) the table into ``docs/estimation.md`` between markers::

    .venv/bin/python scripts/evaluate_estimators.py unet2d --docs
    .venv/bin/python scripts/evaluate_estimators.py deepbrain --docs

``unet2d``: the shipped 2-D U-Net (``cli/data/unet2d/unet2d.onnx``, trained by
``scripts/train_unet2d.py`` on MNI152 slices) on its held-out MNI152 axial slices and on
Colin27 axial slices (a shifted domain: another scanner/subject/averaging). Reference on
Colin27: ``ch2bet > 0`` minus CSF-dark voxels (``ch2 < 0.5 × median(ch2 in ch2bet)``), the
closest analogue of the training target (grey + white matter, no CSF); ``ch2bet > 0`` alone
would count ventricles and sulcal CSF the network was trained to leave out.

``deepbrain``: the demo 3-D U-Net (``cli/data/deepbrain/deepbrain.onnx``) on two subjects
(Colin27 and the MNI152 template), each clean and under graded corruptions (noise, blur,
bias field, contrast/gamma, down-up resampling, crop, shift). Reference: Colin27
``ch2bet > 0``; MNI152 ``gm + wm > 0.5`` with holes filled slice by slice and closed in 3-D
(a brain mask with the ventricles, like deepbrain's target). Geometric corruptions move the
reference with the image.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

__all__ = ["build_unet2d_cases", "build_deepbrain_cases", "corrupt", "evaluate_store", "main"]

COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN_BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
DOCS = REPO / "docs" / "estimation.md"
CORRUPTIONS = ("noise", "blur", "bias", "gamma", "resample", "crop", "shift")


def _load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def colin_tissue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colin27 image, brain mask (``ch2bet > 0``) and tissue mask (brain minus dark CSF)."""
    img = _load_nifti(COLIN)
    brain = _load_nifti(COLIN_BET) > 0
    tissue = brain & (img >= 0.5 * np.median(img[brain]))
    return img, brain.astype(np.uint8), tissue.astype(np.uint8)


def mni_brain_mask(mask: np.ndarray) -> np.ndarray:
    """``gm + wm > 0.5`` with holes filled per axial slice, then a 3-D closing."""
    from scipy import ndimage

    filled = np.stack([ndimage.binary_fill_holes(mask[:, :, z]) for z in range(mask.shape[2])], axis=2)
    closed = ndimage.binary_closing(filled, structure=np.ones((3, 3, 3)), iterations=2)
    return ndimage.binary_fill_holes(closed).astype(np.uint8)


# ----------------------------------------------------------------------------- cases


def build_unet2d_cases(out: Path, wheel: str | None) -> Path:
    """NPZ with held-out MNI152 axial slices and Colin27 axial slices (native grids)."""
    from train_unet2d import axial_slices, find_wheel, load_mni, split_of

    mni = load_mni(find_wheel(wheel))
    m_img, z = axial_slices(mni["t1"], mni["mask"])
    m_msk, _ = axial_slices(mni["mask"], mni["mask"])
    keep = split_of(z) == "test"
    c_img, _, c_tis = colin_tissue()
    c_slices, cz = axial_slices(c_img, c_tis)
    c_msk, _ = axial_slices(c_tis, c_tis)
    # Colin27 (181x217) is padded to the MNI grid (197x233) so that one NPZ holds both
    pad = [(0, 0), (8, 8), (8, 8)]
    c_slices = np.pad(c_slices, pad)
    c_msk = np.pad(c_msk, pad)
    images = np.concatenate([m_img[keep], c_slices]).astype(np.float32)
    masks = np.concatenate([m_msk[keep], c_msk]).astype(np.uint8)
    ids = [f"mni_z{k:03d}" for k in z[keep]] + [f"colin_z{k:03d}" for k in cz]
    groups = ["mni152-heldout"] * int(keep.sum()) + ["colin27"] * len(cz)
    path = out / "unet2d_cases.npz"
    np.savez(path, images=images, masks=masks, ids=np.array(ids), groups=np.array(groups))
    return path


def corrupt(img: np.ndarray, mask: np.ndarray, kind: str, level: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One corruption of a volume at level 1..3 (stronger with level); geometry moves the mask."""
    from scipy import ndimage

    scale = float(np.percentile(img, 99))
    x = img.astype(np.float32)
    if kind == "noise":
        x = x + rng.normal(0, (0.08, 0.2, 0.4)[level - 1] * scale, x.shape).astype(np.float32)
    elif kind == "blur":
        x = ndimage.gaussian_filter(x, (1.5, 3.0, 5.0)[level - 1])
    elif kind == "bias":
        grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in x.shape], indexing="ij")
        field = sum(rng.uniform(-1, 1) * g for g in grids) + rng.uniform(-1, 1) * grids[0] * grids[2]
        x = x * np.exp((0.3, 0.6, 1.0)[level - 1] * field).astype(np.float32)
    elif kind == "gamma":
        g = (2.0, 3.0, 0.3)[level - 1]
        x = scale * np.clip(x / scale, 0, None) ** g
    elif kind == "resample":
        f = (2, 3, 5)[level - 1]
        small = ndimage.zoom(x, 1 / f, order=1)
        x = ndimage.zoom(small, np.array(x.shape) / np.array(small.shape), order=1)[: x.shape[0], : x.shape[1], : x.shape[2]]
    elif kind == "crop":
        frac = (0.15, 0.3, 0.45)[level - 1]  # remove the top of the head (superior slices)
        cut = int(x.shape[2] * (1 - frac))
        x, mask = x.copy(), mask.copy()
        x[:, :, cut:] = 0
        mask[:, :, cut:] = 0
    elif kind == "shift":
        s = (15, 30, 50)[level - 1]
        x = np.roll(x, s, axis=0)
        mask = np.roll(mask, s, axis=0)
        x[:s] = 0
        mask[:s] = 0
    else:
        raise ValueError(f"corruption {kind!r}; expected one of {', '.join(CORRUPTIONS)}")
    return x.astype(np.float32), mask.astype(np.uint8)


def build_deepbrain_cases(out: Path, wheel: str | None, levels: int, seed: int = 0) -> Path:
    """NPZ with Colin27 and MNI152 volumes, clean and corrupted (graded), grouped by subject."""
    from train_unet2d import find_wheel, load_mni

    rng = np.random.default_rng(seed)
    c_img, c_brain, _ = colin_tissue()
    mni = load_mni(find_wheel(wheel))
    subjects = {
        "colin27": (c_img, c_brain),
        # MNI grid is 197x233x189: crop centrally to Colin27's 181x217x181 so one NPZ holds both
        "mni152": (mni["t1"][8:189, 8:225, 4:185], mni_brain_mask(mni["mask"])[8:189, 8:225, 4:185]),
    }
    images, masks, ids, groups = [], [], [], []
    for subject, (img, msk) in subjects.items():
        images.append(img)
        masks.append(msk)
        ids.append(f"{subject}_clean")
        groups.append(subject)
        for kind in CORRUPTIONS:
            for level in range(1, levels + 1):
                x, m = corrupt(img, msk, kind, level, rng)
                images.append(x)
                masks.append(m)
                ids.append(f"{subject}_{kind}{level}")
                groups.append(subject)
    path = out / "deepbrain_cases.npz"
    np.savez(path, images=np.stack(images), masks=np.stack(masks), ids=np.array(ids), groups=np.array(groups))
    return path


# ----------------------------------------------------------------------------- evaluation


def evaluate_store(store_path: Path, *, paper_exclude: tuple[str, ...] = (), folds: int = 5, n_boot: int = 1000) -> dict[str, Any]:
    """Estimators, baselines, cross-validated calibration and validation for one store."""
    from engine.quality import calibrate, estimate_quality, validate, validation_rows
    from engine.store import open_store

    store = open_store(store_path)
    if store.config.get("guide") != "prediction" or store.config.get("reference") != "prediction":
        raise ValueError(
            f"{store_path} was scored with guide={store.config.get('guide')!r}, reference="
            f"{store.config.get('reference')!r}; label-free estimates need guide = reference = 'prediction' "
            "(ground truth would leak into the estimate) — rescore without --reuse-store"
        )
    ls_all = store.layer_scores()
    layers_all = store.layers
    # one-channel tensors before the first / after the last multi-channel tensor (by depth) are
    # copies of the input or the output head (logits, sigmoid), not hidden layers: left out of
    # every estimator (their SA against the prediction is close to 1 by construction)
    depth, chans = layers_all["depth"], layers_all["channels"]
    multi = depth[chans > 1]
    keep = (chans > 1) | ((depth > multi.min()) & (depth < multi.max())) if multi.size else np.ones(len(depth), bool)
    layers = layers_all[keep]
    ls = {k: v[..., keep] for k, v in ls_all.items()}
    dropped = [str(n) for n in layers_all["name"][~keep]]
    cases = store.cases
    dice = store.output_dice()[:, 0].astype(float)
    groups = [str(g) for g in cases["group"]]
    units = store.unit_scores if store.has_units else None
    est: dict[str, np.ndarray] = {}
    details = {}
    for name in ("paper", "all-layers"):
        e, d = estimate_quality(ls, units, layers, estimator=name, exclude=paper_exclude, return_details=True)
        d_reasons = [r for r in d["reason"] if r]
        est[name] = e
        details[name] = {"layers": d["layers"], "level": d["level"], "n_nan": int(np.isnan(e).sum()),
                         "nan_reasons": sorted(set(d_reasons))[:5]}
    try:
        cal = calibrate(ls, units, layers, dice, groups=groups, folds=folds)
    except ValueError as exc:  # e.g. too few defined scores: say so in the results
        cal, cal_error = None, str(exc)
    else:
        cal_error = None
        est["calibrated (out-of-fold)"] = np.asarray(cal.oof_estimate, dtype=float)
    base = {k: np.asarray(v)[:, 0] for k, v in store.baselines().items()}
    est.update(base)
    volume = base.get("predicted_fraction")
    val = validate(est, dice, groups=groups, predicted_volume=volume, n_boot=n_boot, seed=0)
    store.write_estimates(
        {k.split(" ")[0]: v for k, v in est.items()},
        validation=val,
        info={"calibration": None if cal is None else json.loads(cal.to_json()), "details": details},
    )
    return {
        "store": str(store_path),
        "n_cases": int(len(cases)),
        "n_layers": int(len(layers)),
        "dice": {"min": float(np.nanmin(dice)), "median": float(np.nanmedian(dice)), "max": float(np.nanmax(dice))},
        "groups": sorted(set(groups)),
        "left_out_input_or_head": dropped,
        "details": details,
        "calibration": {"error": cal_error} if cal is None else {
            "choice": cal.choice["name"],
            "choice_layers": cal.choice["layers"],
            "cv_spearman_pooled_oof": cal.cv_metric,
            "cv_spearman_mean_of_folds": cal.cv_fold_mean,
            "in_sample_spearman": cal.in_sample_metric,
            "folds": [{k: f[k] for k in ("fold", "selected", "train_metric", "test_metric", "n_test", "test_groups")} for f in cal.folds],
        },
        "rows": validation_rows(val),
    }


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown(result: dict[str, Any], title: str) -> str:
    """A Markdown section with the pooled and within-group table."""
    groups = result["groups"]
    lines = [
        f"### {title}",
        "",
        f"{result['n_cases']} cases, {result['n_layers']} scored layers; true Dice min/median/max "
        f"{result['dice']['min']:.3f} / {result['dice']['median']:.3f} / {result['dice']['max']:.3f}. "
        f"`paper` used {', '.join(result['details']['paper']['layers'])} (unit level).",
        "",
        "| estimator | n | Spearman [95 % CI] | Pearson [95 % CI] | partial Spearman given volume | AUROC (Dice < 0.8) | worst-10 % overlap | "
        + " | ".join(f"Spearman in {g}" for g in groups) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(groups),
    ]
    rows = result["rows"]
    for r in rows:
        if r["scope"] != "all":
            continue
        within = {x["scope"][6:]: x for x in rows if x["estimator"] == r["estimator"] and x["scope"] != "all"}
        lines.append(
            f"| {r['estimator']} | {r['n']} | {_fmt(r['spearman'])} [{_fmt(r['spearman_lo'])}, {_fmt(r['spearman_hi'])}] "
            f"| {_fmt(r['pearson'])} [{_fmt(r['pearson_lo'])}, {_fmt(r['pearson_hi'])}] | {_fmt(r['partial_spearman'])} "
            f"| {_fmt(r['auroc'])} | {r['worst_overlap']}/{r['worst_k']} | "
            + " | ".join(_fmt(within[g]["spearman"]) if g in within else "—" for g in groups) + " |"
        )
    cal = result["calibration"]
    if "error" in cal:
        lines += ["", f"Calibration failed: {cal['error']}", ""]
    else:
        lines += [
            "",
            f"Calibrated: cross-validated Spearman **{_fmt(cal['cv_spearman_pooled_oof'])}** pooled out-of-fold, "
            f"**{_fmt(cal['cv_spearman_mean_of_folds'])}** as the mean of the held-out folds; "
            f"the final choice on all labelled cases is `{cal['choice']}` with in-sample Spearman "
            f"{_fmt(cal['in_sample_spearman'])} (optimistic). Per fold: "
            + "; ".join(
                f"fold {f['fold']} ({', '.join(f['test_groups'] or []) or str(f['n_test']) + ' cases'}) chose "
                f"`{f['selected']}`, held-out Spearman {_fmt(f['test_metric'])}"
                for f in cal["folds"]
            )
            + ".",
            "",
        ]
    if result["left_out_input_or_head"]:
        lines.insert(3, f"Left out (one-channel copies of the input or the output head): {', '.join(result['left_out_input_or_head'])}.")
    return "\n".join(lines)


def write_docs(section: str, text: str) -> None:
    """Replace the text between ``<!-- results:<section> -->`` markers in docs/estimation.md."""
    start, end = f"<!-- results:{section} -->", f"<!-- /results:{section} -->"
    doc = DOCS.read_text()
    if start not in doc or end not in doc:
        raise ValueError(f"{DOCS} lacks the markers {start} … {end}; add them where the results go")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    DOCS.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate the label-free quality estimators on real MRI.")
    parser.add_argument("experiment", choices=("unet2d", "deepbrain"))
    parser.add_argument("--out", default=None, help="output folder (default out/eval-<experiment>)")
    parser.add_argument("--wheel", default=None, help="nilearn wheel on disk (default: pip download)")
    parser.add_argument("--levels", type=int, default=3, help="deepbrain: corruption levels per kind (1-3)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--reuse-store", action="store_true", help="skip building and scoring: evaluate the store in --out")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted scoring run in --out")
    parser.add_argument("--model", default=None, help="ONNX model (default: the shipped one)")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/estimation.md")
    args = parser.parse_args(argv)

    from engine.run import score_dataset

    out = Path(args.out or REPO / "out" / f"eval-{args.experiment}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = out / "scores.h5"
    if args.experiment == "unet2d":
        model = Path(args.model or REPO / "cli" / "data" / "unet2d" / "unet2d.onnx")
        # "auto": the layers the torch exporter exposed and named (module paths)
        layers, batch, title = "auto", args.batch_size or 16, "2-D U-Net: held-out MNI152 slices and Colin27 slices"
    else:
        if not 1 <= args.levels <= 3:
            parser.error("--levels must be 1, 2 or 3")
        model = Path(args.model or REPO / "cli" / "data" / "deepbrain" / "deepbrain.onnx")
        # "auto": the 15 Keras layers the TensorFlow exporter exposed and named
        layers, batch, title = "auto", args.batch_size or 1, "deepbrain 3-D U-Net: Colin27 and MNI152, graded corruptions"
    if not args.reuse_store:
        if args.experiment == "unet2d":
            data = build_unet2d_cases(out, args.wheel)
        else:
            data = build_deepbrain_cases(out, args.wheel, args.levels)
        print(f"cases written to {data} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        # label-free: guide = reference = the prediction (ground truth only for true Dice)
        summary = score_dataset(model, data, store, layers=layers, level="both", guide="prediction",
                                reference="prediction", batch_size=batch,
                                overwrite=not args.resume, resume=args.resume, save_maps=0, progress=None)
        print(f"scored: {summary}", file=sys.stderr)
    result = evaluate_store(store, n_boot=args.n_boot)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = f"python scripts/evaluate_estimators.py {args.experiment} --docs"
    (out / "evaluation.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = markdown(result, title)
    (out / "evaluation.md").write_text(text)
    print(text)
    if args.docs:
        timing = "" if args.reuse_store else f" ({result['seconds']:.0f} s on 2 shared CPU cores)"
        write_docs(args.experiment, text + f"\nReproduce: `{result['command']}`{timing}.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
