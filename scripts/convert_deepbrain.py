#!/usr/bin/env python
"""Reproduce ``cli/data/deepbrain/deepbrain.onnx`` from the PyPI wheel ``deepbrain==0.1``.

deepbrain (Ivan Itzcovich, MIT) ships a frozen TF1 graph ``deepbrain/models/graph.pb``:
a 3-D U-Net for brain extraction from T1 MRI, input ``img`` [N,128,128,128,1] (NDHWC),
output ``prob`` (sigmoid). This script

1. takes the wheel (``--wheel PATH``) or runs ``pip download --no-deps deepbrain==0.1``
   into a temporary folder, and reads ``graph.pb`` with :mod:`zipfile`;
2. makes the graph convertible (SPEC §6): ``img`` (a PlaceholderWithDefault fed by a
   dataset iterator) becomes a plain float32 placeholder [None,128,128,128,1]; the
   ``training`` flag becomes the constant False and every dropout ``cond`` is replaced by
   its inference branch (an Identity), so no Switch/Merge or RandomUniform is left;
3. converts it with :func:`exporters.tensorflow.export`, exposing every convolution
   (after its ReLU), transposed convolution and concatenation, each output named after
   its TF layer scope (``conv3d_1``, ``conv3d_transpose``, ``concat``...; the metadata
   records the TF op, e.g. ``conv3d_1/Relu``);
4. checks ONNX against TensorFlow on a real volume, Colin27 ``ch2.nii.gz`` resized to
   128³ (trilinear, half-pixel centres) and min-max scaled to [0, 1]; and the Dice of the
   thresholded prediction, resized back to 181×217×181, against ``ch2bet > 0``.

Usage::

    python scripts/convert_deepbrain.py [--wheel deepbrain-0.1-py3-none-any.whl]
        [--out cli/data/deepbrain/deepbrain.onnx] [--colin /usr/share/mricron/templates]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_graph_from_wheel", "make_convertible", "colin27_input", "main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "cli" / "data" / "deepbrain" / "deepbrain.onnx"
SIZE = 128


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps deepbrain==0.1`` into ``folder``; the wheel's path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "deepbrain==0.1", "-d", str(folder)],
        check=True,
    )
    wheels = sorted(folder.glob("deepbrain-0.1-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no deepbrain-0.1 wheel in {folder}")
    return wheels[0]


def read_graph_from_wheel(wheel: Path) -> tuple[bytes, str]:
    """The bytes of ``deepbrain/models/graph.pb`` and the wheel's METADATA text."""
    with zipfile.ZipFile(wheel) as zf:
        graph = zf.read("deepbrain/models/graph.pb")
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta_name).decode("utf-8")
    return graph, metadata


def make_convertible(graph_bytes: bytes) -> Any:
    """Parse the frozen graph and apply the SPEC §6 fixes; returns a pruned GraphDef."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_bytes)
    nodes = {n.name: n for n in graph_def.node}
    # 1. img: PlaceholderWithDefault(IteratorGetNext) -> Placeholder float32 [None,128,128,128,1]
    img = nodes["img"]
    shape = tf.TensorShape([None, SIZE, SIZE, SIZE, 1]).as_proto()
    img.op = "Placeholder"
    del img.input[:]
    for key in list(img.attr):
        if key not in ("dtype",):
            del img.attr[key]
    img.attr["dtype"].type = tf.float32.as_datatype_enum
    img.attr["shape"].shape.CopyFrom(shape)
    # 2. training: constant False
    training = nodes["training"]
    training.op = "Const"
    del training.input[:]
    for key in list(training.attr):
        del training.attr[key]
    training.attr["dtype"].type = tf.bool.as_datatype_enum
    training.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(False, dtype=tf.bool))
    # 3. every cond Merge -> Identity of the false (inference) branch's data input
    for node in graph_def.node:
        if node.op != "Merge":
            continue
        src = node.input[0].split(":")[0]
        while nodes[src].op == "Identity":
            src = nodes[src].input[0].split(":")[0]
        if nodes[src].op != "Switch":
            raise ValueError(f"unexpected graph: Merge {node.name!r} is not fed by a Switch ({src!r})")
        data = nodes[src].input[0]
        dtype = node.attr["T"].type
        node.op = "Identity"
        del node.input[:]
        node.input.append(data)
        for key in list(node.attr):
            del node.attr[key]
        node.attr["T"].type = dtype
    return tf.compat.v1.graph_util.extract_sub_graph(graph_def, ["prob"])


def _resize(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear resize, half-pixel centres (the engine's, = torch ``interpolate(align_corners=False)``)."""
    sys.path.insert(0, str(ROOT))
    from engine.resize import resize_linear

    return resize_linear(np.asarray(volume, dtype=np.float32), tuple(shape))


def colin27_input(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Colin27 as the model's input (1,128,128,128,1), its brain mask, its original shape."""
    import nibabel as nib

    image = np.asarray(nib.load(folder / "ch2.nii.gz").dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(folder / "ch2bet.nii.gz").dataobj) > 0
    small = _resize(image, (SIZE, SIZE, SIZE))
    small = (small - small.min()) / (small.max() - small.min())
    return small[None, ..., None].astype(np.float32), mask, image.shape


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays."""
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


LICENSE_TEMPLATE = """deepbrain.onnx is converted from the frozen graph deepbrain/models/graph.pb of the
PyPI package deepbrain 0.1 (http://github.com/iitzco/deepbrain), whose metadata declares
"License: MIT" and "Author: {author}". The wheel ships no licence file; the standard MIT
licence text follows.

MIT License

Copyright (c) 2018 {author}

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def convert(wheel: Path, out: Path, colin: Path) -> dict[str, Any]:
    """Convert, check and write the ONNX file and its licence; returns a summary dict."""
    sys.path.insert(0, str(ROOT))
    from exporters.tensorflow import export
    from exporters._common import run_onnx

    graph_bytes, metadata = read_graph_from_wheel(wheel)
    license_line = next((ln for ln in metadata.splitlines() if ln.startswith("License:")), "")
    author = next((ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Author:")), "")
    if "MIT" not in license_line:
        raise ValueError(f"deepbrain wheel metadata does not declare MIT ({license_line!r}); not shipping it")
    graph_def = make_convertible(graph_bytes)
    x, brain, shape = colin27_input(colin)
    result = export(
        graph_def, out, inputs=["img"], outputs=["prob"], input_shape=(None, SIZE, SIZE, SIZE, 1),
        prediction_activation="sigmoid", input_layout="NDHWC", classes=[0], threshold=0.5,
        preprocessing={"resize": True, "scaling": "minmax"}, check_input=x, atol=1e-4, rtol=1e-3,
        source="deepbrain 0.1 (PyPI wheel, MIT), deepbrain/models/graph.pb",
    )
    prob = run_onnx(result.path, {"img": x}, ["prob"])["prob"][0, ..., 0]
    pred = _resize(prob, shape) > 0.5
    summary = {
        "path": str(result.path),
        "bytes": result.path.stat().st_size,
        "outputs": result.outputs,
        "layers": result.layers,
        "max_abs_diff": result.max_abs_diff,
        "dice_vs_ch2bet": dice(pred, brain),
    }
    (out.parent / "LICENSE-deepbrain.txt").write_text(LICENSE_TEMPLATE.format(author=author))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="deepbrain-0.1 wheel (default: pip download it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--colin", type=Path, default=Path("/usr/share/mricron/templates"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        summary = convert(wheel, args.out, args.colin)
    print(json.dumps(summary, indent=2))
    if summary["dice_vs_ch2bet"] < 0.9:
        print(f"warning: Dice {summary['dice_vs_ch2bet']:.3f} below the expected ~0.93", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
