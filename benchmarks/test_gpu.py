"""GPU throughput: images per second of Grad-CAM and of no-grad inference, CUDA.

The required figure: resnet50, batch 64, 224x224, layer ``layer4``, in float32 and under
bfloat16 autocast: Grad-CAM's throughput is at least :data:`TARGET` times inference's. Both
run interleaved in the same rounds after a warm-up, each call between two
``torch.cuda.synchronize()`` so that the time covers the GPU work. Skipped without CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks._lib import (
    LAYER,
    Case,
    Settings,
    build_model,
    camkit_gradcam,
    cases,
    environment,
    inference,
    interleave,
    make_input,
)

TARGET = 0.9
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> Iterator[torch.device]:
    """The CUDA device, with cuDNN autotuning on for the test (both operations alike)."""
    if not torch.cuda.is_available():
        reason = f"CUDA not available: torch {torch.__version__} " + (
            f"built for CUDA {torch.version.cuda} found no device"
            if torch.version.cuda
            else "is a CPU-only build"
        )
        pytest.skip(reason)
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cudnn.benchmark = previous
        torch.cuda.empty_cache()


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("case", cases(batch=64, quick_batch=16))
def test_gpu_throughput(
    benchmark: BenchmarkFixture,
    case: Case,
    precision: str,
    cuda: torch.device,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    dtype = PRECISIONS[precision]
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip(f"bfloat16 not supported on {torch.cuda.get_device_name(cuda)}")
    model = build_model(case.model, cuda)
    x = make_input(case.batch, cuda)

    def autocast() -> contextlib.AbstractContextManager[object]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def run_gradcam() -> None:
        with autocast():
            camkit_gradcam(model, x)

    def run_inference() -> None:
        with autocast():
            inference(model, x)

    benchmark.group = f"gpu {case.id} {precision}"
    comparison = interleave(
        benchmark,
        ("gradcam", run_gradcam),
        [("inference", run_inference)],
        rounds=settings.rounds,
        warmup=max(settings.warmup, 3),  # cuDNN autotuning happens in the first calls
        sync=torch.cuda.synchronize,
        quiet=settings.quiet,
    )
    # throughput ratio = inference time / Grad-CAM time, per round
    ratio = comparison.ratio("inference", "gradcam")
    images = {n: case.batch / comparison.seconds(n).median for n in ("inference", "gradcam")}
    benchmark.extra_info.update(
        case=case.id,
        layer=LAYER,
        precision=precision,
        target_throughput_ratio=TARGET,
        gated=case.required,
        **environment("cuda"),
        **comparison.info("gradcam", "inference"),
        images_per_second={n: round(v, 1) for n, v in images.items()},
        throughput_ratio=ratio.as_dict(),
    )
    report(
        f"images/s: inference {images['inference']:.1f}, gradcam {images['gradcam']:.1f}; "
        f"rounds used {len(comparison.used)}/{comparison.rounds}"
    )
    report(f"throughput gradcam/inference {ratio.text()}  target >= {TARGET}")
    # the gate's figures are costs (lower is better): time, not throughput
    record_ratio("gradcam/inference", comparison.ratio("gradcam", "inference"), comparison)
    if case.required and not benchmark.disabled:
        assert ratio.median >= TARGET, (
            f"Grad-CAM on {case.id} ({precision}) reaches {ratio.median:.3f}x the throughput "
            f"of no-grad inference ({images['gradcam']:.1f} vs {images['inference']:.1f} "
            f"images/s); the target is >= {TARGET}x"
        )
