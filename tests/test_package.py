"""Package-level promises: light imports, every public name resolves, the console script."""
from __future__ import annotations

import subprocess
import sys

import pytest

import engine
import exporters

HEAVY = ("torch", "tensorflow", "tf2onnx", "keras")


def test_importing_the_packages_pulls_in_no_framework():
    code = ("import sys, engine, exporters, cli, cli.main; "
            "import engine.scores, engine.run, engine.model.graph, engine.store, engine.report; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("name", [n for n in engine.__all__ if n != "__version__"])
def test_every_engine_export_resolves(name):
    assert getattr(engine, name) is not None


@pytest.mark.parametrize("name", exporters.__all__)
def test_every_exporters_export_resolves(name):
    assert getattr(exporters, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        engine.nope  # noqa: B018


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "cli.main", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("protoseg, version ")
