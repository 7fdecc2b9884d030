"""Bad input and interruptions as a user meets them: exit code, one readable stderr line, and
what the store holds afterwards. Each test runs the real `protoseg` command in a subprocess,
except where a fault is injected into this process (Ctrl-C at a chosen batch, a full disk):
those run the same command through click's CliRunner."""
from __future__ import annotations

import errno
import os
import shutil
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


# ------------------------------------------------------------------ the earlier list
# Every test below runs a fault as a user meets it and checks three things: the exit code,
# that stderr is one readable line (or says why it may hold more: a skipped case's warning,
# the "assumed:" lines of a model without metadata), and what the store holds afterwards.


def protoseg_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`protoseg` run from another working directory."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def no_store(store: Path) -> bool:
    """Neither a store nor an unfinished run (nor a temporary file) at ``store``."""
    left = [p.name for p in store.parent.iterdir()
            if p.name.startswith((store.name, f".{store.name}.tmp"))]
    return not left


def _statuses(store: Path) -> list[str]:
    import engine

    return [str(s) for s in engine.open_store(store).cases["status"]]


def assert_same_scores(a: Path, b: Path) -> None:
    """Two stores hold the same cases, in the same order, with the same scores bit for bit."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for key in ("cases/id", "cases/status", "cases/index", "layer_scores/score",
                    "layer_scores/status", "output_dice"):
            np.testing.assert_array_equal(fa[key][()], fb[key][()], err_msg=key)


def release_writers() -> None:
    """Close the store writers an in-process run left open (a failed run's traceback keeps
    its writer, and so the store's lock, alive; a `protoseg` process would have exited)."""
    import gc

    from engine.store import writer as writer_mod

    for ref in list(writer_mod._WRITERS.values()):
        w = ref()
        if w is not None:
            w.close()
    gc.collect()


def interrupted(args: list[str], *, after: int) -> None:
    """Run `protoseg` in this process and press Ctrl-C once ``after`` batches are published:
    an unfinished run that stopped at a known point (no timing involved)."""
    from click.testing import CliRunner

    from cli.main import cli
    from engine.store import writer as writer_mod

    real = writer_mod.StoreWriter.write_batch
    calls = {"n": 0}

    def write_batch(self, result):
        if calls["n"] == after:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, result)

    mp = pytest.MonkeyPatch()
    mp.setattr(writer_mod.StoreWriter, "write_batch", write_batch)
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        mp.undo()
    assert res.exit_code == 130, (res.output, res.stderr)
    release_writers()
    assert calls["n"] == after


@pytest.mark.parametrize("fault", ["truncated", "not-onnx"])
def test_a_model_file_that_cannot_be_read_is_one_line_and_no_store(tmp_path, fault):
    model = tmp_path / "model.onnx"
    if fault == "truncated":
        models.write_truncated(model, models.unet(batch="N", size=32, metadata=True))
    else:
        model.write_text("name,score\nunet,0.9\n")  # a CSV saved under the wrong name
    data = _npz(tmp_path / "d.npz", 2)
    res = protoseg("score", str(model), str(data), "-o", str(tmp_path / "run.h5"))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert str(model) in line and "ONNX" in line and "truncated or corrupt" in line
    assert no_store(tmp_path / "run.h5")


def test_a_model_without_spatial_tensors_says_what_it_needs(tmp_path):
    model = models.save(models.flat_model(), tmp_path / "mlp.onnx")
    data = _npz(tmp_path / "d.npz", 2)
    res = protoseg("score", str(model), str(data), "-o", str(tmp_path / "run.h5"))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "no hidden tensors that can hold spatial features" in line
    assert no_store(tmp_path / "run.h5")


def test_an_unknown_layer_names_the_layers_there_are(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 2)
    res = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "run.h5"), "--layers", "nope")
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "'nope'" in line and "enc1_conv" in line
    assert no_store(tmp_path / "run.h5")


@pytest.mark.parametrize("fault", ["mask-shape-mismatch", "unreadable"])
def test_a_bad_case_is_skipped_with_its_status_and_strict_stops(tmp_path, unet, fault):
    data = _png_folder(tmp_path / "cases", 3)
    if fault == "mask-shape-mismatch":
        from PIL import Image

        Image.fromarray(np.zeros((30, 30), np.uint8)).save(data / "case1_mask.png")
    else:
        (data / "case1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # cut-off PNG
    store = tmp_path / "run.h5"
    res = protoseg("score", str(unet), str(data), "-o", str(store), "--scaling", "minmax")
    assert res.returncode == 0, res.stderr
    # the one line is the skipped case's warning: the user must learn which case and why
    line = one_line(res.stderr)
    assert line.startswith("protoseg: ") and "'case1'" in line and "skipped" in line
    if fault == "mask-shape-mismatch":
        assert "(30, 30)" in line and "(32, 32)" in line
    assert _statuses(store) == ["ok", fault, "ok"]
    import engine

    st = engine.open_store(store)
    assert np.isnan(st.layer_scores()["score"][1]).all() and np.isnan(st.output_dice()[1]).all()
    assert np.isfinite(st.output_dice()[[0, 2]]).all()
    res = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "strict.h5"), "--scaling",
                   "minmax", "--strict")
    assert res.returncode == 1
    assert "case1" in one_line(res.stderr)
    assert not (tmp_path / "strict.h5").exists()


def test_an_empty_folder_says_so_and_leaves_no_store(tmp_path, unet):
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "notes.txt").write_text("nothing to see")
    res = protoseg("score", str(unet), str(tmp_path / "cases"), "-o", str(tmp_path / "run.h5"))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "holds no image files" in line and str(tmp_path / "cases") in line
    assert no_store(tmp_path / "run.h5")


@pytest.mark.slow
def test_a_truncated_store_is_refused_untouched_and_overwrite_rebuilds_it(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 3)
    store = tmp_path / "run.h5"
    assert protoseg("score", str(unet), str(data), "-o", str(store), "-q").returncode == 0
    blob = store.read_bytes()[: store.stat().st_size // 2]
    store.write_bytes(blob)
    res = protoseg("score", str(unet), str(data), "-o", str(store))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "not a readable protoseg store" in line and "--overwrite to delete it" in line
    assert store.read_bytes() == blob  # nothing done to it without being asked
    res = protoseg("report", str(store), "-o", str(tmp_path / "rep"))
    assert res.returncode == 1 and "not a readable HDF5 store" in one_line(res.stderr)
    res = protoseg("score", str(unet), str(data), "-o", str(store), "--overwrite", "-q")
    assert res.returncode == 0, res.stderr
    assert _statuses(store) == ["ok"] * 3


def test_a_truncated_part_is_discarded_and_its_cases_scored_again(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 5)
    store = tmp_path / "run.h5"
    args = ["score", str(unet), str(data), "-o", str(store), "-b", "1", "-q"]
    interrupted(args, after=3)
    parts = Path(str(store) + ".parts")
    part = parts / "part-000001.h5"
    part.write_bytes(part.read_bytes()[:1000])
    res = protoseg(*args[:-1])  # not quiet: --quiet hides warnings
    assert res.returncode == 0, res.stderr
    # one line allowed: the warning that work is redone, naming the part
    line = one_line(res.stderr)
    assert "discarding damaged part" in line and "part-000001.h5" in line and "scored again" in line
    assert not parts.exists()
    ref = tmp_path / "ref.h5"
    assert protoseg("score", str(unet), str(data), "-o", str(ref), "-b", "1", "-q").returncode == 0
    assert_same_scores(store, ref)


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_a_part_keeps_the_parts_and_the_rerun_completes(tmp_path, unet):
    """A fault-injecting writer: the third part's arrays hit ENOSPC inside h5py's write."""
    from click.testing import CliRunner

    from cli.main import cli
    from engine.store import writer as writer_mod

    data = _npz(tmp_path / "d.npz", 5)
    store = tmp_path / "run.h5"
    args = ["score", str(unet), str(data), "-o", str(store), "-b", "1", "-q"]
    real = writer_mod.write_array

    def write_array(group, key, values, **kw):
        if "part-000002" in group.file.filename or ".part-000002" in group.file.filename:
            _enospc()
        return real(group, key, values, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(writer_mod, "write_array", write_array)
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        mp.undo()
    release_writers()
    assert res.exit_code == 1
    line = one_line(res.stderr)
    assert "No space left on device" in line and "part-000002.h5" in line and "resume" in line
    assert "[Errno" not in line
    parts = Path(str(store) + ".parts")
    assert sorted(p.name for p in parts.iterdir()) == [
        "dataset.json", "part-000000.h5", "part-000001.h5", "run.json"]  # no half-written part
    assert not store.exists()
    res = protoseg(*args, "--json")
    assert res.returncode == 0, res.stderr
    import json

    assert json.loads(res.stdout)["resumed_skipped"] == 2
    ref = tmp_path / "ref.h5"
    assert protoseg("score", str(unet), str(data), "-o", str(ref), "-b", "1", "-q").returncode == 0
    assert_same_scores(store, ref)


def test_disk_full_while_finishing_the_store_keeps_every_part(tmp_path, unet):
    from click.testing import CliRunner

    from cli.main import cli
    from engine.store import merge

    data = _npz(tmp_path / "d.npz", 3)
    store = tmp_path / "run.h5"
    args = ["score", str(unet), str(data), "-o", str(store), "-b", "1", "-q"]
    mp = pytest.MonkeyPatch()
    mp.setattr(merge, "_scatter", _enospc)
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        mp.undo()
    release_writers()
    assert res.exit_code == 1
    line = one_line(res.stderr)
    assert "No space left on device" in line and str(store) in line
    assert not store.exists() and not list(tmp_path.glob(".run.h5.tmp-*"))
    parts = Path(str(store) + ".parts")
    assert len(list(parts.glob("part-*.h5"))) == 3
    res = protoseg(*args, "--json")
    assert res.returncode == 0, res.stderr
    import json

    assert json.loads(res.stdout)["resumed_skipped"] == 3  # nothing scored twice
    assert _statuses(store) == ["ok"] * 3


def _private_mount_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_mount_works(), reason="needs root and a private mount namespace")
def test_a_real_full_disk_on_a_small_tmpfs(tmp_path, unet):
    """The same as the injected test on a real 1 MiB tmpfs, filled up by a ballast file."""
    data = _npz(tmp_path / "d.npz", 6)
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = " ".join([sys.executable, "-m", "cli.main", "score", str(unet), str(data), "-o",
                    str(disk / "run.h5"), "-b", "1", "-q"])
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && "
              f"head -c 900000 /dev/zero > {disk}/ballast; "
              f"{cmd} 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1; "
              f"ls -a {disk}/run.h5.parts > {tmp_path}/parts1; "
              f"rm {disk}/ballast; {cmd} 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2; "
              f"cp {disk}/run.h5 {tmp_path}/run.h5")
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, timeout=300,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (tmp_path / "rc1").read_text().strip() == "1"
    line = one_line((tmp_path / "err1").read_text())
    assert "No space left on device" in line and "resume" in line
    left = (tmp_path / "parts1").read_text().split()
    assert not [n for n in left if ".tmp-" in n]  # no half-written part
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert _statuses(tmp_path / "run.h5") == ["ok"] * 6


def _read_only_runner(folder: Path) -> list[str] | None:
    """How to run a command that sees ``folder`` read-only, or None where that cannot be done."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if not _private_mount_works():
        return None
    return ["unshare", "-m", "sh", "-c",
            f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec "$@"', "sh"]


def test_a_read_only_output_folder_is_one_line_and_nothing_is_left(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 2)
    out = tmp_path / "out"
    out.mkdir()
    prefix = _read_only_runner(out)
    if prefix is None:
        pytest.skip("running as root without a private mount namespace: no read-only folder")
    try:
        res = subprocess.run([*prefix, sys.executable, "-m", "cli.main", "score", str(unet), str(data),
                              "-o", str(out / "run.h5")], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    finally:
        out.chmod(0o755)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert f"cannot write in folder {out}" in line and "writable folder" in line
    assert ("Read-only file system" in line) or ("Permission denied" in line)
    assert list(out.iterdir()) == []


def _empty_predictor(tmp_path: Path) -> Path:
    """The U-Net with a head that predicts background everywhere."""
    from onnx import numpy_helper

    model = models.unet(batch="N", size=32, metadata=True)
    for init in model.graph.initializer:
        if init.name in ("head_w", "head_b"):
            arr = numpy_helper.to_array(init)
            value = np.zeros_like(arr) if init.name == "head_w" else np.full_like(arr, -50.0)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return models.save(model, tmp_path / "empty.onnx")


def test_a_model_that_predicts_nothing_gives_nan_with_its_reason(tmp_path):
    model = _empty_predictor(tmp_path)
    data = _npz(tmp_path / "d.npz", 3)
    store = tmp_path / "run.h5"
    res = protoseg("score", str(model), str(data), "-o", str(store), "-q")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    import engine

    st = engine.open_store(store)
    ls = st.layer_scores()
    assert np.isnan(ls["score"]).all()
    assert (ls["status"] == engine.Status.EMPTY_FOREGROUND).all()  # the guide is empty
    np.testing.assert_array_equal(st.output_dice(), 0.0)  # empty prediction vs real masks
    res = protoseg("score", str(model), str(data), "-o", str(tmp_path / "t.h5"))
    assert "EMPTY_FOREGROUND: 3" in res.stdout


def test_a_batch_dim_fixed_to_one_runs_batches_in_chunks(tmp_path):
    fixed = models.save(models.unet(batch=1, size=32, metadata=True), tmp_path / "fixed.onnx")
    data = _npz(tmp_path / "d.npz", 5)
    res = protoseg("score", str(fixed), str(data), "-o", str(tmp_path / "b4.h5"), "-b", "4")
    assert res.returncode == 0, res.stderr
    line = one_line(res.stderr)  # the note that batches are split
    assert "fixed to 1" in line
    res = protoseg("score", str(fixed), str(data), "-o", str(tmp_path / "b1.h5"), "-b", "1", "-q")
    assert res.returncode == 0, res.stderr
    assert_same_scores(tmp_path / "b4.h5", tmp_path / "b1.h5")


@pytest.mark.parametrize("resize", [True, False])
def test_images_on_another_grid_than_the_model_input(tmp_path, resize):
    meta = models.unet_metadata(size=32)
    meta["preprocessing"]["resize"] = resize
    model = models.save(models.unet(batch="N", size=32, metadata=meta), tmp_path / "m.onnx")
    data = _npz(tmp_path / "d48.npz", 2, size=48)
    store = tmp_path / "run.h5"
    res = protoseg("score", str(model), str(data), "-o", str(store))  # --quiet hides warnings
    assert res.returncode == 0, res.stderr
    if resize:  # the card says images are resized to the input: scored on the model's grid
        assert res.stderr == ""
        assert _statuses(store) == ["ok", "ok"]
        import engine

        assert np.isfinite(engine.open_store(store).layer_scores()["score"]).all()
    else:  # each case is skipped with its own line and status
        lines = res.stderr.splitlines()
        assert len(lines) == 2 and "Traceback" not in res.stderr
        for i, line in enumerate(lines):
            assert line.startswith("protoseg: ") and f"'c00{i}'" in line
            assert "(48, 48)" in line and "(32, 32)" in line
        assert _statuses(store) == ["bad-shape"] * 2


def test_grid_advice_is_one_the_cli_user_can_follow(tmp_path):
    meta = models.unet_metadata(size=32)
    meta["preprocessing"]["resize"] = False
    model = models.save(models.unet(batch="N", size=32, metadata=meta), tmp_path / "m.onnx")
    data = _npz(tmp_path / "d48.npz", 1, size=48)
    res = protoseg("score", str(model), str(data), "-o", str(tmp_path / "run.h5"))
    line = one_line(res.stderr)
    assert "turn resize on" not in line and "resample" in line and "--input-size 32,32" in line


def test_an_nhwc_model_without_metadata_is_read_channels_last(tmp_path):
    nhwc = models.save(models.unet(batch="N", size=32, layout="NHWC"), tmp_path / "nhwc.onnx")
    nchw = models.save(models.unet(batch="N", size=32), tmp_path / "nchw.onnx")
    data = _npz(tmp_path / "d.npz", 3)
    res = protoseg("score", str(nhwc), str(data), "-o", str(tmp_path / "a.h5"), "--json")
    assert res.returncode == 0, res.stderr
    # several lines allowed: without metadata every inference is said, as "assumed:"
    lines = res.stderr.splitlines()
    assert lines and all(ln.startswith("protoseg: assumed: ") for ln in lines), res.stderr
    assert any("input layout NHWC" in ln for ln in lines)
    res = protoseg("score", str(nchw), str(data), "-o", str(tmp_path / "b.h5"), "-q")
    assert res.returncode == 0, res.stderr
    import engine

    a, b = engine.open_store(tmp_path / "a.h5"), engine.open_store(tmp_path / "b.h5")
    names_a, names_b = list(a.layers["name"]), list(b.layers["name"])
    assert set(names_b) <= set(names_a)  # plus the transposes x_nchw, prob_nchw
    sa, sb = a.layer_scores()["score"], b.layer_scores()["score"]
    for j, name in enumerate(names_b):
        np.testing.assert_array_equal(sa[:, :, names_a.index(name)], sb[:, :, j], err_msg=name)


def _cuda_run(tmp_path: Path, unet: Path) -> subprocess.CompletedProcess:
    data = _npz(tmp_path / "d.npz", 2)
    res = protoseg("score", str(unet), str(data), "-o", str(tmp_path / "run.h5"), "--provider", "cuda")
    if res.returncode == 0:
        pytest.skip("CUDA loads on this machine")
    return res


def test_cuda_asked_for_but_absent_is_one_line_and_no_store(tmp_path, unet):
    res = _cuda_run(tmp_path, unet)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "cuda" in line.lower() and "cannot load" in line
    assert no_store(tmp_path / "run.h5")


def test_cuda_absent_advice_names_the_cli_flag(tmp_path, unet):
    line = one_line(_cuda_run(tmp_path, unet).stderr)
    assert "--provider" in line and "provider='" not in line


@pytest.mark.slow
def test_two_writers_on_one_store_the_second_is_refused_and_the_first_completes(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 40)
    store = tmp_path / "run.h5"
    args = ["score", str(unet), str(data), "-o", str(store), "-b", "1", "-q"]
    first = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = Path(str(store) + ".parts")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (parts / "run.json").exists() and first.poll() is None:
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)  # holding the store: the first writer is mid-run
    try:
        assert not store.exists(), "the first run finished before it could be paused"
        kept = sorted(parts.iterdir())
        second = protoseg(*args)
        third = protoseg(*args, "--overwrite")  # must not delete the first writer's work
        assert sorted(parts.iterdir()) == kept
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    for res in (second, third):
        assert res.returncode == 1
        line = one_line(res.stderr)
        assert "another writer holds store" in line and "in use" in line
        assert "close()" not in line and "-o/--output" in line
    assert _statuses(store) == ["ok"] * 40
    ref = tmp_path / "ref.h5"
    assert protoseg("score", str(unet), str(data), "-o", str(ref), "-b", "1", "-q").returncode == 0
    assert_same_scores(store, ref)


# ------------------------------------------------------------------ the same data, spelled otherwise
# (issue 13 #4) Resume compares datasets by what they hold: case ids and file fingerprints.


def _prepared_unfinished(tmp_path: Path, unet: Path, *, n: int = 5, after: int = 2) -> Path:
    """A PNG folder ``ds`` and an unfinished run of it, started as ``ds`` from tmp_path."""
    _png_folder(tmp_path / "ds", n)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        interrupted(["score", str(unet), "ds", "-o", "run.h5", "-b", "1", "-q", "--scaling",
                     "minmax"], after=after)
    finally:
        os.chdir(cwd)
    return tmp_path / "run.h5"


def test_the_same_data_spelled_otherwise_or_moved_resumes(tmp_path, unet):
    store = _prepared_unfinished(tmp_path, unet)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = tmp_path / "copy" / "dataset"
    shutil.copytree(tmp_path / "ds", moved)  # a copy: other path, other mtimes, same content
    shutil.rmtree(tmp_path / "ds")
    res = protoseg_in(elsewhere, "score", str(unet), "../copy/dataset", "-o", str(store), "-b", "1",
                      "--scaling", "minmax", "--json")
    assert res.returncode == 0, res.stderr
    import json

    import engine

    out = json.loads(res.stdout)
    assert out["resumed_skipped"] == 2 and out["scored"] == 3
    st = engine.open_store(store)
    assert st.provenance["dataset"] == str(moved.resolve())  # where the data was read from
    assert set(st.config["dataset"]) == {"kind", "cases", "ids_sha256", "fingerprint"}
    ref = tmp_path / "ref.h5"
    res = protoseg("score", str(unet), str(moved), "-o", str(ref), "-b", "1", "-q", "--scaling",
                   "minmax")
    assert res.returncode == 0, res.stderr
    assert_same_scores(store, ref)
    assert engine.open_store(ref).config == st.config


def test_changed_data_is_refused_naming_the_cases_and_files_that_changed(tmp_path, unet):
    from PIL import Image

    store = _prepared_unfinished(tmp_path, unet)
    ds = tmp_path / "ds"
    args = ["score", str(unet), str(ds), "-o", str(store), "-b", "1", "--scaling", "minmax"]
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(ds / "case3_mask.png")
    res = protoseg(*args)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "other data" in line and "1 of 10 file(s) changed ('case3_mask.png')" in line
    assert "--overwrite to delete the finished work" in line
    shutil.copy(ds / "case0.png", ds / "case9.png")
    (ds / "case2.png").unlink()
    (ds / "case2_mask.png").unlink()
    res = protoseg(*args)
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "1 case(s) added ('case9')" in line and "1 case(s) removed ('case2')" in line
    assert len(list(Path(str(store) + ".parts").glob("part-*.h5"))) == 2  # nothing deleted


def test_a_finished_store_compares_its_cases_with_the_data(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 3)
    store = tmp_path / "run.h5"
    assert protoseg("score", str(unet), str(data), "-o", str(store), "-q").returncode == 0
    copy = tmp_path / "sub" / "same.npz"
    copy.parent.mkdir()
    shutil.copy(data, copy)  # a renamed copy of one array file is the same data
    res = protoseg("score", str(unet), str(copy), "-o", str(store), "--json")
    assert res.returncode == 0, res.stderr
    _npz(copy, 4)
    res = protoseg("score", str(unet), str(copy), "-o", str(store))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "other data" in line and "1 case(s) added ('c003')" in line


def _as_older_protoseg(parts: Path, dataset: str) -> None:
    """Make an unfinished run look written by an older protoseg: the dataset as typed."""
    import json

    run = json.loads((parts / "run.json").read_text())
    run["config"]["dataset"] = dataset
    (parts / "run.json").write_text(json.dumps(run))
    (parts / "dataset.json").unlink()
    for part in parts.glob("part-*.h5"):
        with h5py.File(part, "a") as f:
            for key in ("config", "run"):
                attr = json.loads(f.attrs[key])
                (attr["config"] if key == "run" else attr)["dataset"] = dataset
                f.attrs[key] = json.dumps(attr)


def test_an_older_store_naming_its_data_by_path_resumes_where_that_path_leads(tmp_path, unet):
    store = _prepared_unfinished(tmp_path, unet)
    _as_older_protoseg(Path(str(store) + ".parts"), "ds")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = protoseg_in(elsewhere, "score", str(unet), "../ds", "-o", str(store), "-b", "1",
                      "--scaling", "minmax")
    assert res.returncode == 1  # 'ds' from here is another folder
    line = one_line(res.stderr)
    assert "data 'ds'" in line and str(elsewhere / "ds") in line
    res = protoseg_in(tmp_path, "score", str(unet), str(tmp_path / "ds"), "-o", "run.h5", "-b", "1",
                      "--scaling", "minmax", "--json")
    assert res.returncode == 0, res.stderr
    import json

    import engine

    assert json.loads(res.stdout)["resumed_skipped"] == 2
    assert engine.open_store(store).config["dataset"] == "ds"  # the older description is kept


def test_the_dataset_manifest_fingerprints_content_not_names_or_times(tmp_path):
    from engine.datasets import open_dataset
    from engine.run.manifest import EDGE, WHOLE_FILE, dataset_manifest, file_digest

    ds = _png_folder(tmp_path / "a", 3)
    first = dataset_manifest(open_dataset(ds))
    assert first.ids == ("case0", "case1", "case2") and first.path == str(ds.resolve())
    assert [e[0] for e in first.files[0]] == ["case0.png", "case0_mask.png"]
    os.utime(ds / "case1.png", (1, 1))  # a touched file holds the same data
    shutil.copytree(ds, tmp_path / "b")
    again = dataset_manifest(open_dataset(tmp_path / "b"))
    assert again.config() == first.config() and again.path != first.path
    assert dataset_manifest(open_dataset(ds), 2).config()["cases"] == 2  # only what is scored
    big = tmp_path / "big.bin"
    blob = bytearray(WHOLE_FILE + 3 * EDGE)
    big.write_bytes(bytes(blob))
    d0 = file_digest(big)
    blob[-1] = 1  # the end of a large file counts
    big.write_bytes(bytes(blob))
    assert file_digest(big) != d0
    mem = dataset_manifest(type("Mem", (), {"ids": ["x", "y"], "__getitem__": None})())
    assert mem.kind == "memory" and mem.path is None and mem.files == ()
