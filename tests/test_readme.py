"""The README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs() -> None:
    pytest.importorskip("torchvision")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python example"
    for code in blocks:
        namespace: dict[str, object] = {}
        exec(compile(code, str(README), "exec"), namespace)
        assert namespace["res"].layer == "layer4"  # type: ignore[attr-defined]
        assert tuple(namespace["heat"].shape) == (224, 224, 3)  # type: ignore[attr-defined]
