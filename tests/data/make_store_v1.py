"""Write tests/data/store-v1.h5: a tiny store in encoding version 1 (protoseg 0.1.0).

Kept so that later protoseg versions are tested to still read version-1 stores. Do not
regenerate it with a newer protoseg: write a new fixture for a new version instead.
Run: ``python tests/data/make_store_v1.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.store import StoreWriter, parts_dir

__all__ = ["main"]


def main() -> Path:
    out = Path(__file__).with_name("store-v1.h5")
    w = StoreWriter(out, config={"resize": "upsample", "guide": "prediction"},
                    layers=[{"name": "conv1", "layer": "conv1", "op": "Conv", "channels": 2},
                            {"name": "conv2", "layer": "conv2", "op": "Conv", "channels": 2}],
                    classes=[1], overwrite=True)
    ids = ["a", "b", "c", "d"]
    score = np.arange(4)[:, None, None] / 10 + np.arange(2)[None, None, :] / 100
    binary = np.zeros((4, 4), bool)
    binary[:2] = True
    w.write_batch({
        "case_ids": ids, "case_index": np.arange(4),
        "layer_score": score, "layer_status": np.zeros((4, 1, 2)),
        "output_dice": np.full((4, 1), 0.9),
        "maps": {"b": {"conv1": {"binary": binary,
                                 "probability": binary.astype(np.float32)}}},
    })
    path = w.finalize({"protoseg": "0.1.0", "note": "fixture for tests"})
    assert not parts_dir(path).exists()
    return path


if __name__ == "__main__":
    print(main())
