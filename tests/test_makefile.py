"""The Makefile's targets a learner runs by hand: clean, clean-outputs and lab (also as root); README's command table."""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.config import REPO_ROOT


def _project(tmp_path: Path) -> Path:
    """A copy of the Makefile beside build products and a learner's outputs."""
    shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")
    for folder in ("build/html", ".pytest_cache", "helpers/__pycache__", "outputs/lora-adapter", "outputs/eval"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "outputs" / "lora-adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "outputs" / "eval" / "answers.jsonl").write_text("{}\n")
    (tmp_path / "helpers" / "x.py").write_text("")
    return tmp_path


def _make(cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=cwd, capture_output=True, text=True, timeout=60, **kwargs)


def test_make_clean_removes_build_products_and_keeps_outputs(tmp_path):
    project = _project(tmp_path)
    out = _make(project, "clean")
    assert out.returncode == 0, out.stderr
    assert not (project / "build").exists() and not (project / ".pytest_cache").exists()
    assert not (project / "helpers" / "__pycache__").exists() and (project / "helpers" / "x.py").exists()
    assert (project / "outputs" / "lora-adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (project / "outputs" / "eval" / "answers.jsonl").exists()


def test_clean_outputs_refuses_without_a_terminal(tmp_path):
    project = _project(tmp_path)
    out = _make(project, "clean-outputs", stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert "CONFIRM=yes" in out.stderr
    assert (project / "outputs" / "lora-adapter" / "adapter_model.safetensors").exists()


def test_clean_outputs_with_confirm_yes_deletes_and_says_what(tmp_path):
    project = _project(tmp_path)
    out = _make(project, "clean-outputs", "CONFIRM=yes", stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "outputs/" in out.stdout and "lora-adapter" in out.stdout, "it lists what it deletes"
    assert not (project / "outputs").exists()


def _clean_outputs_on_a_terminal(project: Path, answer: bytes) -> str:
    """Run `make clean-outputs` with a pseudo-terminal as stdin and type ``answer``."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(["make", "clean-outputs"], cwd=project, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 30
    while b"[y/N]" not in seen and time.monotonic() < deadline:
        seen += os.read(leader, 4096)
    os.write(leader, answer)
    proc.wait(timeout=30)
    try:
        while chunk := os.read(leader, 4096):
            seen += chunk
    except OSError:  # the terminal closed with the process
        pass
    os.close(leader)
    assert proc.returncode == 0
    return seen.decode(errors="replace")


def test_clean_outputs_asks_on_a_terminal_and_no_keeps_everything(tmp_path):
    project = _project(tmp_path)
    text = _clean_outputs_on_a_terminal(project, b"\n")
    assert "lora-adapter" in text and "kept" in text
    assert (project / "outputs" / "lora-adapter" / "adapter_model.safetensors").exists()


def test_clean_outputs_asks_on_a_terminal_and_yes_deletes(tmp_path):
    project = _project(tmp_path)
    text = _clean_outputs_on_a_terminal(project, b"y\n")
    assert "deleted" in text
    assert not (project / "outputs").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.server
def test_make_lab_readme_command_serves_and_stops(tmp_path):
    """README's headless command, as the current user (root in CI and in containers)."""
    port = _free_port()
    command = ["make", "lab", f"JUPYTER_ARGS=--no-browser --ip=127.0.0.1 --port={port}"]
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert 'make lab JUPYTER_ARGS="--no-browser --ip=127.0.0.1 --port=8888"' in readme
    if Path(sys.prefix) != REPO_ROOT / ".venv":
        # A development checkout that borrows another checkout's environment: use it as it is.
        command += ["-o", "setup", f"VENV={sys.prefix}"]
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=5) as response:
                    status = response.status
                    break
            except OSError:
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    assert status == 200, output[-3000:]
    if os.geteuid() == 0:
        assert "--allow-root" in output, "as root, make lab says it adds --allow-root"
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _group_alive(proc.pid), "no process of `make lab` is left"
    assert not _listening(port), "nothing is left listening on the port"


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_readme_command_table_names_phony_targets_with_a_rule():
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    rules = set(re.findall(r"^([a-z][\w-]*):(?!=)", makefile, re.M))
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `make ([\w-]+)", readme, re.M))
    assert {"check", "lint", "clean"} <= table, "the table lists the maintainers' commands"
    assert table <= phony, f"in README's table but not .PHONY: {sorted(table - phony)}"
    assert table <= rules, f"in README's table without a rule: {sorted(table - rules)}"
