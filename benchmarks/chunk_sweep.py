"""No-grad inference time per image by chunk size, interleaved, on the CPU.

The measurement behind ``batch_size="auto"`` on the CPU (:mod:`camkit.batching`): the same
images scored in chunks of 1 to 64 rows, every chunk size once per round in a rotating order,
the figure per size the median over rounds of its time divided by the round's fastest size::

    python -m benchmarks.chunk_sweep --models resnet18 resnet50 --images 64 --rounds 3

Prints one JSON object per model: the best size, and each size's median ratio to the round's
best, with the ``uptime`` load averages read before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torchvision  # type: ignore[import-untyped]

from camkit.batching import auto_batch_size


def sweep(model_name: str, images: int, sizes: list[int], rounds: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    size = 299 if model_name.startswith("inception") else 224
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))

    def run(chunk: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, images, chunk):
                model(x[start : start + chunk])
        return time.perf_counter() - t0

    for chunk in sizes[:2]:  # warm-up
        run(chunk)
    per_round: dict[int, list[float]] = {c: [] for c in sizes}
    for r in range(rounds):
        order = sizes[r % len(sizes) :] + sizes[: r % len(sizes)]
        if r % 2:
            order.reverse()
        times = {c: run(c) for c in order}
        best = min(times.values())
        for c, t in times.items():
            per_round[c].append(t / best)
    ratios = {c: round(statistics.median(v), 3) for c, v in per_round.items()}
    return {
        "model": model_name,
        "images": images,
        "input": [3, size, size],
        "best": min(ratios, key=lambda c: ratios[c]),
        "auto": auto_batch_size(x[:1], torch.device("cpu")),
        "ratio_to_round_best": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        load0 = os.getloadavg()
        result = sweep(name, args.images, args.sizes, args.rounds)
        result["threads"] = args.threads
        result["load"] = [round(v, 2) for v in (*load0, *os.getloadavg())]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
