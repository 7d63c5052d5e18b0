"""Code a lesson writes out itself (d2l's pattern), for the tests: the imports, functions, classes and
UPPER_CASE constants of chosen code cells, run in a fresh namespace; the cells' other statements
(tables, plots, prints) are skipped."""

from __future__ import annotations

import ast

import nbformat

from helpers.config import REPO_ROOT

DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)


def _upper_case(target) -> bool:
    """``NAME = ...`` or ``NAME_A, NAME_B = ...`` with upper-case names only."""
    if isinstance(target, ast.Tuple):
        return all(_upper_case(t) for t in target.elts)
    return isinstance(target, ast.Name) and target.id.isupper()


def lesson_definitions(lesson: str, *cell_ids: str, given: dict | None = None) -> dict:
    """The namespace the definitions of ``cell_ids`` (in this order) of notebooks/``lesson`` leave behind;
    ``given`` holds what those definitions read from the skipped statements (``choice``, for instance)."""
    cells = {cell.id: cell.source for cell in nbformat.read(REPO_ROOT / "notebooks" / lesson, as_version=4).cells}
    namespace: dict = dict(given or {})
    for cell_id in cell_ids:
        tree = ast.parse(cells[cell_id])
        tree.body = [node for node in tree.body if isinstance(node, DEFINITIONS) or (
            isinstance(node, ast.Assign) and all(_upper_case(t) for t in node.targets))]
        exec(compile(tree, f"{lesson}, cell {cell_id}", "exec"), namespace)
    return namespace


def lesson_calls(lesson: str, cell_id: str, callable_name: str, given: dict) -> list:
    """Every call to ``callable_name`` written in a lesson's cell, evaluated in ``given`` (the names its
    arguments read), in source order: the lesson's own copy of a recipe, for the one-source tests."""
    cells = {cell.id: cell.source for cell in nbformat.read(REPO_ROOT / "notebooks" / lesson, as_version=4).cells}
    tree = ast.parse(cells[cell_id])
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", getattr(node.func, "attr", None)) == callable_name]
    calls.sort(key=lambda node: (node.lineno, node.col_offset))
    return [eval(compile(ast.Expression(node), f"{lesson}, cell {cell_id}", "eval"), dict(given)) for node in calls]


def lesson_expression(lesson: str, cell_id: str, name: str) -> ast.expr:
    """The right-hand side of the (single) ``name = ...`` statement of a lesson's cell."""
    cells = {cell.id: cell.source for cell in nbformat.read(REPO_ROOT / "notebooks" / lesson, as_version=4).cells}
    found = [node.value for node in ast.walk(ast.parse(cells[cell_id])) if isinstance(node, ast.Assign)
             and any(getattr(t, "id", None) == name for t in node.targets)]
    assert len(found) == 1, f"{lesson}, cell {cell_id}: {len(found)} assignments to {name}"
    return found[0]


def script_module(name: str):
    """scripts/<name>.py imported as a module (the scripts are not a package), for the tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
