"""The GPU suite in one script: figures for a CUDA machine in a few minutes, as JSON and Markdown.

::

    pip install --no-deps --no-build-isolation -e .   # torch and torchvision already there
    python -m benchmarks.gpu_suite --out gpu-results   # about 3 minutes on one recent GPU

Cases (random-init torchvision models, eval; ``float32`` and ``bfloat16`` autocast):

- Grad-CAM, resnet50 and vit_b_16, batch 64: time over no-grad inference, and images/s;
- Score-CAM, batch 1: time over no-grad inference on ``C`` images (``C`` channels at the layer:
  2048 for resnet50's ``layer4``, 768 for vit_b_16's last ``ln_1``) in chunks of the rows
  ``batch_size="auto"`` picks, and of 64 and 256, the fastest of them the floor;
- Ablation-CAM, batch 1: time over no-grad inference;
- metrics (float32, resnet18, batch 32, Grad-CAM maps at ``layer4``): camkit's batched deletion
  and insertion (10 steps) and ROAD (percentiles 20, 50, 80) against the per-image loops of
  ``benchmarks/metrics_loops.py`` (one forward of one image per step on the same GPU; ROAD's
  imputation one direct sparse solve per image on the CPU, as the paper's reference code), as
  images per second; the ROAD loop runs on the first :data:`ROAD_LOOP_IMAGES` images only (a
  direct solve takes about a second), its images per second taken on those.

Each comparison runs its operations interleaved (the order alternates between rounds), each
call between two ``torch.cuda.synchronize()``; the figure is the median per-round ratio.
``--device cpu --quick`` runs small stand-ins (resnet18 and a two-block ViT at 64x64, batch 2,
2 rounds) on the CPU, which checks the script anywhere. Needs only torch, torchvision and
camkit (no pytest); it avoids newer torch APIs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision  # type: ignore[import-untyped]
from torch import Tensor, nn

import camkit
from camkit.batching import auto_batch_size

Op = Callable[[], object]

#: images the ROAD loop reference runs on (its images per second are taken on them)
ROAD_LOOP_IMAGES = 2


def _model(name: str, device: torch.device, quick: bool) -> tuple[nn.Module, int, str | None]:
    """The model, its input size and the layer (``None``: camkit's adapter chooses)."""
    torch.manual_seed(0)
    if name == "vit_b_16" and quick:
        model: nn.Module = torchvision.models.VisionTransformer(
            image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
        )
        return model.eval().to(device), 64, None
    if name == "vit_b_16":
        return torchvision.models.vit_b_16(weights=None).eval().to(device), 224, None
    model = getattr(torchvision.models, name)(weights=None)
    return model.eval().to(device), 64 if quick else 224, "layer4"


def _input(batch: int, size: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def _interleaved(
    ops: dict[str, Op], rounds: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Per-round seconds of each operation; the order rotates and reverses between rounds."""
    names = list(ops)
    for _ in range(warmup):
        for name in names:
            ops[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in reversed(order) if r % 2 else order:
            sync()
            t0 = time.perf_counter()
            ops[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _figure(times: dict[str, list[float]], subject: str, reference: str) -> dict[str, Any]:
    ratios = [s / r for s, r in zip(times[subject], times[reference], strict=True)]
    q1 = q3 = ratios[0]
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {
        "ratio": round(statistics.median(ratios), 4),
        "q1": round(q1, 4),
        "q3": round(q3, 4),
        "seconds": round(statistics.median(times[subject]), 5),
        "reference_seconds": round(statistics.median(times[reference]), 5),
    }


def _inference(model: nn.Module, x: Tensor) -> Op:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def _chunked_inference(model: nn.Module, images: Tensor, chunk: int) -> Op:
    def run() -> object:
        with torch.no_grad():
            return [model(images[i : i + chunk]) for i in range(0, images.shape[0], chunk)]

    return run


def run_case(
    name: str, precision: str, device: torch.device, quick: bool, rounds: int
) -> list[dict[str, Any]]:
    """Every figure of one model in one precision."""
    model, size, layer = _model(name, device, quick)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if precision == "bfloat16" else None
    autocast: Callable[[], Any] = (
        (lambda: torch.autocast(device_type=device.type, dtype=dtype))
        if dtype is not None
        else contextlib.nullcontext
    )

    def under_autocast(fn: Op) -> Op:
        def run() -> object:
            with autocast():
                return fn()

        return run

    def explain(x: Tensor, method: str) -> Op:
        return under_autocast(
            lambda: camkit.explain(model, x, method=method, layer=layer, target=1).maps
        )

    results = []
    batch = 2 if quick else 64
    x = _input(batch, size, device)
    times = _interleaved(
        {"gradcam": explain(x, "gradcam"), "inference": under_autocast(_inference(model, x))},
        rounds,
        warmup=3,
        sync=sync,
    )
    fig = _figure(times, "gradcam", "inference")
    fig["images_per_second"] = {
        op: round(batch / statistics.median(times[op]), 1) for op in ("gradcam", "inference")
    }
    results.append(
        {"model": name, "precision": precision, "method": "gradcam", "batch": batch, **fig}
    )

    x1 = _input(1, size, device)
    weights = camkit.explain(model, x1, method="gradcam", layer=layer).weights
    assert isinstance(weights, Tensor)
    channels = int(weights.shape[1])
    images = _input(channels, size, device)
    auto = auto_batch_size(images[:1])
    chunks = sorted({auto, 64, 256} if not quick else {auto})
    floors = {
        f"inference_C_chunk{c}": under_autocast(_chunked_inference(model, images, c))
        for c in chunks
    }
    times = _interleaved(
        {"scorecam": explain(x1, "scorecam"), **floors}, max(2, rounds // 2), 1, sync
    )
    best = min(floors, key=lambda n: statistics.median(times[n]))
    fig = _figure(times, "scorecam", best)
    fig["floor"] = best
    results.append(
        {
            "model": name,
            "precision": precision,
            "method": "scorecam",
            "batch": 1,
            "channels": channels,
            **fig,
        }
    )

    times = _interleaved(
        {
            "ablationcam": explain(x1, "ablationcam"),
            "inference": under_autocast(_inference(model, x1)),
        },
        rounds,
        warmup=1,
        sync=sync,
    )
    fig = _figure(times, "ablationcam", "inference")
    results.append(
        {
            "model": name,
            "precision": precision,
            "method": "ablationcam",
            "batch": 1,
            "channels": channels,
            **fig,
        }
    )
    return results


def run_metrics(device: torch.device, quick: bool, rounds: int) -> list[dict[str, Any]]:
    """Deletion, insertion and ROAD batched against per-image loops, as images per second."""
    from benchmarks.metrics_loops import deletion_loop, road_loop

    model, size, layer = _model("resnet18", device, quick)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch = 4 if quick else 32
    x = _input(batch, size, device)
    res = camkit.explain(model, x, method="gradcam", layer=layer)
    cls = res.targets
    assert cls is not None
    steps, percentiles = 10, (20, 50, 80)
    few = min(ROAD_LOOP_IMAGES, batch) if not quick else 1

    def batched(metric: str, **options: Any) -> Op:
        return lambda: camkit.evaluate(model, x, res, metric, **options)

    ops: dict[str, Op] = {
        "deletion": batched("deletion", steps=steps),
        "deletion-loop": lambda: deletion_loop(model, x, res.maps, cls, steps, False),
        "insertion": batched("insertion", steps=steps),
        "insertion-loop": lambda: deletion_loop(model, x, res.maps, cls, steps, True),
        "road": batched("road", percentiles=percentiles),
        "road-loop": lambda: road_loop(model, x[:few], res.maps[:few], cls[:few], percentiles),
    }
    times = _interleaved(ops, 2 if quick else 3, 1, sync)
    results = []
    for subject in ("deletion", "insertion", "road"):
        loop = f"{subject}-loop"
        n_loop = few if subject == "road" else batch
        # per round: the loop's seconds per image over the batched metric's
        speedups = [
            (t_loop / n_loop) / (t / batch)
            for t, t_loop in zip(times[subject], times[loop], strict=True)
        ]
        q1 = q3 = speedups[0]
        if len(speedups) > 1:
            q1, _, q3 = statistics.quantiles(speedups, n=4, method="inclusive")
        results.append(
            {
                "model": "resnet18",
                "precision": "float32",
                "method": f"metric {subject}",
                "batch": batch,
                "ratio": round(statistics.median(speedups), 3),
                "q1": round(q1, 3),
                "q3": round(q3, 3),
                "seconds": round(statistics.median(times[subject]), 5),
                "floor": f"speed-up over a per-image loop on {n_loop} images",
                "images_per_second": {
                    subject: round(batch / statistics.median(times[subject]), 2),
                    loop: round(n_loop / statistics.median(times[loop]), 2),
                },
            }
        )
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    """The figures as a Markdown table."""
    lines = [
        "| model | precision | method | batch | / reference (median) | IQR | s | reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reference = r.get("floor", "no-grad inference")
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['method']} | {r['batch']} | "
            f"**{r['ratio']:.3f}** | {r['q1']:.3f}-{r['q3']:.3f} | {r['seconds']:.4f} | "
            f"{reference} |"
        )
    return "\n".join(lines)


def _environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "camkit": camkit.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}",
        "load": [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["threads"] = torch.get_num_threads()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_suite",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small stand-in models, 2 rounds")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per comparison (default 7; 2 with --quick)"
    )
    parser.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16"])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--no-metrics", action="store_true", help="skip the metric throughput (needs scipy)"
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "CUDA is not available here; pass --device cpu (with --quick) to check the script.",
            file=sys.stderr,
        )
        return 2
    models = (
        ["resnet18" if m == "resnet50" else m for m in args.models] if args.quick else args.models
    )
    rounds = args.rounds or (2 if args.quick else 7)
    precisions = list(args.precisions)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if not torch.cuda.is_bf16_supported():
            precisions = [p for p in precisions if p != "bfloat16"]
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> str:
        """Both files with what is done so far (a run cut short keeps its figures)."""
        env = _environment(device)
        env["seconds"] = round(time.perf_counter() - start, 1)
        (args.out / "gpu_suite.json").write_text(
            json.dumps({"environment": env, "results": results}, indent=1) + "\n"
        )
        table = markdown(results)
        (args.out / "gpu_suite.md").write_text(
            f"{env.get('gpu', env['device'])}, torch {env['torch']}, {env['date']}, "
            f"{env['seconds']} s\n\n{table}\n"
        )
        return table

    for name in models:
        for precision in precisions:
            done = len(results)
            results.extend(run_case(name, precision, device, args.quick, rounds))
            print("\n".join(markdown(results[done:]).splitlines()[2:]), file=sys.stderr, flush=True)
            write()
    if not args.no_metrics:
        done = len(results)
        results.extend(run_metrics(device, args.quick, rounds))
        print("\n".join(markdown(results[done:]).splitlines()[2:]), file=sys.stderr, flush=True)
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
