"""Write tests/data/store-v1.h5: a tiny store in encoding version 1 (protoseg 0.1.0).

Kept so that later protoseg versions are tested to still read version-1 stores. Do not
regenerate it with a newer protoseg: write a new fixture for a new version instead.
The committed file was written by protoseg 0.1.0, whose batches were dicts holding only
``layer_score`` and ``layer_status`` here (so its ``/layer_scores`` has no ``tp``, ``fp``,
``fn``); this script now builds the same batch as an ``engine.store.BatchResult``.
Run: ``python tests/data/make_store_v1.py OUT.h5``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from engine.store import BatchResult, ScoreBlock, StoreWriter, parts_dir

__all__ = ["main"]


def main(out: Path | None = None) -> Path:
    """Write the fixture to ``out`` (default: ``store-v1.h5`` beside this script)."""
    out = out or Path(__file__).with_name("store-v1.h5")
    w = StoreWriter(out, config={"resize": "upsample", "guide": "prediction"},
                    layers=[{"name": "conv1", "layer": "conv1", "op": "Conv", "channels": 2},
                            {"name": "conv2", "layer": "conv2", "op": "Conv", "channels": 2}],
                    classes=[1], overwrite=True)
    ids = ("a", "b", "c", "d")
    layer = ScoreBlock.empty((4, 1, 2))
    layer.score[:] = np.arange(4)[:, None, None] / 10 + np.arange(2)[None, None, :] / 100
    layer.status[:] = 0
    binary = np.zeros((4, 4), bool)
    binary[:2] = True
    w.write_batch(BatchResult(
        case_ids=ids, case_index=np.arange(4), case_status=("ok",) * 4, case_group=("",) * 4,
        layer=layer, units={}, input=None, output_dice=np.full((4, 1), 0.9), baselines={},
        maps={"b": {"conv1": {"binary": binary, "probability": binary.astype(np.float32)}}},
    ))
    path = w.finalize({"protoseg": "0.1.0", "note": "fixture for tests"})
    assert not parts_dir(path).exists()
    return path


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
