"""The README's example runs as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import camkit

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs() -> None:
    pytest.importorskip("torchvision")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python example"
    for code in blocks:
        namespace: dict[str, object] = {}
        with warnings.catch_warnings():
            # the example's model has random weights (unseeded): its maps may be blank, and
            # camkit says so with a BlankMapWarning, which is not what this test checks
            warnings.simplefilter("ignore", camkit.BlankMapWarning)
            exec(compile(code, str(README), "exec"), namespace)
        assert namespace["res"].layer == "layer4"  # type: ignore[attr-defined]
        assert tuple(namespace["heat"].shape) == (224, 224, 3)  # type: ignore[attr-defined]
