"""The shape of the code: plugins use only the public plugin surface; camkit's modules import
no private name from each other, form no import cycle and stay under 500 lines each."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The camkit modules a plugin may import: the package itself and its documented namespace.
PLUGIN_SURFACE = {"camkit", "camkit.plugin"}
PACKAGE = ROOT / "camkit"
MAX_LINES = 500


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


# -- the package's own modules ---------------------------------------------------------------
def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (no import at run time)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every camkit import of ``name``, at module level or inside
    functions, relative imports resolved; ``from . import x`` of a submodule names ``x``'s
    module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module not in modules:
                continue
            plain = []
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in modules:
                    found.append((node.lineno, sub, []))
                else:
                    plain.append(alias.name)
            if plain:
                found.append((node.lineno, module, plain))
    return found


def _private(name: str) -> bool:
    """A leading underscore marks a private name; dunders such as ``__version__`` are public."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports(modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in modules.items():
        for line, module, names in _imports(name, path, modules):
            if module == name:
                continue
            bad += [f"{name}:{line} imports {n} from {module}" for n in names if _private(n)]
    return bad


def _cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Every import cycle, each as the modules along it (depth-first search)."""
    graph = {
        name: sorted({m for _, m, _ in _imports(name, path, modules) if m != name})
        for name, path in modules.items()
    }
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    return found


def test_no_private_name_crosses_a_module_boundary() -> None:
    bad = _private_imports(_modules())
    assert not bad, "private names imported from another camkit module:\n" + "\n".join(bad)


def test_no_import_cycle_between_camkit_modules() -> None:
    cycles = _cycles(_modules())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_camkit_modules_stay_under_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it by concern"


def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    pkg = tmp_path / "camkit"
    pkg.mkdir()
    for name, text in files.items():
        (pkg / name).write_text(text)
    return {_module_name(p, tmp_path): p for p in sorted(pkg.rglob("*.py"))}


def test_the_structure_checks_see_private_imports_and_cycles(tmp_path: Path) -> None:
    modules = _fake_package(
        tmp_path,
        {
            "__init__.py": "from .a import f\n",
            "a.py": "from .b import _g, h\n\ndef f():\n    from camkit import c\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n",
            "c.py": "import camkit.a\nfrom camkit.b import _k\n",
            "d.py": "from .b import __all__\n",  # a dunder is public
        },
    )
    assert _private_imports(modules) == [
        "camkit.a:1 imports _g from camkit.b",
        "camkit.c:2 imports _k from camkit.b",
    ]
    # a -> c (inside a function) -> a is a cycle; b's import of a is for type checking only
    assert _cycles(modules) == [["camkit.a", "camkit.c", "camkit.a"]]
