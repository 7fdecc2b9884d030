"""Third-party ONNX models with dynamic axes, as other tools write them, scored as they are.

No protoseg exporter is involved: torch.onnx (TorchScript-based and dynamo), and tf2onnx
from a Keras model with ``None`` spatial dims, each write a model whose hidden tensors have
symbolic sizes. ``protoseg score`` must size them from the data, score images of several
sizes in one run, and give what a model exported for one fixed size gives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.model.graph import list_hidden_tensors
from engine.model.shapes import unresolved
from engine.run import score_dataset


def _folder(root: Path, sizes: list[int], channels_last: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i, s in enumerate(sizes):
        yy, xx = np.mgrid[:s, :s] / s
        m = (yy - 0.5) ** 2 + (xx - 0.45) ** 2 < rng.uniform(0.04, 0.09)
        img = np.clip(m * 120 + rng.normal(80, 25, m.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"c{i}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(root / f"c{i}_mask.png")
    return root


def _by_case(store: Path) -> dict[str, dict[str, float]]:
    """Case id → tensor name → layer SA (first class)."""
    st = engine.open_store(store)
    ls = st.layer_scores()["score"]
    names = [str(n) for n in st.layers["name"]]
    return {str(cid): dict(zip(names, ls[i, 0])) for i, cid in enumerate(st.cases["id"])}


def _check_dynamic_run(onnx_path: Path, static_path: Path, tmp_path: Path, sizes: list[int],
                       card: dict | None = None) -> None:
    assert any(unresolved(t) for t in list_hidden_tensors(onnx_path))
    mixed = _folder(tmp_path / "mixed", sizes)
    run = score_dataset(onnx_path, mixed, tmp_path / "dyn.h5", batch_size=4, card=card)
    assert run.n_failed == 0
    got = _by_case(run.store)
    assert list(got) == [f"c{i}" for i in range(len(sizes))]
    assert all(np.isfinite(list(v.values())).all() for v in got.values())
    # the cases of the static export's size score the same through the static model
    only = tmp_path / "only"
    only.mkdir()
    for i, s in enumerate(sizes):
        if s == sizes[0]:
            for n in (f"c{i}.png", f"c{i}_mask.png"):
                (only / n).write_bytes((mixed / n).read_bytes())
    ref = _by_case(score_dataset(static_path, only, tmp_path / "static.h5", card=card).store)
    # (a converter may add tensors for dynamic sizes, e.g. tf2onnx's Slice/Pad around a
    # transposed convolution: the tensors both graphs have must agree)
    for cid, scores in ref.items():
        common = [n for n in scores if n in got[cid]]
        assert len(common) >= len(scores) - 1
        np.testing.assert_allclose([got[cid][n] for n in common], [scores[n] for n in common], atol=1e-6)


# ----------------------------------------------------------------------------- torch

def _torch_net():
    torch = pytest.importorskip("torch")
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            e = self.enc(x)
            return torch.sigmoid(self.head(torch.cat([self.up(self.down(e)), e], 1)))

    torch.manual_seed(0)
    return torch, Net().eval()


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_onnx_dynamic_axes_score_mixed_sizes(tmp_path, dynamo):
    torch, net = _torch_net()
    x = torch.rand(1, 1, 32, 32)
    dyn, static = tmp_path / "dyn.onnx", tmp_path / "static.onnx"
    if dynamo:
        from torch.export import Dim

        h, w = Dim("h", min=2, max=1024), Dim("w", min=2, max=1024)
        torch.onnx.export(net, (x,), str(dyn), dynamo=True, input_names=["image"],
                          output_names=["prob"],
                          dynamic_shapes={"x": {0: Dim("batch", max=64), 2: 2 * h, 3: 2 * w}})
    else:
        torch.onnx.export(net, (x,), str(dyn), dynamo=False, input_names=["image"],
                          output_names=["prob"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "prob": {0: "batch", 2: "height", 3: "width"}})
    torch.onnx.export(net, (x,), str(static), dynamo=dynamo, input_names=["image"], output_names=["prob"])
    _check_dynamic_run(dyn, static, tmp_path, [32, 48, 32, 64, 40])


# ----------------------------------------------------------------------------- tf2onnx

@pytest.mark.slow
def test_tf2onnx_none_dims_score_mixed_sizes(tmp_path):
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    import onnx

    keras = tf.keras

    def build(size):
        tf.random.set_seed(0)
        inp = keras.Input((size, size, 1))
        e = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="enc")(inp)
        d = keras.layers.MaxPooling2D(2)(e)
        d = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="down")(d)
        u = keras.layers.Conv2DTranspose(4, 2, strides=2, name="up")(d)
        out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="head")(keras.layers.Concatenate()([u, e]))
        return keras.Model(inp, out)

    model = build(None)
    paths = {}
    for name, size in (("dyn", None), ("static", 32)):
        spec = (tf.TensorSpec((None, size, size, 1), tf.float32, name="image"),)
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(proto, paths[name])
    _check_dynamic_run(paths["dyn"], paths["static"], tmp_path, [32, 48, 32, 40],
                       card={"layout": "NHWC"})


@pytest.mark.slow
def test_a_unet_needing_multiples_of_16_given_100x100_images(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    class Deep(nn.Module):  # four poolings with skip connections: sizes must be multiples of 16
        def __init__(self) -> None:
            super().__init__()
            self.downs = nn.ModuleList(nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(5))
            self.ups = nn.ModuleList(nn.ConvTranspose2d(4, 4, 2, stride=2) for _ in range(4))
            self.fuse = nn.ModuleList(nn.Conv2d(8, 4, 3, padding=1) for _ in range(4))
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            skips = []
            for i, conv in enumerate(self.downs):
                x = torch.relu(conv(x))
                if i < 4:
                    skips.append(x)
                    x = nn.functional.max_pool2d(x, 2)
            for up, fuse, skip in zip(self.ups, self.fuse, reversed(skips)):
                x = torch.relu(fuse(torch.cat([up(x), skip], 1)))
            return torch.sigmoid(self.head(x))

    torch.manual_seed(0)
    path = tmp_path / "deep.onnx"
    torch.onnx.export(Deep().eval(), (torch.rand(1, 1, 64, 64),), str(path), dynamo=False,
                      input_names=["image"], output_names=["prob"],
                      dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}, "prob": {0: "b", 2: "h", 3: "w"}})
    data = _folder(tmp_path / "cases", [100, 100])
    with pytest.raises(ValueError, match=r"spatial size \(100, 100\).*multiples of 16 \(such as \(112, 112\)\)"):
        score_dataset(path, data, tmp_path / "a.h5")
    run = score_dataset(path, data, tmp_path / "b.h5", card={"size_multiple": 16})
    st = engine.open_store(run.store)
    assert run.n_failed == 0 and np.isfinite(st.output_dice()).all()
    assert st.config["model_card"]["size_multiple"] == [16, 16]
