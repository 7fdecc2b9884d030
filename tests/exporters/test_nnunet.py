"""exporters.nnunet: nnU-Net v2 trained-model folders built here (random weights), exported and
checked against the network nnU-Net would build, its softmax applied."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")

from engine.model.card import resolve_model_card  # noqa: E402
from engine.model.metadata import read_metadata  # noqa: E402
from exporters import nnunet  # noqa: E402
from exporters._common import run_onnx  # noqa: E402

_PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
_RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def _architecture(dim: int, cls: str) -> dict:
    """A tiny configuration as nnU-Net's planners write it (3 stages)."""
    strides = [[1] * dim, [2] * dim, [2] * dim] if dim == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    kwargs = {
        "n_stages": 3, "features_per_stage": [4, 8, 8],
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": [[3] * dim] * 3, "strides": strides,
        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    kwargs["n_conv_per_stage" if cls == _PLAIN else "n_blocks_per_stage"] = [2, 1, 1]
    return {"network_class_name": cls, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def make_nnunet_folder(root: Path, *, dim: int = 2, cls: str = _PLAIN, norm: str = "ZScoreNormalization",
                       channels: int = 1, labels: dict | None = None, fold: int = 0,
                       checkpoints: tuple[str, ...] = ("final",), seed: int = 0) -> Path:
    """Write plans.json, dataset.json and fold_F/checkpoint_*.pth the way nnU-Net v2 does."""
    config_name = "2d" if dim == 2 else "3d_fullres"
    folder = root / "Dataset042_Tiny" / f"nnUNetTrainer__nnUNetPlans__{config_name}"
    (folder / f"fold_{fold}").mkdir(parents=True)
    labels = labels or {"background": 0, "liver": 1, "tumour": 2}
    patch = [16, 24] if dim == 2 else [8, 16, 16]
    config = {
        "data_identifier": f"nnUNetPlans_{config_name}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": patch, "median_image_size_in_voxels": [p * 2 for p in patch],
        "spacing": [1.0, 0.75] if dim == 2 else [2.5, 0.8, 0.8],
        "normalization_schemes": [norm] * channels, "use_mask_for_norm": [False] * channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": _architecture(dim, cls), "batch_dice": True,
    }
    plans = {
        "dataset_name": "Dataset042_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": config["spacing"],
        "original_median_shape_after_transp": [p * 2 for p in patch],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(range(dim)),
        "transpose_backward": list(range(dim)), "configurations": {config_name: config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 1500.0, "mean": 80.5 + c, "median": 75.0, "min": -1000.0,
                     "percentile_00_5": -95.0, "percentile_99_5": 250.0 + c, "std": 60.25}
            for c in range(channels)},
    }
    dataset = {"channel_names": {str(c): ("CT" if norm == "CTNormalization" else f"MR{c}") for c in range(channels)},
               "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
    if any(isinstance(v, list) for v in labels.values()):
        dataset["regions_class_order"] = list(range(1, len(labels)))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    plan = nnunet.read_plan(folder, configuration=config_name)
    torch.manual_seed(seed)
    net = nnunet.load_network(plan)
    for m in net.modules():  # non-trivial affine InstanceNorm parameters
        if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    for name in checkpoints:
        torch.save({
            "network_weights": net.state_dict(), "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5), np.float64(0.61)], "ema_fg_dice": [np.float64(0.5)],
                        "train_losses": [0.9, 0.7], "lrs": [0.01, 0.0099], "epoch_start_timestamps": [1.0, 2.0]},
            "_best_ema": np.float64(0.61), "current_epoch": 2,
            "init_args": {"plans": plans, "configuration": config_name, "fold": fold, "dataset_json": dataset,
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": tuple(range(dim)),
        }, folder / f"fold_{fold}" / f"checkpoint_{name}.pth")
    return folder


def _reference(folder: Path, x: np.ndarray, *, activation: str = "softmax") -> np.ndarray:
    """What nnU-Net computes: the network rebuilt from the plans, weights loaded, softmax."""
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    plan = nnunet.read_plan(folder, configuration=ckpt["init_args"]["configuration"])
    net = nnunet.load_network(plan, ckpt["network_weights"])
    with torch.no_grad():
        y = net(torch.from_numpy(x))
    return (torch.softmax(y, 1) if activation == "softmax" else torch.sigmoid(y)).numpy()


def test_read_plan_2d_zscore(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    plan = nnunet.read_plan(folder, configuration="2d")
    assert plan.size_multiple == (4, 4)
    assert plan.patch_size == (16, 24) and plan.spacing == (1.0, 0.75)
    assert plan.input_channels == 1 and plan.output_channels == 3
    assert plan.class_names == ("background", "liver", "tumour") and plan.classes == (1, 2)
    assert plan.activation == "softmax" and plan.scaling == "zscore" and plan.notes == ()
    with pytest.raises(KeyError, match="3d_fullres.*configurations: \\['2d'\\]"):
        nnunet.read_plan(folder, configuration="3d_fullres")


def test_export_2d_plain_unet_matches_nnunet(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    result = nnunet.export(folder, tmp_path / "m.onnx")
    stages = ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2", "decoder.stages.0", "decoder.stages.1"]
    assert result.outputs == ["output", *stages]
    assert result.layers == {s: s for s in stages}
    proto = onnx.load(result.path)
    card = read_metadata(proto)
    assert card["framework"] == "nnunet" and "fold_0/checkpoint_final.pth" in card["source"]
    assert card["input"] == {"name": "input", "layout": "NCHW", "size": None, "channels": 1, "size_multiple": [4, 4]}
    assert card["prediction"]["activation"] == "softmax" and card["prediction"]["classes"] == [1, 2]
    assert card["preprocessing"] == {"resize": False, "scaling": "zscore", "mean": None, "std": None}
    extra = card["extra"]
    assert extra["class_names"] == ["background", "liver", "tumour"] and extra["channel_names"] == ["MR0"]
    assert extra["spacing"] == [1.0, 0.75] and extra["patch_size"] == [16, 24]
    assert extra["nnunet"]["trainer"] == "nnUNetTrainer" and extra["nnunet"]["configuration"] == "2d"
    # the file agrees with nnU-Net's network + softmax at the patch size and at another multiple of 4
    for shape in [(2, 1, 16, 24), (1, 1, 20, 12)]:
        x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
        got = run_onnx(result.path, {"input": x})
        want = _reference(folder, x)
        np.testing.assert_allclose(got["output"], want, atol=1e-5)
        np.testing.assert_allclose(got["output"].sum(1), 1.0, atol=1e-5)
    assert "output@12x20" in result.max_abs_diff  # the exporter's own second-size check
    # the engine reads the card: any size that is a multiple of 4, no resize
    engine_card = resolve_model_card(result.path)
    assert engine_card.size_multiple == (4, 4) and engine_card.input_size is None
    assert engine_card.resize is False and engine_card.classes == (1, 2) and engine_card.channels == 1


def test_export_zscore_with_use_mask_for_norm_writes_zscore_nonzero(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    plans_path = folder / "plans.json"
    plans = json.loads(plans_path.read_text())
    for config in plans["configurations"].values():
        if "use_mask_for_norm" in config:
            config["use_mask_for_norm"] = [True] * len(config["use_mask_for_norm"])
    plans_path.write_text(json.dumps(plans))
    result = nnunet.export(folder, tmp_path / "m.onnx")
    card = read_metadata(onnx.load(result.path))
    assert card["preprocessing"]["scaling"] == "none"
    assert card["preprocessing"]["normalization"] == [{"kind": "zscore_nonzero"}]
    assert any("zscore_nonzero" in m and "bounding box" in m for m in result.messages)


def test_export_3d_residual_encoder_ct(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=3, cls=_RESENC, norm="CTNormalization", checkpoints=("final", "best"))
    result = nnunet.export(folder, tmp_path / "m3.onnx", checkpoint="best")
    assert result.outputs[0] == "output"
    assert [o for o in result.outputs if o.startswith("encoder.stages.")] == [f"encoder.stages.{i}" for i in range(3)]
    assert [o for o in result.outputs if o.startswith("decoder.stages.")] == ["decoder.stages.0", "decoder.stages.1"]
    card = read_metadata(onnx.load(result.path))
    assert card["input"]["layout"] == "NCDHW" and card["input"]["size_multiple"] == [2, 4, 4]
    assert card["input"]["size"] is None and card["preprocessing"]["resize"] is False  # dynamic spatial axes
    assert card["preprocessing"]["scaling"] == "none"  # CTNormalization: the per-channel normalization
    assert card["preprocessing"]["normalization"] == [
        {"kind": "ct", "clip": [-95.0, 250.0], "mean": 80.5, "std": 60.25}]
    assert card["extra"]["normalization"][0]["clip"] == [-95.0, 250.0]
    assert card["extra"]["nnunet"]["checkpoint"] == "checkpoint_best.pth"
    assert not any("CTNormalization" in m for m in result.messages)  # expressed: nothing to do by hand
    for shape in [(1, 1, 8, 16, 16), (1, 1, 6, 12, 20)]:
        x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(run_onnx(result.path, {"input": x})["output"], _reference(folder, x), atol=1e-5)
    engine_card = resolve_model_card(result.path)
    assert engine_card.size_multiple == (2, 4, 4) and engine_card.scaling == "none"
    assert engine_card.normalization == ({"kind": "ct", "clip": [-95.0, 250.0], "mean": 80.5, "std": 60.25},)


def test_region_based_labels_export_sigmoid_over_every_region(tmp_path):
    labels = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3}
    folder = make_nnunet_folder(tmp_path, dim=2, labels=labels, channels=2)
    result = nnunet.export(folder, tmp_path / "r.onnx", input_size=[8, 12])
    card = result.metadata
    assert card["prediction"]["activation"] == "sigmoid" and card["prediction"]["classes"] == [0, 1, 2]
    assert card["extra"]["class_names"] == ["whole tumour", "tumour core", "enhancing"]
    assert card["input"]["channels"] == 2 and card["extra"]["nnunet"]["regions"] is True
    x = np.random.default_rng(5).standard_normal((1, 2, 8, 12)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(result.path, {"input": x})["output"],
                               _reference(folder, x, activation="sigmoid"), atol=1e-5)


def test_checkpoint_with_unknown_objects_is_refused_not_unpickled(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    ckpt_path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["init_args"]["args"] = argparse.Namespace(seed=1)  # code-bearing object: never unpickled
    torch.save(ckpt, ckpt_path)
    with pytest.raises(ValueError, match=r"weights_only=True.*argparse\.Namespace.*never unpickles"):
        nnunet.export(folder, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_missing_checkpoint_lists_those_found(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    with pytest.raises(FileNotFoundError, match=r"checkpoint_best\.pth.*fold_0/checkpoint_final\.pth"):
        nnunet.export(folder, tmp_path / "x.onnx", checkpoint="best")
    with pytest.raises(FileNotFoundError, match="fold_3"):
        nnunet.export(folder, tmp_path / "x.onnx", fold=3)
    with pytest.raises(FileNotFoundError, match="trained-model folders below it"):
        nnunet.export(folder.parent, tmp_path / "x.onnx")


def test_input_size_must_be_a_multiple(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    with pytest.raises(ValueError, match=r"not a multiple of \[4, 4\].*\[12, 12\]"):
        nnunet.export(folder, tmp_path / "x.onnx", input_size=[10, 12])


def test_weights_that_do_not_fit_name_the_plans(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ValueError, match="network_weights do not fit .*PlainConvUNet"):
        nnunet.export(folder, tmp_path / "x.onnx")


def test_legacy_plans_format_is_rebuilt(tmp_path):
    folder = make_nnunet_folder(tmp_path, dim=2)
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["2d"]
    arch = config.pop("architecture")["arch_kwargs"]
    config.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=8,
                  n_conv_per_stage_encoder=arch["n_conv_per_stage"],
                  n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"],
                  conv_kernel_sizes=arch["kernel_sizes"], pool_op_kernel_sizes=arch["strides"])
    (folder / "plans.json").write_text(json.dumps(plans))
    plan = nnunet.read_plan(folder, configuration="2d")
    assert plan.network_class.endswith("unet.PlainConvUNet") and plan.size_multiple == (4, 4)
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    nnunet.load_network(plan, ckpt["network_weights"])  # the same network as the new format


def test_cli_export_nnunet(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    folder = make_nnunet_folder(tmp_path, dim=2, fold=1)
    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(cli, ["export", "nnunet", str(folder), "--fold", "1", "--checkpoint", "final",
                                   "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["path"] == str(out) and data["outputs"][0] == "output"
    assert data["metadata"]["input"]["size_multiple"] == [4, 4]
    assert read_metadata(onnx.load(out))["extra"]["nnunet"]["fold"] == "1"
    res = CliRunner().invoke(cli, ["export", "nnunet", str(folder), "-o", str(tmp_path / "y.onnx")])
    assert res.exit_code == 1 and "fold_1/checkpoint_final.pth" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["export", "nnunet", str(folder), "--fold", "1", "--input-size", "8,a",
                                   "-o", str(tmp_path / "y.onnx")])
    assert res.exit_code == 2
