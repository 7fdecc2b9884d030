"""exporters.monai: MONAI bundles built here (random weights, MONAI's bundle layout), exported
and checked against the network MONAI's ConfigParser builds, with the bundle's activation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
bundle = pytest.importorskip("monai.bundle")

from engine.model.card import resolve_model_card  # noqa: E402
from engine.model.metadata import read_metadata  # noqa: E402
from exporters import monai as mexp  # noqa: E402
from exporters._common import run_onnx  # noqa: E402

_UNET3D = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "batch"},
    "network": "$@network_def.to(@device)",
    "image_key": "image",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -57, "a_max": 164,
         "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 12], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]},
}

_META3D = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
    "version": "0.1.0", "name": "Tiny spleen", "monai_version": "1.3.0", "pytorch_version": "2.1.0",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                             "spatial_shape": ["4*n", "4*n", "4*n"], "dtype": "float32", "value_range": [0, 1],
                             "is_patch_data": True, "channel_def": {"0": "image"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                             "spatial_shape": ["4*n", "4*n", "4*n"], "dtype": "float32", "value_range": [0, 1],
                             "is_onehot": True, "channel_def": {"0": "background", "1": "spleen"}}},
    },
}

_UNET2D_YAML = """\
imports:
  - $import torch
bundle_root: .
network_def:
  _target_: BasicUNet
  spatial_dims: 2
  in_channels: 2
  out_channels: 3
  features: [4, 4, 8, 8, 16, 4]
preprocessing:
  _target_: Compose
  transforms:
    - {_target_: LoadImaged, keys: image}
    - {_target_: NormalizeIntensityd, keys: image, nonzero: true, channel_wise: true}
    - {_target_: RandGaussianNoised, keys: image, prob: 0.0}
postprocessing:
  _target_: Compose
  transforms:
    - {_target_: Activationsd, keys: pred, sigmoid: true}
"""

_META2D = {
    "version": "0.2.0", "name": "Tiny brats",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 2, "spatial_shape": ["16*n", "16*n"],
                             "channel_def": {"0": "T1c", "1": "FLAIR"}}},
        "outputs": {"pred": {"type": "image", "num_channels": 3, "spatial_shape": ["16*n", "16*n"],
                             "channel_def": {"0": "TC", "1": "WT", "2": "ET"}}},
    },
}


def _network(folder: Path, config: str) -> torch.nn.Module:
    parser = bundle.ConfigParser()
    parser.read_config(str(folder / "configs" / config))
    return parser.get_parsed_content("network_def")


def make_bundle(root: Path, *, dim: int = 3, seed: int = 0) -> Path:
    """A bundle folder: configs/inference.json|yaml, configs/metadata.json, models/model.pt."""
    folder = root / ("tiny_spleen" if dim == 3 else "tiny_brats")
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    if dim == 3:
        config = "inference.json"
        (folder / "configs" / config).write_text(json.dumps(_UNET3D, indent=2))
        (folder / "configs" / "metadata.json").write_text(json.dumps(_META3D, indent=2))
    else:
        config = "inference.yaml"
        (folder / "configs" / config).write_text(_UNET2D_YAML)
        (folder / "configs" / "metadata.json").write_text(json.dumps(_META2D, indent=2))
    torch.manual_seed(seed)
    net = _network(folder, config)
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


def _reference(folder: Path, config: str, x: np.ndarray, activation: str) -> np.ndarray:
    """What the bundle computes: ConfigParser's network, models/model.pt, the post-processing activation."""
    net = _network(folder, config)
    net.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    net.eval()
    with torch.no_grad():
        y = net(torch.from_numpy(x))
    return (torch.softmax(y, 1) if activation == "softmax" else torch.sigmoid(y)).numpy()


def test_read_bundle_3d(tmp_path):
    folder = make_bundle(tmp_path, dim=3)
    info = mexp.read_bundle(folder)
    assert info.spatial_dims == 3 and info.input_channels == 1 and info.output_channels == 2
    assert info.class_names == ("background", "spleen") and info.classes == [1]
    assert info.activation == "softmax" and info.size_multiple == (4, 4, 4) and info.example_size == (16, 16, 12)
    # ScaleIntensityRange(-57, 164 -> 0, 1, clip) is clip(x, -57, 164), then (x - (-57)) / 221
    assert info.scaling == "none" and info.mean is None and info.std is None
    assert info.normalization == ({"kind": "ct", "clip": [-57.0, 164.0], "mean": -57.0, "std": 221.0},)
    assert info.extra["clip"] == [-57.0, 164.0] and info.extra["spacing"] == [1.5, 1.5, 2.0]
    assert info.extra["orientation"] == "RAS" and info.extra["roi_size"] == [16, 16, 12]
    assert info.orientation == "RAS"  # Orientationd(axcodes="RAS"): the card's input.orientation
    assert not any("clip" in n for n in info.notes)


def test_export_3d_unet_bundle_matches_monai(tmp_path):
    folder = make_bundle(tmp_path, dim=3)
    result = mexp.export(folder, tmp_path / "spleen.onnx")
    # MONAI UNet stages (outermost ResidualUnit/Convolution blocks); the logits' unit model.2.1 left out
    assert result.outputs == ["output", "model.0", "model.1.submodule.0", "model.1.submodule.1.submodule",
                              "model.1.submodule.2.0", "model.1.submodule.2.1", "model.2.0"]
    card = read_metadata(onnx.load(result.path))
    assert card["framework"] == "monai" and card["source"].startswith("monai-bundle:Tiny spleen")
    assert card["input"] == {"name": "input", "layout": "NCDHW", "size": None, "channels": 1,
                             "size_multiple": [4, 4, 4], "orientation": "RAS"}
    assert card["prediction"]["activation"] == "softmax" and card["prediction"]["classes"] == [1]
    assert card["preprocessing"] == {"resize": False, "scaling": "none", "mean": None, "std": None,
                                     "normalization": [{"kind": "ct", "clip": [-57.0, 164.0], "mean": -57.0,
                                                        "std": 221.0}]}
    assert card["extra"]["class_names"] == ["background", "spleen"] and card["extra"]["clip"] == [-57.0, 164.0]
    assert not any("clipping" in m for m in result.messages)
    for shape in [(1, 1, 16, 16, 12), (2, 1, 8, 12, 20)]:
        x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
        got = run_onnx(result.path, {"input": x})["output"]
        np.testing.assert_allclose(got, _reference(folder, "inference.json", x, "softmax"), atol=1e-5)
    engine_card = resolve_model_card(result.path)
    assert engine_card.size_multiple == (4, 4, 4) and engine_card.scaling == "none"
    assert engine_card.orientation == "RAS" and engine_card.normalization[0]["clip"] == [-57.0, 164.0]


def test_export_2d_yaml_bundle_sigmoid(tmp_path):
    folder = make_bundle(tmp_path, dim=2)
    result = mexp.export(folder, tmp_path / "brats.onnx", input_size=[32, 48])
    assert result.outputs == ["output", "conv_0", "down_1", "down_2", "down_3", "down_4",
                              "upcat_4", "upcat_3", "upcat_2", "upcat_1"]  # BasicUNet's children
    card = result.metadata
    assert card["prediction"]["activation"] == "sigmoid" and card["prediction"]["classes"] == [0, 1, 2]
    assert card["input"]["channels"] == 2 and card["input"]["size_multiple"] == [16, 16]
    assert card["preprocessing"]["scaling"] == "zscore"
    assert card["extra"]["class_names"] == ["TC", "WT", "ET"] and card["extra"]["channel_names"] == ["T1c", "FLAIR"]
    assert card["extra"]["not_expressed"] == ["RandGaussianNoised"]
    assert any("nonzero" in m for m in result.messages)
    x = np.random.default_rng(8).standard_normal((1, 2, 32, 48)).astype(np.float32)
    got = run_onnx(result.path, {"input": x})["output"]
    np.testing.assert_allclose(got, _reference(folder, "inference.yaml", x, "sigmoid"), atol=1e-5)


def test_missing_weights_and_unknown_network_id(tmp_path):
    folder = make_bundle(tmp_path, dim=3)
    (folder / "models" / "model.pt").rename(folder / "models" / "model.ts")
    with pytest.raises(FileNotFoundError, match=r"model\.pt.*\['model\.ts'\]"):
        mexp.export(folder, tmp_path / "x.onnx")
    with pytest.raises(KeyError, match=r"no 'net'.*network_def"):
        mexp.export(folder, tmp_path / "x.onnx", network_id="net")
    with pytest.raises(FileNotFoundError, match="not a MONAI bundle"):
        mexp.export(tmp_path, tmp_path / "x.onnx")


def test_weights_that_do_not_fit(tmp_path):
    folder = make_bundle(tmp_path, dim=3)
    torch.save({"model": {"nope": torch.zeros(1)}}, folder / "models" / "model.pt")
    with pytest.raises(ValueError, match="does not fit the bundle's network"):
        mexp.export(folder, tmp_path / "x.onnx")


def test_cli_export_monai_bundle(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    folder = make_bundle(tmp_path, dim=3)
    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(cli, ["export", "monai-bundle", str(folder), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["path"] == str(out) and data["metadata"]["framework"] == "monai"
    assert read_metadata(onnx.load(out))["input"]["size_multiple"] == [4, 4, 4]
    res = CliRunner().invoke(cli, ["export", "monai-bundle", str(folder), "--input-size", "16,16,10",
                                   "-o", str(tmp_path / "y.onnx")])
    assert res.exit_code == 1 and "not a multiple of [4, 4, 4]" in res.output
