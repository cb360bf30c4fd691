"""Peak memory growth of Grad-CAM over no-grad inference, CPU, each case in a fresh process.

The required figure: resnet50, batch 32, layer ``layer4``: the peak RSS growth of
``camkit.explain(..., method="gradcam")`` is at most :data:`TARGET` times that of the no-grad
forward. Each measurement is one fresh ``python -m benchmarks.memory_probe`` process (see its
docstring for the method); the operations alternate across ``--bench-repeats`` repeats and the
figure is the median of the per-repeat ratios. Measured the same way, reported, not gated:
the hand-written Grad-CAM (whole graph + ``autograd.grad``) and ``camkit.explain`` with the
default ``layer=None``.

The benchmark's timing is the wall time of one Grad-CAM probe process (start-up, model,
warm-up and the measured call): a by-product; the figures are in ``extra_info``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks._lib import (
    OPERATIONS,
    THREADS,
    Case,
    Settings,
    Spread,
    cases,
    environment,
    interleave,
)

TARGET = 1.1
ROOT = Path(__file__).resolve().parents[1]


def probe(case: Case, op: str) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.memory_probe"]
    command += ["--model", case.model, "--batch", str(case.batch), "--op", op]
    command += ["--threads", str(THREADS)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"memory probe {op} failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        pytest.fail(f"memory probe {op}: {result['error']}")
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {op} failed ({done.returncode}):\n{done.stderr}")
    return result


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM, clear_refs)"
)
@pytest.mark.parametrize("case", cases(batch=32, quick_batch=4))
def test_gradcam_peak_memory(
    benchmark: BenchmarkFixture,
    case: Case,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    results: dict[str, list[dict[str, Any]]] = {op: [] for op in OPERATIONS}

    def run(op: str) -> Callable[[], None]:
        return lambda: results[op].append(probe(case, op))

    benchmark.group = f"memory {case.id}"
    interleave(
        benchmark,
        ("gradcam", run("gradcam")),
        [(op, run(op)) for op in OPERATIONS if op != "gradcam"],
        rounds=settings.repeats,
        warmup=0,
        quiet=0,  # peak memory does not depend on other processes
    )
    repeats = min(len(r) for r in results.values())
    growth = {op: [r["growth_kib"] / 1024 for r in rs[:repeats]] for op, rs in results.items()}
    ratio = Spread.of([g / i for g, i in zip(growth["gradcam"], growth["inference"], strict=True)])
    others = {
        op: Spread.of([g / i for g, i in zip(growth[op], growth["inference"], strict=True)])
        for op in OPERATIONS
        if op not in ("gradcam", "inference")
    }
    benchmark.extra_info.update(
        case=case.id,
        layer="layer4",
        target_ratio=TARGET,
        gated=case.required,
        **environment(),
        repeats=repeats,
        growth_mib={op: Spread.of(g).as_dict(1) for op, g in growth.items()},
        ratio={
            "gradcam/inference": ratio.as_dict(),
            **{f"{op}/inference": r.as_dict() for op, r in others.items()},
        },
        probes=results,
    )
    report(
        "peak RSS growth MiB (median of "
        + f"{repeats}): "
        + ", ".join(f"{op} {Spread.of(g).median:.1f}" for op, g in growth.items())
    )
    report(f"gradcam/inference {ratio.text()}  target <= {TARGET}")
    record_ratio("peak-memory gradcam/inference", ratio)
    for op, r in others.items():
        report(f"{op}/inference {r.text()}")
    if case.required and not benchmark.disabled:
        assert ratio.median <= TARGET, (
            f"Grad-CAM's peak RSS growth on {case.id} is {ratio.median:.3f}x inference's "
            f"({Spread.of(growth['gradcam']).median:.1f} MiB vs "
            f"{Spread.of(growth['inference']).median:.1f} MiB); the target is <= {TARGET}x"
        )
