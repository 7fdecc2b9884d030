"""Models with symbolic sizes, mixed image sizes, fixed batches, sizes a model cannot take.

Every test compares against the same model with the sizes made concrete, or against each
size scored alone: a dynamic model must give exactly what a static one gives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.model.graph import list_hidden_tensors
from engine.model.session import Session
from engine.model.shapes import resolve_shapes, unresolved
from engine.run import score_dataset
from engine.store.runinfo import parts_dir
from tests import models


def _blobs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    imgs, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        imgs.append(m * 0.6 + rng.normal(0, 0.2, m.shape))
        masks.append(m.astype(np.uint8))
    return np.asarray(imgs, np.float32)[:, None], np.asarray(masks)


def _png_folder(root: Path, sizes: list[int], seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(sizes):
        img, m = _blobs(1, s, seed + i)
        grey = np.clip(img[0, 0] * 200 + 30, 0, 255).astype(np.uint8)
        Image.fromarray(grey).save(root / f"case{i:02d}.png")
        Image.fromarray(m[0] * 255).save(root / f"case{i:02d}_mask.png")
    return root


def _scores(store: Path) -> dict[str, tuple[np.ndarray, ...]]:
    st = engine.open_store(store)
    ls, units = st.layer_scores(), st.unit_scores(0)
    return {str(cid): (ls["score"][i], units["score"][i]) for i, cid in enumerate(st.cases["id"])}


def test_symbolic_spatial_dims_are_sized_from_the_data(tmp_path):
    model = models.unet(batch="N", size="S")
    hidden = list_hidden_tensors(model)
    assert any(unresolved(t) for t in hidden)
    sized = resolve_shapes(model, hidden, "x", (1, 1, 40, 24))
    static = {t.name: t.shape for t in list_hidden_tensors(models.unet(batch="N", size=40))}
    for t in sized:
        assert not unresolved(t)
        assert t.shape[1] == static[t.name][1]
    by_name = {t.name: t.shape for t in sized}
    assert by_name["enc1"][2:] == (40, 24) and by_name["pool1"][2:] == (20, 12)


def test_shapes_inference_cannot_tell_are_read_off_one_run(monkeypatch):
    import engine.model.shapes as shapes

    model = models.unet(batch="N", size="S")
    hidden = list_hidden_tensors(model)
    # shape inference that tells nothing: the observing run must size every tensor
    monkeypatch.setattr(shapes, "list_hidden_tensors", lambda *a, **k: hidden)
    sized = {t.name: t.shape for t in resolve_shapes(model, hidden, "x", (1, 1, 16, 16))}
    assert sized["enc1"][1:] == (4, 16, 16) and sized["enc2"][1:] == (8, 8, 8)


def test_a_model_with_dynamic_sizes_scores_like_its_static_twin(tmp_path):
    images, masks = _blobs(5, 32, seed=1)
    data = tmp_path / "d.npz"
    np.savez(data, images=images, masks=masks)
    dyn = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    static = models.save(models.unet(batch="N", size=32), tmp_path / "static.onnx")
    a = score_dataset(dyn, data, tmp_path / "a.h5", level="both", batch_size=2)
    b = score_dataset(static, data, tmp_path / "b.h5", level="both", batch_size=2)
    sa, sb = _scores(a.store), _scores(b.store)
    assert list(sa) == list(sb)
    for cid in sa:
        np.testing.assert_array_equal(sa[cid][0], sb[cid][0])
        np.testing.assert_array_equal(sa[cid][1], sb[cid][1])
    assert (engine.open_store(a.store).layers["channels"] > 0).all()


def test_mixed_image_sizes_score_as_each_size_alone(tmp_path):
    sizes = [32, 48, 64, 32, 48]
    mixed = _png_folder(tmp_path / "mixed", sizes)
    model = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    run = score_dataset(model, mixed, tmp_path / "mixed.h5", level="both", batch_size=4)
    assert run.n_failed == 0
    together = _scores(run.store)
    assert list(together) == [f"case{i:02d}" for i in range(len(sizes))]  # order kept
    for size in sorted(set(sizes)):
        alone_dir = tmp_path / f"only{size}"
        alone_dir.mkdir()
        for i, s in enumerate(sizes):
            if s == size:
                for name in (f"case{i:02d}.png", f"case{i:02d}_mask.png"):
                    (alone_dir / name).write_bytes((mixed / name).read_bytes())
        alone = _scores(score_dataset(model, alone_dir, tmp_path / f"{size}.h5", level="both",
                                      batch_size=4).store)
        for cid, (layer, unit) in alone.items():
            np.testing.assert_array_equal(together[cid][0], layer)
            np.testing.assert_array_equal(together[cid][1], unit)


def test_larger_cases_than_planned_run_in_smaller_parts(tmp_path, monkeypatch):
    # planned on the first case (16x16): the 64x64 cases have 16x the voxels, so a batch
    # of 4 of them is fed one case at a time and memory stays what the plan allowed
    mixed = _png_folder(tmp_path / "mixed", [16, 16, 64, 64, 64, 64])
    model = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    fed: list[tuple[int, ...]] = []
    real_run = Session.run

    def spy(self, feeds, outputs=None):
        fed.append(next(iter(feeds.values())).shape)
        return real_run(self, feeds, outputs)

    monkeypatch.setattr(Session, "run", spy)
    score_dataset(model, mixed, tmp_path / "r.h5", batch_size=4)
    big = [s for s in fed if s[-1] == 64]
    assert big and max(s[0] for s in big) == 1
    assert max(s[0] for s in fed if s[-1] == 16) == 2


@pytest.mark.parametrize("fixed", [1, 2])
def test_a_fixed_batch_model_takes_any_batch_size(tmp_path, fixed):
    images, masks = _blobs(5, 32, seed=2)
    data = tmp_path / "d.npz"
    np.savez(data, images=images, masks=masks)
    a = models.save(models.unet(batch=fixed), tmp_path / "fixed.onnx")
    b = models.save(models.unet(batch="N"), tmp_path / "dyn.onnx")
    sa = _scores(score_dataset(a, data, tmp_path / "a.h5", level="both", batch_size=3).store)
    sb = _scores(score_dataset(b, data, tmp_path / "b.h5", level="both", batch_size=3).store)
    for cid in sb:
        np.testing.assert_array_equal(sa[cid][0], sb[cid][0])


def test_a_size_the_model_cannot_take_names_the_sizes_it_can(tmp_path):
    # one pooling and a skip connection: the model needs even sizes
    images = np.random.default_rng(0).random((2, 1, 33, 33)).astype(np.float32)
    data = tmp_path / "odd.npz"
    np.savez(data, images=images)
    model = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    with pytest.raises(ValueError, match=r"spatial size \(33, 33\).*multiples of 2 \(such as \(34, 34\)\)"):
        score_dataset(model, data, tmp_path / "r.h5")
    assert not (tmp_path / "r.h5").exists()


def test_an_odd_case_after_good_ones_keeps_them_and_names_the_case(tmp_path):
    root = _png_folder(tmp_path / "mixed", [32, 32, 33])
    model = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    with pytest.raises(engine.errors.CaseError, match=r"multiples of 2") as info:
        score_dataset(model, root, tmp_path / "r.h5", batch_size=2)
    assert info.value.case_id == "case02"
    # the first batch is kept for a rerun to resume
    assert not (tmp_path / "r.h5").exists() and parts_dir(tmp_path / "r.h5").is_dir()
    # and the lock went with the error, although its traceback is still alive (a notebook):
    # the rerun resumes (and meets the same case), it is not refused as "in use"
    with pytest.raises(engine.errors.CaseError, match=r"multiples of 2") as again:
        score_dataset(model, root, tmp_path / "r.h5", batch_size=2)
    assert again.value.case_id == "case02" and info.value is not None


def test_input_size_resizes_every_case_to_one_size(tmp_path):
    root = _png_folder(tmp_path / "mixed", [32, 33, 48])
    model = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    run = score_dataset(model, root, tmp_path / "r.h5", card={"input_size": (32, 32)})
    st = engine.open_store(run.store)
    assert run.n_failed == 0 and len(st.cases) == 3
    assert tuple(st.config["model_card"]["input_size"]) == (32, 32)


def test_unknown_input_dims_without_names_are_sized_too(tmp_path):
    # dims with neither a value nor a name (what some converters write) and a fixed batch of 1
    model = models.unet(batch=1, size="S")
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.ClearField("dim_param")
    for d in model.graph.output[0].type.tensor_type.shape.dim[2:]:
        d.ClearField("dim_param")
    assert all(unresolved(t) for t in list_hidden_tensors(model))
    images, masks = _blobs(3, 32, seed=4)
    data = tmp_path / "d.npz"
    np.savez(data, images=images, masks=masks)
    a = _scores(score_dataset(models.save(model, tmp_path / "unk.onnx"), data, tmp_path / "a.h5",
                              level="both", batch_size=2).store)
    b = _scores(score_dataset(models.save(models.unet(batch="N", size=32), tmp_path / "s.onnx"), data,
                              tmp_path / "b.h5", level="both", batch_size=2).store)
    for cid in b:
        np.testing.assert_array_equal(a[cid][0], b[cid][0])
        np.testing.assert_array_equal(a[cid][1], b[cid][1])


def test_a_card_size_multiple_pads_and_scores_on_the_image_grid(tmp_path):
    # 33x33 images for a model that needs even sizes: padded to 34x34 for the model, scored
    # on 33x33. The twin: run the model on the padded image, take each tensor, resize it to
    # the padded grid (the engine's linear resize), crop to 33x33, score on that grid.
    from engine.model.graph import expose
    from engine.model.session import make_session
    from engine.resize import resize_linear
    from engine.scores import sa_scores

    img = _blobs(2, 33, seed=9)[0]
    data = tmp_path / "odd.npz"
    np.savez(data, images=img)
    proto = models.unet(batch="N", size="S")
    model = models.save(proto, tmp_path / "dyn.onnx")
    run = score_dataset(model, data, tmp_path / "r.h5", card={"size_multiple": 2})
    st = engine.open_store(run.store)
    assert run.n_failed == 0 and st.config["model_card"]["size_multiple"] == [2, 2]
    names = [str(n) for n in st.layers["name"]]
    got = st.layer_scores()["score"][:, 0]
    padded = np.pad(img, [(0, 0), (0, 0), (0, 1), (0, 1)])
    out = make_session(expose(proto, names), provider="cpu").run({"x": padded})
    prob = out["prob"][:, 0, :33, :33]
    guide = (prob > 0.5).astype(np.float32)
    for li, name in enumerate(names):
        f = out[name]
        twin = np.ascontiguousarray(resize_linear(f, (34, 34))[:, :, :33, :33])
        want = sa_scores(twin, guide, guide > 0.5).score
        np.testing.assert_array_equal(got[:, li], want, err_msg=name)


def test_size_multiple_from_the_cli_message_is_the_fix(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    data = tmp_path / "odd.npz"
    np.savez(data, images=_blobs(2, 33, seed=3)[0])
    model = models.save(models.unet(batch="N", size="S"), tmp_path / "dyn.onnx")
    runner = CliRunner()
    bad = runner.invoke(cli, ["score", str(model), str(data), "-o", str(tmp_path / "a.h5"), "-q"])
    assert bad.exit_code == 1 and "--size-multiple 2" in bad.stderr
    ok = runner.invoke(cli, ["score", str(model), str(data), "-o", str(tmp_path / "b.h5"),
                             "--size-multiple", "2"])
    assert ok.exit_code == 0, ok.stderr
    assert ok.stderr.count("padded:") == 1  # recorded once for the run
