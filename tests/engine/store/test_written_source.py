"""Finalize from what the writer wrote: the parts are not opened again to be checked.

:meth:`StoreWriter.write_batch` describes each part it publishes
(:func:`engine.store.merge.written_source`) and :meth:`StoreWriter.finalize` hands these
descriptions to :func:`engine.store.merge.assemble`. The store must be exactly the one
assembled from the files (every dataset's values, dtype, shape, chunks and filters, every
attribute), whatever the memory budget, with resumed parts mixed in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from engine.store import merge as merge_mod
from engine.store.merge import _scan, assemble, list_part_files
from tests.engine.store import _worker as worker
from tests.engine.store._common import all_cases, writer

PROV = {"protoseg_version": "test"}


def _write(path: Path, cases: list[tuple[int, str]], batch: int) -> Any:
    w = writer(path)
    for s in range(0, len(cases), batch):
        chunk = cases[s:s + batch]
        w.write_batch(worker.make_batch([c for _, c in chunk], [i for i, _ in chunk]))
    return w


def _values(arr: Any) -> Any:
    """Bit for bit: the bytes of numbers (NaN equal to NaN), the list of strings."""
    a = np.asarray(arr)
    return a.tolist() if a.dtype.kind in "OSU" else (str(a.dtype), a.shape, a.tobytes())


def _contents(path: Path) -> dict[str, Any]:
    """Every object of a file: attributes, and for datasets values, dtype, layout, filters."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                out[name] = (attrs, str(obj.dtype), obj.shape, obj.maxshape, obj.chunks,
                             obj.compression, obj.compression_opts, obj.shuffle, _values(obj[()]))
            else:
                out[name] = (attrs, sorted(obj.keys()))
        f.visititems(visit)
        out["/"] = {k: v for k, v in f.attrs.items()}
    return out


def test_a_written_source_is_what_a_scan_of_the_part_reads(tmp_path):
    w = _write(tmp_path / "s.h5", all_cases(), 4)
    parts = list_part_files(w.parts)
    assert len(parts) == 3 and set(w._written) == set(parts)
    for part in parts:
        mine, scanned = w._written[part], _scan(part, 1 << 30)[0]
        assert mine.path == scanned.path and mine.ids == scanned.ids
        np.testing.assert_array_equal(mine.index, scanned.index)
        assert mine.index.dtype == scanned.index.dtype
        assert mine.has_maps == scanned.has_maps
        assert mine.schema.keys() == scanned.schema.keys()
        for key, (dtype, tail) in scanned.schema.items():
            assert mine.schema[key][1] == tail
            assert (h5py.check_string_dtype(mine.schema[key][0]) is not None) == \
                (h5py.check_string_dtype(dtype) is not None)
            if h5py.check_string_dtype(dtype) is None:
                assert mine.schema[key][0] == dtype, key
        assert mine.rows.keys() == scanned.rows.keys()
        for key, arr in scanned.rows.items():
            assert mine.rows[key].dtype.kind == arr.dtype.kind and mine.rows[key].shape == arr.shape
            assert _values(mine.rows[key]) == _values(arr), key  # strings as bytes in both


@pytest.mark.parametrize("budget", [merge_mod._COPY_BYTES, 3000, 0])
def test_finalize_writes_the_store_assembled_from_the_files(tmp_path, monkeypatch, budget):
    monkeypatch.setattr(merge_mod, "_COPY_BYTES", budget)  # rows held, some held, none held
    w = _write(tmp_path / "s.h5", all_cases(), 3)
    parts = list_part_files(w.parts)
    assemble(parts, w.run, tmp_path / "from_files.h5", PROV)  # the files, opened and checked
    assert not any(p.name == "from_files.h5" for p in parts)
    w.finalize(PROV)
    assert _contents(tmp_path / "s.h5") == _contents(tmp_path / "from_files.h5")


def test_a_resumed_run_mixes_scanned_and_written_parts(tmp_path):
    cases = all_cases()
    first = _write(tmp_path / "s.h5", cases[:6], 3)
    first.close()
    w = writer(tmp_path / "s.h5", resume=True)
    assert not w._written  # the parts of the first writer are scanned by finalize
    rest = [c for c in cases if c[1] not in w.done_ids()]
    for s in range(0, len(rest), 2):
        chunk = rest[s:s + 2]
        w.write_batch(worker.make_batch([c for _, c in chunk], [i for i, _ in chunk]))
    parts = list_part_files(w.parts)
    assert len(w._written) == 3 and len(parts) == 5
    assemble(parts, w.run, tmp_path / "from_files.h5", PROV)
    w.finalize(PROV)
    assert _contents(tmp_path / "s.h5") == _contents(tmp_path / "from_files.h5")


def test_a_refilled_batch_does_not_change_what_was_written(tmp_path):
    """The rows kept for finalize are copies: a caller reusing its arrays changes nothing."""
    cases = all_cases()
    w = writer(tmp_path / "s.h5")
    batch = worker.make_batch([c for _, c in cases[:3]], [i for i, _ in cases[:3]])
    w.write_batch(batch)
    parts = list_part_files(w.parts)
    assemble(parts, w.run, tmp_path / "from_files.h5", PROV)
    batch.layer.score[...] = -1.0  # refilled in place after the write
    batch.output_dice[...] = -1.0
    w.finalize(PROV)
    assert _contents(tmp_path / "s.h5") == _contents(tmp_path / "from_files.h5")
