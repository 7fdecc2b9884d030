"""engine._kernels._env: a read-only package folder must not break ``import`` of the kernels."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine._kernels import _env as _numba_cache

ROOT = Path(__file__).resolve().parents[2]


def test_user_setting_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert _numba_cache.ensure_cache_dir(tmp_path / "pkg") is None
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path)


def test_writable_package_needs_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    (tmp_path / "__pycache__").mkdir()
    assert _numba_cache.ensure_cache_dir(tmp_path) is None
    assert "NUMBA_CACHE_DIR" not in os.environ


def test_read_only_package_falls_back_to_the_first_writable_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    pkg = tmp_path / "site-packages" / "engine"
    pkg.mkdir(parents=True)
    blocked = tmp_path / "home-cache"
    allowed = tmp_path / "tmp"
    monkeypatch.setattr(_numba_cache, "candidate_dirs", lambda: [blocked / "numba", allowed / "numba"])
    real_access = os.access

    def access(path, mode):  # root can write anywhere: simulate a read-only install and HOME
        p = str(path)
        if p.startswith(str(pkg)) or p.startswith(str(blocked)):
            return False
        return real_access(path, mode)

    monkeypatch.setattr(_numba_cache.os, "access", access)
    chosen = _numba_cache.ensure_cache_dir(pkg)
    assert chosen == str(allowed / "numba")
    assert os.environ["NUMBA_CACHE_DIR"] == chosen


def test_kernels_import_with_the_cache_elsewhere(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    code = ("import numpy as np, engine; f = np.random.rand(1, 2, 4, 4).astype('float32'); "
            "g = np.zeros((1, 8, 8), 'float32'); g[:, 2:6, 2:6] = 1; "
            "print(engine.sa_scores(f, g, g > 0).score.shape)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1,)"
    assert any((tmp_path / "cache").rglob("*.nbi")), "Numba wrote no cache index there"


def test_kernels_make_idle_openmp_threads_sleep_unless_told_otherwise():
    code = "import os, engine._kernels as k; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["PASSIVE", "10000"], out.stderr
    env.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="5")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["ACTIVE", "5"], out.stderr
