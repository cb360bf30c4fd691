"""The ``cam_cost`` fixture (entry point ``pytest11``) and :func:`camkit.benchmark.cam_cost`."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from torch import nn

import camkit
from camkit.benchmark import CamCost, cam_cost
from camkit.toy import TinyCNN


def _model_and_batch() -> tuple[nn.Module, torch.Tensor]:
    return TinyCNN().eval(), torch.randn(2, 3, 16, 16)


def test_the_plugin_is_advertised_to_pytest() -> None:
    eps = {ep.name: ep.value for ep in md.entry_points(group="pytest11")}
    assert eps.get("camkit") == "camkit.pytest_plugin"


def test_ratio_is_explain_over_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _model_and_batch()
    honest = cam_cost(model, x, "gradcam", layer="features", rounds=5)
    assert honest.rounds == 5 and honest.method == "gradcam"
    assert honest.minimum <= honest.q1 <= honest.ratio <= honest.q3 <= honest.maximum
    assert honest.inference_seconds > 0 and honest.explain_seconds > 0
    # a delay of ten inferences in the weights shows in every round's ratio
    delay = max(0.01, 10 * honest.inference_seconds)
    gradcam = type(camkit.default_registry().get("gradcam"))
    weights = gradcam.weights
    monkeypatch.setattr(
        gradcam, "weights", lambda self, ctx: (time.sleep(delay), weights(self, ctx))[1]
    )
    slowed = cam_cost(model, x, "gradcam", layer="features", rounds=3, warmup=0)
    assert slowed.explain_seconds >= delay
    assert slowed.ratio > honest.ratio


def test_fixture_returns_the_figures_and_records_them(
    cam_cost: Any, request: pytest.FixtureRequest
) -> None:
    model, x = _model_and_batch()
    cost = cam_cost(model, x, method="gradcam", layer="features")
    assert isinstance(cost, CamCost) and cost.rounds == 15
    assert ("cam_cost", cost.as_dict()) in request.node.user_properties
    assert "gradcam" in str(cost) and "x no-grad inference" in str(cost)


def test_fixture_times_through_pytest_benchmark(cam_cost: Any, benchmark: Any) -> None:
    model, x = _model_and_batch()
    cost = cam_cost(model, x, method="gradcam", layer="features")
    assert benchmark.extra_info["cam_cost"]["ratio"] == cost.ratio
    if not benchmark.disabled:
        assert benchmark.stats.stats.rounds == cost.rounds == 15


def test_bad_rounds_are_refused() -> None:
    model, x = _model_and_batch()
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        cam_cost(model, x, rounds=0)


def test_camkit_imports_without_pytest() -> None:
    """pytest and pytest-benchmark stay optional: blocked, camkit and its helper still import."""
    code = (
        "import sys; sys.modules['pytest'] = None; sys.modules['pytest_benchmark'] = None\n"
        "import camkit, camkit.benchmark\n"
        "assert 'camkit.pytest_plugin' not in sys.modules\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
