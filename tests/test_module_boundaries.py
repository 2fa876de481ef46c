"""Modules talk through public names: no module imports, or reaches into, another module's underscore names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("d2mc", "passes", "targets", "benchmarks", "tests")


def private_uses(path: Path) -> list[str]:
    """``from d2mc.x import _y`` and ``x._y`` on a module imported from the project, in one file."""
    tree = ast.parse(path.read_text())
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("d2mc", "tests"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("d2mc"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_module_s_private_names():
    uses = {str(path.relative_to(ROOT)): found for package in PACKAGES for path in (ROOT / package).rglob("*.py")
            if (found := private_uses(path))}
    assert uses == {}


def test_the_check_finds_a_private_import(tmp_path):
    path = tmp_path / "example.py"
    path.write_text("from d2mc.plots import _draw\nimport d2mc.pipeline as p\np._REGISTRY\n")
    assert private_uses(path) == ["from d2mc.plots import _draw", "line 3: p._REGISTRY"]
