"""The shape of the code: plugins use only the public plugin surface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The camkit modules a plugin may import: the package itself and its documented namespace.
PLUGIN_SURFACE = {"camkit", "camkit.plugin"}


def _camkit_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("camkit")]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("camkit")
        ):
            found.append((node.lineno, str(node.module)))
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "plugins").glob("*.py")), ids=lambda p: p.name)
def test_plugins_import_only_the_public_surface(path: Path) -> None:
    bad = [(line, mod) for line, mod in _camkit_imports(path) if mod not in PLUGIN_SURFACE]
    assert not bad, f"{path.name} imports camkit internals: {bad}"


def test_the_surface_check_sees_a_private_import(tmp_path: Path) -> None:
    p = tmp_path / "bad.py"
    p.write_text("import camkit\nfrom camkit.cam import normalize\nimport camkit.targets\n")
    assert _camkit_imports(p) == [(1, "camkit"), (2, "camkit.cam"), (3, "camkit.targets")]


def test_plugin_namespace_exports_exist() -> None:
    from camkit import plugin

    for name in plugin.__all__:
        assert hasattr(plugin, name), name
