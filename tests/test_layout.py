"""The package's own rules of shape: modules use each other's public names only, and stay small enough to read."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("d2mc", "passes", "targets")  # installed as d2mc, d2mc.passes, d2mc.targets
OTHER_DIRS = ("benchmarks", "tests")  # use the package's public names too
MAX_LINES = 400


def package_modules() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))


def private_uses(path: Path) -> list[str]:
    """``from X import _name`` of a d2mc module, and ``name._attr`` where ``name`` was imported from d2mc."""
    tree = ast.parse(path.read_text())
    imported, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in ("d2mc", "tests")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("d2mc"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_underscore_names():
    scripts = sorted(p for d in OTHER_DIRS for p in (ROOT / d).rglob("*.py"))
    offences = {str(p.relative_to(ROOT)): uses for p in package_modules() + scripts if (uses := private_uses(p))}
    assert offences == {}


def test_the_check_sees_private_imports_and_attributes(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import d2mc.measure\nfrom d2mc.lowering.builder import _linear_t, norm\n"
                      "from d2mc.ops import moe\nx = moe._private\ny = d2mc.measure._check_lengths\nz = self._own\n")
    assert private_uses(module) == ["line 2: from d2mc.lowering.builder import _linear_t", "line 4: moe._private",
                                    "line 5: d2mc.measure._check_lengths"]


@pytest.mark.parametrize("module", [str(p.relative_to(ROOT)) for p in package_modules()])
def test_modules_stay_under_the_line_limit(module):
    lines = len((ROOT / module).read_text().splitlines())
    assert lines < MAX_LINES, f"{module} has {lines} lines"
