"""The regression gate (``python -m benchmarks.compare``): its verdicts on synthetic ratios, and
on a real measurement of Grad-CAM slowed on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import camkit
from camkit.benchmark import cam_cost

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a package at the repository root

from benchmarks import compare  # noqa: E402


def _ratios(**figures: float) -> dict[str, Any]:
    return {
        "schema": 1,
        "benchmarks": {
            name: {"ratio": value, "machine": "test", "torch": "x", "commit": "abc"}
            for name, value in figures.items()
        },
    }


def _gate(tmp_path: Path, baseline: dict[str, Any], new: dict[str, Any], *args: str) -> Any:
    (tmp_path / "base.json").write_text(json.dumps(baseline))
    (tmp_path / "new.json").write_text(json.dumps(new))
    return subprocess.run(
        [
            sys.executable,
            *("-m", "benchmarks.compare", str(tmp_path / "new.json")),
            *("--baseline", str(tmp_path / "base.json"), *args),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_verdicts_and_changes() -> None:
    baseline = _ratios(a=1.00, b=2.00, c=1.00, gone=1.0)["benchmarks"]
    new = _ratios(a=1.04, b=2.20, c=0.90, extra=3.0)["benchmarks"]
    rows = {r.name: r for r in compare.compare(baseline, new, tolerance=0.05)}
    assert {n: r.verdict for n, r in rows.items()} == {
        "a": "ok",  # +4% within 5%
        "b": "REGRESSED",  # +10%
        "c": "faster",  # -10%
        "gone": "MISSING",
        "extra": "new",
    }
    assert rows["b"].change == pytest.approx(0.10)
    assert rows["gone"].new is None and rows["extra"].baseline is None
    text = compare.table(list(rows.values()))
    assert "| b | 2.000 | 2.200 | +10.0% | REGRESSED |" in text
    assert "| gone | 1.000 | - | - | MISSING |" in text


def test_tolerance_is_a_share_of_the_baseline() -> None:
    rows = compare.compare(_ratios(a=2.0)["benchmarks"], _ratios(a=2.3)["benchmarks"], 0.2)
    assert rows[0].verdict == "ok"  # 2.3 <= 2.0 * 1.2
    rows = compare.compare(_ratios(a=2.0)["benchmarks"], _ratios(a=2.5)["benchmarks"], 0.2)
    assert rows[0].verdict == "REGRESSED"


def test_exit_status(tmp_path: Path) -> None:
    ok = _gate(tmp_path, _ratios(a=1.0), _ratios(a=1.02))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "| a | 1.000 | 1.020 | +2.0% | ok |" in ok.stdout
    assert _gate(tmp_path, _ratios(a=1.0), _ratios(a=1.2)).returncode == 1
    missing = _gate(tmp_path, _ratios(a=1.0, b=1.0), _ratios(a=1.0))
    assert missing.returncode == 1 and "1 missing" in missing.stdout
    (tmp_path / "bad.json").write_text('{"benchmarks": []}')
    base = str(tmp_path / "base.json")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.compare",
            str(tmp_path / "bad.json"),
            "--baseline",
            base,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "expected a ratios file" in bad.stderr


def test_committed_baseline_is_a_ratios_file() -> None:
    entries = compare.load(compare.BASELINE)
    assert entries
    for entry in entries.values():
        assert {"ratio", "spread", "machine", "torch", "commit"} <= entry.keys()


def test_gate_fails_on_a_slowed_gradcam(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real measurement: Grad-CAM over inference on a small ResNet, then the same with a
    delay in Grad-CAM's weights; the gate passes the honest build and fails the slowed one."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    name = "gradcam/inference resnet18-b1-32px-layer3"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: other processes slow it down less erratically
    try:
        first = cam_cost(model, x, "gradcam", layer="layer3", rounds=9)
        again = cam_cost(model, x, "gradcam", layer="layer3", rounds=9)
        gradcam = type(camkit.default_registry().get("gradcam"))
        weights = gradcam.weights
        delay = max(0.02, 10 * first.inference_seconds)  # ten forwards of this model

        def slowed(self: Any, ctx: Any) -> torch.Tensor:
            time.sleep(delay)
            return weights(self, ctx)

        monkeypatch.setattr(gradcam, "weights", slowed)
        slow = cam_cost(model, x, "gradcam", layer="layer3", rounds=9)
    finally:
        torch.set_num_threads(threads)
    baseline = _ratios(**{name: first.ratio})
    # a generous tolerance (100%): the honest repeat passes on a busy machine, ten forwards
    # more do not
    passed = _gate(tmp_path, baseline, _ratios(**{name: again.ratio}), "--tolerance", "1.0")
    failed = _gate(tmp_path, baseline, _ratios(**{name: slow.ratio}), "--tolerance", "1.0")
    assert passed.returncode == 0, passed.stdout
    assert failed.returncode == 1 and "REGRESSED" in failed.stdout, failed.stdout
