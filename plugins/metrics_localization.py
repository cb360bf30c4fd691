"""Localisation metrics: does the map point at the object? They need ground-truth masks
(``masks_from_boxes`` turns boxes into masks).

- ``pointing-game`` (Zhang et al. 2018, "Top-down neural attention by excitation backprop",
  IJCV): a hit when the map's maximum lies within ``tolerance`` pixels of the object.
- ``energy-pointing-game`` (Wang et al. 2020, Score-CAM, sec. 4.3): the share of the map's sum
  that lies on the object.
- ``class-discrimination``: camkit's own (its demo uses it), for inputs holding two objects of
  different classes: whether the maximum falls on the explained class's object rather than the
  other one.

A map's maximum is its first maximal pixel in row-major order; a constant map has none and
counts as a miss (pointing game) or is left out (class discrimination).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import camkit
from camkit import plugin


def grown(masks: Tensor, tolerance: int) -> Tensor:
    """Masks ``(N, K, H, W)`` grown by a disc of radius ``tolerance`` pixels (Euclidean)."""
    if tolerance == 0:
        return masks
    if masks.ndim != 4:
        raise camkit.InputError(
            f"a tolerance in pixels expects 2-d masks (N, K, H, W); got {tuple(masks.shape)}."
        )
    n, k, h, w = masks.shape
    t = torch.arange(-tolerance, tolerance + 1, device=masks.device, dtype=torch.float32)
    disc = ((t[:, None] ** 2 + t[None, :] ** 2) <= tolerance**2).float()
    out = F.conv2d(masks.reshape(n * k, 1, h, w).float(), disc[None, None], padding=tolerance)
    return (out > 0).reshape(n, k, h, w)


def _on(masks: Tensor, peak: Tensor) -> Tensor:
    """``(N,)`` bool: whether each peak (flat index, ``-1`` for none) falls on its mask
    ``(N, *S)``."""
    flat = masks.reshape(masks.shape[0], -1)
    hit = flat.gather(1, peak.clamp(min=0)[:, None])[:, 0]
    return hit & (peak >= 0)


class _Tolerant(plugin.Metric):
    cost = "no forward"

    def check_options(self, options: Mapping[str, Any]) -> None:
        plugin.check_int(options, "tolerance", minimum=0)


class PointingGame(_Tolerant):
    """1 when the map's maximum lies on the object's mask grown by ``tolerance`` pixels (15 in
    the paper), else 0; a constant map scores 0. Chance level: the share of the image the grown
    mask covers."""

    name = "pointing-game"
    citation = "Zhang et al. 2018, Top-down neural attention by excitation backprop (IJCV)"
    higher_is_better = True
    needs = ("masks",)
    options = {"tolerance": 15}

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        assert ctx.masks is not None
        masks = grown(ctx.masks[:, :1], ctx.options["tolerance"])[:, 0]
        return _on(masks, plugin.peaks(ctx.maps)).float()


class EnergyPointingGame(plugin.Metric):
    """``sum(map * mask) / sum(map)``: the share of the map's energy on the object (the union of
    region 0). ``NaN`` for an all-zero map. Maps are expected non-negative (ReLU on)."""

    name = "energy-pointing-game"
    citation = "Wang et al. 2020, Score-CAM (CVPR workshops), sec. 4.3"
    higher_is_better = True
    needs = ("masks",)
    cost = "no forward"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        assert ctx.masks is not None
        maps = ctx.maps.flatten(1).double()
        inside = (maps * ctx.masks[:, 0].flatten(1)).sum(1)
        total = maps.sum(1)
        share = inside / torch.where(total != 0, total, torch.ones_like(total))
        return torch.where(total != 0, share, torch.full_like(share, float("nan")))


class ClassDiscrimination(_Tolerant):
    """For an input holding the explained class's object (region 0) and objects of other classes
    (regions 1 and up): 1 when the map's maximum falls on the explained object, 0 when it falls
    on another object only, ``NaN`` (left out) when it falls on none or the map is constant. The
    mean is the share of maps on the right object among those on any object; chance level 0.5
    for two objects (a map that ignores the class is right for one class, wrong for the other).
    camkit's own metric, used by its demo."""

    name = "class-discrimination"
    citation = "camkit: the explained object against the others, on two-object inputs"
    higher_is_better = True
    needs = ("masks", "other-objects")
    options = {"tolerance": 0}

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        assert ctx.masks is not None  # K >= 2, checked by evaluate
        masks = grown(ctx.masks, ctx.options["tolerance"])
        peak = plugin.peaks(ctx.maps)
        own = _on(masks[:, 0], peak)
        other = _on(masks[:, 1:].any(dim=1), peak)
        value = own.float()
        return torch.where(own | other, value, torch.full_like(value, float("nan")))


@camkit.hookimpl
def register_metrics(register: plugin.RegisterMetric) -> None:
    for metric in (PointingGame(), EnergyPointingGame(), ClassDiscrimination()):
        register(metric)
