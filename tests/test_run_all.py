"""`make run-all` writes executed copies and HTML to build/ and never touches the sources."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import nbformat

from helpers.config import REPO_ROOT


def test_run_all_executes_lesson_00_into_build(tmp_path):
    source = REPO_ROOT / "notebooks" / "00_overview.ipynb"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / ".ci" / "run_all.py"), "--only", "00", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before, "sources must stay unexecuted"
    executed = nbformat.read(tmp_path / "notebooks" / "00_overview.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code[1:]), "every cell after the install cell ran"
    assert any(c.outputs for c in code)
    html = (tmp_path / "html" / "00_overview.html").read_text(encoding="utf-8")
    assert "课程总览" in html and "<html" in html
    report = json.loads((tmp_path / "run_all.json").read_text())
    assert report == [{"notebook": "00_overview.ipynb", "seconds": report[0]["seconds"], "error": None}]
