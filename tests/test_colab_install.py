"""The install cell's Colab path, exercised for real.

A throw-away virtual environment stands in for Colab: it sees this checkout's already-installed
packages (torch included, as Colab has torch preinstalled) through a .pth file, and the install
source is pointed at the local checkout. The cell must install the course package there without
touching torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv

import pytest

from helpers.config import REPO_ROOT
from notebook_conventions import INSTALL_CELL


@pytest.fixture(scope="module")
def colab_python(tmp_path_factory):
    root = tmp_path_factory.mktemp("colab-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    # Colab's preinstalled packages: everything this checkout's environment has, except the course itself.
    with open(os.path.join(site, "colab_preinstalled.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_install_cell_outside_colab_does_nothing():
    env = {k: v for k, v in os.environ.items() if k != "COLAB_RELEASE_TAG"}
    out = subprocess.run([sys.executable, "-c", INSTALL_CELL], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == ""


@pytest.mark.slow
@pytest.mark.server
def test_install_cell_in_simulated_colab_installs_without_touching_torch(colab_python, tmp_path):
    import torch

    env = dict(os.environ, COLAB_RELEASE_TAG="simulated", LLAMA_TUTORIAL_SOURCE=str(REPO_ROOT), PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    # pip's verbose log tells us what it installed.
    cell = INSTALL_CELL.replace('"-q", "-e"', '"-v", "-e"')
    out = subprocess.run(
        [colab_python, "-c", cell + "\nimport helpers, torch; print('HELPERS', helpers.__file__); print('TORCH', torch.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    installed = [line for line in out.stdout.splitlines() if line.startswith("Successfully installed")]
    assert installed and "llama2-chinese-tutorial" in installed[0], out.stdout[-2000:]
    assert "torch-" not in installed[0], "the Colab path must never reinstall torch"
    assert "Colab 环境已就绪" in out.stdout and torch.__version__ in out.stdout
    torch_line = [line for line in out.stdout.splitlines() if line.startswith("TORCH ")][0]
    assert torch_line.split(" ", 1)[1] == torch.__file__, "torch must stay the preinstalled one"
    helpers_line = [line for line in out.stdout.splitlines() if line.startswith("HELPERS ")][0]
    assert helpers_line.split(" ", 1)[1].startswith(str(REPO_ROOT))


@pytest.mark.slow
@pytest.mark.server
def test_install_cell_asks_for_a_restart_when_an_imported_package_changed(colab_python, tmp_path):
    """A package imported before the install and changed by it: say restart, don't run the old one."""
    env = dict(os.environ, COLAB_RELEASE_TAG="simulated", LLAMA_TUTORIAL_SOURCE=str(REPO_ROOT), PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    # transformers imported before and left as it is (no restart needed); peft imported in a version
    # the install then replaced (stands in for an upgrade pip made).
    prelude = "import sys, types, transformers\nsys.modules['peft'] = types.SimpleNamespace(__version__='0.0.1')\n"
    out = subprocess.run(
        [colab_python, "-c", prelude + INSTALL_CELL + "\nprint('RAN ON')"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Restart the session" in out.stderr and "重启会话" in out.stderr
    assert "['peft']" in out.stderr, "only the changed package is named"
    assert "RAN ON" not in out.stdout and "Colab 环境已就绪" not in out.stdout
