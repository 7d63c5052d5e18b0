"""`make run-all` writes executed copies and HTML to build/, figures included, and never touches the sources."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import nbformat
import pytest

from helpers.config import REPO_ROOT

LESSON = "02_loading_quantized"  # a lesson that draws a chart with plt.show()


@pytest.mark.slow
@pytest.mark.server
def test_run_all_executes_a_lesson_into_build_with_its_figures(tmp_path, tiny_model):
    source = REPO_ROOT / "notebooks" / f"{LESSON}.ipynb"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    # Agg is what a learner's shell or a CI runner may set (it draws nothing inline): figures must still appear.
    env = dict(os.environ, MPLBACKEND="Agg")
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / ".ci" / "run_all.py"), "--only", LESSON[:2], "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before, "sources must stay unexecuted"
    executed = nbformat.read(tmp_path / "notebooks" / f"{LESSON}.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code[1:]), "every cell after the install cell ran"
    charts = [c for c in code if "plt.show()" in c.source]
    assert charts, f"{LESSON} no longer draws a chart: pick another lesson for this test"
    for cell in charts:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), "the chart is in the executed copy"
    html = (tmp_path / "html" / f"{LESSON}.html").read_text(encoding="utf-8")
    assert "<html" in html and executed.cells[0].source.splitlines()[0].lstrip("# ") in html
    embedded = re.findall(r'<img [^>]*src="data:image/png;base64,', html)
    assert len(embedded) >= len(charts), "the chart is embedded in the HTML page"
    report = json.loads((tmp_path / "run_all.json").read_text())
    assert report == [{"notebook": f"{LESSON}.ipynb", "seconds": report[0]["seconds"], "error": None}]
