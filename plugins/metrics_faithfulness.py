"""Faithfulness metrics: does the model's confidence follow the map?

- ``average-drop`` and ``increase-in-confidence`` (Chattopadhay et al. 2018, Grad-CAM++, sec. 5):
  the image multiplied by its map, ``x * map``, scored against ``x``.
- ``deletion`` and ``insertion`` (Petsiuk et al. 2018, RISE, sec. 4.1): pixels removed (or
  inserted) most relevant first; the area under the score curve.

Every score is the explained class's softmax probability. The inputs are the caller's (already
normalised) tensors, so "removed" means set to the baseline in that space: zeros are the mean
image of a dataset normalised to zero mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import camkit
from camkit import plugin


def _with_first(ctx: plugin.MetricContext, first: Tensor, index: Tensor) -> tuple[Tensor, ...]:
    """The inputs of rows ``index`` with the first tensor replaced by ``first``."""
    return (first, *(t[index] for t in ctx.inputs[1:]))


class AverageDrop(plugin.Metric):
    """``max(0, Y - O) / Y`` per sample, with ``Y`` the class's probability on ``x`` and ``O`` on
    ``x * map``; the paper's Average Drop % is 100 times the mean. ``NaN`` where ``Y`` is 0."""

    name = "average-drop"
    citation = "Chattopadhay et al. 2018, Grad-CAM++ (WACV), eq. 19"
    higher_is_better = False
    cost = "1 forward"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        x = ctx.inputs[0]
        index = torch.arange(x.shape[0], device=x.device)
        masked = ctx.score(_with_first(ctx, x * ctx.maps[:, None].to(x.dtype), index), index)
        y = ctx.scores
        drop = (y - masked).clamp(min=0) / y
        return torch.where(y > 0, drop, torch.full_like(drop, math.nan))


class IncreaseInConfidence(plugin.Metric):
    """1 where the class's probability on ``x * map`` exceeds that on ``x``, else 0; the paper's
    Increase in Confidence % is 100 times the mean."""

    name = "increase-in-confidence"
    citation = "Chattopadhay et al. 2018, Grad-CAM++ (WACV), eq. 20"
    higher_is_better = True
    cost = "1 forward"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        x = ctx.inputs[0]
        index = torch.arange(x.shape[0], device=x.device)
        masked = ctx.score(_with_first(ctx, x * ctx.maps[:, None].to(x.dtype), index), index)
        return (masked > ctx.scores).float()


def baseline(x: Tensor, kind: str) -> Tensor:
    """What removed pixels become, ``(N, C, *S)``: ``zeros``, ``blur`` (a Gaussian of sigma 5 in
    a window of 11, RISE's insertion start) or ``mean`` (each image's per-channel mean)."""
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
    if x.ndim != 4:
        raise camkit.InputError(
            f"baseline 'blur' expects images (N, C, H, W); got {tuple(x.shape)}. Use 'zeros' or "
            "'mean'."
        )
    return plugin.gaussian_blur(x, 11, 5.0)


class _Curve(plugin.Metric):
    insert: bool = False
    cost = "steps + 1 forwards (51 by default)"

    def check_options(self, options: Mapping[str, Any]) -> None:
        plugin.check_int(options, "steps", minimum=1)
        plugin.check_choice(options, "baseline", ("zeros", "blur", "mean"))
        if options["pixels_per_step"] is not None:
            plugin.check_int(options, "pixels_per_step", minimum=1)

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        x = ctx.inputs[0]
        n, pixels = x.shape[0], ctx.maps[0].numel()
        every = ctx.options["pixels_per_step"]
        if every is None:
            steps = ctx.options["steps"]
            counts = [round(k * pixels / steps) for k in range(steps + 1)]
        else:
            counts = [min(k * every, pixels) for k in range(math.ceil(pixels / every) + 1)]
        counts_t = torch.tensor(counts, device=x.device)
        points = len(counts)
        base = baseline(x, ctx.options["baseline"])
        # rank of each pixel in the map's order, most relevant first (ties: lower index first)
        order = ctx.maps.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(pixels, device=x.device).expand(n, -1))
        rows = n * points
        size = ctx.options["batch_size"]
        scores = []
        with plugin.progress_bar(rows, self.name, ctx.options) as bar:
            for start in range(0, rows, size):
                row = torch.arange(start, min(start + size, rows), device=x.device)
                sample, step = row // points, row % points
                done = (rank[sample] < counts_t[step][:, None]).reshape(-1, 1, *x.shape[2:])
                kept, gone = (base, x) if self.insert else (x, base)
                first = torch.where(done, gone[sample], kept[sample])
                scores.append(ctx.score(_with_first(ctx, first, sample), sample))
                bar.update(len(row))
        curve = torch.cat(scores).reshape(n, points)
        widths = (counts_t[1:] - counts_t[:-1]).to(curve.dtype) / pixels
        return ((curve[:, 1:] + curve[:, :-1]) / 2 * widths).sum(dim=1)


class Deletion(_Curve):
    """The area under the class's probability as pixels are set to the baseline, most relevant
    first, in ``steps`` equal steps (or ``pixels_per_step`` pixels at a time), by the trapezoid
    rule over the removed fraction in [0, 1]. Lower is better: a faithful map names the pixels
    whose loss destroys the score first."""

    name = "deletion"
    citation = "Petsiuk et al. 2018, RISE: Randomized Input Sampling for Explanation (BMVC)"
    higher_is_better = False
    options = {"steps": 50, "baseline": "zeros", "pixels_per_step": None}


class Insertion(_Curve):
    """The area under the class's probability as pixels of the image replace the baseline (a
    blurred copy by default), most relevant first. Higher is better."""

    name = "insertion"
    citation = "Petsiuk et al. 2018, RISE: Randomized Input Sampling for Explanation (BMVC)"
    higher_is_better = True
    insert = True
    options = {"steps": 50, "baseline": "blur", "pixels_per_step": None}


@camkit.hookimpl
def register_metrics(register: plugin.RegisterMetric) -> None:
    for metric in (AverageDrop(), IncreaseInConfidence(), Deletion(), Insertion()):
        register(metric)
