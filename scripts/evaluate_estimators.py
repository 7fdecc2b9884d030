"""Honest evaluation of the label-free quality estimators on real MRI and CT (issues 7, 20).

One command per experiment; each builds its cases from real volumes, scores them with
:func:`engine.score_dataset` (layer and unit level, guide = reference = prediction), computes
the estimators (``paper``, ``all-layers``, cross-validated ``calibrated``) and the trivial
baselines, validates every one against the output's true Dice, writes JSON/Markdown under
``--out`` and (``--docs``) the table into ``docs/estimation.md`` between markers::

    .venv/bin/python scripts/evaluate_estimators.py unet2d --docs
    .venv/bin/python scripts/evaluate_estimators.py deepbrain --docs
    .venv/bin/python scripts/evaluate_estimators.py lungct --docs

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

``lungct``: the shipped lung-CT 2-D U-Net (``cli/data/lungct/lungct.onnx``, trained by
``scripts/train_lungct.py`` on ``lung1`` of the pyradiomics data) on the held-out ``lung1``
slices and on every ``lung2`` slice (another patient with a large tumour: the shifted domain),
each clean and under graded in-plane corruptions (:func:`corrupt_ct`). Reference: the training
target (aerated lung by a fixed HU rule, united with the packaged tumour label), moved with
the image by the shift.

Every experiment also runs the failure-detection benchmark (:mod:`engine.quality.failure`:
AURC, E-AURC, AUROC at Dice thresholds, Spearman pooled and within group, bootstrap intervals
by subject), fit the ``combined`` ridge estimator and its baselines-only twin by grouped
cross-validation (does SA add anything beyond the baselines?), and check the coverage of the
conformal Dice lower bounds on held-out groups. ``deepbrain`` and ``lungct`` add held-out shift families:
each corruption family (:data:`FAMILIES`) is left out in turn, ``calibrated`` and ``combined``
are fitted on the clean cases and the other families, and tested on the left-out one.

Colin27 is read from Debian's ``mricron-data`` when installed, else from the unchanged copies
in ``cli/data/colin27``; MNI152 from the installed ``nilearn`` package (``--wheel PATH``: from a
wheel on disk); the lung CT from ``.cache/pyradiomics/data`` (``--data DIR``). ``make
setup-eval`` installs / puts all of them there; nothing is downloaded while an experiment runs —
missing data stop it with one line naming that command.
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

__all__ = ["build_unet2d_cases", "build_deepbrain_cases", "build_lungct_cases", "corrupt", "corrupt_ct",
           "evaluate_store", "main"]

_MRICRON = Path("/usr/share/mricron/templates")
_SHIPPED = REPO / "cli" / "data" / "colin27"
# Debian's mricron-data when installed, else the unchanged copies shipped in cli/data/colin27
COLIN = _MRICRON / "ch2.nii.gz" if (_MRICRON / "ch2.nii.gz").is_file() else _SHIPPED / "colin27.nii.gz"
COLIN_BET = _MRICRON / "ch2bet.nii.gz" if (_MRICRON / "ch2bet.nii.gz").is_file() else _SHIPPED / "colin27_mask.nii.gz"
DOCS = REPO / "docs" / "estimation.md"
CORRUPTIONS = ("noise", "blur", "bias", "gamma", "resample", "crop", "shift")
#: Shift family of each corruption (held out together in the family split).
FAMILIES = {"noise": "noise", "blur": "blur", "bias": "bias field", "gamma": "contrast",
            "resample": "resampling", "crop": "crop/shift", "shift": "crop/shift"}
COVERAGE = 0.9


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


#: Corruptions of the lung-CT slices (HU, 64×64 grid); shift families as :data:`FAMILIES`.
CT_CORRUPTIONS = ("noise", "blur", "bias", "gamma", "resample", "shift")


def corrupt_ct(hu: np.ndarray, mask: np.ndarray, kind: str, level: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One corruption of a stack of CT slices ``(n, H, W)`` in HU at level 1..3 (per slice, in plane).

    ``noise``: Gaussian, σ = 60 / 150 / 300 HU; ``blur``: Gaussian, σ = 0.8 / 1.5 / 2.5 pixels;
    ``bias``: a smooth multiplicative field on the attenuation (HU + 1000), amplitude
    0.2 / 0.4 / 0.7; ``gamma`` (family *contrast*): attenuation scaled by 1.3 / 1.6 / 0.6 (a
    miscalibrated scanner); ``resample``: down–up by 2 / 3 / 4 (linear); ``shift``: 6 / 12 / 20
    pixels along the first axis, air (-1000 HU) filled in, the mask moves with the image.
    """
    from scipy import ndimage

    x = hu.astype(np.float32).copy()
    if kind == "noise":
        x = x + rng.normal(0, (60.0, 150.0, 300.0)[level - 1], x.shape).astype(np.float32)
    elif kind == "blur":
        x = ndimage.gaussian_filter(x, (0, *(2 * [(0.8, 1.5, 2.5)[level - 1]])))
    elif kind == "bias":
        gy, gx = np.meshgrid(*[np.linspace(-1, 1, s) for s in x.shape[1:]], indexing="ij")
        for i in range(len(x)):
            field = rng.uniform(-1, 1) * gy + rng.uniform(-1, 1) * gx + rng.uniform(-1, 1) * gy * gx
            x[i] = (x[i] + 1000) * np.exp((0.2, 0.4, 0.7)[level - 1] * field) - 1000
    elif kind == "gamma":
        x = (x + 1000) * (1.3, 1.6, 0.6)[level - 1] - 1000
    elif kind == "resample":
        f = (2, 3, 4)[level - 1]
        small = ndimage.zoom(x, (1, 1 / f, 1 / f), order=1)
        x = ndimage.zoom(small, np.array(x.shape) / np.array(small.shape), order=1)[:, : x.shape[1], : x.shape[2]]
    elif kind == "shift":
        s = (6, 12, 20)[level - 1]
        x, mask = np.roll(x, s, axis=1), np.roll(mask, s, axis=1)
        x[:, :s] = -1000
        mask = mask.copy()
        mask[:, :s] = 0
    else:
        raise ValueError(f"corruption {kind!r}; expected one of {', '.join(CT_CORRUPTIONS)}")
    return x.astype(np.float32), mask.astype(np.uint8)


def build_lungct_cases(out: Path, data: str | Path | None = None, levels: int = 3, seed: int = 0) -> Path:
    """NPZ with held-out ``lung1`` slices and all ``lung2`` slices (64×64, HU), clean and corrupted.

    Groups = subject (``lung1-heldout``, ``lung2``); ids ``<subject>_z<k>_<kind><level>`` or
    ``…_clean``. The data are read from the folder ``make setup-eval`` fills (or ``data``);
    when they are missing this raises a one-line :class:`FileNotFoundError` naming that
    command — nothing is downloaded.
    """
    from train_lungct import ct_slices, find_data, split_of

    folder = find_data(data)
    rng = np.random.default_rng(seed)
    images, masks, ids, groups = [], [], [], []
    for case, group in (("lung1", "lung1-heldout"), ("lung2", "lung2")):
        hu, msk, z = ct_slices(folder, case)
        if case == "lung1":  # the training subject: only the slices the network never saw
            keep = split_of(z) == "test"
            hu, msk, z = hu[keep], msk[keep], z[keep]
        variants = [("clean", hu, msk)]
        for kind in CT_CORRUPTIONS:
            for level in range(1, levels + 1):
                variants.append((f"{kind}{level}", *corrupt_ct(hu, msk, kind, level, rng)))
        for name, x, m in variants:
            images.append(x)
            masks.append(m)
            ids += [f"{group}_z{k:03d}_{name}" for k in z]
            groups += [group] * len(z)
    path = out / "lungct_cases.npz"
    np.savez(path, images=np.concatenate(images), masks=np.concatenate(masks), ids=np.array(ids),
             groups=np.array(groups))
    return path


# ----------------------------------------------------------------------------- evaluation


def evaluate_store(store_path: Path, *, paper_exclude: tuple[str, ...] = (), folds: int = 5, n_boot: int = 1000,
                   families: bool = False) -> dict[str, Any]:
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
    bench = failure_section(store, ls, layers, base, dice, groups, est, n_boot=n_boot, folds=folds,
                            families=families)
    return {
        "failure": bench,
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


# ----------------------------------------------------------------------------- failure detection


def _units_dict(store: Any, layers: np.ndarray) -> dict[int, dict[str, np.ndarray]] | None:
    """Unit scores (score, status) of the kept layers, read once, keyed by store layer index."""
    if not store.has_units:
        return None
    return {int(i): {k: v for k, v in store.unit_scores(int(i)).items() if k in ("score", "status")}
            for i in layers["index"]}


def _take(ls: dict, units: dict | None, base: dict, sel: np.ndarray) -> tuple[dict, dict | None, dict]:
    return ({k: v[sel] for k, v in ls.items()},
            None if units is None else {j: {k: v[sel] for k, v in u.items()} for j, u in units.items()},
            {k: v[sel] for k, v in base.items()})


def _family(case_id: str) -> str:
    """Shift family of a case id (``colin27_noise2``, ``lung2_z017_noise2`` → ``noise``; ``…_clean`` → ``clean``)."""
    kind = case_id.rsplit("_", 1)[-1].rstrip("0123456789")  # lung-CT ids: lung2_z017_noise2
    return FAMILIES.get(kind, "clean")


def _fit_apply(ls: dict, units: dict | None, layers: np.ndarray, base: dict, dice: np.ndarray,
               groups: np.ndarray, train: np.ndarray, test: np.ndarray, folds: int) -> dict[str, dict[str, Any]]:
    """``calibrated``, ``combined`` and the baselines-only ridge fitted on ``train`` only and
    applied to ``test``; conformal scores (constant and normalised, :func:`engine.quality.
    conformal_entry`) from the training part's out-of-fold estimates, and the test cases'
    difficulty features."""
    from engine.quality import (calibrate, candidate_estimates, conformal_entry, conformal_scores,
                                difficulty_features, fit_combined, hidden_layer_sa)
    from engine.quality.table import score_table

    ls_tr, u_tr, b_tr = _take(ls, units, base, train)
    ls_te, u_te, b_te = _take(ls, units, base, test)
    g_tr = groups[train]
    g_arg = list(g_tr) if len(set(g_tr.tolist())) > 1 else None
    cal = calibrate(ls_tr, u_tr, layers, dice[train], groups=g_arg, folds=folds)
    out = {"calibrated": {"estimate": candidate_estimates(ls_te, u_te, layers, [cal.choice])[0],
                          "oof": np.asarray(cal.oof_estimate), "choice": cal.choice["name"]}}
    table_te = score_table(ls_te, u_te, layers)
    for name, fs in (("combined", "sa+baselines"), ("baselines (ridge)", "baselines")):
        m = fit_combined(ls_tr, u_tr, layers, b_tr, dice[train], groups=g_arg, folds=folds, feature_set=fs)
        out[name] = {"estimate": m.predict(table_te, b_te), "oof": np.asarray(m.oof_estimate), "alpha": m.alpha}
    sa_tr, hidden = hidden_layer_sa(ls_tr, layers)
    sa_te = hidden_layer_sa(ls_te, layers, names=hidden)[0]
    for fa in out.values():
        fa["scores"] = conformal_scores(fa["oof"], dice[train])
        fa["entry"] = conformal_entry(fa["oof"], dice[train], difficulty_features(fa["oof"], baselines=b_tr, layer_sa=sa_tr),
                                      groups=g_arg, folds=folds, layers=hidden)
        fa["features"] = difficulty_features(fa["estimate"], baselines=b_te, layer_sa=sa_te)
    return out


def _coverage_row(held_out: str, name: str, fa: dict[str, Any], dice: np.ndarray,
                  method: str = "constant") -> dict[str, Any]:
    """Coverage of one estimator's Dice lower bound on the test cases, by ``method``; with the
    mean bound, the mean slack ``Dice − bound`` (looseness), the spread of the per-case margin
    ``q · σ`` (estimate − bound before clipping to [0, 1]) and the Spearman of that margin with
    the actual ``|estimate − Dice|``."""
    from engine.quality import apply_bound, coverage_interval

    b = apply_bound(fa["entry"], fa["estimate"], COVERAGE, features=fa["features"], method=method)
    return {"held_out": held_out, "estimator": name, "method": b.method, "n_calibration": b.n_calibration,
            "expected": list(coverage_interval(b.n_calibration, COVERAGE)),
            **_bound_stats(b.bound, np.asarray(fa["estimate"], dtype=float), dice, b.q * b.sigma),
            "bound": b.bound, "estimate": np.asarray(fa["estimate"], dtype=float), "margin": b.q * b.sigma}


def _bound_stats(bound: np.ndarray, est: np.ndarray, dice: np.ndarray, margin: np.ndarray) -> dict[str, Any]:
    from engine.quality import empirical_coverage
    from engine.quality.validation import correlation

    ok = np.isfinite(bound) & np.isfinite(dice) & np.isfinite(margin)
    vary = ok.sum() > 2 and float(np.ptp(margin[ok])) > 1e-12
    return {**empirical_coverage(bound, dice),
            "mean_bound": float(np.nanmean(bound)) if np.isfinite(bound).any() else float("nan"),
            "mean_dice": float(np.nanmean(dice)),
            "mean_slack": float(np.mean(dice[ok] - bound[ok])) if ok.any() else float("nan"),
            "margin_sd": float(np.std(margin[ok])) if ok.any() else float("nan"),
            "margin_vs_error": correlation(margin[ok], np.abs(est[ok] - dice[ok])) if vary else float("nan"),
            "n_undefined": int(np.sum(np.isnan(bound) & np.isfinite(est)))}


def _case_fold_coverage(ls: dict, units: dict | None, layers: np.ndarray, base: dict, dice: np.ndarray,
                        folds: int) -> list[dict[str, Any]]:
    """In-distribution coverage: folds over cases (every domain in every fold); each fold's
    bounds come from estimators and conformal scores fitted on the other folds only, with
    inner folds over cases too. Pooled over the folds, per estimator and method."""
    from engine.quality import coverage_interval, group_folds

    n = dice.size
    each = np.array([str(i) for i in range(n)])  # one "group" per case: inner folds over cases
    fold = group_folds(n, folds, seed=0)
    parts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in np.unique(fold):
        test = fold == f
        fa = _fit_apply(ls, units, layers, base, dice, each, ~test, test, folds)
        for k in ("calibrated", "combined"):
            for method in ("constant", "normalized"):
                r = _coverage_row("case folds", k, fa[k], dice[test], method)
                parts.setdefault((k, r["method"]), []).append({**r, "dice": dice[test]})
    rows = []
    for (k, method), rs in parts.items():
        n_cal = int(round(np.mean([r["n_calibration"] for r in rs])))
        cat = {key: np.concatenate([r[key] for r in rs]) for key in ("bound", "estimate", "dice", "margin")}
        rows.append({"held_out": f"case folds ({len(rs)}, pooled)", "estimator": k, "method": method,
                     "n_calibration": n_cal, "expected": list(coverage_interval(n_cal, COVERAGE)),
                     **_bound_stats(cat["bound"], cat["estimate"], cat["dice"], cat["margin"])})
    return rows


def _best_baseline(fb: dict[str, Any], base: dict[str, np.ndarray]) -> str:
    return min(base, key=lambda b: fb[b]["aurc"]["value"])


def _comparisons(oof: dict[str, np.ndarray], base: dict[str, np.ndarray], fb: dict[str, Any], dice: np.ndarray,
                 groups: np.ndarray, n_boot: int, names: tuple[str, str]) -> list[dict[str, Any]]:
    """AURC differences: combined vs the baselines-only ridge, and SA estimators vs the best baseline."""
    from engine.quality import compare_aurc
    from engine.quality.validation import LOWER_IS_BETTER

    best = _best_baseline(fb, base)
    lower = best in LOWER_IS_BETTER
    pairs = [(f"{names[0]} − {names[1]}", oof[names[0]], oof[names[1]], False),
             (f"{names[0]} − {best}", oof[names[0]], base[best], lower),
             (f"all-layers − {best}", oof["all-layers"], base[best], lower)]
    out = []
    for label, a, b, low_b in pairs:
        c = compare_aurc(a, b, dice, groups=groups, n_boot=n_boot, seed=0, lower_is_better=(False, low_b))
        lo, hi = c["ci"]
        c["verdict"] = ("the first is better (interval below 0)" if hi < 0 else
                        "the first is worse (interval above 0)" if lo > 0 else "no clear difference (interval contains 0)")
        out.append({"comparison": label, **c})
    return out


def failure_section(store: Any, ls: dict, layers: np.ndarray, base: dict[str, np.ndarray], dice: np.ndarray,
                    groups: list[str], est: dict[str, np.ndarray], *, n_boot: int, folds: int,
                    families: bool) -> dict[str, Any]:
    """Failure-detection benchmark, combined estimator, SA-vs-baselines, conformal coverage."""
    from engine.quality import failure_benchmark, failure_rows, fit_combined

    units = _units_dict(store, layers)
    g = np.asarray(groups)
    kw = dict(groups=groups, folds=folds)
    models = {fs: fit_combined(ls, units, layers, base, dice, feature_set=fs, **kw)
              for fs in ("sa+baselines", "sa", "baselines")}
    comb, sa_only, bl = (np.asarray(models[k].oof_estimate) for k in ("sa+baselines", "sa", "baselines"))
    # the same fits with folds over cases (groups ignored): labelled data from every domain,
    # i.e. the in-distribution figure, beside the grouped (leave-groups-out) one
    in_dist = {fs: fit_combined(ls, units, layers, base, dice, feature_set=fs, folds=folds)
               for fs in ("sa+baselines", "baselines")}
    comb_c, bl_c = (np.asarray(in_dist[k].oof_estimate) for k in ("sa+baselines", "baselines"))
    ests = {"paper": est["paper"], "all-layers": est["all-layers"]}
    if "calibrated (out-of-fold)" in est:
        ests["calibrated (out-of-fold)"] = est["calibrated (out-of-fold)"]
    ests.update({"combined (out-of-fold)": comb, "SA-only ridge (out-of-fold)": sa_only,
                 "baselines-only ridge (out-of-fold)": bl, "combined (case folds)": comb_c,
                 "baselines-only ridge (case folds)": bl_c, **base})
    fb = failure_benchmark(ests, dice, groups=groups, n_boot=n_boot, seed=0)
    cmp = _comparisons({"combined (out-of-fold)": comb, "baselines-only ridge (out-of-fold)": bl,
                        "all-layers": est["all-layers"]}, base, fb, dice, g, n_boot,
                       ("combined (out-of-fold)", "baselines-only ridge (out-of-fold)"))
    cmp += _comparisons({"combined (case folds)": comb_c, "baselines-only ridge (case folds)": bl_c,
                         "all-layers": est["all-layers"]}, base, fb, dice, g, n_boot,
                        ("combined (case folds)", "baselines-only ridge (case folds)"))[:2]
    coverage = []
    for grp in sorted(set(groups)):
        test = g == grp
        fa = _fit_apply(ls, units, layers, base, dice, g, ~test, test, folds)
        coverage += [_coverage_row(grp, k, fa[k], dice[test], m) for k in ("calibrated", "combined")
                     for m in ("constant", "normalized")]
    coverage += _case_fold_coverage(ls, units, layers, base, dice, folds)
    out = {
        "rows": failure_rows(fb),
        "oracle_aurc": next(iter(fb.values()))["oracle_aurc"],
        "random_aurc": next(iter(fb.values()))["random_aurc"],
        "resample": next(iter(fb.values()))["resample"],
        "comparisons": cmp,
        "combined": {fs: {"alpha": m.alpha, "spearman_oof": m.cv["spearman_oof"], "mse_oof": m.cv["mse_oof"],
                          "n_features": len(m.features), "folds": m.cv["folds"]} for fs, m in models.items()},
        "combined_case_folds": {fs: {"alpha": m.alpha, "spearman_oof": m.cv["spearman_oof"]}
                                for fs, m in in_dist.items()},
        "coverage_groups": [{k: v for k, v in r.items() if k not in ("bound", "estimate", "margin")} for r in coverage],
        "estimates": {k: np.asarray(v, dtype=float).tolist() for k, v in ests.items()},
    }
    if families:
        out["families"] = _families_section(store, ls, units, layers, base, dice, g, est, n_boot=n_boot, folds=folds)
    return out


def _families_section(store: Any, ls: dict, units: dict | None, layers: np.ndarray, base: dict[str, np.ndarray],
                      dice: np.ndarray, groups: np.ndarray, est: dict[str, np.ndarray], *, n_boot: int,
                      folds: int) -> dict[str, Any]:
    """Leave one shift family out: fit on clean + the other families, test on the left-out one."""
    from engine.quality import failure_benchmark, failure_rows
    from engine.quality.validation import correlation

    fam = np.array([_family(str(i)) for i in store.cases["id"]])
    n = dice.size
    fitted = ("calibrated", "combined", "baselines (ridge)")
    held = {k: np.full(n, np.nan) for k in fitted}
    bounds = {f"{k} {m}": np.full(n, np.nan) for k in ("calibrated", "combined") for m in ("constant", "normalized")}
    held_est = {k: np.full(n, np.nan) for k in ("calibrated", "combined")}
    margins = {k: np.full(n, np.nan) for k in bounds}
    per_family = []
    order = [f for f in dict.fromkeys(FAMILIES.values()) if (fam == f).any()]
    for f in order:
        test = fam == f
        fa = _fit_apply(ls, units, layers, base, dice, groups, ~test, test, folds)
        for k in fitted:
            held[k][test] = fa[k]["estimate"]
        row: dict[str, Any] = {"family": f, "n": int(test.sum()), "n_train": int((~test).sum()),
                               "calibrated_choice": fa["calibrated"]["choice"], "spearman": {}}
        for k, v in (("all-layers", est["all-layers"]), ("calibrated", held["calibrated"]),
                     ("combined", held["combined"]), ("predicted_fraction", base["predicted_fraction"]),
                     ("mean_entropy", -base["mean_entropy"])):
            row["spearman"][k] = correlation(v[test], dice[test])
        for k in ("calibrated", "combined"):
            held_est[k][test] = fa[k]["estimate"]
            for m in ("constant", "normalized"):
                cr = _coverage_row(f, k, fa[k], dice[test], m)
                cr.pop("estimate")
                margins[f"{k} {cr['method']}"][test] = cr.pop("margin")
                bounds[f"{k} {cr['method']}"][test] = cr.pop("bound")
                row[f"coverage_{k}" + ("" if m == "constant" else f"_{m}")] = cr
        per_family.append(row)
    shifted = fam != "clean"
    ests = {"paper": est["paper"], "all-layers": est["all-layers"],
            "calibrated (family held out)": held["calibrated"], "combined (family held out)": held["combined"],
            "baselines-only ridge (family held out)": held["baselines (ridge)"], **base}
    ests = {k: np.asarray(v)[shifted] for k, v in ests.items()}
    fb = failure_benchmark(ests, dice[shifted], groups=groups[shifted], n_boot=n_boot, seed=0)
    cmp = _comparisons({"combined (family held out)": ests["combined (family held out)"],
                        "baselines-only ridge (family held out)": ests["baselines-only ridge (family held out)"],
                        "all-layers": ests["all-layers"]},
                       {k: ests[k] for k in base}, fb, dice[shifted], groups[shifted], n_boot,
                       ("combined (family held out)", "baselines-only ridge (family held out)"))
    return {
        "families": order, "per_family": per_family, "rows": failure_rows(fb), "comparisons": cmp,
        "n_shifted": int(shifted.sum()),
        "coverage_pooled": {k: _bound_stats(bounds[k][shifted], held_est[k.split(" ")[0]][shifted], dice[shifted],
                                            margins[k][shifted]) for k in bounds},
        "oracle_aurc": next(iter(fb.values()))["oracle_aurc"], "random_aurc": next(iter(fb.values()))["random_aurc"],
    }


def _ci(r: dict[str, Any], key: str, nd: int = 3) -> str:
    return f"{_fmt(r[key], nd)} [{_fmt(r[key + '_lo'], nd)}, {_fmt(r[key + '_hi'], nd)}]"


def _failure_table(rows: list[dict[str, Any]], groups: list[str]) -> list[str]:
    thr = [k[6:] for k in rows[0] if k.startswith("auroc_")]
    lines = ["| estimator | AURC [95 % CI] | E-AURC [95 % CI] | "
             + " | ".join(f"AUROC Dice < {t}" for t in thr) + " | Spearman [95 % CI] | "
             + " | ".join(f"Spearman in {g}" for g in groups) + " |",
             "|---|---|---|" + "---|" * len(thr) + "---|" + "---|" * len(groups)]
    for r in rows:
        lines.append(f"| {r['estimator']} | {_ci(r, 'aurc')} | {_ci(r, 'e_aurc')} | "
                     + " | ".join(_fmt(r[f'auroc_{t}']) for t in thr) + f" | {_ci(r, 'spearman', 2)} | "
                     + " | ".join(_fmt(r.get(f"spearman_in_{g}")) for g in groups) + " |")
    if not groups:  # no per-group columns: drop the empty last cell of every row
        lines = [line[:-5] + " |" if line.endswith(" |  |") else line for line in lines]
    return lines


def _comparison_table(cmp: list[dict[str, Any]]) -> list[str]:
    lines = ["| AURC difference (negative: the first is better) | Δ AURC [95 % CI] | share of replicates not better | verdict |",
             "|---|---|---|---|"]
    for c in cmp:
        lines.append(f"| {c['comparison']} | {_fmt(c['difference'], 3)} [{_fmt(c['ci'][0], 3)}, {_fmt(c['ci'][1], 3)}] "
                     f"| {_fmt(c['p_not_better'])} | {c['verdict']} |")
    return lines


def cluster_comparisons(result: dict[str, Any], ids: list[str], dice: np.ndarray, *, n_boot: int) -> list[dict[str, Any]]:
    """The key AURC comparisons again, resampling whole slices instead of cases.

    Lung-CT cases are slices and their corrupted versions (``<subject>_z<k>_<variant>``); the
    versions of one slice are not independent, so resampling cases within a subject gives
    intervals that are too narrow. Here each slice with all its versions is one cluster
    (:func:`engine.quality.compare_aurc` with ``groups`` = slice), whole clusters resampled.
    """
    from engine.quality import compare_aurc
    from engine.quality.validation import LOWER_IS_BETTER

    est = {k: np.asarray(v, dtype=float) for k, v in result["failure"]["estimates"].items()}
    base = [k for k in ("predicted_fraction", "soft_dice", "uncertain_fraction", "mean_entropy") if k in est]
    aurc = {r["estimator"]: r["aurc"] for r in result["failure"]["rows"]}
    best = min(base, key=lambda b: aurc[b])
    clusters = [i.rsplit("_", 1)[0] for i in ids]
    pairs = [("combined (out-of-fold)", "baselines-only ridge (out-of-fold)"),
             ("combined (out-of-fold)", best), ("all-layers", best), ("calibrated (out-of-fold)", best),
             ("combined (case folds)", "baselines-only ridge (case folds)")]
    out = []
    for a, b in pairs:
        if a not in est or b not in est:
            continue
        c = compare_aurc(est[a], est[b], dice, groups=clusters, n_boot=n_boot, seed=0,
                         lower_is_better=(a in LOWER_IS_BETTER, b in LOWER_IS_BETTER))
        lo, hi = c["ci"]
        c["verdict"] = ("the first is better (interval below 0)" if hi < 0 else
                        "the first is worse (interval above 0)" if lo > 0 else "no clear difference (interval contains 0)")
        out.append({"comparison": f"{a} − {b}", "n_clusters": len(set(clusters)), **c})
    return out


def subset_benchmark(result: dict[str, Any], keep: np.ndarray, dice: np.ndarray, *, n_boot: int) -> list[dict[str, Any]]:
    """Failure-detection rows on a subset of the cases (e.g. the clean shifted-domain slices).

    The estimates are the ones of the full evaluation (out-of-fold where fitted); only the
    cases evaluated change. Cases are resampled for the intervals.
    """
    from engine.quality import failure_benchmark, failure_rows

    est = {k: np.asarray(v, dtype=float)[keep] for k, v in result["failure"]["estimates"].items()}
    return failure_rows(failure_benchmark(est, dice[keep], n_boot=n_boot, seed=0))


def failure_markdown(result: dict[str, Any], title: str) -> str:
    """The failure-detection section (and the held-out families, when computed)."""
    fb = result["failure"]
    groups = result["groups"]
    res = fb["resample"]
    mode = {"stratified": f"cases resampled within each of the {res['n_groups']} groups (too few groups to "
                          "resample whole groups: the intervals are conditional on these subjects)",
            "cluster": f"whole groups resampled ({res['n_groups']} groups)", "cases": "cases resampled"}[res["mode"]]
    comb = fb["combined"]
    lines = [f"### {title}: failure detection", "",
             f"Risk = 1 − Dice; {result['n_cases']} cases; oracle AURC {_fmt(fb['oracle_aurc'], 3)}, "
             f"an uninformative estimate {_fmt(fb['random_aurc'], 3)} (the mean risk). Intervals: "
             f"{res['n_boot']} bootstrap replicates, {mode}. Spearman of the oriented estimate "
             "(entropy and uncertain fraction negated), so higher is better everywhere.", ""]
    lines += _failure_table(fb["rows"], groups)
    lines += ["", "Ridge models (grouped cross-validation, out of fold): "
              + "; ".join(f"`{fs}` {c['n_features']} features, α = {c['alpha']:.3g}, Spearman {_fmt(c['spearman_oof'])}"
                          for fs, c in comb.items()) + "; with folds over cases instead of groups: "
              + "; ".join(f"`{fs}` α = {c['alpha']:.3g}, Spearman {_fmt(c['spearman_oof'])}"
                          for fs, c in fb["combined_case_folds"].items()) + ".", ""]
    lines += _comparison_table(fb["comparisons"])
    lines += ["", f"Dice lower bounds at coverage {COVERAGE:g} on held-out groups (fitted on the other groups only) and "
              "on case folds (every group in every fold: the in-distribution check), by method — `constant`: "
              "estimate − q; `normalized`: estimate − q·σ, σ a label-free per-case difficulty scale. Slack = "
              "mean Dice − bound; margin = q·σ, the estimate minus the bound before clipping to [0, 1] (its SD "
              "across cases, and its Spearman with the actual |estimate − Dice|: does the bound widen where "
              "the estimate is worse?):", "",
              "| held out | estimator | method | labelled cases | covered | coverage | 95 % range if exchangeable "
              "| mean bound | mean Dice | slack | margin SD | margin vs error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in fb["coverage_groups"]:
        und = f" ({c['n_undefined']} undefined)" if c.get("n_undefined") else ""
        lines.append(f"| {c['held_out']} | {c['estimator']} | {c.get('method', 'constant')} | {c['n_calibration']} | "
                     f"{c['covered']}/{c['n']}{und} | {_fmt(c['coverage'])} | "
                     f"{_fmt(c['expected'][0])}–{_fmt(c['expected'][1])} | {_fmt(c['mean_bound'])} | "
                     f"{_fmt(c['mean_dice'])} | {_fmt(c.get('mean_slack'))} | {_fmt(c.get('margin_sd'))} | "
                     f"{_fmt(c.get('margin_vs_error'))} |")
    lines.append("")
    return "\n".join(lines)


def families_markdown(result: dict[str, Any], title: str) -> str:
    fam = result["failure"]["families"]
    lines = [f"### {title}: held-out shift families", "",
             f"Each family is left out in turn; `calibrated` and `combined` (and the baselines-only ridge) are "
             f"fitted on the clean cases and the other families, then applied to the left-out family. "
             f"Pooled over the {fam['n_shifted']} corrupted cases (each estimated while its family was held out):", ""]
    lines += _failure_table(fam["rows"], result["groups"])
    lines += [""] + _comparison_table(fam["comparisons"])
    lines += ["", f"Per family (Spearman with true Dice within the family; Dice lower bound at coverage {COVERAGE:g}):", "",
              "| held-out family | n | calibrated chose | all-layers | calibrated | combined | predicted_fraction | −mean_entropy "
              "| coverage calibrated (constant / normalized) | coverage combined (constant / normalized) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in fam["per_family"]:
        sp = r["spearman"]
        cov = {k: [r[f"coverage_{k}"], r.get(f"coverage_{k}_normalized")] for k in ("calibrated", "combined")}
        cells = {k: " / ".join(f"{c['covered']}/{c['n']}" for c in v if c) for k, v in cov.items()}
        lines.append(f"| {r['family']} | {r['n']} | `{r['calibrated_choice']}` | {_fmt(sp['all-layers'])} | "
                     f"{_fmt(sp['calibrated'])} | {_fmt(sp['combined'])} | {_fmt(sp['predicted_fraction'])} | "
                     f"{_fmt(sp['mean_entropy'])} | {cells['calibrated']} | {cells['combined']} |")
    pc = fam["coverage_pooled"]
    lines += ["", f"Pooled over the held-out families (nominal {COVERAGE:g}; slack = mean Dice − bound; margin = q·σ):", "",
              "| estimator | method | covered | coverage | mean bound | slack | margin SD | margin vs error |",
              "|---|---|---|---|---|---|---|---|"]
    for k, c in pc.items():
        est_name, method = k.split(" ")
        lines.append(f"| {est_name} | {method} | {c['covered']}/{c['n']} | {_fmt(c['coverage'])} | "
                     f"{_fmt(c['mean_bound'])} | {_fmt(c['mean_slack'])} | {_fmt(c['margin_sd'])} | "
                     f"{_fmt(c['margin_vs_error'])} |")
    lines.append("")
    return "\n".join(lines)


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
    parser = argparse.ArgumentParser(description="Evaluate the label-free quality estimators on real MRI and CT.")
    parser.add_argument("experiment", choices=("unet2d", "deepbrain", "lungct"))
    parser.add_argument("--out", default=None, help="output folder (default out/eval-<experiment>)")
    parser.add_argument("--wheel", default=None, help="nilearn wheel on disk (default: the installed nilearn)")
    parser.add_argument("--data", default=None, help="lungct: folder with the pyradiomics lung NRRD files "
                        "(default .cache/pyradiomics/data, filled by `make setup-eval`)")
    parser.add_argument("--levels", type=int, default=3, help="deepbrain, lungct: corruption levels per kind (1-3)")
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
    elif args.experiment == "lungct":
        if not 1 <= args.levels <= 3:
            parser.error("--levels must be 1, 2 or 3")
        model = Path(args.model or REPO / "cli" / "data" / "lungct" / "lungct.onnx")
        layers, batch = "auto", args.batch_size or 64
        title = "Lung-CT 2-D U-Net: held-out lung1 slices and lung2 slices, graded corruptions"
    else:
        if not 1 <= args.levels <= 3:
            parser.error("--levels must be 1, 2 or 3")
        model = Path(args.model or REPO / "cli" / "data" / "deepbrain" / "deepbrain.onnx")
        # "auto": the 15 Keras layers the TensorFlow exporter exposed and named
        layers, batch, title = "auto", args.batch_size or 1, "deepbrain 3-D U-Net: Colin27 and MNI152, graded corruptions"
    if not args.reuse_store:
        try:
            if args.experiment == "unet2d":
                data = build_unet2d_cases(out, args.wheel)
            elif args.experiment == "lungct":
                data = build_lungct_cases(out, args.data, args.levels)
            else:
                data = build_deepbrain_cases(out, args.wheel, args.levels)
        except FileNotFoundError as exc:  # data not set up: one line naming the set-up command
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"cases written to {data} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        # label-free: guide = reference = the prediction (ground truth only for true Dice)
        summary = score_dataset(model, data, store, layers=layers, level="both", guide="prediction",
                                reference="prediction", batch_size=batch,
                                overwrite=not args.resume, resume=args.resume, save_maps=0, progress=None)
        print(f"scored: {summary}", file=sys.stderr)
    result = evaluate_store(store, n_boot=args.n_boot, families=args.experiment in ("deepbrain", "lungct"))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = f"python scripts/evaluate_estimators.py {args.experiment} --docs"
    (out / "evaluation.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = markdown(result, title)
    fail_text = failure_markdown(result, title)
    fam_text = families_markdown(result, title) if "families" in result["failure"] else ""
    if args.experiment == "lungct":  # slices and their corrupted versions: resample whole slices
        from engine.store import open_store

        st = open_store(store)
        ids = [str(i) for i in st.cases["id"]]
        cmp = cluster_comparisons(result, ids, st.output_dice()[:, 0].astype(float), n_boot=args.n_boot)
        result["failure"]["comparisons_slice_clusters"] = cmp
        dice_all = st.output_dice()[:, 0].astype(float)
        clean2 = np.array([i.startswith("lung2_") and i.endswith("_clean") for i in ids])
        result["failure"]["clean_lung2"] = subset_benchmark(result, clean2, dice_all, n_boot=args.n_boot)
        (out / "evaluation.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        fail_text += "\n".join([
            "", f"The same comparisons with whole slices resampled ({cmp[0]['n_clusters'] if cmp else 0} clusters: "
            "each slice with all its corrupted versions; the case-resampled intervals above treat the "
            "versions of one slice as independent and are too narrow):", ""] + _comparison_table(cmp) + [
            "", f"The clean `lung2` slices alone ({int(clean2.sum())} cases, {int(np.sum(dice_all[clean2] < 0.8))} "
            "with Dice < 0.8: the domain shift without corruptions; estimates as above, cases resampled):", ""]
            + _failure_table(result["failure"]["clean_lung2"], []) + [""])
    (out / "evaluation.md").write_text("\n\n".join(t for t in (text, fail_text, fam_text) if t))
    print(text, fail_text, fam_text, sep="\n")
    if args.docs:
        timing = (f" ({result['seconds']:.0f} s on 2 shared CPU cores)" if not args.reuse_store else
                  f" (evaluation of the existing store: {result['seconds']:.0f} s on 2 shared CPU cores)")
        write_docs(args.experiment, text + f"\nReproduce: `{result['command']}`{timing}.\n")
        write_docs(f"{args.experiment}-failure", fail_text + f"\nReproduce: `{result['command']}`.\n")
        if fam_text:
            write_docs(f"{args.experiment}-families", fam_text + f"\nReproduce: `{result['command']}`.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
