"""Packaging: the wheel ships camkit and camkit_plugins, py.typed and the entry points."""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _packages_on_disk() -> set[str]:
    found = set()
    for top, name in (("camkit", "camkit"), ("plugins", "camkit_plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_is_listed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _packages_on_disk() == listed, "a sub-package missing here vanishes from the wheel"


def test_builtins_advertised_as_entry_points() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = config["project"]["entry-points"]["camkit"]
    modules = {p.stem for p in (ROOT / "plugins").glob("*.py") if p.stem != "__init__"}
    assert set(eps.values()) == {f"camkit_plugins.{m}" for m in modules}
    installed = {
        ep.name: ep.value
        for ep in md.entry_points(group="camkit")
        if ep.dist is not None and ep.dist.name == "camkit"
    }
    assert installed == eps, "reinstall with `pip install -e .` after adding an entry point"


def test_wheel_contents(tmp_path: Path) -> None:
    # build from a copy: an in-tree build leaves camkit.egg-info behind, whose stale entry
    # points would shadow the installed ones for anything run from the repository root
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "site", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(tmp_path), str(src)], check=True)
    (wheel,) = tmp_path.glob("camkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "camkit/py.typed" in names and "camkit_plugins/gradcam.py" in names
    assert "camkit/explain.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[camkit]" in text and "gradcam = camkit_plugins.gradcam" in text
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_quickstart_runs_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "camkit"], capture_output=True, text=True, check=True, timeout=120
    )
    assert "explained SquareDetector with 'gradcam' at layer 'features'" in out.stdout
    assert "inside the square" in out.stdout
