"""Tests for engine.store.atomic: the writer lock and atomic JSON."""
from __future__ import annotations

import errno
import json
import os

import pytest

from engine.store import StoreExistsError, StoreWriteError
from engine.store import atomic
from engine.store.atomic import StoreLock, lock_path, write_json_atomic

pytestmark = pytest.mark.skipif(atomic.fcntl is None, reason="flock is POSIX only")


def test_lock_is_exclusive_and_removed_on_release(tmp_path):
    store = tmp_path / "s.h5"
    a, b = StoreLock(store), StoreLock(store)
    a.acquire(advice="wait")
    assert a.held and lock_path(store).exists()
    with pytest.raises(StoreExistsError, match=r"another writer holds store .*s\.h5.*; wait"):
        b.acquire(advice="wait")
    a.release(remove=True)
    assert not a.held and not lock_path(store).exists()
    b.acquire(advice="wait")
    assert b.held
    b.release()
    assert lock_path(store).exists()  # kept without remove


def test_lock_taken_on_a_removed_file_is_taken_again(tmp_path, monkeypatch):
    """A holder that finishes removes the lock file; a process that opened the old file
    just before must not believe it holds the lock on the new one."""
    store = tmp_path / "s.h5"
    first, second, third = StoreLock(store), StoreLock(store), StoreLock(store)
    first.acquire(advice="wait")
    real_open = os.open
    opened = []

    def racing_open(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        opened.append(os.fstat(fd).st_ino)
        if len(opened) == 1:
            first.release(remove=True)  # the holder finishes between open and flock
        return fd

    monkeypatch.setattr(atomic.os, "open", racing_open)
    second.acquire(advice="wait")
    monkeypatch.undo()
    assert len(opened) == 2 and second.held
    assert os.stat(lock_path(store)).st_ino == opened[1]
    with pytest.raises(StoreExistsError):
        third.acquire(advice="wait")
    second.release(remove=True)


def test_json_is_published_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"b": 1, "a": float("nan")})
    assert json.loads(path.read_text()) == {"a": None, "b": 1}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(StoreWriteError, match="cannot write .*run.json: No space left"):
        write_json_atomic(path, {"c": 2})
    assert json.loads(path.read_text()) == {"a": None, "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
