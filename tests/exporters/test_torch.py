"""exporters.torch: tiny U-Nets (2-D, 3-D) exported with hidden outputs named by module path."""
from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from torch import nn  # noqa: E402

from engine.model.metadata import read_metadata  # noqa: E402
from exporters import torch as texp  # noqa: E402
from exporters._common import ExportMismatchError, LayerNotFoundError, run_onnx  # noqa: E402


def _block(cin: int, cout: int, dim: int) -> nn.Sequential:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d
    return nn.Sequential(conv(cin, cout, 3, padding=1), bn(cout), nn.ReLU(), conv(cout, cout, 3, padding=1), nn.ReLU())


class UNet(nn.Module):
    """enc1 -> pool -> enc2 -> up (ConvTranspose) -> cat -> dec1 -> head (1x1 conv)."""

    def __init__(self, dim: int = 2, c: int = 3) -> None:
        super().__init__()
        self.enc1 = _block(1, c, dim)
        self.pool = (nn.MaxPool2d if dim == 2 else nn.MaxPool3d)(2)
        self.enc2 = _block(c, 2 * c, dim)
        self.drop = nn.Dropout(0.5)
        self.up = (nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d)(2 * c, c, 2, stride=2)
        self.dec1 = _block(2 * c, c, dim)
        self.head = (nn.Conv2d if dim == 2 else nn.Conv3d)(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        return self.head(self.dec1(torch.cat([self.up(self.drop(e2)), e1], 1)))


def _model(dim: int = 2) -> UNet:
    torch.manual_seed(0)
    model = UNet(dim)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_export_2d_default_blocks_named_after_modules(tmp_path):
    model = _model(2)
    x = torch.rand(1, 1, 16, 16)
    result = texp.export(model, x, tmp_path / "u.onnx", exporter="torchscript", prediction_activation="logits")
    assert result.outputs == ["output", "enc1", "enc2", "up", "dec1"]
    assert result.layers == {n: n for n in ["enc1", "enc2", "up", "dec1"]}
    proto = onnx.load(result.path)
    assert [o.name for o in proto.graph.output] == result.outputs
    meta = read_metadata(proto)
    assert meta["framework"] == "torch"
    assert meta["input"] == {"name": "input", "layout": "NCHW", "size": [16, 16]}
    assert meta["prediction"]["output"] == "output" and meta["prediction"]["activation"] == "logits"
    assert set(meta["hidden"]) == {"enc1", "enc2", "up", "dec1"}
    assert all(v["layout"] == "NCHW" for v in meta["hidden"].values())
    assert all(d <= 1e-4 for d in result.max_abs_diff.values())
    # dynamic batch: a batch of 3 agrees with torch in eval mode
    xb = torch.rand(3, 1, 16, 16)
    got = run_onnx(result.path, {"input": xb.numpy()})
    model.eval()
    with torch.no_grad():
        e1 = model.enc1(xb)
        want_out = model(xb)
    np.testing.assert_allclose(got["enc1"], e1.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["output"], want_out.numpy(), atol=1e-5)


def test_export_3d_scored_by_engine(tmp_path):
    scores = pytest.importorskip("engine.scores")
    model = _model(3)
    result = texp.export(model, torch.rand(2, 1, 8, 8, 8), tmp_path / "u3.onnx", exporter="torchscript")
    assert result.layouts["enc2"] == "NCDHW"
    out = run_onnx(result.path, {"input": np.random.default_rng(1).random((2, 1, 8, 8, 8), dtype=np.float32)})
    prob = 1.0 / (1.0 + np.exp(-out["output"][:, 0]))
    guide = (prob > np.median(prob)).astype(np.float32)  # a non-empty foreground for sure
    for name in ["enc1", "enc2", "up", "dec1"]:
        assert out[name].ndim == 5
        sa = scores.sa_scores(out[name], guide, guide > 0.5, layout="channels_first")
        assert sa.score.shape == (2,)
        assert np.all((sa.score >= 0) & (sa.score <= 1))


def test_caller_model_untouched(tmp_path):
    model = _model(2)
    model.train()
    model.enc2.eval()  # mixed modes survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texp.export(model, torch.rand(1, 1, 16, 16), tmp_path / "u.onnx", exporter="torchscript")
    assert model.training and model.enc1.training and not model.enc2.training
    assert all(not m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layer_selection_by_name_glob_type(tmp_path):
    model = _model(2)
    x = torch.rand(1, 1, 16, 16)
    r = texp.export(model, x, tmp_path / "a.onnx", exporter="torchscript",
                    layers=["enc1.0", "dec*", nn.ConvTranspose2d])
    # dec1.4 (a ReLU) returns the very tensor of dec1: exposed once, in forward order
    assert r.outputs == ["output", "enc1.0", "up", "dec1.0", "dec1.1", "dec1.2", "dec1.3", "dec1"]
    r = texp.export(model, x, tmp_path / "b.onnx", exporter="torchscript", layers="type:ReLU")
    assert all(name.split(".")[-1] in {"2", "4"} for name in r.outputs[1:])
    r = texp.export(model, x, tmp_path / "c.onnx", exporter="torchscript", layers="Conv2d")
    assert "head" not in r.outputs  # the prediction itself is never a hidden output
    assert "enc1.0" in r.outputs and "dec1.3" in r.outputs


def test_unknown_layer_lists_closest(tmp_path):
    with pytest.raises(LayerNotFoundError) as info:
        texp.export(_model(2), torch.rand(1, 1, 16, 16), tmp_path / "x.onnx", layers="enc3")
    assert "enc3" in str(info.value) and "'enc2'" in str(info.value)
    assert isinstance(info.value, KeyError)
    assert not (tmp_path / "x.onnx").exists()


def test_module_called_twice_is_refused(tmp_path):
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    with pytest.raises(ValueError, match="runs 2 times"):
        texp.export(Twice(), torch.rand(1, 1, 8, 8), tmp_path / "t.onnx", layers="conv")


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        texp.export(object(), torch.rand(1, 1, 8, 8), tmp_path / "t.onnx")
    with pytest.raises(ValueError, match="rank 3 to 5"):
        texp.export(_model(2), torch.rand(8, 8), tmp_path / "t.onnx")
    with pytest.raises(ValueError, match="exporter must be"):
        texp.export(_model(2), torch.rand(1, 1, 8, 8), tmp_path / "t.onnx", exporter="tf")


def test_unexportable_model_raises_with_context(tmp_path):
    class Zeta(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return torch.special.zeta(y.abs() + 2.0, y.abs() + 1.0)

    with pytest.raises(RuntimeError, match="torch could not export.*special_zeta"):
        texp.export(Zeta(), torch.rand(1, 1, 8, 8), tmp_path / "z.onnx", exporter="torchscript")


def test_mismatch_names_the_output(tmp_path, monkeypatch):
    real = texp.run_onnx

    def perturbed(model, feeds, outputs=None):
        out = real(model, feeds, outputs)
        out["enc2"] = out["enc2"] + 1e-2
        return out

    monkeypatch.setattr(texp, "run_onnx", perturbed)
    with pytest.raises(ExportMismatchError, match="'enc2'"):
        texp.export(_model(2), torch.rand(1, 1, 16, 16), tmp_path / "m.onnx", exporter="torchscript")
    assert not (tmp_path / "m.onnx").exists()


def test_falls_back_to_torchscript_with_message(tmp_path, monkeypatch, caplog):
    real = texp.require

    def no_onnxscript(module, *, extra=None):
        if module == "onnxscript":
            raise ImportError("onnxscript is missing; install it with: pip install 'protoseg[torch]'")
        return real(module, extra=extra)

    monkeypatch.setattr(texp, "require", no_onnxscript)
    with caplog.at_level("WARNING", logger="protoseg"):
        r = texp.export(_model(2), torch.rand(1, 1, 16, 16), tmp_path / "f.onnx")
    assert r.exporter == "torch.onnx(torchscript)"
    assert r.messages and "onnxscript" in r.messages[0]
    assert any("torchscript" in rec.message for rec in caplog.records)


def test_torch_missing_names_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"protoseg\[torch\]"):
        texp.export(object(), None, tmp_path / "x.onnx")
    with pytest.raises(ImportError, match=r"protoseg\[torch\]"):
        texp.load_torch_model("a.b:c")


def test_load_torch_model_sources(tmp_path, monkeypatch):
    pkg = tmp_path / "mynets.py"
    pkg.write_text(
        "import torch\n"
        "def make():\n    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(),"
        " torch.nn.Conv2d(2, 1, 1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reference = _load("mynets:make")
    torch.nn.init.constant_(reference[0].weight, 0.25)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model = texp.load_torch_model("mynets:make", weights=tmp_path / "w.pth")
    assert torch.equal(model[0].weight, reference[0].weight) and not model.training
    with pytest.raises(LayerNotFoundError, match="make"):
        texp.load_torch_model("mynets:mak")
    bad = {"nope": torch.zeros(1)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="do not fit"):
        texp.load_torch_model("mynets:make", weights=tmp_path / "bad.pth")
    scripted = torch.jit.script(reference)
    scripted.save(str(tmp_path / "m.pt"))
    loaded = texp.load_torch_model(tmp_path / "m.pt")
    x = torch.rand(1, 1, 4, 4)
    assert torch.allclose(loaded(x), reference(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        texp.load_torch_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        texp.load_torch_model(tmp_path / "junk.pt")


def _load(spec: str):
    return texp.load_torch_model(spec)


@pytest.mark.slow
def test_dynamo_exporter_dynamic_spatial(tmp_path):
    model = _model(2)
    r = texp.export(model, torch.rand(1, 1, 16, 16), tmp_path / "d.onnx", exporter="dynamo")
    assert r.exporter == "torch.onnx(dynamo)"
    assert r.outputs == ["output", "enc1", "enc2", "up", "dec1"]
    x = torch.rand(2, 1, 24, 32)  # another batch and spatial size
    got = run_onnx(r.path, {"input": x.numpy()})
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(got["output"], model(x).numpy(), atol=1e-4)


def test_torchscript_and_torch_export_models_get_named_hidden_outputs(tmp_path):
    model = _model(2).eval()
    x = torch.rand(1, 1, 16, 16)
    torch.jit.script(model).save(str(tmp_path / "m.pt"))
    scripted = texp.load_torch_model(tmp_path / "m.pt")
    r = texp.export(scripted, x, tmp_path / "s.onnx")
    # hooks cannot run on TorchScript: the ReLU outputs are named from the ONNX node scopes
    assert r.exporter == "torch.onnx(torchscript)"
    assert r.outputs == ["output", "enc1.2", "enc1.4", "enc2.2", "enc2.4", "dec1.2", "dec1.4"]
    meta = read_metadata(onnx.load(r.path))
    assert meta["framework"] == "torch" and set(meta["hidden"]) == set(r.outputs[1:])
    got = run_onnx(r.path, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got["enc1.4"], model.enc1(x).numpy(), atol=1e-5)


def test_default_layers_rule():
    class DoubleConv(nn.Module):  # a custom block wrapping one Sequential: named after the block
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 2, 3, padding=1)  # a conv leaf outside any block
            self.act = nn.ReLU()
            self.down1 = DoubleConv(2, 4)
            self.encoder = nn.Sequential(DoubleConv(4, 4), DoubleConv(4, 4))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Flatten()
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.encoder(self.down1(self.act(self.stem(x))))
            _ = self.fc(self.pool(h))  # rank-2 side output: never a hidden layer
            return self.head(h)

    names = texp.default_layers(Net(), torch.rand(1, 1, 8, 8))
    assert names == ["stem", "down1", "encoder.0", "encoder.1"]
