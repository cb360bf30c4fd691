"""Sanity checks: metrics that explain again, under changed weights or inputs.

- ``model-randomization`` (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", NeurIPS,
  sec. 3.1, cascading randomisation): the parameterised modules are re-initialised from the
  top (the last registered first) on a deep copy of the model, and the maps of the copy are
  compared with the original ones. The model itself is never modified. A map that does not
  change when the weights that produce the output are random does not explain the model.
- ``max-sensitivity`` (Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations",
  NeurIPS, eq. 4): the largest change of the map under small uniform input perturbations,
  Monte Carlo with the call's seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import camkit
from camkit import plugin


def parameterised(model: nn.Module) -> list[nn.Module]:
    """Modules holding parameters of their own, in registration order (for most models the
    order of the forward)."""
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def randomise(module: nn.Module) -> None:
    """Re-initialise ``module``'s own parameters from the global generator: its
    ``reset_parameters`` when it has one, else a normal draw of each parameter's mean and
    standard deviation."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            std = float(p.float().std()) if p.numel() > 1 else 1.0
            p.normal_(float(p.float().mean()), std or 1.0)


class ModelRandomization(plugin.Metric):
    """Similarity of each map with the map after the top ``layers`` parameterised modules are
    randomised (``None``: all of them): Spearman's rank correlation or SSIM (``measure``).
    Lower is better: the map depends on what the model learned.

    A randomised map that is constant has no ranks to agree with: its Spearman similarity is 0.
    ``NaN`` where the original map is constant. Cascading step by step (``layers=1, 2, ...``)
    gives the paper's curves.
    """

    name = "model-randomization"
    citation = "Adebayo et al. 2018, Sanity Checks for Saliency Maps (NeurIPS)"
    higher_is_better = False
    needs = ("method",)
    cost = "one explain call on a randomised copy of the model"
    options = {"layers": None, "measure": "spearman"}

    def check_options(self, options: Mapping[str, Any]) -> None:
        if options["layers"] is not None:
            plugin.check_int(options, "layers", minimum=1)
        plugin.check_choice(options, "measure", ("spearman", "ssim"))

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        assert ctx.explain is not None
        copied = copy.deepcopy(ctx.model)
        modules = parameterised(copied)
        if not modules:
            raise camkit.ModelError("model-randomization found no module with parameters.")
        top = modules[::-1][: ctx.options["layers"] or len(modules)]
        device = ctx.inputs[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(ctx.options["seed"])
            for module in top:
                randomise(module)
        randomised = ctx.explain(copied, ctx.inputs)
        if ctx.options["measure"] == "ssim":
            if ctx.maps.ndim != 3:
                raise camkit.InputError(
                    f"measure='ssim' expects 2-d maps (N, H, W); got {tuple(ctx.maps.shape)}."
                )
            return plugin.ssim(ctx.maps, randomised).float()
        similarity = plugin.spearman(ctx.maps, randomised)
        original, changed = ctx.maps.flatten(1), randomised.flatten(1)
        informative = original.amax(1) > original.amin(1)
        flat = changed.amax(1) <= changed.amin(1)
        return torch.where(informative & flat, 0.0, similarity).float()


class MaxSensitivity(plugin.Metric):
    """``max_k ||map(x + d_k) - map(x)|| / ||map(x)||`` over ``n_samples`` perturbations ``d_k``
    drawn uniformly from ``[-radius, radius]`` per input element, each draw shared by the
    samples of the call so that a sample's value does not depend on its batch (Frobenius norms,
    the target kept). Lower is better. ``NaN`` for an all-zero map."""

    name = "max-sensitivity"
    citation = "Yeh et al. 2019, On the (In)fidelity and Sensitivity of Explanations (NeurIPS)"
    higher_is_better = False
    needs = ("method",)
    cost = "n_samples explain calls (10 by default)"
    options = {"radius": 0.02, "n_samples": 10}

    def check_options(self, options: Mapping[str, Any]) -> None:
        plugin.check_number(options, "radius", minimum=0)
        plugin.check_int(options, "n_samples", minimum=1)

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        assert ctx.explain is not None
        x = ctx.inputs[0]
        norm = ctx.maps.flatten(1).norm(dim=1)
        worst = torch.zeros_like(norm)
        radius = ctx.options["radius"]
        for _ in range(ctx.options["n_samples"]):
            # one perturbation per draw, shared by the samples (batch-independent values)
            shape = (1, *x.shape[1:])
            d = torch.rand(shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
            noisy = (x + (2 * d - 1) * radius, *ctx.inputs[1:])
            change = (ctx.explain(ctx.model, noisy) - ctx.maps).flatten(1).norm(dim=1)
            worst = torch.maximum(worst, change)
        return torch.where(norm > 0, worst / norm.clamp(min=1e-30), math.nan)


@camkit.hookimpl
def register_metrics(register: plugin.RegisterMetric) -> None:
    for metric in (ModelRandomization(), MaxSensitivity()):
        register(metric)
