"""``camkit.compare`` and ``Comparison``: the table from per-sample values, its files, resuming,
and ``torchrun`` giving the single-process table."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import camkit
from camkit.comparison import bootstrap_interval

#: random-init models give some samples a blank (constant) map, which camkit reports with a
#: BlankMapWarning; these tests are about other things and take such maps as they come
pytestmark = pytest.mark.filterwarnings("ignore::camkit.BlankMapWarning")

HERE = Path(__file__).parent
#: the module (``camkit.compare`` is the function)
compare_module = importlib.import_module("camkit.compare")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_torchrun", HERE / "compare_torchrun.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()


def test_rows_are_the_per_sample_values_of_evaluate() -> None:
    model, (x, y, masks) = SCRIPT.setup()
    cmp = SCRIPT.run()
    assert cmp.methods == ["gradcam", "random"] and cmp.metrics == SCRIPT.METRICS
    assert cmp.images == 11
    for method in cmp.methods:
        res = camkit.explain(model, x, method=method, layer="2", target=y)
        for metric in cmp.metrics:
            direct = camkit.evaluate(
                model, x, res, metric, masks=masks, **SCRIPT.OPTIONS[metric]
            ).values.double()
            assert torch.allclose(cmp.values[method][metric], direct, atol=1e-6), (method, metric)
    row = cmp.rows[0]
    for metric in cmp.metrics:
        v = cmp.values["gradcam"][metric]
        assert row[metric] == pytest.approx(float(v.mean()))
        assert row[f"{metric} low"] <= row[metric] <= row[f"{metric} high"]
        assert row[f"{metric} n"] == 11
    assert row["time per image (ms)"] > 0


def test_bootstrap_interval() -> None:
    assert bootstrap_interval(torch.full((5,), 0.25)) == (0.25, 0.25)
    v = torch.tensor([0.0, 1.0, float("nan")])
    low, high = bootstrap_interval(v, n_bootstrap=2000)
    # resampled means of two values lie in {0, 0.5, 1}; each end has probability 1/4
    assert (low, high) == (0.0, 1.0)
    assert bootstrap_interval(v, seed=1) == bootstrap_interval(v, seed=1)
    assert all(math.isnan(b) for b in bootstrap_interval(torch.tensor([float("nan")])))


def test_outputs(tmp_path: Path) -> None:
    cmp = SCRIPT.run()
    md = cmp.to_markdown()
    assert md.splitlines()[0].startswith("| method | pointing-game ↑ | deletion ↓ |")
    assert "| gradcam |" in md and "11 samples on cpu" in md
    rows = list(csv.DictReader(cmp.to_csv(tmp_path / "t.csv").open()))
    assert [r["method"] for r in rows] == ["gradcam", "random"]
    assert float(rows[1]["deletion"]) == pytest.approx(cmp.rows[1]["deletion"])
    doc = json.loads(cmp.to_json(tmp_path / "t.json").read_text())
    assert doc["values"]["random"]["road"] == pytest.approx(cmp.values["random"]["road"].tolist())
    assert doc["higher_is_better"]["deletion"] is False
    png = cmp.figure(tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cmp.examples is not None and cmp.examples.shape == (4, 3, 12, 12)
    assert cmp.best("pointing-game") in ("gradcam", "random")


def test_metrics_needing_masks_are_skipped_with_a_reason() -> None:
    model, (x, y, _) = SCRIPT.setup()
    cmp = camkit.compare(
        model, (x, y), ["gradcam"], ["pointing-game", "class-discrimination", "average-drop"],
        layer="2", batch_size=4,
    )  # fmt: skip
    assert cmp.metrics == ["average-drop"]
    assert cmp.skipped == {
        "pointing-game": "the data has no masks",
        "class-discrimination": "the data has no masks",
    }
    assert "Skipped pointing-game: the data has no masks." in cmp.to_markdown()


def test_an_interrupted_comparison_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = SCRIPT.run()
    real = compare_module._run_batch
    calls: list[int] = []

    def failing(*args: Any) -> Any:
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(compare_module, "_run_batch", failing)
    ckpt = tmp_path / "partial.pt"
    with pytest.raises(KeyboardInterrupt):
        SCRIPT.run(checkpoint=ckpt)
    assert ckpt.exists() and len(calls) == 2
    calls.clear()

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(compare_module, "_run_batch", counting)
    resumed = SCRIPT.run(checkpoint=ckpt)
    assert len(calls) == 2  # 11 samples in batches of 3: 4 batches, 2 done before
    for method in full.methods:
        for metric in full.metrics:
            assert torch.equal(resumed.values[method][metric], full.values[method][metric])
    with pytest.raises(camkit.InputError, match="different comparison"):
        SCRIPT.run(checkpoint=ckpt, seed=5)


def _metric_columns(markdown: str) -> list[str]:
    """The table's lines without the time and memory columns (they differ between runs)."""
    lines = []
    for line in markdown.splitlines():
        cells = line.split(" | ")
        lines.append(" | ".join(cells[:-2]) if line.startswith("|") else line)
    return lines


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_two_processes_give_the_single_process_table(tmp_path: Path) -> None:
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(HERE / "compare_torchrun.py"), str(out),
    ]  # fmt: skip
    # a session of its own: on a timeout the launcher and its workers are ended together
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    doc = json.loads(out.read_text())
    single = SCRIPT.run()
    for method in single.methods:
        for metric in single.metrics:
            assert doc["values"][method][metric] == single.values[method][metric].tolist(), (
                method,
                metric,
            )
    dist_rows = doc["rows"]
    for got, want in zip(dist_rows, single.rows, strict=True):
        for key, value in want.items():
            if key not in ("time per image (ms)", "peak memory growth (MB)"):
                assert got[key] == value, key
