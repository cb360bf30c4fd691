"""Metric throughput: camkit's batched deletion, insertion and ROAD beside per-image loops of the
same metrics, measured in one interleaved run.

resnet50 (random init, eval), batch 32 (the required case; ``-m quick``: resnet18, batch 4),
224x224, Grad-CAM maps at ``layer4``, 2 CPU threads. The references
(``benchmarks/metrics_loops.py``) compute each image on its own: deletion and insertion one
forward of one image per step, ROAD one direct sparse solve (scipy, float64, as the paper's
reference code) and one forward per image, percentile and order. Deletion and insertion use 10
steps, ROAD the percentiles 20, 50 and 80, both sides alike. Targets (reported, not asserted:
on a CPU the same forwards on both sides bound the speed-up below them): the batched metric at
least :data:`DELETION_TARGET` times the loop's images per second for deletion and insertion,
:data:`ROAD_TARGET` for ROAD.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

import camkit
from benchmarks._lib import LAYER, Case, Settings, build_model, cases, environment, interleave
from benchmarks._lib import make_input as make_batch
from benchmarks.metrics_loops import deletion_loop, road_loop

DELETION_TARGET = 3.0
ROAD_TARGET = 10.0
STEPS = 10
PERCENTILES = (20, 50, 80)


def _setup(case: Case) -> tuple[torch.nn.Module, torch.Tensor, camkit.CamResult]:
    model = build_model(case.model)
    x = make_batch(case.batch)
    return model, x, camkit.explain(model, x, method="gradcam", layer=LAYER)


def _report(
    comparison: Any, benchmark: BenchmarkFixture, subject: str, loop: str, batch: int,
    report: Callable[[str], None], target: float,
) -> float:  # fmt: skip
    speedup = comparison.ratio(loop, subject)  # loop time / batched time
    seconds = comparison.seconds(subject).median
    benchmark.extra_info[f"{loop}/{subject}"] = speedup.as_dict()
    benchmark.extra_info[f"{subject} images/s"] = batch / seconds
    report(
        f"{subject}: {batch / seconds:.2f} images/s, {speedup.median:.2f}x the per-image loop "
        f"({batch / comparison.seconds(loop).median:.2f} images/s) {speedup.text()}  "
        f"target >= {target}"
    )
    return speedup.median


@pytest.mark.parametrize("case", cases(32, 4))
def test_deletion_and_insertion_over_a_loop(
    case: Case, benchmark: BenchmarkFixture, settings: Settings, report: Callable[[str], None]
) -> None:
    pytest.importorskip("scipy")
    model, x, res = _setup(case)
    cls = res.targets
    assert cls is not None
    benchmark.group = f"metrics deletion {case.id}"

    def batched(metric: str, baseline: str = "zeros") -> Callable[[], object]:
        return lambda: camkit.evaluate(model, x, res, metric, steps=STEPS, baseline=baseline)

    comparison = interleave(
        benchmark,
        ("deletion", batched("deletion")),
        [
            ("deletion-loop", lambda: deletion_loop(model, x, res.maps, cls, STEPS, False)),
            ("insertion", batched("insertion")),
            ("insertion-loop", lambda: deletion_loop(model, x, res.maps, cls, STEPS, True)),
        ],
        rounds=max(3, settings.rounds // 7),
        warmup=1,
        quiet=settings.quiet,
    )
    benchmark.extra_info.update(**environment(), **comparison.info("deletion", "deletion-loop"))
    a = _report(comparison, benchmark, "deletion", "deletion-loop", case.batch, report, 3.0)
    b = _report(comparison, benchmark, "insertion", "insertion-loop", case.batch, report, 3.0)
    # reported, not asserted: on a CPU both sides run the same forwards, so the speed-up is
    # bounded by the chunk's effect on a forward (about 1.2x; docs/benchmarks.md, Metrics)
    report(f"deletion/insertion target {DELETION_TARGET} met: {min(a, b) >= DELETION_TARGET}")


@pytest.mark.parametrize("case", cases(32, 4))
def test_road_over_a_loop(
    case: Case, benchmark: BenchmarkFixture, settings: Settings, report: Callable[[str], None]
) -> None:
    pytest.importorskip("scipy")
    model, x, res = _setup(case)
    cls = res.targets
    assert cls is not None
    benchmark.group = f"metrics road {case.id}"
    comparison = interleave(
        benchmark,
        ("road", lambda: camkit.evaluate(model, x, res, "road", percentiles=PERCENTILES)),
        [("road-loop", lambda: road_loop(model, x, res.maps, cls, PERCENTILES))],
        rounds=max(3, settings.rounds // 7),
        warmup=1,
        quiet=settings.quiet,
    )
    benchmark.extra_info.update(**environment(), **comparison.info("road", "road-loop"))
    speedup = _report(comparison, benchmark, "road", "road-loop", case.batch, report, ROAD_TARGET)
    # reported, not asserted: the forwards, the same on both sides, bound it below the target
    # on a CPU (docs/benchmarks.md, Metrics)
    report(f"road target {ROAD_TARGET} met: {speedup >= ROAD_TARGET}")
