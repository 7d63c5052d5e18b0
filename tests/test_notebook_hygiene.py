"""Every lesson notebook follows the series' conventions (see notebooks/00_overview.ipynb)."""

from __future__ import annotations

import ast
import importlib
import re

import nbformat
import pytest

from helpers.config import REPO_ROOT
from notebook_conventions import COLAB_PREFIX, INSTALL_CELL

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CORE_LESSONS = ["00", "01", "02", "03", "04", "05", "06"]


def _ids(paths):
    return [p.name for p in paths]


def test_the_series_is_complete():
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert numbers[: len(CORE_LESSONS)] == CORE_LESSONS
    assert numbers == [f"{i:02d}" for i in range(len(numbers))], "lessons are numbered without gaps"


@pytest.fixture(params=NOTEBOOKS, ids=_ids(NOTEBOOKS))
def nb(request):
    path = request.param
    notebook = nbformat.read(path, as_version=4)
    return type("Lesson", (), {"path": path, "cells": notebook.cells, "metadata": notebook.metadata, "node": notebook})


def test_valid_nbformat(nb):
    nbformat.validate(nb.node)


def test_committed_without_outputs_or_widget_state(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{nb.path.name}: a code cell has outputs"
            assert cell.execution_count is None, f"{nb.path.name}: a code cell has an execution count"
    assert "widgets" not in nb.metadata


def test_first_cell_title_goal_time_and_badge(nb):
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    src = first.source
    assert src.startswith("# "), "the first cell starts with the lesson title"
    assert "T4" in src and "CPU" in src, "the first cell gives the time on a Colab T4 and on a CPU"
    # Lesson 00's course directory reads this one line from every lesson: one source for the times.
    assert len(re.findall(r"^\*\*预计用时\*\*：.+$", src, re.M)) == 1, "exactly one line starting **预计用时**："
    assert "目标" in src or "你将学到" in src
    links = re.findall(r"\((https://colab\.research\.google\.com/github/[^)]+)\)", src)
    assert links == [COLAB_PREFIX + "notebooks/" + nb.path.name], "run `python .ci/notebook_conventions.py`"


def test_install_cell_is_the_guarded_one(nb):
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source == INSTALL_CELL, "run `python .ci/notebook_conventions.py` to stamp the install cell"
    tree = ast.parse(INSTALL_CELL)
    guarded = [n for n in tree.body if isinstance(n, ast.If)]
    assert guarded and "IN_COLAB" in ast.unparse(guarded[0].test)
    # Nothing outside the guard installs anything.
    outside = "\n".join(ast.unparse(n) for n in tree.body if not isinstance(n, ast.If))
    assert "pip" not in outside
    pip_calls = [ast.unparse(n) for n in ast.walk(guarded[0]) if isinstance(n, ast.Call) and "pip" in ast.unparse(n)]
    assert pip_calls and not any("torch" in call for call in pip_calls), "never reinstall torch in Colab"


def test_no_other_cell_installs_packages(nb):
    for cell in nb.cells[1:]:
        if cell.cell_type == "code" and cell.source != INSTALL_CELL:
            assert not re.search(r"^\s*[!%]pip\b|pip\", \"install", cell.source, re.M), cell.source[:80]


def test_colab_gpu_metadata(nb):
    assert nb.metadata.get("accelerator") == "GPU"
    assert nb.metadata.get("colab", {}).get("gpuType") == "T4"
    assert nb.metadata.kernelspec.name == "python3"


def _helper_imports(source: str):
    source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "helpers":
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "helpers":
                    yield alias.name, None


def test_every_helpers_import_resolves(nb):
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for module, name in _helper_imports(cell.source):
            mod = importlib.import_module(module)
            if name is not None:
                assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"


def test_prose_is_chinese(nb):
    prose = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    han = len(re.findall(r"[\u4e00-\u9fff]", prose))
    assert han > 200, f"{nb.path.name}: notebook prose is written in Simplified Chinese"


def test_lesson_00s_module_table_is_helpers_lesson_modules():
    """Lesson 00 lists every public helpers module with its lesson, as helpers.LESSON_MODULES does."""
    import re

    import nbformat

    from helpers import LESSON_MODULES
    from helpers.config import REPO_ROOT

    text = "\n".join(c.source for c in nbformat.read(REPO_ROOT / "notebooks" / "00_overview.ipynb", as_version=4).cells)
    rows = dict(re.findall(r"^\| `helpers\.(\w+)` \| (\d\d · [^|]+?) \|$", text, flags=re.M))
    assert rows == {m: f"{lesson} · {what}" for m, (lesson, what) in LESSON_MODULES.items()}
    public = {p.stem for p in (REPO_ROOT / "helpers").glob("*.py") if not p.stem.startswith("_")}
    assert public == set(LESSON_MODULES), "every public helpers module belongs to a lesson"
    for module, (lesson, _) in LESSON_MODULES.items():
        assert list((REPO_ROOT / "notebooks").glob(f"{lesson}_*.ipynb")), module


def test_tested_markers_are_unique_across_the_course_and_first_in_their_cell():
    """Tests find a lesson's cell by its `#| tested: <name>` marker (tests/lesson_code.py), never by its id:
    a name is used once in the whole course, and the marker is the cell's first line, where a reader sees it."""
    from tests.lesson_code import MARKER, lesson_markers

    where: dict[str, str] = {}
    for path in NOTEBOOKS:
        for name in lesson_markers(path.name):  # fails on a name marked twice in one lesson
            assert name not in where, f"the marker `tested: {name}` is in both {where[name]} and {path.name}"
            where[name] = path.name
        for cell in nbformat.read(path, as_version=4).cells:
            for match in MARKER.finditer(cell.source):
                assert match.start() == 0, f"{path.name}: `{match.group(0)}` must be the first line of its cell"
    assert len(where) >= 30, where


def test_a_missing_or_doubled_marker_fails_naming_the_lesson_and_the_marker(tmp_path, monkeypatch):
    from tests import lesson_code

    lesson = "99_markers.ipynb"
    (tmp_path / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("#| tested: twice\nA = 1"),
                                         nbformat.v4.new_code_cell("#| tested: twice\nA = 2")])
    nbformat.write(nb, tmp_path / "notebooks" / lesson)
    monkeypatch.setattr(lesson_code, "REPO_ROOT", tmp_path)
    with pytest.raises(LookupError, match=rf"{lesson}: the marker `tested: twice` is on more than one cell"):
        lesson_code.lesson_definitions(lesson, "twice")
    nbformat.write(nbformat.v4.new_notebook(cells=nb.cells[:1]), tmp_path / "notebooks" / lesson)
    with pytest.raises(LookupError, match=rf"{lesson}: no cell is marked `tested: missing` \(markers there: twice\)"):
        lesson_code.lesson_cell(lesson, "missing")



def _text(node) -> str | None:
    """A string literal's text, an f-string's with its fields as "…"; None for anything else."""
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _course_messages() -> tuple[list[str], list[str]]:
    """Every string in helpers/ (where the course's Chinese messages live), and the English text of every coded
    error, ``SomeError("area.problem", zh, en, ...)``."""
    texts, english = [], []
    for path in sorted((REPO_ROOT / "helpers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if (text := _text(node)) is not None:
                texts.append(text)
            if isinstance(node, ast.Call) and len(node.args) >= 3 and re.fullmatch(r"[a-z_0-9]+\.[a-z_0-9.]+", _text(node.args[0]) or ""):
                english.append(_text(node.args[2]) or "")
    return texts, english


def test_a_course_message_a_lesson_quotes_is_the_one_the_learner_sees(nb):
    """A common-errors entry that quotes one of the course's own messages quotes the Chinese one a learner sees by
    default, as helpers/ words it: each Chinese piece between the elisions (…, ..., numbers) is in one message, in
    order. Pieces with no Chinese may be a tool's own output (a converter's log tail) and are not checked; an entry
    of several words with no Chinese must not be a course error's English text."""
    messages, english = _course_messages()
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for text in re.findall(r"^- \*\*`([^`]+)`", prose, flags=re.M):
        pieces = [p.strip() for p in re.split(r"…|\.\.\.|\d+", text)]
        chinese = [p for p in pieces if re.search(r"[\u4e00-\u9fff]", p)]
        if chinese:
            pattern = re.compile(".*?".join(re.escape(p) for p in chinese), re.S)
            assert any(pattern.search(m) for m in messages), f"{nb.path.name} quotes {text!r}, which no helpers message says"
        elif " " in text.strip():  # a message, not a name such as `config.json`
            pattern = re.compile(".*?".join(re.escape(p) for p in pieces if p), re.S)
            shown = [m for m in english if pattern.search(m)]
            assert not shown, f"{nb.path.name} quotes the English of a course error, {text!r}; a learner sees the Chinese one"
