"""Grad-CAM latency over plain no-grad inference, on the CPU.

The required figure: resnet50 (random init, eval), batch 8, 224x224, layer ``layer4``, 2 threads:
``camkit.explain(..., method="gradcam")`` takes at most :data:`TARGET` times the no-grad
forward of the same batch. Two references run in the same rounds, reported, not gated: the
hand-written Grad-CAM (:func:`~benchmarks._lib.naive_gradcam`, whole graph +
``autograd.grad``), to show what building the graph only from the layer on saves; and
``camkit.explain`` with the default ``layer=None`` (camkit finds ``layer4`` itself).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks._lib import (
    LAYER,
    Case,
    Settings,
    build_model,
    camkit_gradcam,
    camkit_gradcam_default_layer,
    cases,
    environment,
    inference,
    interleave,
    make_input,
    naive_gradcam,
)

TARGET = 1.05


@pytest.mark.parametrize("case", cases(batch=8, quick_batch=2))
def test_gradcam_latency(
    benchmark: BenchmarkFixture,
    case: Case,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    model = build_model(case.model)
    x = make_input(case.batch)
    benchmark.group = f"latency {case.id}"
    comparison = interleave(
        benchmark,
        ("gradcam", lambda: camkit_gradcam(model, x)),
        [
            ("inference", lambda: inference(model, x)),
            ("naive", lambda: naive_gradcam(model, x)),
            ("gradcam_layer_none", lambda: camkit_gradcam_default_layer(model, x)),
        ],
        rounds=settings.rounds,
        warmup=settings.warmup,
        quiet=settings.quiet,
    )
    ratio = comparison.ratio("gradcam", "inference")
    naive = comparison.ratio("naive", "inference")
    default_layer = comparison.ratio("gradcam_layer_none", "inference")
    benchmark.extra_info.update(
        case=case.id,
        layer=LAYER,
        target_ratio=TARGET,
        gated=case.required,
        **environment(),
        **comparison.info("gradcam", "inference"),
    )
    seconds = {n: comparison.seconds(n).median for n in comparison.samples}
    report(
        "median s: "
        + ", ".join(f"{n} {s:.4f}" for n, s in seconds.items())
        + f"; rounds used {len(comparison.used)}/{comparison.rounds}"
        + (" (contended)" if comparison.contended else "")
    )
    report(f"gradcam/inference {ratio.text()}  target <= {TARGET}")
    record_ratio("gradcam/inference", ratio, comparison)
    report(f"naive/inference   {naive.text()}")
    report(f"gradcam_layer_none/inference {default_layer.text()}")
    if case.required and not benchmark.disabled:
        assert ratio.median <= TARGET, (
            f"Grad-CAM on {case.id} takes {ratio.median:.3f}x no-grad inference (median of "
            f"{len(comparison.used)} rounds, IQR {ratio.q1:.3f}-{ratio.q3:.3f}); "
            f"the target is <= {TARGET}x"
        )
