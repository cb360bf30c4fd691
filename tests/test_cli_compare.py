"""``camkit compare``: the demo's comparison in a few scenes, files, resuming, errors."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from camkit.cli import main

cli_compare = importlib.import_module("camkit.cli.compare")
compare_module = importlib.import_module("camkit.compare")


def _run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def few_scenes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_compare, "DEMO_SCENES", 4)


def test_compare_demo_writes_the_table_and_figure(
    few_scenes: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    code, stdout, err = _run(
        capsys, "compare", "--demo", "--methods", "gradcam,random", "--metrics",
        "pointing-game,deletion", "--out", out, "--batch-size", "3", "--no-progress",
        "--metric-option", "deletion.steps=4",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "figure.png", "table.csv", "table.json", "table.md",
    ]  # fmt: skip
    doc = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in doc["rows"]] == ["gradcam", "random"]
    assert doc["images"] == 8 and len(doc["values"]["gradcam"]["deletion"]) == 8
    assert (out / "table.md").read_text() in stdout
    assert "| gradcam |" in stdout and "files in" in stdout


def test_compare_resumes_after_an_interruption(
    few_scenes: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["compare", "--demo", "--methods", "random", "--metrics", "pointing-game",
            "--batch-size", "3", "--no-progress"]  # fmt: skip
    code, _, err = _run(capsys, *args, "--out", tmp_path / "fresh")
    assert code == 0, err
    real = compare_module._run_batch
    calls: list[int] = []

    def interrupted(*a: Any) -> Any:
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(compare_module, "_run_batch", interrupted)
    code, _, err = _run(capsys, *args, "--out", tmp_path / "c")
    assert code == 130 and "interrupted" in err
    assert (tmp_path / "c" / cli_compare.PARTIAL).exists()
    calls.clear()

    def counting(*a: Any) -> Any:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(compare_module, "_run_batch", counting)
    code, _, err = _run(capsys, *args, "--out", tmp_path / "c")
    assert code == 0, err
    assert len(calls) == 2  # 8 maps in batches of 3: the first batch was kept
    assert not (tmp_path / "c" / cli_compare.PARTIAL).exists()
    fresh = json.loads((tmp_path / "fresh" / "table.json").read_text())
    resumed = json.loads((tmp_path / "c" / "table.json").read_text())
    assert resumed["values"] == fresh["values"]


def test_compare_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "compare", "--out", tmp_path / "x")
    assert code == 2 and "image files, or --demo" in err
    code, _, err = _run(capsys, "compare", "--demo", "--metrics", "deletoin")
    assert code == 1 and "Did you mean 'deletion'" in err
    code, _, err = _run(capsys, "compare", "--demo", "--metric-option", "steps=3")
    assert code == 2 and "METRIC.KEY=VALUE" in err
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    code, _, err = _run(capsys, "compare", str(image))
    assert code != 0


TINY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )
"""


def test_compare_image_files_with_a_model_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import cv2
    import numpy as np

    name = f"tinycmp_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "more").mkdir()
    for i in range(3):
        img = np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / ("0.png" if i == 0 else f"more/{i}.png")), img)
    (tmp_path / "more" / "notes.txt").write_text("not an image")
    images = ["0.png", "more"]  # a file and a folder of two images
    try:
        code, stdout, err = _run(
            capsys, "compare", *images, "--model", f"{name}:build", "--size", "16",
            "--layer", "0", "--metrics", "deletion,pointing-game", "--target", "2",
            "--out", "c", "--no-progress", "--metric-option", "deletion.steps=4",
        )  # fmt: skip
    finally:
        sys.modules.pop(name, None)
    assert code == 0, err
    assert "Skipped pointing-game: the data has no masks." in stdout
    doc = json.loads((tmp_path / "c" / "table.json").read_text())
    assert doc["images"] == 3 and list(doc["values"]["gradcam"]) == ["deletion"]
