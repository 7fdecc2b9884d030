"""The faster store writes (issue 15) write what the plain h5py calls wrote.

Parts are written with low-level string attributes and cached parent groups, and
:func:`engine.store.merge.assemble` opens each source once and writes the rows of many
sources in one call per dataset. Compared here against twins of the previous code, built in
the test: parts byte for byte, finished stores dataset by dataset (dtype, shape, chunks,
compression, attributes, values).
"""
from __future__ import annotations

import filecmp
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import h5py
import numpy as np
import pytest

import engine.store.encoding as encoding
import engine.store.merge as merge
import engine.store.writer as writer_mod
from engine._json import dumps
from engine.store.annotate import write_placeholders
from engine.store.encoding import GZIP, STORE_TYPE, STR, read_array, require_group, write_array
from engine.store.merge import OPTIONAL_ROWS, _write_layers, assemble, list_part_files
from engine.store.runinfo import RunInfo
from tests.engine.store import _worker as worker
from tests.engine.store._common import all_cases, writer


# ---------------------------------------------------------------- twins of the previous code
def _set_encoding_plain(obj: Any, kind: str, *, new: bool = False) -> None:
    obj.attrs["encoding-type"] = kind
    obj.attrs["encoding-version"] = encoding.STORE_VERSION


def _require_parent_plain(root: h5py.Group, path: str, cache: Any = None) -> tuple[h5py.Group, str]:
    parent, _, leaf = path.rpartition("/")
    grp = root
    for part in parent.split("/") if parent else []:
        grp = require_group(grp, part, "dict")
    return grp, leaf


def _write_run_attrs_plain(f: h5py.File, run: RunInfo, texts: Any = None) -> None:
    f.attrs["config"] = dumps(run.config, sort_keys=True)
    f.attrs["run"] = dumps(run.as_json(), sort_keys=True)


def _schema_plain(path: Path) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    schema: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and not name.startswith(("maps/", "layers/", "estimates/")) \
                    and name not in ("classes", "validation", "cases/index"):
                schema[name] = (obj.dtype, obj.shape[1:])
        f.visititems(visit)
    return schema


def _assemble_plain(sources: list[Path], run: RunInfo, out: Path, provenance: dict[str, Any]) -> None:
    """The previous ``assemble``: every source read three times, one write per source and key."""
    ids_per_source, index_per_source = [], []
    for src in sources:
        with h5py.File(src, "r") as f:
            ids_per_source.append([str(c) for c in read_array(f["cases/id"])])
            index_per_source.append(read_array(f["cases/index"]) if "cases/index" in f else None)
    n_total = sum(len(i) for i in ids_per_source)
    has_index = all(ix is not None for ix in index_per_source)
    keys = np.concatenate(index_per_source) if has_index else np.arange(n_total)
    order = np.argsort(keys, kind="stable")
    rows = np.empty(n_total, dtype=np.int64)
    rows[order] = np.arange(n_total)
    schema = _schema_plain(sources[0])
    for src in sources[1:]:
        for key, value in _schema_plain(src).items():
            schema.setdefault(key, value)
    with h5py.File(out, "w") as f:
        _set_encoding_plain(f, STORE_TYPE)
        _write_run_attrs_plain(f, run)
        f.attrs["provenance"] = dumps(provenance, sort_keys=True)
        f.attrs["n_cases"] = n_total
        _write_layers(f, run)
        dsets = {}
        for key, (dtype, tail) in sorted(schema.items()):
            grp, leaf = _require_parent_plain(f, key)
            is_str = h5py.check_string_dtype(dtype) is not None
            kwargs: dict[str, Any] = dict(GZIP)
            if not is_str:
                kwargs["shuffle"] = True
            dsets[key] = grp.create_dataset(leaf, shape=(n_total,) + tail, maxshape=(None,) + tail,
                                            dtype=STR if is_str else dtype, chunks=True, **kwargs)
            _set_encoding_plain(dsets[key], "string-array" if is_str else "array")
        dsets["cases/index"] = write_array(require_group(f, "cases", "dict"), "index",
                                           np.zeros(n_total, np.int64), resizable=True)
        maps = require_group(f, "maps", "map-collection")
        start = 0
        for src, ids in zip(sources, ids_per_source):
            dest = rows[start:start + len(ids)]
            start += len(ids)
            with h5py.File(src, "r") as s:
                for key in sorted(schema):
                    data = s[key][()] if key in s else np.full(
                        (len(ids),) + schema[key][1], OPTIONAL_ROWS[key],
                        dtype=object if isinstance(OPTIONAL_ROWS[key], str) else schema[key][0])
                    merge._scatter(dsets[key], dest, data)
                index = dest if not has_index else read_array(s["cases/index"])
                merge._scatter(dsets["cases/index"], dest, index)
                for name in s.get("maps", {}):
                    assert name not in maps, unquote(name)
                    s.copy(s["maps"][name], maps, name=name)
        write_placeholders(f)


# ---------------------------------------------------------------- comparison
def _attrs(obj: Any) -> dict[str, Any]:
    out = {}
    for key in obj.attrs:
        aid = obj.attrs.get_id(key)
        value = obj.attrs[key]
        out[key] = (str(aid.dtype), aid.get_space().get_simple_extent_type(),
                    value if isinstance(value, (str, bytes)) else np.asarray(value).tolist())
    return out


def _contents(path: Path) -> dict[str, Any]:
    """Every group and dataset: attributes, and for datasets their layout and values."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        out["/"] = _attrs(f)

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                values = obj[()]
                if obj.dtype.kind == "O":
                    values = np.array([v.decode() if isinstance(v, bytes) else v
                                       for v in np.ravel(values)], dtype=object)
                out[name] = (str(obj.dtype), obj.shape, obj.maxshape, obj.chunks, obj.compression,
                             obj.compression_opts, obj.shuffle, _attrs(obj), np.asarray(values))
            else:
                out[name] = _attrs(obj)
        f.visititems(visit)
    return out


def _assert_same(a: Path, b: Path) -> None:
    ca, cb = _contents(a), _contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        va, vb = ca[key], cb[key]
        if isinstance(va, tuple):
            assert va[:-1] == vb[:-1], key
            x, y = va[-1], vb[-1]
            assert x.dtype == y.dtype and x.shape == y.shape, key
            if x.dtype.kind == "f":
                np.testing.assert_array_equal(x, y, err_msg=key)  # NaN where NaN
            else:
                assert (x == y).all(), key
        else:
            assert va == vb, key


# ---------------------------------------------------------------- tests
def _batches(order: list[int] | None = None, size: int = 3) -> list[Any]:
    cases = all_cases(11)
    if order is not None:
        cases = [cases[i] for i in order]
    return [worker.make_batch([c for _, c in cases[s:s + size]], [i for i, _ in cases[s:s + size]])
            for s in range(0, len(cases), size)]


def _write_parts(path: Path, batches: list[Any]) -> list[Path]:
    w = writer(path)
    for b in batches:
        w.write_batch(b)
    w.close()
    return list_part_files(Path(f"{path}.parts"))


def test_set_str_attrs_writes_what_attrs_wrote(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as fa, h5py.File(tmp_path / "b.h5", "w") as fb:
        for f, set_ in ((fa, _set_encoding_plain), (fb, encoding.set_encoding)):
            set_(f, "protoseg-store")
            set_(f.create_group("g"), "dict")
            set_(f.create_dataset("d", data=np.arange(3)), "array")
            set_(f["g"], "table")  # replaces the earlier value
        encoding.set_str_attrs(fb["d"], [("name", "é/x")])
        fa["d"].attrs["name"] = "é/x"
        for name in ("/", "g", "d"):
            assert _attrs(fa[name]) == _attrs(fb[name])
        assert encoding.attr_str(fb["g"], "encoding-type") == "table"
    assert filecmp.cmp(tmp_path / "a.h5", tmp_path / "b.h5", shallow=False)


def test_parts_are_byte_identical_to_the_plain_writes(tmp_path, monkeypatch):
    batches = _batches()
    new = _write_parts(tmp_path / "new.h5", batches)
    monkeypatch.setattr(encoding, "set_encoding", _set_encoding_plain)
    monkeypatch.setattr(writer_mod, "set_encoding", _set_encoding_plain)
    monkeypatch.setattr(writer_mod, "require_parent", _require_parent_plain)
    monkeypatch.setattr(writer_mod, "write_run_attrs", _write_run_attrs_plain)
    old = _write_parts(tmp_path / "old.h5", batches)
    assert [p.name for p in new] == [p.name for p in old] and len(new) == 4
    assert any("maps" in h5py.File(p, "r") for p in new)  # saved maps are written too
    for a, b in zip(new, old):
        assert filecmp.cmp(a, b, shallow=False), a.name


@pytest.mark.parametrize("order", [None, [10, 3, 0, 7, 1, 9, 2, 8, 4, 6, 5]], ids=["in-order", "shuffled"])
@pytest.mark.parametrize("small", [False, True], ids=["rows-kept", "rows-reread"])
def test_assemble_equals_the_plain_assembly(tmp_path, monkeypatch, order, small):
    parts = _write_parts(tmp_path / "s.h5", _batches(order))
    run = RunInfo(worker.CONFIG, worker.LAYERS, worker.CLASSES)
    if small:  # sources read again when copying, blocks across and within sources
        monkeypatch.setattr(merge, "_COPY_BYTES", 4000)
        monkeypatch.setattr(merge, "_COPY_ROWS", 2)
    assemble(parts, run, tmp_path / "new.h5", {"p": 1})
    _assemble_plain(parts, run, tmp_path / "old.h5", {"p": 1})
    _assert_same(tmp_path / "new.h5", tmp_path / "old.h5")
    with h5py.File(tmp_path / "new.h5", "r") as f:
        assert len(f["maps"]) > 0 and f["cases/id"].shape == (11,)


def test_assemble_fills_the_rows_an_older_part_lacks(tmp_path):
    parts = _write_parts(tmp_path / "s.h5", _batches())
    for key in OPTIONAL_ROWS:  # the second part as an older protoseg wrote it
        with h5py.File(parts[1], "a") as f:
            del f[key]
    run = RunInfo(worker.CONFIG, worker.LAYERS, worker.CLASSES)
    assemble(parts, run, tmp_path / "new.h5", {})
    _assemble_plain(parts, run, tmp_path / "old.h5", {})
    _assert_same(tmp_path / "new.h5", tmp_path / "old.h5")
    with h5py.File(tmp_path / "new.h5", "r") as f:
        assert np.isnan(f["cases/affine"][3:6]).all()
        assert list(f["cases/orientation"].asstr()[3:6]) == [""] * 3


def test_finalize_after_resume_of_a_finished_store(tmp_path):
    """A finished store is a source too: resumed with new parts, the store equals the plain
    assembly of the first store and the new parts."""
    batches = _batches()
    path = tmp_path / "s.h5"
    w = writer(path)
    for b in batches[:2]:
        w.write_batch(b)
    w.finalize({"p": 0})
    first = tmp_path / "first.h5"
    first.write_bytes(path.read_bytes())
    w = writer(path, resume=True)
    for b in batches[2:]:
        w.write_batch(b)
    parts = list_part_files(Path(f"{path}.parts"))
    copies = []
    for p in parts:  # finalize removes the parts: keep copies for the twin
        copies.append(tmp_path / p.name)
        copies[-1].write_bytes(p.read_bytes())
    w.finalize({"p": 1})
    _assemble_plain([first, *copies], RunInfo(worker.CONFIG, worker.LAYERS, worker.CLASSES),
                    tmp_path / "old.h5", {"p": 1})
    _assert_same(path, tmp_path / "old.h5")


def test_assemble_refuses_what_it_refused(tmp_path):
    """Damage, overlaps and differing arrays are still refused, naming the part."""
    batches = _batches()
    parts = _write_parts(tmp_path / "s.h5", batches)
    run = RunInfo(worker.CONFIG, worker.LAYERS, worker.CLASSES)
    with pytest.raises(ValueError, match="is in both"):
        assemble([parts[0], parts[0]], run, tmp_path / "x.h5", {})
    other = tmp_path / "other.h5"
    other.write_bytes(parts[1].read_bytes())
    with h5py.File(other, "a") as f:
        del f["output_dice"]
    with pytest.raises(ValueError, match="holds other arrays"):
        assemble([parts[0], other], run, tmp_path / "x.h5", {})
    broken = tmp_path / "broken.h5"
    broken.write_bytes(parts[2].read_bytes()[:200])
    with pytest.raises(ValueError, match=f"cannot read part {broken}"):
        assemble([parts[0], broken], run, tmp_path / "x.h5", {})
    assert not (tmp_path / "x.h5").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]

