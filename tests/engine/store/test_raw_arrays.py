"""``write_array(..., compress=False)`` makes its contiguous datasets with h5py's low-level
calls (:func:`engine.store.encoding._create_raw`): each must be the dataset h5py's
``create_dataset(key, data=...)`` makes — HDF5 type (string character set included), space,
creation properties, values and attributes."""
from __future__ import annotations

from typing import Any

import h5py
import numpy as np
import pytest

from engine.store.encoding import STR, set_encoding, write_array

ARRAYS = {
    "float64": np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7,
    "float64 NaN": np.array([np.nan, 1.0, -np.inf]),
    "float32 Fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    "float16": np.linspace(0, 1, 5).astype(np.float16),
    "uint8": np.array([[0, 1, 255]], dtype=np.uint8),
    "int64": np.array([-(2**40), 0, 7], dtype=np.int64),
    "big-endian": np.arange(4, dtype=">i4"),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 3)),
    "strings": np.array(["sub/001", "é", None, ""], dtype=object),
    "string matrix": np.array([["a", "b"], ["c", "ü"]], dtype=object),
    "unicode array": np.array(["x", "yz"]),
}


def _old(group: h5py.Group, key: str, data: np.ndarray) -> h5py.Dataset:
    """What write_array made before: h5py's create_dataset."""
    data = np.asarray(data)
    if data.dtype.kind in "OUS":
        values = np.array(["" if v is None else str(v) for v in data.ravel()],
                          dtype=object).reshape(data.shape)
        dset = group.create_dataset(key, data=values, dtype=STR)
        set_encoding(dset, "string-array")
    else:
        dset = group.create_dataset(key, data=data)
        set_encoding(dset, "array")
    return dset


def _describe(d: h5py.Dataset) -> tuple[Any, ...]:
    tid, dcpl = d.id.get_type(), d.id.get_create_plist()
    cset = tid.get_cset() if isinstance(tid, h5py.h5t.TypeStringID) else None
    value = d[()]
    values = value.tolist() if value.dtype.kind in "OSU" else value.tobytes()
    fill = np.zeros((1,), dtype=d.dtype) if d.dtype.kind not in "OSU" else None
    if fill is not None:
        dcpl.get_fill_value(fill)
    return (str(d.dtype), h5py.check_string_dtype(d.dtype), d.shape, d.maxshape, d.chunks,
            d.compression, d.shuffle, tid.get_class(), tid.get_size(), cset, tid.is_variable_str()
            if isinstance(tid, h5py.h5t.TypeStringID) else None,
            dcpl.get_layout(), dcpl.get_fill_time(), dcpl.get_alloc_time(), dcpl.fill_value_defined(),
            dcpl.get_obj_track_times(), dcpl.get_nfilters(), dcpl.get_attr_creation_order(),
            None if fill is None else fill.tobytes(), values, sorted(d.attrs.items()))


@pytest.mark.parametrize("name", list(ARRAYS))
def test_a_raw_array_is_the_dataset_h5py_makes(tmp_path, name):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        new = write_array(f, "new", ARRAYS[name], compress=False)
        old = _old(f, "old", ARRAYS[name])
        assert _describe(new) == _describe(old)
        assert new.name == "/new" and isinstance(new, h5py.Dataset)


def test_names_and_scalars_keep_h5pys_own_path(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        grp = f.create_group("g")
        write_array(grp, "a%2Fb", np.ones(2), compress=False)  # a key_name stays one name
        write_array(f, "scalar", np.float64(3.5), compress=False)
        assert list(grp) == ["a%2Fb"] and f["scalar"][()] == 3.5 and f["scalar"].shape == ()
        with pytest.raises(ValueError):  # a name taken: h5py's error, as before
            write_array(grp, "a%2Fb", np.ones(2), compress=False)
