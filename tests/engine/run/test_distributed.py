"""engine.run.distributed: a real Dask LocalCluster on 127.0.0.1 (2 worker processes, no
dashboard) writes the store a single-process run writes, survives killed workers, resumes,
and contains a case that kills its worker to its own chunk."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import dask  # noqa: E402

import engine  # noqa: E402
from engine.run import score_dataset  # noqa: E402
from engine.run.distributed import (  # noqa: E402
    FAILED_STATUS,
    TEST_EXIT_ENV,
    TEST_PAUSE_ENV,
    default_chunk_size,
    parse_cluster,
    plan_chunks,
)
from engine.store import StoreConfigError  # noqa: E402
from tests import models  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
N_CASES, BATCH, CHUNK = 12, 2, 2  # 6 chunks of one batch each


def _npz(path: Path, n: int = N_CASES, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 2, indexing="ij"))
    images, masks = [], []
    for _ in range(n):
        c = rng.uniform(-0.3, 0.3, 2)
        m = (np.sqrt(((grid - c.reshape(2, 1, 1)) ** 2).sum(0)) < rng.uniform(0.3, 0.6)).astype(np.uint8)
        images.append(m.astype(np.float32) + 0.3 * rng.standard_normal(m.shape).astype(np.float32))
        masks.append(m)
    np.savez(path, images=np.stack(images), masks=np.stack(masks),
             ids=np.array([f"case{i:03d}" for i in range(n)]))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Model, data and the single-process store they give (the reference)."""
    d = tmp_path_factory.mktemp("dist")
    model = models.save(models.unet(ndim=2, batch="N", size=32, metadata=True), d / "unet.onnx")
    data = _npz(d / "data.npz")
    ref = score_dataset(model, data, d / "single.h5", batch_size=BATCH, level="both",
                        save_maps=["case001", "case006"]).store
    return model, data, ref


def _setenv(key: str, value: str | None) -> None:
    """Run in the workers (by reference: a bound ``os.environ`` method would travel as a copy)."""
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _local_cluster(**config):
    settings = {"distributed.scheduler.worker-saturation": 1.0, **config}
    with dask.config.set(settings):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=None)
    return cluster


@pytest.fixture()
def client():
    with _local_cluster() as cluster, distributed.Client(cluster) as c:
        yield c


def _score(model, data, out, client, **kw):
    return score_dataset(model, data, out, batch_size=BATCH, level="both",
                         save_maps=["case001", "case006"], client=client,
                         chunk_size=kw.pop("chunk_size", CHUNK), **kw)


def _contents(path: Path) -> dict[str, object]:
    """Every dataset's bytes and every attribute of a store, provenance left out."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {k: (v.tobytes() if isinstance(v, np.ndarray) else v)
                     for k, v in obj.attrs.items() if k != "provenance"}
            out[name + "@attrs"] = attrs
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if isinstance(data, np.ndarray) and data.dtype.kind != "O":
                    out[name] = (data.dtype.str, data.shape, data.tobytes())
                else:
                    out[name] = repr(np.asarray(data).tolist())
        f.visititems(visit)
        out["/@attrs"] = {k: v for k, v in f.attrs.items() if k != "provenance"}
    return out


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = _contents(a), _contents(b)
    assert sorted(ca) == sorted(cb)
    differing = [k for k in ca if ca[k] != cb[k]]
    assert not differing, differing[:5]


# ---------------------------------------------------------------- pure parts
def test_chunks_are_consecutive_cases_on_a_fixed_grid():
    ids = [f"c{i}" for i in range(7)]
    chunks, skipped = plan_chunks(ids, 7, 3)
    assert [(c.start, c.stop, c.indices) for c in chunks] == [(0, 3, (0, 1, 2)), (3, 6, (3, 4, 5)),
                                                              (6, 7, (6,))]
    assert skipped == 0
    chunks, skipped = plan_chunks(ids, 7, 3, done={"c0", "c1", "c2", "c4"})
    assert [(c.start, c.indices, c.ids) for c in chunks] == [(3, (3, 5), ("c3", "c5")), (6, (6,), ("c6",))]
    assert skipped == 1


def test_default_chunk_size_is_a_multiple_of_the_batch():
    assert default_chunk_size(8, 10_000, 4) == 64
    assert default_chunk_size(8, 20, 2) == 8
    assert default_chunk_size(3, 100, 2) % 3 == 0


def test_cluster_addresses_are_parsed_or_refused():
    assert parse_cluster("local:2") == ("local", 2)
    assert parse_cluster("tcp://127.0.0.1:8786") == ("address", "tcp://127.0.0.1:8786")
    for bad in ("local:0", "local:x", "127.0.0.1:8786", ""):
        with pytest.raises(ValueError, match="expected"):
            parse_cluster(bad)


def test_chunk_size_needs_a_cluster_and_shard_excludes_one(tmp_path, inputs):
    model, data, _ = inputs
    with pytest.raises(ValueError, match="client"):
        score_dataset(model, data, tmp_path / "x.h5", chunk_size=4)
    with pytest.raises(ValueError, match="exclude each other"):
        score_dataset(model, data, tmp_path / "x.h5", client="local:1", shard="0/2")


# ---------------------------------------------------------------- on a LocalCluster
@pytest.mark.slow
def test_cluster_store_equals_single_process_and_a_rerun_skips_every_chunk(tmp_path, inputs, client):
    model, data, ref = inputs
    out = tmp_path / "dist.h5"
    s = _score(model, data, out, client)
    assert (s.chunks, s.chunks_done, s.chunks_skipped, s.chunks_failed) == (6, 6, 0, 0)
    assert sum(s.worker_seconds.values()) > 0 and len(s.worker_seconds) >= 1
    assert_same_store(out, ref)
    prov = engine.open_store(out).provenance
    assert prov["cluster"]["chunk_size"] == CHUNK and prov["cluster"]["hosts"] == ["127.0.0.1"]
    again = _score(model, data, out, client)  # a finished store: nothing to do
    assert (again.chunks_done, again.chunks_skipped) == (0, 6)
    assert_same_store(out, ref)


@pytest.mark.slow
def test_a_mismatching_shard_is_refused_naming_the_difference(tmp_path, inputs, client, monkeypatch):
    model, data, _ = inputs
    out = tmp_path / "dist.h5"
    monkeypatch.setenv(TEST_EXIT_ENV, "case011")  # stops after the other chunks: parts stay
    with _local_cluster(**{"distributed.scheduler.allowed-failures": 0}) as cl, \
            distributed.Client(cl) as c:
        s = _score(model, data, out, c)
    assert s.chunks_failed == 1
    shard = sorted(engine.store.parts_dir(out).glob("part-chunk-*.h5"))[0]
    with h5py.File(shard, "r+") as f:  # as if an older protoseg had written it
        chunk = json.loads(f.attrs["chunk"])
        f.attrs["chunk"] = json.dumps(dict(chunk, protoseg_version="0.0.1"))
    monkeypatch.delenv(TEST_EXIT_ENV)
    with pytest.raises(StoreConfigError, match=r"protoseg '0.0.1' wrote it"):
        _score(model, data, out, client)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["score", "write"])
def test_a_worker_killed_while_it_computes_or_writes_loses_nothing(tmp_path, inputs, client,
                                                                     monkeypatch, phase):
    model, data, ref = inputs
    out = tmp_path / "dist.h5"
    pause = tmp_path / "pause"
    pause.mkdir()
    # the plugin's env is read at spawn: set for restarted workers, and in running ones
    monkeypatch.setenv(TEST_PAUSE_ENV, f"{pause}:{phase}")
    client.run(_setenv, TEST_PAUSE_ENV, f"{pause}:{phase}")
    pids = set(client.run(os.getpid).values())

    import threading

    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            marker = pause / "paused"
            if marker.exists() and marker.read_text():
                pid = int(marker.read_text())
                assert pid in pids
                if phase == "write":  # the shard is written under its temporary name
                    assert list(engine.store.parts_dir(out).glob(".part-chunk-*.tmp-*"))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    s = _score(model, data, out, client)
    t.join()
    assert killed
    assert s.chunks_failed == 0 and s.chunks_done == 6
    assert s.chunks_retried >= 1
    assert_same_store(out, ref)


@pytest.mark.slow
def test_a_poison_case_fails_its_chunk_only_and_the_next_run_retries_it(tmp_path, inputs,
                                                                        monkeypatch):
    model, data, ref = inputs
    out = tmp_path / "dist.h5"
    monkeypatch.setenv(TEST_EXIT_ENV, "case005")
    with _local_cluster(**{"distributed.scheduler.allowed-failures": 0}) as cl, \
            distributed.Client(cl) as c:
        s = _score(model, data, out, c)
        assert (s.chunks_done, s.chunks_failed) == (5, 1)
        assert s.failed_chunks[0]["ids"] == ["case004", "case005"]
        st = engine.open_store(out)
        status = dict(zip(st.cases["id"], st.cases["status"]))
        assert [k for k, v in status.items() if v == FAILED_STATUS] == ["case004", "case005"]
        assert all(v == "ok" for k, v in status.items() if k not in ("case004", "case005"))
        assert list(engine.store.parts_dir(out).glob("failed-chunk-*.h5"))
        monkeypatch.delenv(TEST_EXIT_ENV)  # for workers started from now on
        c.wait_for_workers(2, timeout=60)  # the last one killed is back: none is starting
        c.run(_setenv, TEST_EXIT_ENV, None)
        again = _score(model, data, out, c)
    assert (again.chunks_done, again.chunks_skipped, again.chunks_failed) == (1, 5, 0)
    assert_same_store(out, ref)


@pytest.mark.slow
def test_cli_cluster_local_2(tmp_path, inputs):
    model, data, ref = inputs
    out = tmp_path / "cli.h5"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "score", str(model), str(data), "-o", str(out),
         "--batch-size", str(BATCH), "--level", "both", "--maps", "case001", "--maps", "case006",
         "--cluster", "local:2", "--chunk-size", "4", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["cluster"]["chunks"] == 3 and summary["cluster"]["done"] == 3
    assert_same_store(out, ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_scheduler_and_worker_processes_on_loopback(tmp_path, inputs):
    model, data, ref = inputs
    port = _free_port()
    dask_bin = Path(sys.executable).with_name("dask")
    env = dict(os.environ, PYTHONPATH=str(ROOT), DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION="1.0")
    sched = subprocess.Popen([str(dask_bin), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([str(dask_bin), "worker", f"tcp://127.0.0.1:{port}", "--host", "127.0.0.1",
                               "--nworkers", "2", "--nthreads", "1", "--no-dashboard"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with distributed.Client(f"tcp://127.0.0.1:{port}", timeout=60) as c:
            c.wait_for_workers(2, timeout=60)
            out = tmp_path / "tcp.h5"
            s = _score(model, data, out, f"tcp://127.0.0.1:{port}")
        assert s.chunks_done == 6 and s.workers == 2
        assert_same_store(out, ref)
    finally:
        for p in (worker, sched):
            p.send_signal(signal.SIGINT)
        for p in (worker, sched):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_protoseg_merge_joins_shards_into_the_single_process_store(tmp_path, inputs):
    from click.testing import CliRunner

    from cli.main import cli

    model, data, ref = inputs
    shards = [score_dataset(model, data, tmp_path / f"s{i}.h5", batch_size=BATCH, level="both",
                            save_maps=["case001", "case006"], shard=f"{i}/2").store for i in range(2)]
    res = CliRunner().invoke(cli, ["merge", *map(str, shards), "-o", str(tmp_path / "m.h5"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["cases"] == N_CASES
    ref_scores = engine.open_store(ref).layer_scores()
    got = engine.open_store(tmp_path / "m.h5").layer_scores()
    assert all(np.array_equal(ref_scores[k], got[k], equal_nan=True) for k in ref_scores)
    res = CliRunner().invoke(cli, ["merge", str(shards[0]), "-o", str(tmp_path / "m.h5")])
    assert res.exit_code == 1 and "exists" in res.output
