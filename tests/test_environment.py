"""environment.yml (conda) and pyproject.toml (pip) must install the same packages."""

from __future__ import annotations

import re
import tomllib

import yaml

from helpers.config import REPO_ROOT


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return data["dependencies"] + data["optional-dependencies"]["test"]


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
