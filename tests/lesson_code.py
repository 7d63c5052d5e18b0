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
