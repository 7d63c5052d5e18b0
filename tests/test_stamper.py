"""The repository's address lives in pyproject.toml; the stamper puts badge and install cell into every lesson."""

from __future__ import annotations

import shutil

import nbformat
import pytest

from helpers.config import REPO_ROOT
import notebook_conventions as conventions

LESSONS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_badge_and_install_cell_come_from_pyproject_urls():
    url = conventions.repository_url()
    repo = url.removeprefix("https://github.com/")
    assert conventions.GITHUB_REPO == repo
    assert conventions.COLAB_PREFIX == f"https://colab.research.google.com/github/{repo}/blob/main/"
    assert f'"{url}.git"' in conventions.INSTALL_CELL
    assert url not in conventions.INSTALL_CELL.replace(f"{url}.git", ""), "the cell names the repository once"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.name for p in LESSONS])
def test_committed_lessons_are_stamped(lesson, tmp_path):
    copy = tmp_path / lesson.name
    shutil.copy(lesson, copy)
    assert not conventions.stamp(copy), f"run `python .ci/notebook_conventions.py`: {lesson.name} is out of step"


def _new_lesson(path, title_cell: str, first_code: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(title_cell), nbformat.v4.new_code_cell(first_code),
                nbformat.v4.new_markdown_cell("## 小结")]
    nbformat.write(nb, path)
    return [c.id for c in nb.cells]


def test_stamper_adds_badge_and_cell_to_a_new_lesson(tmp_path):
    path = tmp_path / "07_serving.ipynb"
    ids = _new_lesson(path, "# 07 · 用 vLLM 部署\n\n**目标**：……", "import torch")
    assert conventions.stamp(path)
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].source.splitlines()[:3] == [
        "# 07 · 用 vLLM 部署", "", conventions.colab_badge("notebooks/07_serving.ipynb")]
    assert "**目标**" in nb.cells[0].source
    assert nb.cells[1].source == conventions.INSTALL_CELL and nb.cells[2].source == "import torch"
    assert [nb.cells[0].id, nb.cells[2].id, nb.cells[3].id] == ids, "existing cells keep their ids"
    assert nb.metadata["accelerator"] == "GPU"
    assert not conventions.stamp(path), "stamping twice changes nothing"


def test_stamper_replaces_an_old_badge_and_install_cell(tmp_path):
    path = tmp_path / "08_x.ipynb"
    old_badge = conventions.colab_badge("notebooks/05_old.ipynb", "someone/old")
    old_cell = conventions.install_cell("someone/old").replace("-q", "-qq")
    ids = _new_lesson(path, f"# 08\n\n{old_badge}\n\n目标", old_cell)
    assert conventions.stamp(path)
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].source == f"# 08\n\n{conventions.colab_badge('notebooks/08_x.ipynb')}\n\n目标"
    assert nb.cells[1].source == conventions.INSTALL_CELL
    assert [c.id for c in nb.cells] == ids


def test_a_fork_changes_the_address_with_one_command(tmp_path, monkeypatch):
    pyproject = tmp_path / "pyproject.toml"
    shutil.copy(REPO_ROOT / "pyproject.toml", pyproject)
    monkeypatch.setattr(conventions, "PYPROJECT", pyproject)
    lesson = tmp_path / LESSONS[0].name
    shutil.copy(LESSONS[0], lesson)
    assert conventions.main(["--repo", "someone/my-course", str(lesson)]) == 0
    assert 'Repository = "https://github.com/someone/my-course"' in pyproject.read_text()
    nb = nbformat.read(lesson, as_version=4)
    assert "https://colab.research.google.com/github/someone/my-course/blob/main/notebooks/" in nb.cells[0].source
    cell = [c for c in nb.cells if c.cell_type == "code"][0].source
    assert '"https://github.com/someone/my-course.git"' in cell and '"my-course"' in cell
    assert cell == conventions.install_cell("someone/my-course")
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "python .ci/notebook_conventions.py --repo" in readme, "README tells a fork how"
