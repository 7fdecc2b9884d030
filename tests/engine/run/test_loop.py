"""engine.run.score_dataset: plumbing checked against a direct computation.

The kernels are tested against their NumPy twins elsewhere; here the question is whether the
pipeline feeds them the right tensors, guides, references and classes, writes what it computed,
survives being killed, and refuses bad input with a clear message while keeping finished work.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import engine
from engine.run import score_dataset
from tests import models

ROOT = Path(__file__).resolve().parents[3]


def _npz(path: Path, n: int, size: int, *, ndim: int = 2, masks: bool = True, labels: int = 1,
         seed: int = 0, channels: int = 1) -> Path:
    """Random smooth images with blob masks; intensity correlates with the mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * ndim, indexing="ij"))
    images, ms = [], []
    for i in range(n):
        c = rng.uniform(-0.3, 0.3, ndim)
        r = rng.uniform(0.3, 0.6)
        d = np.sqrt(((grid - c.reshape((ndim,) + (1,) * ndim)) ** 2).sum(0))
        m = (d < r).astype(np.uint8)
        if labels > 1:
            m = m * (1 + (grid[0] > c[0]).astype(np.uint8))
        img = m.astype(np.float32) + 0.3 * rng.standard_normal(m.shape).astype(np.float32)
        if channels > 1:
            img = np.stack([img * (k + 1) for k in range(channels)])
        images.append(img)
        ms.append(m)
    arrays = {"images": np.stack(images), "ids": np.array([f"case{i:03d}" for i in range(n)])}
    if masks:
        arrays["masks"] = np.stack(ms)
    np.savez(path, **arrays)
    return path


def _direct(model: onnx.ModelProto, data: Path, tensors: list[str], *, threshold: float = 0.5,
            cls: int = 0, binary: bool = True, card=None):
    """Run the exposed model with plain onnxruntime and score with engine.sa_scores."""
    card = card or engine.resolve_model_card(model)
    hidden = engine.select_tensors(engine.list_hidden_tensors(model), tensors)
    exposed = engine.expose(model, hidden)
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    z = np.load(data)
    x = np.stack([card.preprocess(img if img.ndim == card.spatial_ndim + 1 else img[None])
                  for img in z["images"]]).astype(np.float32)
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {card.input_name: x})))
    prob = card.to_probability({card.prediction_output: out[card.prediction_output]})
    k = list(card.classes).index(cls)
    pred = prob[:, k] > threshold
    gt = (z["masks"] > 0) if binary else (z["masks"] == cls)
    res = {}
    for t in hidden:
        f = card.to_channels_first(out[t.name], t.name)
        res[t.name] = engine.sa_scores(f, pred.astype(np.float32), gt, level="both")
    return res, pred, gt


@pytest.fixture()
def unet2d(tmp_path):
    m = models.unet(ndim=2, batch="N", size=32, metadata=True)
    return m, models.save(m, tmp_path / "unet.onnx")


def test_layer_and_unit_scores_equal_a_direct_computation(tmp_path, unet2d):
    model, path = unet2d
    data = _npz(tmp_path / "d.npz", 5, 32)
    summary = score_dataset(path, data, tmp_path / "run.h5", level="both", batch_size=2)
    assert summary.n_cases == 5 and summary.n_failed == 0
    st = engine.open_store(summary.store)
    names = list(st.layers["name"])
    direct, pred, gt = _direct(model, data, names)
    ls = st.layer_scores()
    assert ls["score"].shape == (5, 1, len(names))
    for li, name in enumerate(names):
        layer, unit = direct[name]
        np.testing.assert_allclose(ls["score"][:, 0, li], layer.score, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(ls["tp"][:, 0, li], layer.tp)
        us = st.unit_scores(li)
        np.testing.assert_allclose(us["score"][:, 0, :], unit.score, atol=1e-6, err_msg=name)
    dice = engine.dice(pred, gt, batch=True)
    np.testing.assert_allclose(st.output_dice()[:, 0], dice, atol=1e-12)
    assert list(st.cases["id"]) == [f"case{i:03d}" for i in range(5)]
    assert st.config["reference"] == "ground_truth" and st.config["guide"] == "prediction"
    assert st.provenance["provider"] == "CPUExecutionProvider"


def test_label_free_run_uses_the_prediction_as_reference(tmp_path, unet2d):
    model, path = unet2d
    data = _npz(tmp_path / "d.npz", 3, 32, masks=False)
    summary = score_dataset(path, data, tmp_path / "run.h5", layers=["enc1", "dec"])
    st = engine.open_store(summary.store)
    assert st.config["reference"] == "prediction"
    assert np.isnan(st.output_dice()).all()
    names = list(st.layers["name"])
    assert names == ["enc1", "dec"]
    card = engine.resolve_model_card(model)
    hidden = engine.select_tensors(engine.list_hidden_tensors(model), names)
    sess = ort.InferenceSession(engine.expose(model, hidden).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    z = np.load(data)
    x = np.stack([card.preprocess(i[None]) for i in z["images"]]).astype(np.float32)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {card.input_name: x})))
    pred = card.to_probability({card.prediction_output: out[card.prediction_output]})[:, 0] > 0.5
    for li, n in enumerate(names):
        want = engine.sa_scores(out[n], pred.astype(np.float32), pred).score
        np.testing.assert_allclose(st.layer_scores()["score"][:, 0, li], want, atol=1e-6)


def test_channels_last_3d_softmax_scores_each_class_one_vs_rest(tmp_path):
    model = models.unet(ndim=3, layout="NDHWC", head="softmax", n_classes=3, batch="N", size=16,
                        metadata=True)
    path = models.save(model, tmp_path / "u3.onnx")
    data = _npz(tmp_path / "d.npz", 3, 16, ndim=3, labels=2)
    summary = score_dataset(path, data, tmp_path / "run.h5", layers=["enc2", "dec"], batch_size=2)
    st = engine.open_store(summary.store)
    assert list(st.classes) == [1, 2]
    ls = st.layer_scores()
    assert ls["score"].shape == (3, 2, 2)
    for k, cls in enumerate((1, 2)):
        direct, _, _ = _direct(model, data, ["enc2", "dec"], cls=cls, binary=False)
        for li, n in enumerate(["enc2", "dec"]):
            np.testing.assert_allclose(ls["score"][:, k, li], direct[n][0].score, atol=1e-6)


def test_fixed_batch_of_one_gives_the_same_scores(tmp_path):
    data = _npz(tmp_path / "d.npz", 4, 32)
    a = models.save(models.unet(batch=1, metadata=True), tmp_path / "fixed.onnx")
    b = models.save(models.unet(batch="N", metadata=True), tmp_path / "dyn.onnx")
    sa = engine.open_store(score_dataset(a, data, tmp_path / "a.h5", batch_size=3).store)
    sb = engine.open_store(score_dataset(b, data, tmp_path / "b.h5", batch_size=3).store)
    np.testing.assert_array_equal(sa.layer_scores()["score"], sb.layer_scores()["score"])


def test_splitting_into_passes_changes_nothing(tmp_path, unet2d, caplog):
    _, path = unet2d
    data = _npz(tmp_path / "d.npz", 3, 32)
    one = engine.open_store(score_dataset(path, data, tmp_path / "one.h5").store)
    many = score_dataset(path, data, tmp_path / "many.h5", max_activation_memory=20_000)
    assert many.passes > 1
    two = engine.open_store(many.store)
    np.testing.assert_array_equal(one.layer_scores()["score"], two.layer_scores()["score"])


def test_input_sa_and_maps_are_stored(tmp_path, unet2d):
    _, path = unet2d
    data = _npz(tmp_path / "d.npz", 3, 32, channels=2)
    model = models.unet(batch="N", in_channels=2, metadata=True)
    path = models.save(model, tmp_path / "u2c.onnx")
    st = engine.open_store(score_dataset(path, data, tmp_path / "r.h5", save_maps=["case001"]).store)
    inp = st.input_scores()
    assert inp["score"].shape == (3, 1, 3)  # all channels, then each channel alone
    assert np.isfinite(inp["score"]).all()
    assert list(st.map_case_ids) == ["case001"]
    maps = st.maps("case001")
    assert any(k.startswith("enc1") for k in maps)
    assert not any("#unit" in k for k in maps)  # unit maps need unit scores


def test_best_unit_maps_are_the_units_with_the_highest_sa(tmp_path, unet2d):
    _, path = unet2d
    data = _npz(tmp_path / "d.npz", 2, 32)
    st = engine.open_store(score_dataset(path, data, tmp_path / "r.h5", level="both",
                                         layers=["enc1"], save_maps=["case000"]).store)
    keys = [k for k in st.maps("case000") if k.startswith("enc1#unit")]
    units = sorted(int(k.split("#unit")[1]) for k in keys)
    scores = st.unit_scores(0)["score"][0, 0]
    want = sorted(np.argsort(np.where(np.isfinite(scores), -scores, np.inf))[:3].tolist())
    assert units == want
    u = units[0]
    m = st.maps("case000")[f"enc1#unit{u}"]
    assert m["binary"].shape == (32, 32)


def test_unreadable_and_mismatched_cases_are_skipped_and_recorded(tmp_path, unet2d):
    _, path = unet2d
    folder = tmp_path / "cases"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(folder / f"c{i}.npy", rng.random((32, 32)).astype(np.float32))
        np.save(folder / f"c{i}_mask.npy", (rng.random((32, 32)) > 0.5).astype(np.uint8))
    np.save(folder / "c1_mask.npy", np.zeros((30, 30), np.uint8))  # wrong shape
    (folder / "c2.npy").write_bytes(b"not a numpy file")  # unreadable
    with pytest.warns(UserWarning):
        summary = score_dataset(path, folder, tmp_path / "r.h5")
    st = engine.open_store(summary.store)
    status = dict(zip(st.cases["id"], st.cases["status"]))
    assert status["c0"] == "ok" and status["c1"] != "ok" and status["c2"] != "ok"
    ls = st.layer_scores()
    ids = list(st.cases["id"])
    assert np.isfinite(ls["score"][ids.index("c0")]).any()
    assert np.isnan(ls["score"][ids.index("c1")]).all()
    assert (ls["status"][ids.index("c2")] == engine.Status.NOT_COMPUTED).all()


def test_a_store_made_with_other_settings_is_refused_naming_the_difference(tmp_path, unet2d):
    _, path = unet2d
    data = _npz(tmp_path / "d.npz", 2, 32)
    score_dataset(path, data, tmp_path / "r.h5")
    with pytest.raises(ValueError, match="resize"):
        score_dataset(path, data, tmp_path / "r.h5", resize="downsample", resume=True)
    score_dataset(path, data, tmp_path / "r.h5", resize="downsample", overwrite=True)
    assert engine.open_store(tmp_path / "r.h5").config["resize"] == "downsample"


@pytest.mark.parametrize("bad", ["truncated", "flat", "unknown-layer"])
def test_bad_models_give_one_line_errors(tmp_path, bad):
    data = _npz(tmp_path / "d.npz", 1, 32)
    if bad == "truncated":
        path = models.write_truncated(tmp_path / "t.onnx")
        with pytest.raises(ValueError) as info:
            score_dataset(path, data, tmp_path / "r.h5")
    elif bad == "flat":
        path = models.save(models.flat_model(), tmp_path / "f.onnx")
        with pytest.raises(ValueError, match="no hidden tensors") as info:
            score_dataset(path, data, tmp_path / "r.h5")
    else:
        path = models.save(models.unet(batch="N", metadata=True), tmp_path / "u.onnx")
        with pytest.raises(KeyError, match="enc1") as info:
            score_dataset(path, data, tmp_path / "r.h5", layers=["encl"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r.h5").exists()


def test_nonfinite_features_name_the_tensor_or_are_skipped(tmp_path):
    model = models.unet(batch="N", metadata=True)
    path = models.save(model, tmp_path / "u.onnx")
    data = _npz(tmp_path / "d.npz", 2, 32)
    z = dict(np.load(data))
    z["images"][1, 3, 3] = np.nan
    np.savez(data, **z)
    with pytest.raises(ValueError, match="case001.*NaN") as info:
        score_dataset(path, data, tmp_path / "r.h5", card={"scaling": "none"})
    assert "nonfinite" in str(info.value)
    summary = score_dataset(path, data, tmp_path / "s.h5", nonfinite="skip", card={"scaling": "none"})
    st = engine.open_store(summary.store)
    assert list(st.cases["status"]) == ["ok", "nonfinite-input"]
    status = st.layer_scores()["status"]
    assert (status[1] == engine.Status.NONFINITE).all()
    assert np.isfinite(st.layer_scores()["score"][0]).any()


_WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from engine.run import score_dataset
    stop_after = int(os.environ.get("STOP_AFTER", "-1"))
    def progress(done, total):
        if stop_after >= 0 and done >= stop_after:
            open({flag!r}, "w").write(str(done))
            time.sleep(60)
    score_dataset({model!r}, {data!r}, {store!r}, batch_size=2, level="both",
                  resume=True, progress=progress)
""")


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [0, 2, 6])
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, unet2d, stop_after):
    _, path = unet2d
    data = _npz(tmp_path / "d.npz", 9, 32)
    ref = engine.open_store(score_dataset(path, data, tmp_path / "ref.h5", batch_size=2, level="both").store)
    flag = tmp_path / "flag"
    script = tmp_path / "worker.py"
    store = tmp_path / "killed.h5"
    script.write_text(_WORKER.format(root=str(ROOT), flag=str(flag), model=str(path), data=str(data),
                                     store=str(store)))
    env = {**os.environ, "STOP_AFTER": str(stop_after)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.time() + 120
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "worker did not reach the kill point"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not store.exists()
    env["STOP_AFTER"] = "-1"
    subprocess.run([sys.executable, str(script)], env=env, check=True)
    got = engine.open_store(store)
    assert list(got.cases["id"]) == list(ref.cases["id"])
    for key in ("score", "status", "tp", "fp", "fn"):
        np.testing.assert_array_equal(got.layer_scores()[key], ref.layer_scores()[key])
    for li in range(len(ref.layers)):
        np.testing.assert_array_equal(got.unit_scores(li)["score"], ref.unit_scores(li)["score"])


def test_a_failing_write_names_the_file_and_keeps_finished_batches(tmp_path, unet2d, monkeypatch):
    _, path = unet2d
    data = _npz(tmp_path / "d.npz", 6, 32)
    from engine import store as store_mod

    calls = {"n": 0}
    real = store_mod.StoreWriter.write_batch

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, batch)

    monkeypatch.setattr(store_mod.StoreWriter, "write_batch", flaky)
    with pytest.raises(OSError):
        score_dataset(path, data, tmp_path / "r.h5", batch_size=2)
    monkeypatch.setattr(store_mod.StoreWriter, "write_batch", real)
    summary = score_dataset(path, data, tmp_path / "r.h5", batch_size=2, resume=True)
    assert summary.n_skipped_done == 2
    assert engine.open_store(summary.store).cases.shape[0] == 6


def test_shards_merge_into_the_store_of_one_run(tmp_path, unet2d):
    _, path = unet2d
    data = _npz(tmp_path / "d.npz", 7, 32)
    whole = engine.open_store(score_dataset(path, data, tmp_path / "whole.h5", batch_size=2).store)
    shards = [score_dataset(path, data, tmp_path / f"s{i}.h5", batch_size=2, shard=f"{i}/3").store
              for i in range(3)]
    assert [len(engine.open_store(s).cases) for s in shards] == [3, 2, 2]
    merged = engine.open_store(engine.merge_parts(shards, tmp_path / "merged.h5",
                                                  expected_ids=list(whole.cases["id"])))
    assert list(merged.cases["id"]) == list(whole.cases["id"])
    np.testing.assert_array_equal(merged.layer_scores()["score"], whole.layer_scores()["score"])
    with pytest.raises(ValueError, match="shard"):
        score_dataset(path, data, tmp_path / "x.h5", shard="3/3")


def test_card_toml_with_overrides_on_top(tmp_path):
    model = models.unet(batch="N", metadata=False)
    path = models.save(model, tmp_path / "u.onnx")
    toml = tmp_path / "card.toml"
    toml.write_text('[prediction]\noutput = "prob"\nactivation = "sigmoid"\n'
                    '[preprocessing]\nscaling = "minmax"\n')
    data = _npz(tmp_path / "d.npz", 2, 32)
    st = engine.open_store(score_dataset(path, data, tmp_path / "r.h5",
                                         card={"_toml": str(toml), "scaling": "zscore"}).store)
    card = st.config["model_card"]
    assert card["activation"] == "sigmoid" and card["scaling"] == "zscore"


@pytest.mark.parametrize("kwargs, want", [
    ({"head": "sigmoid"}, ["head"]),
    ({"head": "logits"}, ["head"]),  # the output is Identity(head)
    ({"ndim": 3, "layout": "NDHWC", "head": "softmax", "n_classes": 3}, ["prob_nchw", "head"]),
])
def test_output_path_tensors_are_the_prediction_in_another_form(kwargs, want):
    from engine.model.graph import output_path_tensors

    model = models.unet(batch="N", size=16, **kwargs)
    assert output_path_tensors(model, "prob" if kwargs["head"] != "logits" else model.graph.output[0].name) == want
