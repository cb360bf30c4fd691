"""The GPU suite script runs anywhere: ``--device cpu --quick`` on a tiny ViT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ at the root

pytest.importorskip("torchvision")

from benchmarks import gpu_suite

#: random-init models give some samples a blank (constant) map, which camkit reports with a
#: BlankMapWarning; these tests are about other things and take such maps as they come
pytestmark = pytest.mark.filterwarnings("ignore::camkit.BlankMapWarning")


def test_quick_cpu_run_writes_json_and_markdown(tmp_path: Path) -> None:
    argv = ["--device", "cpu", "--quick", "--models", "vit_b_16", "--no-metrics"]
    argv += ["--out", str(tmp_path)]
    assert gpu_suite.main(argv) == 0
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    results = data["results"]
    cases = {(r["precision"], r["method"]) for r in results}
    assert cases == {
        (p, m) for p in ("float32", "bfloat16") for m in ("gradcam", "scorecam", "ablationcam")
    }
    for r in results:
        assert r["model"] == "vit_b_16" and r["ratio"] > 0 and r["q1"] <= r["q3"]
    scorecam = next(r for r in results if r["method"] == "scorecam")
    assert scorecam["channels"] == 32  # the stand-in ViT's hidden size
    assert scorecam["floor"] == "inference_C_chunk64"  # 32 small rows: one chunk on the CPU
    assert data["environment"]["device"] == "cpu"
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.count("| vit_b_16 |") == 6


def test_cuda_absent_is_said(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert gpu_suite.main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_quick_cpu_metrics_give_speedups_over_the_loops(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    argv = ["--device", "cpu", "--quick", "--models", "vit_b_16", "--precisions", "float32"]
    assert gpu_suite.main([*argv, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_suite.json").read_text())["results"]
    metrics = {r["method"]: r for r in results if r["method"].startswith("metric ")}
    assert set(metrics) == {"metric deletion", "metric insertion", "metric road"}
    for name, r in metrics.items():
        subject = name.split()[1]
        ips = r["images_per_second"]
        assert r["q1"] <= r["ratio"] <= r["q3"] and r["ratio"] > 0
        assert set(ips) == {subject, f"{subject}-loop"}
        # speed-ups of 2 rounds: the ratio of the mean images per second lies between them
        assert r["q1"] * 0.999 <= ips[subject] / ips[f"{subject}-loop"] <= r["q3"] * 1.001
        assert r["floor"].startswith("speed-up over a per-image loop")
