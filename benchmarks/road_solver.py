"""ROAD's batched imputation against one scipy direct sparse solve per image, interleaved.

The systems are those of a ROAD call: resnet18 (random init, eval), ``--batch`` random images
224 x 224, Grad-CAM maps at ``layer4``, the most relevant 20, 50 and 80 % of the pixels removed
(``--order lerf``: the least relevant). Each round times, back to back, camkit's batched solve of
the whole batch (every image and channel at once, :func:`camkit_plugins.metrics_road.impute`)
and the reference: per image, one float64 direct sparse solve of the paper's system for its 3
channels (``scipy.sparse.linalg.spsolve``, as Rong et al.'s code; the order of the two alternates
between rounds). Prints per removal level the median per-image times, their ratio (the
reference's time / camkit's) with its range over rounds, and the largest difference of the
filled values. Then what bounds the end-to-end speed-up of ROAD: it runs the model on every
filled image, in both approaches alike, so a forward per image is added to each side::

    python -m benchmarks.road_solver [--batch 8] [--rounds 5] [--threads 2] [--tolerance 1e-3]

Needs scipy (``pip install scipy``); skipped without. Timings are only comparable within one run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import camkit
from benchmarks._lib import LAYER, THREADS, build_model, make_input
from benchmarks.metrics_loops import impute_sparse

road = importlib.import_module("camkit_plugins.metrics_road")

PERCENTILES = (20, 50, 80)


def _seconds(f: Callable[[], object]) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def _masks(maps: torch.Tensor, percent: int, order: str) -> torch.Tensor:
    n, pixels = maps.shape[0], maps[0].numel()
    rank = torch.empty(n, pixels, dtype=torch.long)
    order_idx = maps.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
    rank.scatter_(1, order_idx, torch.arange(pixels).expand(n, -1))
    k = round(percent / 100 * pixels)
    removed = rank < k if order == "morf" else rank >= pixels - k
    return removed.reshape(n, 1, *maps.shape[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--tolerance", type=float, default=road.impute.__defaults__[0])
    parser.add_argument("--order", choices=("morf", "lerf"), default="morf")
    args = parser.parse_args()
    try:
        importlib.import_module("scipy.sparse.linalg")
    except ImportError:
        print("skipped: scipy is not installed (pip install scipy)")
        return
    torch.set_num_threads(args.threads)
    model = build_model("resnet18")
    x = make_input(args.batch)
    maps = camkit.explain(model, x, method="gradcam", layer=LAYER).maps
    images = [x[i].double().numpy() for i in range(args.batch)]
    with torch.no_grad():  # what both sides add per filled image: the model's forward
        model(x)
        fwd_batched = statistics.median(_seconds(lambda: model(x)) for _ in range(3)) / len(x)
        fwd_single = statistics.median(_seconds(lambda: model(x[:1])) for _ in range(3))
    print(
        f"batch {args.batch}, {tuple(x.shape[1:])}, {args.order}, tolerance {args.tolerance:g}, "
        f"{args.threads} threads, {args.rounds} rounds, load average "
        f"{' '.join(f'{a:.1f}' for a in os.getloadavg())}; resnet18 forward "
        f"{fwd_batched * 1e3:.1f} ms/image batched, {fwd_single * 1e3:.1f} ms one at a time"
    )
    print(
        "removed | camkit ms/image | scipy ms/image | scipy / camkit (min-max) | max |diff| | "
        "end-to-end (bound)"
    )
    for percent in PERCENTILES:
        removed = _masks(maps, percent, args.order)
        masks = [removed[i, 0].numpy() for i in range(args.batch)]

        def batched(removed: torch.Tensor = removed) -> torch.Tensor:
            out: torch.Tensor = road.impute(x, removed, tolerance=args.tolerance)
            return out

        def loop(masks: list[np.ndarray] = masks) -> list[np.ndarray]:
            return [impute_sparse(img, m) for img, m in zip(images, masks, strict=True)]

        got, ref = batched(), loop()  # warm-up, and the values compared
        diff = max(float(np.abs(got[i].double().numpy() - ref[i]).max()) for i in range(len(ref)))
        ours, theirs = [], []
        for k in range(args.rounds):
            pair = (batched, loop) if k % 2 == 0 else (loop, batched)
            times = {f: _seconds(f) / args.batch for f in pair}
            ours.append(times[batched])
            theirs.append(times[loop])
        ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
        mine, scipy = statistics.median(ours), statistics.median(theirs)
        # ROAD end to end, per filled image: the imputation plus one forward, batched for
        # camkit, one at a time for the loop; even a free imputation cannot beat the bound
        end_to_end = (scipy + fwd_single) / (mine + fwd_batched)
        bound = (scipy + fwd_single) / fwd_batched
        print(
            f"{percent:>6}% | {mine * 1e3:15.1f} | {scipy * 1e3:14.1f} | "
            f"{statistics.median(ratios):6.1f}x ({min(ratios):.1f}-{max(ratios):.1f}){'':>9} | "
            f"{diff:10.1e} | {end_to_end:.1f}x ({bound:.1f}x)"
        )


if __name__ == "__main__":
    main()
