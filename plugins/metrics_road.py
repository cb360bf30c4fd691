"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML).

For each percentile ``p`` the ``p`` % most relevant pixels (MoRF) or least relevant pixels (LeRF)
of the map are removed and filled by **noisy linear imputation**: every removed pixel takes the
weighted mean of its 8 neighbours inside the image (weights 1/6 for the 4 direct neighbours,
1/12 for the diagonals), removed neighbours included, which is one sparse linear system per
image and channel; Gaussian noise of standard deviation ``noise`` is then added to the filled
pixels. The filled image carries no information about where the pixels were removed, which is
what makes the test fair.

The reference code solves the system with one direct sparse solve per image and percentile on
the CPU. Here every image, channel and percentile of a chunk is solved at once on the model's
device by conjugate gradients (the system is symmetric positive definite), started from a
coarse-to-fine fill and run until the largest relative residual is below ``tolerance``. The
tests compare it with a float64 direct solve of the paper's system: within 1e-5 of the image's
value range at the default tolerance.

The score is the explained class's softmax probability of the filled image (the paper reports
the accuracy over a dataset, the mean of a correct/incorrect indicator per image; a probability
per image keeps one value per sample and the same ordering of methods). ``road-morf``: mean over
the percentiles, lower is better; ``road-lerf``: higher is better; ``road``: the mean of
``(LeRF - MoRF) / 2`` over the percentiles, higher is better (a single figure combining both
orders, as pytorch-grad-cam's ROADCombined reports; not in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import camkit
from camkit import plugin

#: The paper's neighbour weights: direct neighbours 1/6, diagonal ones 1/12 (centre unused).
WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def _neighbours(v: Tensor, kernel: Tensor) -> Tensor:
    """``sum_j w_j v_j`` over the 8 neighbours inside the image, for ``v`` ``(B, 1, H, W)``."""
    return F.conv2d(v, kernel, padding=1)


def _coarse_fill(x: Tensor, known: Tensor) -> Tensor:
    """A first guess for the removed pixels: known values averaged over ever coarser grids, the
    finest grid that has a known pixel nearby filling each removed pixel. ``x`` and ``known``
    ``(B, 1, H, W)``; returns ``(B, 1, H, W)``."""
    if min(x.shape[-2:]) < 2 or bool(known.all()):
        mean = (x * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp(min=1)
        return torch.where(known, x, mean.expand_as(x))
    weight = known.to(x.dtype)
    total = F.avg_pool2d(x * weight, 2, ceil_mode=True)
    count = F.avg_pool2d(weight, 2, ceil_mode=True)
    coarse = total / count.clamp(min=1e-12)
    coarse = _coarse_fill(coarse, count > 0)
    up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    return torch.where(known, x, up[..., : x.shape[-2], : x.shape[-1]])


def impute(x: Tensor, removed: Tensor, tolerance: float = 1e-6, max_iter: int = 2000) -> Tensor:
    """Linear imputation of ``removed`` pixels, without noise, batched.

    Args:
        x: ``(B, C, H, W)`` images.
        removed: ``(B, 1, H, W)`` bool, the pixels to fill (the same for every channel). Each
            image needs at least one kept pixel.
        tolerance: the largest ``||r|| / ||b||`` accepted, per image and channel.
        max_iter: conjugate-gradient iterations at most.

    Returns:
        ``(B, C, H, W)``: ``x`` with each removed pixel the weighted mean of its neighbours.
    """
    b, c, h, w = x.shape
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    kernel = torch.tensor(WEIGHTS, dtype=dtype, device=x.device).reshape(1, 1, 3, 3)
    u = removed.expand(b, c, h, w).reshape(b * c, 1, h, w)
    img = x.to(dtype).reshape(b * c, 1, h, w)
    uf = u.to(dtype)
    total_weight = _neighbours(torch.ones(1, 1, h, w, dtype=dtype, device=x.device), kernel)

    def apply(v: Tensor) -> Tensor:  # A v on the removed pixels, v zero elsewhere
        return uf * (total_weight * v - _neighbours(v, kernel))

    rhs = uf * _neighbours(img * (1 - uf), kernel)
    guess = uf * _coarse_fill(img, ~u)
    r = rhs - apply(guess)
    p = r.clone()
    rr = r.square().sum((1, 2, 3))
    target = (tolerance * rhs.square().sum((1, 2, 3)).sqrt()).square().clamp(min=1e-30)
    v = guess
    for _ in range(max_iter):
        if bool((rr <= target).all()):
            break
        ap = apply(p)
        alpha = rr / (p * ap).sum((1, 2, 3)).clamp(min=1e-30)
        alpha = torch.where(rr <= target, torch.zeros_like(alpha), alpha)
        v = v + alpha[:, None, None, None] * p
        r = r - alpha[:, None, None, None] * ap
        rr_new = r.square().sum((1, 2, 3))
        beta = rr_new / rr.clamp(min=1e-30)
        p = r + beta[:, None, None, None] * p
        rr = rr_new
    filled = torch.where(u, v, img)
    return filled.reshape(b, c, h, w).to(x.dtype)


class _Road(plugin.Metric):
    orders: tuple[str, ...] = ()
    citation = (
        "Rong et al. 2022, A Consistent and Efficient Evaluation Strategy for Attribution "
        "Methods (ICML)"
    )
    options = {
        "percentiles": (10, 20, 30, 40, 50, 60, 70, 80, 90),
        "noise": 0.01,
        "tolerance": 1e-6,
        "max_iter": 2000,
    }

    def check_options(self, options: Mapping[str, Any]) -> None:
        pct = options["percentiles"]
        ok = isinstance(pct, Sequence) and len(pct) > 0
        ok = ok and all(not isinstance(p, bool) and isinstance(p, (int, float)) for p in pct)
        if not ok or not all(0 < p < 100 for p in pct):
            raise camkit.OptionError(
                "option 'percentiles' expects a non-empty list of numbers in (0, 100); got "
                f"{pct!r}."
            )
        plugin.check_number(options, "noise", minimum=0)
        plugin.check_number(options, "tolerance", minimum=0, exclusive=True)
        plugin.check_int(options, "max_iter", minimum=1)

    def curves(self, ctx: plugin.MetricContext) -> dict[str, Tensor]:
        """``order -> (N, len(percentiles))`` scores of the filled images."""
        x = ctx.inputs[0]
        if x.ndim != 4:
            raise camkit.InputError(f"ROAD expects images (N, C, H, W); got {tuple(x.shape)}.")
        n, pixels = x.shape[0], ctx.maps[0].numel()
        order = ctx.maps.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(pixels, device=x.device).expand(n, -1))
        counts = torch.tensor(
            [round(p / 100 * pixels) for p in ctx.options["percentiles"]], device=x.device
        )
        k = len(counts)
        morf = torch.tensor([o == "morf" for o in self.orders], device=x.device)
        jobs = [(o, s) for o in self.orders for s in range(n)]  # rows: order, sample, percentile
        rows = len(jobs) * k
        size, out = ctx.options["batch_size"], []
        with plugin.progress_bar(rows, self.name, ctx.options) as bar:
            for start in range(0, rows, size):
                row = torch.arange(start, min(start + size, rows), device=x.device)
                job, pct = row // k, row % k
                sample = job % n
                is_morf = morf[job // n][:, None]
                r, c = rank[sample], counts[pct][:, None]
                removed = torch.where(is_morf, r < c, r >= pixels - c)
                removed = removed.reshape(-1, 1, *x.shape[2:])
                filled = impute(
                    x[sample], removed, ctx.options["tolerance"], ctx.options["max_iter"]
                )
                noise = torch.randn(
                    filled.shape, generator=ctx.generator, device=x.device, dtype=filled.dtype
                )
                filled = torch.where(removed, filled + ctx.options["noise"] * noise, filled)
                inputs = (filled, *(t[sample] for t in ctx.inputs[1:]))
                out.append(ctx.score(inputs, sample))
                bar.update(len(row))
        scores = torch.cat(out).reshape(len(self.orders), n, k)
        return dict(zip(self.orders, scores, strict=True))


class RoadMorf(_Road):
    """Mean probability over the percentiles with the most relevant pixels removed and filled;
    lower is better."""

    name = "road-morf"
    higher_is_better = False
    orders = ("morf",)
    cost = "one forward and one batched imputation per percentile (9 by default)"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        return self.curves(ctx)["morf"].mean(dim=1)


class RoadLerf(_Road):
    """Mean probability over the percentiles with the least relevant pixels removed and filled;
    higher is better."""

    name = "road-lerf"
    higher_is_better = True
    orders = ("lerf",)
    cost = "one forward and one batched imputation per percentile (9 by default)"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        return self.curves(ctx)["lerf"].mean(dim=1)


class Road(_Road):
    """Mean over the percentiles of ``(LeRF - MoRF) / 2``; higher is better."""

    name = "road"
    aliases = ("road-combined",)
    higher_is_better = True
    orders = ("morf", "lerf")
    cost = "two forwards and two batched imputations per percentile (18 by default)"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        c = self.curves(ctx)
        return ((c["lerf"] - c["morf"]) / 2).mean(dim=1)


@camkit.hookimpl
def register_metrics(register: plugin.RegisterMetric) -> None:
    for metric in (Road(), RoadMorf(), RoadLerf()):
        register(metric)
