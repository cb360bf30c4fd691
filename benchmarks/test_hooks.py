"""Hook overhead: a forward through camkit's capture hooks over a bare no-grad forward, CPU.

The required figure: resnet50, batch 8, hooks on ``layer4`` recording activations without
gradients (``Capture(layers, needs_gradients=False)``) cost at most :data:`TARGET` times the
bare ``torch.no_grad()`` forward of the same model and batch.
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
    capture_forward,
    cases,
    environment,
    inference,
    interleave,
    make_input,
)
from camkit.layers import resolve_layers

TARGET = 1.02


@pytest.mark.parametrize("case", cases(batch=8, quick_batch=2))
def test_capture_overhead(
    benchmark: BenchmarkFixture,
    case: Case,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    model = build_model(case.model)
    x = make_input(case.batch)
    layers = resolve_layers(model, LAYER)
    benchmark.group = f"hooks {case.id}"
    comparison = interleave(
        benchmark,
        ("capture", lambda: capture_forward(model, x, layers)),
        [("inference", lambda: inference(model, x))],
        rounds=settings.rounds,
        warmup=settings.warmup,
        quiet=settings.quiet,
    )
    ratio = comparison.ratio("capture", "inference")
    benchmark.extra_info.update(
        case=case.id,
        layer=LAYER,
        target_ratio=TARGET,
        gated=case.required,
        **environment(),
        **comparison.info("capture", "inference"),
    )
    report(
        f"median s: inference {comparison.seconds('inference').median:.4f}, "
        f"capture {comparison.seconds('capture').median:.4f}; "
        f"rounds used {len(comparison.used)}/{comparison.rounds}"
        + (" (contended)" if comparison.contended else "")
    )
    report(f"capture/inference {ratio.text()}  target <= {TARGET}")
    record_ratio("capture/inference", ratio, comparison)
    if case.required and not benchmark.disabled:
        assert ratio.median <= TARGET, (
            f"a forward through the capture hooks on {case.id} takes {ratio.median:.3f}x the "
            f"bare no-grad forward (median of {len(comparison.used)} rounds, IQR "
            f"{ratio.q1:.3f}-{ratio.q3:.3f}); the target is <= {TARGET}x"
        )
