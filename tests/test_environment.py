"""environment.yml (conda) and pyproject.toml (pip) install the same packages; the floors are Colab's versions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from helpers.config import REPO_ROOT


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = data["optional-dependencies"]
    return data["dependencies"] + extras["lab"] + extras["test"] + extras["multigpu"] + extras["bench"]


def _conda_pip():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    return pip


def test_same_packages():
    assert {_name(s) for s in _pyproject()} == {_name(s) for s in _conda_pip()}


def test_same_version_bounds_except_the_torch_pin():
    py = {_name(s): s.replace(" ", "") for s in _pyproject()}
    conda = {_name(s): s.replace(" ", "") for s in _conda_pip()}
    for name, spec in py.items():
        if name == "torch":
            assert conda[name] == "torch==2.13.0", "conda pins torch like the Makefile does"
            continue
        assert conda[name] == spec, f"{name}: pyproject {spec!r} vs environment.yml {conda[name]!r}"


def test_makefile_pins_the_same_torch():
    assert "TORCH_VERSION ?= 2.13.0" in (REPO_ROOT / "Makefile").read_text()


def _colab_pins():
    lines = (REPO_ROOT / ".ci" / "colab-preinstalled.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_lower_bounds_are_the_colab_versions_that_colab_check_proves():
    """No untested floor: each dependency Colab preinstalls has Colab's version as its lower bound.

    `make colab-check` builds exactly those versions and runs the tests there; the install cell
    then keeps them (pip finds them satisfying the floors).
    """
    from packaging.version import Version

    pins = {_name(n): Version(v) for n, v in _colab_pins().items()}
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    checked = []
    for spec in deps:
        name = _name(spec)
        if name not in pins:
            continue
        floor = re.search(r">=\s*([\w.]+)", spec)
        assert floor, f"{spec}: needs a lower bound"
        assert Version(floor.group(1)) == pins[name], f"{spec}: the floor should be Colab's {pins[name]}"
        checked.append(name)
    assert {"transformers", "huggingface-hub", "peft", "accelerate", "datasets", "gradio", "ipywidgets"} <= set(checked)


def test_colab_runtime_does_not_get_local_tools():
    """`pip install -e .` (what the Colab cell runs) installs only what lessons need."""
    deps = {_name(s) for s in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert not deps & {"jupyterlab", "playwright", "pytest", "nbval", "nbstripout", "hypothesis", "notebook"}


@pytest.mark.server
@pytest.mark.parametrize("script", ["colab_check.py", "run_all.py", "notebook_conventions.py"])
def test_maintainer_scripts_start_from_any_folder(script, tmp_path):
    """`make colab-check` and `make run-all` run .ci/'s scripts as files: whatever they import (tests.lesson_code,
    notebook_conventions) must resolve without pytest's pythonpath, from any working folder."""
    run = subprocess.run([sys.executable, str(REPO_ROOT / ".ci" / script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0 and "usage" in run.stdout, run.stderr[-2000:]
