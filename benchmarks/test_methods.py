"""Every method's time over inference, beside Grad-CAM's, measured in one interleaved run.

Gradient and activation methods (issue figure): resnet50 (random init, eval), batch 8,
224x224, ``layer4``. Methods that need one forward and one partial backward stay within
:data:`GRADIENT_TARGET` of Grad-CAM's time. Smooth Grad-CAM++ costs ``1 + n_samples`` forwards
and backwards by design: reported, not gated.

Perturbation methods: resnet18, batch 1, 224x224, ``layer4`` (512 channels). Ablation-CAM takes
at most :data:`ABLATION_TARGET` times no-grad inference (the prefix runs once; about 2x is the
floor: the explained forward and one checked replay). Score-CAM takes at most
:data:`SCORECAM_TARGET` times no-grad inference on ``C`` images (its ``C`` masked forwards).
SS-CAM and IS-CAM cost ``n_samples`` times Score-CAM: reported with small ``n_samples``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

import camkit
from benchmarks._lib import (
    LAYER,
    Settings,
    build_model,
    environment,
    inference,
    interleave,
    make_input,
)

GRADIENT_TARGET = 1.1
ABLATION_TARGET = 2.5
SCORECAM_TARGET = 1.1

ONE_PASS = [
    "gradcampp",
    "xgradcam",
    "hirescam",
    "gradcam-elementwise",
    "layercam",
    "eigengradcam",
    "eigencam",
    "cam",
    "random",
]


def _explain(model: torch.nn.Module, x: torch.Tensor, method: str, **options: Any) -> object:
    return camkit.explain(model, x, method=method, layer=LAYER, target=1, **options).maps


def test_gradient_family_over_gradcam(
    benchmark: BenchmarkFixture, settings: Settings, report: Callable[[str], None]
) -> None:
    model = build_model("resnet50")
    x = make_input(8)
    benchmark.group = "methods resnet50-b8"
    references: list[tuple[str, Callable[[], object]]] = [
        ("inference", lambda: inference(model, x)),
        *[(m, lambda m=m: _explain(model, x, m)) for m in ONE_PASS],
        ("smoothgradcampp-n4", lambda: _explain(model, x, "smoothgradcampp", n_samples=4)),
    ]
    comparison = interleave(
        benchmark,
        ("gradcam", lambda: _explain(model, x, "gradcam")),
        references,
        rounds=max(5, settings.rounds // 3),
        warmup=1,
        quiet=settings.quiet,
    )
    benchmark.extra_info.update(**environment(), **comparison.info("gradcam", "inference"))
    gradcam = comparison.ratio("gradcam", "inference")
    report(f"gradcam/inference {gradcam.text()}")
    slow = []
    for name, _ in references[1:]:
        over_gradcam = comparison.ratio(name, "gradcam")
        over_inference = comparison.ratio(name, "inference")
        benchmark.extra_info[f"{name}/gradcam"] = over_gradcam.as_dict()
        report(f"{name}/gradcam {over_gradcam.text()}; /inference {over_inference.median:.3f}")
        if name in ONE_PASS and over_gradcam.median > GRADIENT_TARGET:
            slow.append(f"{name} {over_gradcam.median:.3f}x")
    if not benchmark.disabled:
        assert not slow, f"over {GRADIENT_TARGET}x Grad-CAM: {', '.join(slow)}"


def test_perturbation_methods_over_inference(
    benchmark: BenchmarkFixture, settings: Settings, report: Callable[[str], None]
) -> None:
    model = build_model("resnet18")
    x = make_input(1)
    channels = 512
    x_many = make_input(64).repeat(channels // 64, 1, 1, 1)  # C images, scored 64 at a time

    def inference_on_c_images() -> object:
        with torch.no_grad():
            return [model(x_many[i : i + 64]) for i in range(0, channels, 64)]

    benchmark.group = "perturbation resnet18-b1"
    comparison = interleave(
        benchmark,
        ("ablationcam", lambda: _explain(model, x, "ablationcam")),
        [
            ("inference", lambda: inference(model, x)),
            ("gradcam", lambda: _explain(model, x, "gradcam")),
            ("scorecam", lambda: _explain(model, x, "scorecam")),
            ("inference_on_C_images", inference_on_c_images),
            ("sscam-n2", lambda: _explain(model, x, "sscam", n_samples=2)),
            ("iscam-n2", lambda: _explain(model, x, "iscam", n_samples=2)),
        ],
        rounds=max(3, settings.rounds // 7),
        warmup=1,
        quiet=settings.quiet,
    )
    benchmark.extra_info.update(**environment(), **comparison.info("ablationcam", "inference"))
    ablation = comparison.ratio("ablationcam", "inference")
    scorecam = comparison.ratio("scorecam", "inference_on_C_images")
    report(f"ablationcam/inference {ablation.text()}  target <= {ABLATION_TARGET}")
    report(f"gradcam/inference {comparison.ratio('gradcam', 'inference').text()}")
    report(f"scorecam/inference on C images {scorecam.text()}  target <= {SCORECAM_TARGET}")
    for name in ("sscam-n2", "iscam-n2"):
        report(
            f"{name}/inference on C images {comparison.ratio(name, 'inference_on_C_images').text()}"
        )
    if not benchmark.disabled:
        assert ablation.median <= ABLATION_TARGET
        assert scorecam.median <= SCORECAM_TARGET


@pytest.mark.quick
def test_methods_quick(benchmark: BenchmarkFixture, report: Callable[[str], None]) -> None:
    model = build_model("resnet18")
    x = make_input(2, size=112)
    comparison = interleave(
        benchmark,
        ("gradcam", lambda: _explain(model, x, "gradcam")),
        [
            ("inference", lambda: inference(model, x)),
            ("gradcampp", lambda: _explain(model, x, "gradcampp")),
        ],
        rounds=5,
        warmup=1,
        quiet=0,
    )
    report(f"quick gradcampp/gradcam {comparison.ratio('gradcampp', 'gradcam').text()}")
