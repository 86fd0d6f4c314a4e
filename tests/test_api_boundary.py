"""amnesiac uses deltastore only through ``deltastore.__all__`` (issue 9, item 1).

Walks the syntax tree of every module of ``amnesiac/`` and fails on ``from deltastore.x import ...``, on
``import deltastore.x``, on ``from deltastore import name`` with ``name`` not in ``deltastore.__all__``, and on any
access to a private attribute (``._name``) of an object that is not amnesiac's own (``self``/``cls``, or a name
amnesiac defines at module level).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import amnesiac
import deltastore

PACKAGE = Path(amnesiac.__file__).resolve().parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def _module_level_names(tree: ast.Module) -> set[str]:
    """Names a module defines itself (functions, classes, assignments): private ones of those are its own."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def boundary_violations(source: str, where: str = "<source>") -> list[str]:
    """Every place in ``source`` that reaches past ``deltastore.__all__`` (as ``where:line: what``)."""
    tree = ast.parse(source)
    own = _module_level_names(tree) | {"self", "cls"}
    public = set(deltastore.__all__)
    found = []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("deltastore."):
                found.append(f"{line}: from {node.module} import ... (import from deltastore itself)")
            elif node.module == "deltastore":
                found += [f"{line}: deltastore.{a.name} is not in deltastore.__all__" for a in node.names
                          if a.name not in public]
        elif isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.startswith("deltastore.")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in own:
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue  # a subclass calling its own base class's method
            if isinstance(base, ast.Name) and base.id == "deltastore" and node.attr in public:
                continue
            found.append(f"{line}: private attribute .{node.attr} of {ast.unparse(base)}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "deltastore" \
                and node.attr not in public and not node.attr.startswith("__"):
            found.append(f"{line}: deltastore.{node.attr} is not in deltastore.__all__")
    return found


def test_amnesiac_uses_deltastore_only_through_its_public_names():
    assert MODULES, f"no modules found under {PACKAGE}"
    found = []
    for path in MODULES:
        found += boundary_violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, "amnesiac reaches past deltastore.__all__:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "from deltastore.fileio import crc32c",
    "import deltastore.writer",
    "from deltastore import _private_helper",
    "def f(store):\n    return store._commit",
    "def f(writer):\n    return writer.thing._next_step",
    "import deltastore\nx = deltastore.reduce",
])
def test_the_check_catches_each_kind_of_reach(source):
    assert boundary_violations(source), source


@pytest.mark.parametrize("source", [
    "from deltastore import DeltaStore, crc32c",
    "import deltastore",
    "class A:\n    def f(self):\n        return self._writer.next_step",
    "def _helper():\n    pass\nx = _helper",
    "import deltastore\nx = deltastore.DeltaStore",
    "x = (1).__class__",
])
def test_the_check_lets_public_use_through(source):
    assert not boundary_violations(source), source


def test_every_name_in_deltastore_all_exists():
    missing = [name for name in deltastore.__all__ if not hasattr(deltastore, name)]
    assert not missing, missing
