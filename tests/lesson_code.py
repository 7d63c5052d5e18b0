"""Code a lesson writes out itself (d2l's pattern), for the tests: the imports, functions, classes and
UPPER_CASE constants of the cells a lesson marks ``#| tested: <name>``, run in a fresh namespace; the cells' other statements
(tables, plots, prints) are skipped."""

from __future__ import annotations

import ast
import re

import nbformat

from helpers.config import REPO_ROOT

DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)


def _upper_case(target) -> bool:
    """``NAME = ...`` or ``NAME_A, NAME_B = ...`` with upper-case names only."""
    if isinstance(target, ast.Tuple):
        return all(_upper_case(t) for t in target.elts)
    return isinstance(target, ast.Name) and target.id.isupper()


# The marker a lesson puts on a cell that the tests read: one line, `#| tested: <name>` in a code cell,
# `<!-- tested: <name> -->` in a markdown cell (invisible once rendered). Names are unique across the course;
# cells are found by marker, never by cell id (an id says nothing and is lost silently when a cell is split).
MARKER = re.compile(r"^(?:#\| tested: ([\w-]+)|<!-- tested: ([\w-]+) -->)[ \t]*$", re.M)


def lesson_markers(lesson: str) -> dict[str, str]:
    """Every marked cell of notebooks/``lesson``: marker name -> the cell's source; a name marked twice fails."""
    found: dict[str, str] = {}
    for cell in nbformat.read(REPO_ROOT / "notebooks" / lesson, as_version=4).cells:
        for match in MARKER.finditer(cell.source):
            name = match.group(1) or match.group(2)
            if name in found:
                raise LookupError(f"{lesson}: the marker `tested: {name}` is on more than one cell")
            found[name] = cell.source
    return found


def lesson_cell(lesson: str, marker: str) -> str:
    """The source of the one cell of notebooks/``lesson`` marked ``tested: <marker>``."""
    found = lesson_markers(lesson)
    if marker not in found:
        raise LookupError(f"{lesson}: no cell is marked `tested: {marker}` (markers there: {', '.join(sorted(found)) or 'none'})")
    return found[marker]


def lesson_definitions(lesson: str, *markers: str, given: dict | None = None) -> dict:
    """The namespace the definitions of the cells marked ``markers`` (in this order) of notebooks/``lesson``
    leave behind; ``given`` holds what those definitions read from the skipped statements (``choice``, for instance)."""
    namespace: dict = dict(given or {})
    for marker in markers:
        tree = ast.parse(lesson_cell(lesson, marker))
        tree.body = [node for node in tree.body if isinstance(node, DEFINITIONS) or (
            isinstance(node, ast.Assign) and all(_upper_case(t) for t in node.targets))]
        exec(compile(tree, f"{lesson}, cell {marker}", "exec"), namespace)
    return namespace


def lesson_calls(lesson: str, marker: str, callable_name: str, given: dict) -> list:
    """Every call to ``callable_name`` written in a lesson's marked cell, evaluated in ``given`` (the names its
    arguments read), in source order: the lesson's own copy of a recipe, for the one-source tests."""
    tree = ast.parse(lesson_cell(lesson, marker))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", getattr(node.func, "attr", None)) == callable_name]
    calls.sort(key=lambda node: (node.lineno, node.col_offset))
    return [eval(compile(ast.Expression(node), f"{lesson}, cell {marker}", "eval"), dict(given)) for node in calls]


def lesson_expression(lesson: str, marker: str, name: str) -> ast.expr:
    """The right-hand side of the (single) ``name = ...`` statement of a lesson's marked cell."""
    found = [node.value for node in ast.walk(ast.parse(lesson_cell(lesson, marker))) if isinstance(node, ast.Assign)
             and any(getattr(t, "id", None) == name for t in node.targets)]
    assert len(found) == 1, f"{lesson}, cell {marker}: {len(found)} assignments to {name}"
    return found[0]


def script_module(name: str):
    """scripts/<name>.py imported as a module (the scripts are not a package), for the tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
