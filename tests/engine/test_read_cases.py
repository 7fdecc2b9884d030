"""``Dataset.read_cases``: a batch of an HDF5 dataset read with its file opened once.

Every case must be the one ``dataset[i]`` reads (image and mask values, dtype and shape,
status, message, paths, warnings), for the dtypes HDF5 files hold (little- and big-endian
floats, signed and unsigned integers, bool masks stored as enums), unreadable masks, and a
file that is gone by the time the batch is read.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from engine.datasets import open_dataset


def _case(c: Any) -> tuple[Any, ...]:
    def arr(a: Any) -> Any:
        return None if a is None else (str(a.dtype), a.shape, np.ascontiguousarray(a).tobytes())
    return (c.id, arr(c.image), arr(c.mask), c.group, c.path, c.status, c.message, c.mask_path,
            arr(c.affine), c.file_orientation)


def _read(ds: Any, idx: list[int], batch: bool) -> tuple[list[tuple[Any, ...]], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases = ds.read_cases(idx) if batch else [ds[i] for i in idx]
    return [_case(c) for c in cases], [str(w.message) for w in caught]


def _write(path: Path, images: np.ndarray, masks: np.ndarray | None = None, **extra: Any) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(1,) + images.shape[1:])
        if masks is not None:
            f.create_dataset("masks", data=masks)
        for k, v in extra.items():
            f.create_dataset(k, data=v)
    return path


rng = np.random.default_rng(3)
CASES = {
    "float32 + uint8": (rng.normal(size=(5, 1, 6, 7)).astype(np.float32),
                        (rng.random((5, 6, 7)) > 0.5).astype(np.uint8)),
    "big-endian float64 + uint16": (rng.normal(size=(4, 2, 5, 5)).astype(">f8"),
                                    rng.integers(0, 300, (4, 5, 5)).astype(np.uint16)),
    "int16, no masks": (rng.integers(-50, 50, (3, 4, 4, 4)).astype(np.int16), None),
    "bool masks (an enum)": (rng.random((3, 1, 4, 4)).astype(np.float32), rng.random((3, 4, 4)) > 0.5),
    "negative labels": (rng.random((3, 1, 4, 4)).astype(np.float32),
                        rng.integers(-1, 2, (3, 4, 4)).astype(np.int8)),
    "float masks with NaN": (rng.random((3, 1, 4, 4)).astype(np.float32),
                             np.where(rng.random((3, 4, 4)) > 0.8, np.nan, 1.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_batch_reads_the_cases_one_read_at_a_time_gives(tmp_path, name):
    images, masks = CASES[name]
    ds = open_dataset(_write(tmp_path / "d.h5", images, masks))
    idx = [2, 0, 1, len(ds) - 1]
    one, warned_one = _read(ds, idx, batch=False)
    many, warned_many = _read(ds, idx, batch=True)
    assert many == one and warned_many == warned_one


def test_a_file_gone_before_the_batch_reports_each_case_as_reading_alone_does(tmp_path):
    path = _write(tmp_path / "d.h5", *CASES["float32 + uint8"])
    ds = open_dataset(path)
    path.unlink()
    one, warned_one = _read(ds, [0, 1], batch=False)
    many, warned_many = _read(ds, [0, 1], batch=True)
    assert many == one and warned_many == warned_one
    assert {c[5] for c in many} == {"unreadable"}


def test_the_low_level_row_read_is_what_h5py_reads(tmp_path):
    """The fast path really runs (not h5py's) and gives h5py's arrays."""
    from engine import datasets

    images, masks = CASES["big-endian float64 + uint16"]
    ds = open_dataset(_write(tmp_path / "d.h5", images, masks))
    with h5py.File(ds.source, "r") as f:
        held = datasets._HeldFile(f)
        for i in range(len(ds)):
            for key in ("images", "masks"):
                got, want = held.row(key, i), np.asarray(f[key][i])
                assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
        assert set(held._dsets) == {"images", "masks"}
        with pytest.raises(IndexError):  # out of range: h5py's own error
            held.row("images", len(ds))


def test_another_threads_reads_do_not_use_the_batchs_file(tmp_path):
    import threading

    ds = open_dataset(_write(tmp_path / "d.h5", *CASES["float32 + uint8"]))
    seen: list[Any] = []
    real = type(ds).__getitem__

    def getitem(self: Any, i: int) -> Any:  # while the batch holds its file, read in another thread
        if not seen:
            t = threading.Thread(target=lambda: seen.append(_case(real(self, 4))))
            t.start()
            t.join()
        return real(self, i)

    type(ds).__getitem__ = getitem
    try:
        many = [_case(c) for c in ds.read_cases([0, 1])]
    finally:
        type(ds).__getitem__ = real
    assert seen == [_case(ds[4])] and many == [_case(ds[0]), _case(ds[1])]
