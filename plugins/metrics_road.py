"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML).

For each percentile ``p`` the ``p`` % most relevant pixels (MoRF) or least relevant pixels (LeRF)
of the map are removed and filled by **noisy linear imputation**: every removed pixel takes the
weighted mean of its 8 neighbours inside the image (weights 1/6 for the 4 direct neighbours,
1/12 for the diagonals), removed neighbours included, which is one sparse linear system per
image and channel; Gaussian noise of standard deviation ``noise`` is then added to the filled
pixels (one noise image per order and percentile, drawn from the call's seed and shared by
the samples, so that a sample's value does not depend on the batch it is in). The filled image
carries no information about where the pixels were removed, which is
what makes the test fair.

The reference code solves the system with one direct sparse solve per image and percentile on
the CPU. Here every image, channel and percentile of a chunk is solved at once on the model's
device by conjugate gradients (the system is symmetric positive definite) preconditioned by a
multigrid V-cycle, run until each relative residual is below ``tolerance``, stalls at float32's
round-off, or ``max_iter`` is reached. The tests compare it with a float64 direct solve of the
paper's system: within 1e-5 of the image's value range on small images; on 224 x 224 ResNet-18
inputs the ROAD values agreed with a scipy direct solve per image within 1e-5. Large removed
regions converge slowly (hundreds of iterations at 224 x 224): on a CPU the batched solve is not
faster than one sparse direct solve per image (see the benchmarks page).

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


def _neighbours(v: Tensor) -> Tensor:
    """``sum_j w_j v_j`` over the 8 neighbours inside the image (:data:`WEIGHTS`), for ``v``
    ``(B, 1, H, W)``: shifted sums, cheaper than a convolution of one channel."""
    p = F.pad(v, (1, 1, 1, 1))
    direct = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]
    diagonal = p[..., :-2, :-2] + p[..., :-2, 2:] + p[..., 2:, :-2] + p[..., 2:, 2:]
    return direct * (1 / 6) + diagonal * (1 / 12)


def _operator(u: Tensor) -> tuple[Tensor, Tensor]:
    """For removed pixels ``u`` ``(B, 1, H, W)`` float: the diagonal of ``A`` (the summed
    weights of the neighbours inside the image) and ``u`` itself."""
    ones = torch.ones(1, 1, *u.shape[-2:], dtype=u.dtype, device=u.device)
    return _neighbours(ones), u


def _apply(v: Tensor, u: Tensor, diagonal: Tensor) -> Tensor:
    """``A v`` on the removed pixels (``v`` zero elsewhere): ``sum_j w_j (v_i - v_j)``."""
    return u * (diagonal * v - _neighbours(v))


def _v_cycle(r: Tensor, u: Tensor, sweeps: int = 2) -> Tensor:
    """An approximate ``A^-1 r`` by one multigrid V-cycle: damped Jacobi sweeps, the residual
    averaged onto a grid half as fine (a coarse cell is removed when any of its pixels is), the
    coarse correction there, bilinear back, Jacobi sweeps again. On the coarse grid
    ``A`` is 4 times the fine one for smooth errors (the stencil spans twice the distance),
    hence the factor 4 on the coarse right-hand side."""
    diagonal, _ = _operator(u)
    step = 0.8 * u / diagonal
    z = step * r
    for _ in range(sweeps - 1):
        z = z + step * (r - _apply(z, u, diagonal))
    if min(r.shape[-2:]) >= 4:
        residual = r - _apply(z, u, diagonal)
        coarse_u = F.max_pool2d(u, 2, ceil_mode=True)
        coarse_r = 4 * F.avg_pool2d(residual, 2, ceil_mode=True) * coarse_u
        e = _v_cycle(coarse_r, coarse_u, sweeps)
        e = F.interpolate(e, scale_factor=2, mode="bilinear")[..., : r.shape[-2], : r.shape[-1]]
        z = z + u * e
    for _ in range(sweeps):
        z = z + step * (r - _apply(z, u, diagonal))
    return z


def _solve(img: Tensor, u: Tensor, tolerance: float, max_iter: int) -> Tensor:
    """Conjugate gradients preconditioned by a multigrid V-cycle (flexible form) on ``A v = b``
    for the removed pixels ``u`` of every ``(1, H, W)`` system of ``img`` ``(B, 1, H, W)`` at
    once; returns the filled images."""
    uf = u.to(img.dtype)
    diagonal, _ = _operator(uf)
    rhs = uf * _neighbours(img * (1 - uf))
    v = torch.zeros_like(img)
    r = rhs.clone()
    z = _v_cycle(r, uf)
    p = z.clone()
    rz = (r * z).sum((1, 2, 3))
    target = tolerance**2 * rhs.square().sum((1, 2, 3))
    best = r.square().sum((1, 2, 3))
    stale = torch.zeros_like(best, dtype=torch.long)
    for _ in range(max_iter):
        rr = r.square().sum((1, 2, 3))
        better = rr < 0.99 * best
        best = torch.where(better, rr, best)
        stale = torch.where(better, 0, stale + 1)
        # done: converged, or stalled for 5 iterations (the floor of the dtype's round-off)
        done = (rr <= target) | (stale >= 5)
        if bool(done.all()):
            break
        ap = _apply(p, uf, diagonal)
        alpha = rz / (p * ap).sum((1, 2, 3)).clamp(min=1e-30)
        alpha = torch.where(done, torch.zeros_like(alpha), alpha)[:, None, None, None]
        v = v + alpha * p
        r_new = r - alpha * ap
        z_new = _v_cycle(r_new, uf)
        beta = (r_new * (z_new - z)).sum((1, 2, 3)) / rz.clamp(min=1e-30)
        rz = (r_new * z_new).sum((1, 2, 3))
        p = z_new + beta[:, None, None, None] * p
        r, z = r_new, z_new
    return torch.where(u, v, img)


def impute(x: Tensor, removed: Tensor, tolerance: float = 1e-6, max_iter: int = 500) -> Tensor:
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
    u = removed.expand(b, c, h, w).reshape(b * c, 1, h, w)
    filled = _solve(x.to(dtype).reshape(b * c, 1, h, w), u, tolerance, max_iter)
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
        "max_iter": 500,
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
        # one noise image per order and percentile, the same for every sample: a sample's value
        # does not depend on the batch it is in
        shape = (len(self.orders) * k, *x.shape[1:])
        noise = torch.randn(shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
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
                slot = (job // n) * k + pct  # the row's order and percentile
                filled = torch.where(removed, filled + ctx.options["noise"] * noise[slot], filled)
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
