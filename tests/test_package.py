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


def test_every_shipped_data_folder_is_package_data():
    """Each folder under cli/data (the shipped networks and images) is in the wheel's package-data."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pkg_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = sorted(p.name for p in (root / "cli" / "data").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert "lungct" in shipped
    for name in shipped:
        assert pkg_data.get(f"cli.data.{name}") == ["*"], f"cli/data/{name} is not package-data in pyproject.toml"


def test_the_third_network_ships_model_card_record_and_licence():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "cli" / "data" / "lungct"
    assert {"lungct.onnx", "README.md", "training.json", "LICENSE-pyradiomics.txt"} <= {p.name for p in folder.iterdir()}
    assert "BSD" in (folder / "LICENSE-pyradiomics.txt").read_text() or "Redistribution" in (
        folder / "LICENSE-pyradiomics.txt").read_text()
