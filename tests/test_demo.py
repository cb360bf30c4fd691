"""The built-in demo: data, the shipped model, and run_demo's files, table and metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import camkit
import camkit.demo.run as demo_run
from camkit.demo import CLASSES, TABLE_COLUMNS, generate, load_demo_model, run_demo
from camkit.demo.model import WEIGHTS_FILE

METHODS = ["gradcam", "random", "gradcam++", "eigencam"]
CANONICAL = ["gradcam", "random", "gradcampp", "eigencam"]


def _parse_table(text: str) -> tuple[list[dict[str, str]], str]:
    """The rows of the Markdown table in ``text`` (header as keys) and the text after it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert re.fullmatch(r"\|(-+:?\|)+", lines[start + 1].replace(" ", ""))
    rows, i = [], start + 2
    while i < len(lines) and lines[i].startswith("|"):
        cells = [c.strip() for c in lines[i].strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
        i += 1
    return rows, "\n".join(lines[i:])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("demo") / "out"
    rows = run_demo(out, methods=METHODS, progress=False)
    return out, rows


def test_files(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = demo
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "overlays", "table.md"]
    names = sorted(p.name for p in (out / "overlays").iterdir())
    scenes = {*CLASSES}
    stems = {n.rsplit("_", 1)[0] for n in names}
    assert scenes <= stems and len(stems) == len(CLASSES) + 2  # + one pair, for each class
    assert len(names) == len(stems) * len(CANONICAL)
    assert {n.rsplit("_", 1)[1] for n in names} == {f"{m}.png" for m in CANONICAL}
    img = cv2.imread(str(out / "overlays" / f"circle_{CANONICAL[0]}.png"))
    assert img is not None and img.shape == (demo_run.CELL, demo_run.CELL, 3)
    # nothing left next to the output folder
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_grid_layout(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = demo
    g = cv2.imread(str(out / "grid.png"))
    assert g is not None
    n_rows, n_cols = len(CLASSES) + 2, len(CANONICAL) + 1  # the image column, then methods
    cell, pad = demo_run.CELL, demo_run.GRID_PAD
    h, w = g.shape[:2]
    left = w - pad - n_cols * cell - (n_cols - 1) * pad  # where the first cell starts
    top = h - pad - n_rows * cell - (n_rows - 1) * pad
    assert pad < left < 3 * cell and pad < top < cell  # room for row labels, column headers
    white = (g == 255).all(axis=2)
    ys = slice(top, top + n_rows * (cell + pad) - pad)
    for j in range(n_cols):  # each cell column holds pixels; gaps between them are white
        x = left + j * (cell + pad)
        assert not white[ys, x + cell // 2].all()
        if j:
            assert white[ys, x - pad : x].all()
    for i in range(n_rows):
        y = top + i * (cell + pad)
        assert not white[y + cell // 2, left:].all()
        assert not white[y : y + cell, :left].all(), "row labels"
        if i:
            assert white[y - pad : y, left:].all()
    assert not white[:top, left:].all(), "column headers"


def test_table(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = demo
    table, after = _parse_table((out / "table.md").read_text())
    assert list(table[0]) == list(TABLE_COLUMNS)
    assert [r["method"] for r in table] == CANONICAL == [r["method"] for r in rows]
    for t, r in zip(table, rows, strict=True):
        assert list(r) == list(TABLE_COLUMNS)
        assert float(t["pointing game"]) == pytest.approx(r["pointing game"], abs=0.0051)
        assert float(t["class discrimination"]) == pytest.approx(
            r["class discrimination"], abs=0.0051
        )
        ms = re.fullmatch(r"([0-9.]+) ms", t["time per image"])
        assert ms and float(ms.group(1)) == pytest.approx(r["time per image"], abs=0.05)
        assert r["time per image"] > 0
    found = re.search(r"Chance level: pointing game ([0-9.]+) .*class discrimination 0\.50", after)
    assert found, after
    chance = float(found.group(1))
    assert 0.02 < chance < 0.2
    by = {r["method"]: r for r in rows}
    assert by["gradcam"]["pointing game"] >= chance + 0.5
    assert by["gradcam"]["class discrimination"] >= 0.8
    assert by["gradcampp"]["class discrimination"] >= 0.8
    # the same map whatever the class: only two-object scenes tell them from the others
    for blind in ("random", "eigencam"):
        assert by[blind]["pointing game"] > chance + 0.3
        assert 0.3 <= by[blind]["class discrimination"] <= 0.7
    assert "sscam" not in after  # options are named only for methods that ran


def test_rerun_replaces_and_failures_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "stale_gradcam.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    rows = run_demo(out, methods=["gradcam"], progress=False)
    assert [r["method"] for r in rows] == ["gradcam"]
    assert not (out / "overlays" / "stale_gradcam.png").exists()
    assert (out / "notes.txt").read_text() == "mine"  # other files are left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    real = camkit.viz.save_image

    def fail_on_grid(path: Any, image: Any, **kw: Any) -> Path:
        if Path(path).name == "grid.png":
            raise OSError("disk full")
        return real(path, image, **kw)

    monkeypatch.setattr(demo_run, "save_image", fail_on_grid)
    with pytest.raises(OSError, match="disk full"):
        run_demo(out, methods=["random"], progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(OSError, match="disk full"):
        run_demo(tmp_path / "new", methods=["random"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_arguments_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(camkit.UnknownMethodError):
        run_demo(tmp_path / "out", methods=["gradcam", "nosuchcam"])
    with pytest.raises(camkit.InputError, match="at least one method"):
        run_demo(tmp_path / "out", methods=[])
    (tmp_path / "file").write_text("x")
    with pytest.raises(camkit.InputError, match="is a file"):
        run_demo(tmp_path / "file", methods=["gradcam"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_data_is_seeded_and_consistent() -> None:
    a = generate(6, split="test", seed=3)
    b = generate(3, split="test", seed=3, start=3)
    assert np.array_equal(a.images[3:], b.images) and np.array_equal(a.labels[3:], b.labels)
    assert not np.array_equal(generate(3, split="train", seed=3).images, a.images[:3])
    assert a.images.dtype == np.float32 and a.images.shape == (6, 64, 64, 3)
    assert a.images.min() >= 0.0 and a.images.max() <= 1.0
    assert a.tensor().shape == (6, 3, 64, 64)
    assert a.masks.shape == (6, 1, 64, 64) and (a.masks.sum(axis=(2, 3)) > 60).all()
    pairs = generate(20, split="test", objects=2)
    assert (pairs.labels[:, 0] != pairs.labels[:, 1]).all()
    assert not (pairs.masks[:, 0] & pairs.masks[:, 1]).any()
    assert set(generate(64).labels[:, 0]) == set(range(len(CLASSES)))
    with pytest.raises(camkit.InputError, match="split"):
        generate(1, split="holdout")
    with pytest.raises(camkit.InputError, match="objects"):
        generate(1, objects=3)


def test_shipped_model() -> None:
    weights = Path(demo_run.__file__).with_name(WEIGHTS_FILE)
    assert weights.stat().st_size < 500_000
    model = load_demo_model()
    assert not model.training
    val = generate(200, split="val")
    with torch.no_grad():
        pred = model(val.tensor()).argmax(1)
    assert float((pred == torch.from_numpy(val.labels[:, 0])).float().mean()) >= 0.9
    assert camkit.explain(model, val.tensor()[:2], method="cam").layer == "features"


def test_methods_that_do_not_apply_to_the_demo_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "legrad" in demo_run.NOT_FOR_THE_DEMO
    with pytest.raises(camkit.InputError, match="cannot run 'legrad': it explains vision"):
        run_demo(tmp_path / "out", methods=["legrad"], progress=False)
    # methods=None runs every registered method but those
    monkeypatch.setattr(demo_run, "list_methods", lambda: ["legrad", "random"])
    rows = run_demo(tmp_path / "all", progress=False)
    assert [r["method"] for r in rows] == ["random"]
