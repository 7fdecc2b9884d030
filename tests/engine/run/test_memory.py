"""Memory: sizes as people write them, the automatic budget (MemAvailable, cgroup v1/v2,
rlimits), ``--max-memory`` feeding the pass planner, and a one-line error when a batch cannot
be allocated that keeps the finished batches."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from cli.main import cli
from engine.errors import CaseError, OutOfMemoryError
from engine.memory import MIN_BYTES, cgroup_paths, format_size, memory_limit, parse_size
from engine.run.options import ACTIVATION_FRACTION, ScoreOptions
from tests import models

ROOT = Path(__file__).resolve().parents[3]
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# ---------------------------------------------------------------- parse_size
@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * GiB), ("4gib", 4 * GiB), ("4 GiB", 4 * GiB), ("4G", 4 * GiB), ("4g", 4 * GiB),
    ("512MB", 512_000_000), ("512mb", 512_000_000), ("512MiB", 512 * MiB), ("512M", 512 * MiB),
    ("1e9", 1_000_000_000), ("1E9", 1_000_000_000), ("2.5e3KB", 2_500_000), ("1.5GiB", 3 * GiB // 2),
    ("1kB", 1000), ("1KiB", KiB), ("1k", KiB), ("2TB", 2 * 1000 ** 4), ("1TiB", 1 << 40),
    ("4096", 4096), ("4096B", 4096), (" 8 MiB ", 8 * MiB), ("0.5KiB", 512),
    (4096, 4096), (np.int64(7), 7), (1e9, 1_000_000_000),
])
def test_parse_size_reads_si_iec_and_plain_bytes(text, expected):
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("bad", ["12XB", "", "GiB", "4 GiB extra", "four GiB", "-1GiB", "0", "0GiB",
                                 "1..5G", "nan", "inf", 0, -5, 1.5, float("inf"), True, None, [4]])
def test_parse_size_refuses_with_the_value_and_examples(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    msg = str(info.value)
    assert repr(bad) in msg and "4GiB" in msg and "512MB" in msg and "\n" not in msg


@pytest.mark.parametrize("n", [1, 1000, KiB, 3 * GiB, 1536 * MiB, 123_456_789, 5 << 40])
def test_format_size_is_what_parse_size_reads(n):
    assert abs(parse_size(format_size(n)) - n) <= 0.001 * n
    assert format_size(3 * GiB) == "3GiB" and format_size(1536 * MiB) == "1.5GiB"


# ---------------------------------------------------------------- memory_limit
def _proc(tmp_path: Path, *, avail_kib: int | None = 8 * GiB // KiB, cgroup: str = "0::/\n",
          vmsize_kib: int = 0, vmdata_kib: int = 0) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    meminfo = "MemTotal:       16000000 kB\nMemFree:          100000 kB\n"
    if avail_kib is not None:
        meminfo += f"MemAvailable:   {avail_kib} kB\n"
    (proc / "meminfo").write_text(meminfo + "Buffers:           10000 kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "status").write_text(
        f"Name:\tpython\nVmPeak:\t{vmsize_kib + 10} kB\nVmSize:\t{vmsize_kib} kB\n"
        f"VmData:\t{vmdata_kib} kB\nThreads:\t4\n")
    return proc


def _files(root: Path, rel: str, **files: str | int) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(f"{text}\n")


def test_memavailable_alone(tmp_path):
    lim = memory_limit(proc=_proc(tmp_path, avail_kib=3 * GiB // KiB), cgroup=tmp_path / "cg", rlimits={})
    assert (lim.bytes, lim.source) == (3 * GiB, "MemAvailable")
    assert lim.describe() == "3GiB (MemAvailable)"


def test_cgroup_v2_limit_less_usage_less_reclaimable_cache(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, "user.slice/job-1", memory__max=2 * GiB, memory__current=3 * GiB // 2,
           memory__stat=f"anon 100\nfile 200\ninactive_file {GiB // 2}\nactive_file 5")
    proc = _proc(tmp_path, cgroup="0::/user.slice/job-1\n")
    lim = memory_limit(proc=proc, cgroup=cg, rlimits={})
    assert (lim.bytes, lim.source) == (GiB, "cgroup v2 memory.max")  # 2 - (1.5 - 0.5)
    assert lim.limits == {"MemAvailable": 8 * GiB, "cgroup v2 memory.max": GiB}


def test_cgroup_v2_max_is_unlimited_and_an_ancestor_limit_still_applies(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, "a", memory__max=GiB, memory__current=256 * MiB)
    _files(cg, "a/b", memory__max="max", memory__current=100 * MiB)
    lim = memory_limit(proc=_proc(tmp_path, cgroup="0::/a/b\n"), cgroup=cg, rlimits={})
    assert (lim.bytes, lim.source) == (768 * MiB, "cgroup v2 memory.max")
    _files(cg, "a", memory__max="max")
    assert memory_limit(proc=_proc(tmp_path / "2", cgroup="0::/a/b\n"), cgroup=cg, rlimits={}).source \
        == "MemAvailable"


@pytest.mark.parametrize("path", ["/", "/docker/0123abcd"])  # own namespace, or a host path not visible
def test_cgroup_v2_in_a_container_reads_the_mount_root(tmp_path, path):
    cg = tmp_path / "cg"
    _files(cg, "", memory__max=512 * MiB, memory__current=128 * MiB)
    lim = memory_limit(proc=_proc(tmp_path, cgroup=f"0::{path}\n"), cgroup=cg, rlimits={})
    assert (lim.bytes, lim.source) == (384 * MiB, "cgroup v2 memory.max")


def test_cgroup_v1_memory_controller(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, "memory/process_api/f5dc", memory__limit_in_bytes=2 * GiB,
           memory__usage_in_bytes=GiB + 100 * MiB, memory__stat=f"cache 5\ntotal_inactive_file {100 * MiB}")
    _files(cg, "memory/process_api", memory__limit_in_bytes=9223372036854771712, memory__usage_in_bytes=GiB)
    _files(cg, "memory", memory__limit_in_bytes=9223372036854771712, memory__usage_in_bytes=GiB)
    text = "9:name=systemd:/\n5:devices:/\n4:cpu,memory:/process_api/f5dc\n1:cpu:/\n"
    lim = memory_limit(proc=_proc(tmp_path, cgroup=text), cgroup=cg, rlimits={})
    assert (lim.bytes, lim.source) == (GiB, "cgroup v1 memory.limit_in_bytes")


def test_cgroup_v1_unlimited_is_no_limit(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, "memory/x", memory__limit_in_bytes=9223372036854771712, memory__usage_in_bytes=GiB)
    lim = memory_limit(proc=_proc(tmp_path, cgroup="4:memory:/x\n0::/\n"), cgroup=cg, rlimits={})
    assert lim.source == "MemAvailable" and set(lim.limits) == {"MemAvailable"}


def test_hybrid_host_reads_v2_from_unified(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, "memory", memory__limit_in_bytes=9223372036854771712, memory__usage_in_bytes=1)
    _files(cg, "unified/svc", memory__max=300 * MiB, memory__current=100 * MiB)
    lim = memory_limit(proc=_proc(tmp_path, cgroup="4:memory:/\n0::/svc\n"), cgroup=cg, rlimits={})
    assert (lim.bytes, lim.source) == (200 * MiB, "cgroup v2 memory.max")


def test_cgroup_paths_reads_v1_and_v2_lines(tmp_path):
    text = "12:pids:/a\n4:cpu,memory:/process_api/x\n0::/user.slice/s.scope\nbroken\n"
    assert cgroup_paths(_proc(tmp_path, cgroup=text)) == {"v1": "/process_api/x", "v2": "/user.slice/s.scope"}
    assert cgroup_paths(tmp_path / "nowhere") == {}


def test_rlimits_less_what_the_process_already_uses(tmp_path):
    proc = _proc(tmp_path, vmsize_kib=GiB // KiB, vmdata_kib=512 * MiB // KiB)
    lim = memory_limit(proc=proc, cgroup=tmp_path / "cg", rlimits={"RLIMIT_AS": 3 * GiB})
    assert (lim.bytes, lim.source) == (2 * GiB, "RLIMIT_AS")
    lim = memory_limit(proc=proc, cgroup=tmp_path / "cg",
                       rlimits={"RLIMIT_AS": 4 * GiB, "RLIMIT_DATA": GiB + 512 * MiB})
    assert (lim.bytes, lim.source) == (GiB, "RLIMIT_DATA")
    assert lim.limits == {"MemAvailable": 8 * GiB, "RLIMIT_AS": 3 * GiB, "RLIMIT_DATA": GiB}


def test_the_smallest_source_wins_and_never_below_the_floor(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, "job", memory__max=6 * GiB, memory__current=GiB)
    text = "4:memory:/old\n0::/job\n"
    _files(cg, "memory/old", memory__limit_in_bytes=7 * GiB, memory__usage_in_bytes=GiB)
    proc = _proc(tmp_path, avail_kib=9 * GiB // KiB, cgroup=text, vmsize_kib=GiB // KiB)
    lim = memory_limit(proc=proc, cgroup=cg, rlimits={"RLIMIT_AS": 5 * GiB + 512 * MiB})
    assert (lim.bytes, lim.source) == (9 * GiB // 2, "RLIMIT_AS")
    assert lim.limits["cgroup v2 memory.max"] == 5 * GiB
    assert lim.limits["cgroup v1 memory.limit_in_bytes"] == 6 * GiB
    used_up = memory_limit(proc=proc, cgroup=cg, rlimits={"RLIMIT_AS": GiB // 2})
    assert used_up.bytes == MIN_BYTES and used_up.source == "RLIMIT_AS" and used_up.limits["RLIMIT_AS"] == 0


def test_without_meminfo_there_is_still_a_figure(tmp_path):
    lim = memory_limit(proc=_proc(tmp_path, avail_kib=None), cgroup=tmp_path / "cg", rlimits={})
    assert lim.bytes > 0 and lim.source in ("free physical memory", "default")


def test_a_real_address_space_limit_is_read():
    code = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from engine.memory import memory_limit
        lim = memory_limit()
        print(lim.source, lim.limits["RLIMIT_AS"])
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    source, left = res.stdout.split()
    assert 0 < int(left) < 3 << 30
    if int(left) < memory_limit().limits.get("MemAvailable", 1 << 62):
        assert source == "RLIMIT_AS"


def test_graph_available_memory_uses_the_budget(monkeypatch):
    from engine import memory
    from engine.model import graph

    monkeypatch.setattr(memory, "memory_limit", lambda **kw: memory.MemoryLimit(123 * MiB, "RLIMIT_AS", {}))
    assert graph.available_memory() == 123 * MiB


# ---------------------------------------------------------------- ScoreOptions
def test_max_memory_feeds_a_quarter_to_the_pass_planner(monkeypatch):
    from engine import memory
    from engine.run import options

    assert ScoreOptions(max_memory="4GiB").max_memory == 4 * GiB
    assert ScoreOptions(max_memory="4GiB").activation_budget() == int(4 * GiB * ACTIVATION_FRACTION) == GiB
    assert ScoreOptions(max_memory=1000, max_activation_memory=77).activation_budget() == 77  # override
    monkeypatch.setattr(options, "memory_limit", lambda: memory.MemoryLimit(2 * GiB, "cgroup v2 memory.max", {}))
    assert ScoreOptions().activation_budget() == GiB // 2
    assert ScoreOptions().memory_budget() == (2 * GiB, "cgroup v2 memory.max")
    assert ScoreOptions(max_memory="1GiB").memory_budget() == (GiB, "max_memory='1GiB'")
    with pytest.raises(ValueError, match=r"max_memory: memory size '12XB' is not understood"):
        ScoreOptions(max_memory="12XB")
    with pytest.raises(ValueError, match="max_memory"):
        ScoreOptions(max_memory=0)


# ---------------------------------------------------------------- allocation failures
class _OrtError(RuntimeError):
    """Stands in for onnxruntime.capi.onnxruntime_pybind11_state.RuntimeException."""


_OrtError.__module__ = "onnxruntime.capi.onnxruntime_pybind11_state"


def _wrapped(inner: BaseException) -> CaseError:
    try:
        try:
            raise inner
        except Exception as exc:
            raise CaseError("running the model failed", case_id="c0") from exc
    except CaseError as err:
        return err


def test_allocation_failures_are_recognised():
    from engine.run.loop import _allocation_failure

    assert _allocation_failure(MemoryError())
    try:
        np.empty(1 << 60, np.uint8)
    except MemoryError as exc:  # numpy's _ArrayMemoryError
        assert _allocation_failure(exc)
    bfc = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
           "Conv node. Name:'c1' Status Message: bfc_arena.cc:376 Failed to allocate memory for "
           "requested buffer of size 536870912")
    assert _allocation_failure(_wrapped(_OrtError(bfc)))
    assert _allocation_failure(_wrapped(_OrtError("std::bad_alloc")))
    assert not _allocation_failure(_wrapped(_OrtError("Invalid input shape")))
    assert not _allocation_failure(_wrapped(RuntimeError("Failed to allocate memory")))  # not onnxruntime's
    assert not _allocation_failure(CaseError("NaN", case_id="c0"))


# ---------------------------------------------------------------- CLI and API
def _npz(path: Path, n: int, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, size, size)).astype(np.float32)
    np.savez(path, images=images, masks=(images > 0.5).astype(np.uint8),
             ids=np.array([f"c{i:03d}" for i in range(n)]))
    return path


@pytest.fixture()
def unet(tmp_path):
    return models.save(models.unet(batch="N", size=32, metadata=True), tmp_path / "unet.onnx")


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and 'File "' not in stderr
    return lines[0]


def test_max_memory_splits_the_layers_into_passes_and_is_provenance(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 3)
    runner = CliRunner()
    args = ["score", str(unet), str(data), "--layers", "enc1,dec", "-q"]
    res = runner.invoke(cli, [*args, "-o", str(tmp_path / "a.h5"), "--max-memory", "1KiB"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*args, "-o", str(tmp_path / "b.h5")])
    assert res.exit_code == 0, res.output
    small, auto = engine.open_store(tmp_path / "a.h5"), engine.open_store(tmp_path / "b.h5")
    assert small.provenance["passes"] == 2 and small.provenance["max_memory"] == KiB
    assert auto.provenance["passes"] == 1 and auto.provenance["max_memory"] is None
    assert "max_memory" not in small.config
    for key in ("score", "status"):
        np.testing.assert_array_equal(small.layer_scores()[key], auto.layer_scores()[key])


def test_a_bad_max_memory_is_a_one_line_usage_error(tmp_path, unet):
    data = _npz(tmp_path / "d.npz", 2)
    res = CliRunner().invoke(cli, ["score", str(unet), str(data), "-o", str(tmp_path / "a.h5"),
                                   "--max-memory", "12XB"])
    assert res.exit_code == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in res.stderr
    assert "--max-memory" in errors[0] and "'12XB'" in errors[0] and "4GiB" in errors[0]
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "a.h5.parts").exists()


def _fail_on_call(monkeypatch, n: int, error: BaseException) -> list[list[int]]:
    """Make the loop's n-th batch raise ``error``; returns the batches' dataset indices."""
    from engine.run import loop

    real, calls = loop.score_batch, []

    def score_batch(plan, cases, index):
        calls.append(list(index))
        if len(calls) == n:
            raise error
        return real(plan, cases, index)

    monkeypatch.setattr(loop, "score_batch", score_batch)
    return calls


def test_out_of_memory_is_one_line_keeps_finished_batches_and_the_rerun_resumes(tmp_path, unet, monkeypatch):
    data = _npz(tmp_path / "d.npz", 5)
    store = tmp_path / "run.h5"
    runner = CliRunner()
    args = ["score", str(unet), str(data), "-o", str(store), "-q"]
    try:
        np.empty(1 << 60, np.uint8)
    except MemoryError as exc:
        numpy_error = exc
    calls = _fail_on_call(monkeypatch, 2, numpy_error)
    res = runner.invoke(cli, [*args, "-b", "2", "--max-memory", "1GiB"])
    assert res.exit_code == 1 and calls == [[0, 1], [2, 3]]
    line = _error_line(res.stderr)
    assert line.startswith("Error: out of memory in batch 2 of 3 (cases 'c002', 'c003', batch size 2")
    assert "uint8 array of" in line and "of hidden tensors exposed per model run" in line
    assert "memory budget of 1GiB (--max-memory 1GiB)" in line
    assert "--batch-size 1" in line and "--max-memory 512MiB" in line and "--layers" in line
    assert "the 2 cases already scored are kept" in line
    assert not store.exists() and len(list(Path(f"{store}.parts").glob("part-*.h5"))) == 1

    monkeypatch.undo()
    calls = _fail_on_call(monkeypatch, 0, MemoryError())  # records, never fails
    res = runner.invoke(cli, [*args, "-b", "1", "--max-memory", "2GiB"])  # provenance: resume accepts
    assert res.exit_code == 0, res.output
    assert calls == [[2], [3], [4]]
    ref = tmp_path / "ref.h5"
    assert runner.invoke(cli, ["score", str(unet), str(data), "-o", str(ref), "-q"]).exit_code == 0
    a, b = engine.open_store(store), engine.open_store(ref)
    assert list(a.cases["id"]) == list(b.cases["id"])
    np.testing.assert_array_equal(a.layer_scores()["score"], b.layer_scores()["score"])


def test_out_of_memory_in_python_names_keywords(tmp_path, unet, monkeypatch):
    data = _npz(tmp_path / "d.npz", 3)
    _fail_on_call(monkeypatch, 1, MemoryError())
    with pytest.raises(OutOfMemoryError) as info:
        engine.score_dataset(unet, data, tmp_path / "r.h5", batch_size=4)
    err = info.value
    msg = str(err)
    assert err.case_ids == ("c000", "c001", "c002") and err.batch_size == 4 and err.budget > 0
    assert err.needed is not None and err.needed > 0 and isinstance(err.__cause__, MemoryError)
    assert "batch_size=2" in msg and "max_memory='" in msg and "--" not in msg
    assert "no batch had finished" in msg and "\n" not in msg


def test_a_case_error_that_is_not_memory_passes_through(tmp_path, unet, monkeypatch):
    data = _npz(tmp_path / "d.npz", 2)
    _fail_on_call(monkeypatch, 1, _wrapped(_OrtError("Invalid input shape")))
    with pytest.raises(CaseError, match="running the model failed"):
        engine.score_dataset(unet, data, tmp_path / "r.h5")


def test_onnxruntime_allocation_failure_becomes_out_of_memory(tmp_path, unet, monkeypatch):
    data = _npz(tmp_path / "d.npz", 2)
    _fail_on_call(monkeypatch, 1, _wrapped(_OrtError("Failed to allocate memory for requested buffer")))
    with pytest.raises(OutOfMemoryError, match="onnxruntime could not allocate its buffers"):
        engine.score_dataset(unet, data, tmp_path / "r.h5")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as Linux counts it")
def test_score_under_a_real_address_space_limit(tmp_path):
    """A batch of 8 large cases needs ~6.5 GB of address space; under a 3.5 GB limit the run
    stops with one line naming the batch and the flags, and -b 1 (its advice) then succeeds."""
    model = models.save(models.unet(batch="N", size=1024, base=8, metadata=True), tmp_path / "big.onnx")
    data = _npz(tmp_path / "big.npz", 8, size=1024)
    store = tmp_path / "run.h5"
    limit = int(3.5e9)

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, MALLOC_ARENA_MAX="2")
        return subprocess.run(
            [sys.executable, "-m", "cli.main", "score", str(model), str(data), "-o", str(store), "-q", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))

    res = run("-b", "8")
    assert res.returncode == 1, res.stderr
    line = _error_line(res.stderr)
    assert line.startswith("Error: out of memory in batch 1 of 1 (cases 'c000' ... 'c007' (8), batch size 8")
    assert "(RLIMIT_AS)" in line and "--batch-size 4" in line and "--max-memory" in line
    res = run("-b", "1")
    assert res.returncode == 0, res.stderr
    assert len(engine.open_store(store).cases) == 8
