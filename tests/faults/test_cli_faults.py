"""Bad input and interruptions as a user meets them: exit code, one readable stderr line, and
what the store holds afterwards. Each test runs the real `protoseg` command in a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import models

ROOT = Path(__file__).resolve().parents[2]


def protoseg(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def one_line(stderr: str) -> str:
    """The error output is a single readable line: no traceback, no source lines."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and 'File "' not in stderr
    return lines[0]


def _npz(path: Path, n: int, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, size, size)).astype(np.float32)
    masks = (images > 0.5).astype(np.uint8)
    np.savez(path, images=images, masks=masks, ids=np.array([f"c{i:03d}" for i in range(n)]))
    return path


@pytest.fixture()
def unet(tmp_path):
    return models.save(models.unet(batch="N", size=32, metadata=True), tmp_path / "unet.onnx")


def test_an_empty_dataset_says_so_and_leaves_no_store(tmp_path, unet):
    data = tmp_path / "empty.npz"
    np.savez(data, images=np.zeros((0, 32, 32), np.float32))
    res = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "run.h5"))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "holds no cases" in line and str(data) in line
    assert not (tmp_path / "run.h5").exists() and not (tmp_path / "run.h5.parts").exists()


@pytest.mark.slow
def test_ctrl_c_exits_130_keeps_finished_batches_and_the_rerun_completes(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 200)
    store = tmp_path / "run.h5"
    args = ["score", str(unet), str(data), "-o", str(store), "-b", "1", "--level", "both", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = Path(str(store) + ".parts")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("part-*.h5"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = one_line(err)
    assert line.startswith("interrupted") and "resume" in line
    kept = len(list(parts.glob("part-*.h5")))
    assert kept >= 3 and not store.exists()
    res = protoseg(*args)
    assert res.returncode == 0, res.stderr
    ref = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "ref.h5"), "-b", "1",
                   "--level", "both", "-q")
    assert ref.returncode == 0, ref.stderr
    with h5py.File(store) as a, h5py.File(tmp_path / "ref.h5") as b:
        for key in ("layer_scores/score", "layer_scores/status", "cases/id"):
            np.testing.assert_array_equal(a[key][()], b[key][()])


@pytest.mark.parametrize("scaling", ["zscore", "minmax"])
def test_a_nan_voxel_is_never_scaled_into_a_number(tmp_path, unet, scaling):
    data = _npz(tmp_path / "d.npz", 3)
    z = dict(np.load(data))
    z["images"][1, 5, 7] = np.nan
    np.savez(data, **z)
    res = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "a.h5"), "--scaling", scaling)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "case 'c001'" in line and "NaN" in line and "--nonfinite skip" in line
    res = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "b.h5"), "--scaling", scaling,
                   "--nonfinite", "skip", "-q")
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "b.h5") as f:
        status = [s.decode() if isinstance(s, bytes) else s for s in f["cases/status"][()]]
        assert status == ["ok", "nonfinite-input", "ok"]
        assert np.isnan(f["layer_scores/score"][1]).all() and np.isnan(f["output_dice"][1]).all()


def test_scaling_keeps_nan_in_the_model_card():
    import engine

    card = engine.resolve_model_card(models.unet(batch="N", size=8, metadata=True),
                                     overrides={"scaling": "zscore"})
    img = np.ones((1, 8, 8), np.float32)
    img[0, 2, 2] = np.nan
    assert np.isnan(card.preprocess(img)).all()
    const = np.ones((1, 8, 8), np.float32)
    assert (card.preprocess(const) == 0).all()  # a constant image still scales to 0


def _png_folder(root: Path, n: int, *, without_mask: tuple[int, ...] = (), labels=(0, 255),
                size: int = 32) -> Path:
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        img = np.zeros((size, size), np.uint8)
        img[8:24, 6 + i:20 + i] = 200
        img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"case{i}.png")
        if i not in without_mask:
            mask = np.where(img > 150, labels[-1], labels[0]).astype(np.uint8)
            if len(labels) > 2:
                mask[mask > 0] = np.where(np.arange(size) < size // 2, labels[1], labels[2])[None, :].repeat(
                    size, 0)[mask > 0]
            Image.fromarray(mask).save(root / f"case{i}_mask.png")
    return root


def test_cases_without_a_mask_get_no_reference_and_the_run_says_so(tmp_path, unet):
    data = _png_folder(tmp_path / "cases", 6, without_mask=(1, 4))
    res = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "run.h5"), "--json",
                   "--scaling", "minmax")
    assert res.returncode == 0, res.stderr
    assert "2 of 6 cases have no mask" in res.stderr
    import json

    import engine

    assert json.loads(res.stdout)["no_reference"] == 2
    st = engine.open_store(tmp_path / "run.h5")
    status = st.layer_scores()["status"]
    score = st.layer_scores()["score"]
    for i in (1, 4):
        assert (status[i] == engine.Status.NO_REFERENCE).all() and np.isnan(score[i]).all()
        assert np.isnan(st.output_dice()[i]).all()
        assert np.isfinite(st.baselines()["predicted_fraction"][i]).all()  # label-free results kept
    others = [0, 2, 3, 5]
    assert (status[others] != engine.Status.NO_REFERENCE).all()
    assert np.isfinite(st.output_dice()[others]).all()
    # 255 and 1 mean the same foreground for a binary model
    data1 = tmp_path / "cases01"
    data1.mkdir()
    for p in data.iterdir():
        arr = np.asarray(__import__("PIL.Image").Image.open(p))
        if p.stem.endswith("_mask"):
            arr = (arr > 0).astype(np.uint8)
        __import__("PIL.Image").Image.fromarray(arr).save(data1 / p.name)
    res1 = protoseg("score", str(unet), str(data1), "-o", str(tmp_path / "run1.h5"), "-q",
                    "--scaling", "minmax")
    assert res1.returncode == 0, res1.stderr
    np.testing.assert_array_equal(engine.open_store(tmp_path / "run1.h5").layer_scores()["score"], score)


def test_mask_labels_that_match_no_class_are_an_error_naming_them(tmp_path):
    model = models.unet(batch="N", size=32, metadata=True, head="softmax", n_classes=3)
    path = models.save(model, tmp_path / "soft.onnx")
    data = _png_folder(tmp_path / "cases", 2)  # masks valued {0, 255}
    res = protoseg("score", str(path), str(data), "-o", str(tmp_path / "run.h5"))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "case 'case0'" in line and "[255]" in line and "--classes" in line
    assert "[1, 2]" in line


def test_a_binary_model_merging_several_labels_says_so_once(tmp_path, unet):
    data = _png_folder(tmp_path / "cases", 3, labels=(0, 1, 2))
    res = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "run.h5"))
    assert res.returncode == 0, res.stderr
    notes = [ln for ln in res.stderr.splitlines() if "merged into one foreground" in ln]
    assert len(notes) == 1 and "[1, 2]" in notes[0]


def test_a_truncated_run_description_names_the_file_and_the_way_out(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 4)
    store = tmp_path / "run.h5"
    parts = Path(str(store) + ".parts")
    parts.mkdir()
    (parts / "run.json").write_text('{"encoding-type": "protoseg-run", "conf')
    res = protoseg("score", str(unet), str(data), "-o", str(store))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "run.json" in line and "truncated" in line and "--overwrite deletes" in line
    assert "overwrite=True" not in line  # CLI advice names flags only
    res = protoseg("score", str(unet), str(data), "-o", str(store), "--overwrite", "-q")
    assert res.returncode == 0, res.stderr and store.exists()


def test_other_settings_say_that_overwrite_deletes_finished_work(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 2)
    store = tmp_path / "run.h5"
    assert protoseg("score", str(unet), str(data), "-o", str(store), "-q").returncode == 0
    res = protoseg("score", str(unet), str(data), "-o", str(store), "--level", "both")
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "level='layer'" in line and "--overwrite to delete the finished work" in line
    assert "overwrite=True" not in line
