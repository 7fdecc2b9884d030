"""Synthetic stores for the report tests: real StoreWriter batches, then open_store."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from engine.status import Status
from engine.store import BatchResult, ScoreBlock, Store, StoreWriter, open_store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- synthetic run
def make_batches(
    *,
    n_cases: int = 7,
    classes: tuple[int, ...] = (1,),
    spatial: tuple[int, ...] = (12, 14),
    channels: tuple[int, ...] = (3, 6, 5),
    units: bool = True,
    maps: tuple[str, ...] = ("c0", "c2"),
    input_sa: bool = True,
    dice: bool = True,
    batch_size: int = 3,
    seed: int = 0,
) -> tuple[list[BatchResult], list[dict]]:
    """Random batches as the scoring run hands them to the store, and the layer rows."""
    rng = np.random.default_rng(seed)
    nk, nl = len(classes), len(channels)
    layers = [{"index": j, "name": f"t{j}", "layer": f"block{j}.conv", "op": "Conv", "channels": c,
               "depth": 2 * j + 1, "shape": [c, *spatial]} for j, c in enumerate(channels)]
    batches = []
    for start in range(0, n_cases, batch_size):
        ids = [f"c{i}" for i in range(start, min(n_cases, start + batch_size))]
        nb = len(ids)

        def block(shape: tuple[int, ...]) -> ScoreBlock:
            score = rng.uniform(0, 1, shape)
            status = np.zeros(shape, np.uint8)
            drop = rng.uniform(size=shape) < 0.15
            status[drop] = rng.choice([Status.EMPTY_DICE, Status.EMPTY_FOREGROUND],
                                      size=int(drop.sum()))
            score[drop] = np.nan
            tp = rng.integers(0, 50, shape)
            return ScoreBlock(score=score, status=status, tp=tp, fp=tp // 2, fn=tp // 3)

        layer = block((nb, nk, nl))
        unit_blocks = {j: block((nb, nk, c)) for j, c in enumerate(channels)} if units else {}
        input_block = block((nb, nk, 1)) if input_sa else None
        output_dice = rng.uniform(0.5, 1, (nb, nk)) if dice else np.full((nb, nk), np.nan)
        baselines = {"predicted_fraction": rng.uniform(0, 0.5, (nb, nk))}
        mp = {}
        for cid in ids:
            if cid not in maps:
                continue
            ref = np.zeros((nk, *spatial), bool)
            ref[(slice(None),) + tuple(slice(n // 4, 3 * n // 4) for n in spatial)] = True
            entry: dict = {"_image": rng.normal(size=spatial).astype(np.float32),
                           "_prediction": rng.uniform(size=(nk, *spatial)).astype(np.float32),
                           "_reference": ref}
            for j in range(nl):
                for cls in classes:
                    key = f"t{j}" if nk == 1 else f"t{j}[class {cls}]"
                    prob = rng.uniform(size=spatial).astype(np.float32)
                    entry[key] = {"binary": prob > 0.5, "probability": prob}
            mp[cid] = entry
        batches.append(BatchResult(
            case_ids=tuple(ids), case_index=np.arange(start, start + nb),
            case_status=("ok",) * nb, case_group=tuple(f"s{i % 2}" for i in range(nb)),
            layer=layer, units=unit_blocks, input=input_block, output_dice=output_dice,
            baselines=baselines, maps=mp))
    return batches, layers


CONFIG = {"guide": "prediction", "reference": "ground_truth", "resize": "upsample",
          "level": "both", "threshold": 0.5}
PROVENANCE = {"model": "tiny.onnx", "model_sha256": "ab" * 32, "provider": "CPUExecutionProvider",
              "optimization": "all", "started": "2026-01-01T00:00:00Z", "seconds": 1.5}


def build_store(tmp_path: Path, **kw) -> Store:
    """A real store: batches written with StoreWriter, finalized, opened with open_store.

    ``config`` entries are added to :data:`CONFIG`.

    ``maps`` calls are recorded in ``store.maps_read`` (to check lazy reading).
    """
    est = kw.pop("estimates", None)
    val = kw.pop("validation", None)
    config = {**CONFIG, **kw.pop("config", {})}
    classes = list(kw.get("classes", (1,)))
    batches, layers = make_batches(**kw)
    path = tmp_path / f"store{len(list(tmp_path.glob('store*.h5')))}.h5"
    writer = StoreWriter(path, config=config, layers=layers, classes=classes)
    for b in batches:
        writer.write_batch(b)
    writer.finalize(dict(PROVENANCE))
    store = open_store(path)
    if est is not None:
        store.write_estimates(est, validation=val, info={"paper": {"layers": ["t1", "t2"]}})
    store.maps_read = []
    read = store.maps

    def recording(case_id, names=None):
        store.maps_read.append(case_id)
        return read(case_id, names)

    store.maps = recording
    return store


# ----------------------------------------------------------------------------- helpers
def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def as_float(text: str) -> float:
    return float("nan") if text in ("", "NaN") else float(text)


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        w, h = im.size
        assert w > 100 and h > 100, (path, im.size)
        assert im.mode in ("RGB", "RGBA"), (path, im.mode)
        assert any(lo < 255 for lo, _ in im.getextrema()), path  # not blank white
