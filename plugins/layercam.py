"""LayerCAM.

Jiang, Zhang, Hou, Cheng & Wei (2021), "LayerCAM: Exploring Hierarchical Class Activation Maps
for Localization", IEEE TIP. Eq. 5-6: each position's weight is the positive part of its
gradient,

.. math::

    M^c_{ij} = \\mathrm{ReLU}\\Big(\\sum_k
               \\mathrm{ReLU}\\Big(\\frac{\\partial y^c}{\\partial A^k_{ij}}\\Big) A^k_{ij}\\Big)

Several layers (eq. 7 and section III-C) are fused by scaling the maps of the shallower layers
with ``tanh(gamma * M / max M)`` (``gamma = 2``) and taking the element-wise maximum with the
deepest layer's map (min-max normalised, under ``normalize``). The shallow maps are scaled from
their raw values, as the equation says. camkit fuses after upsampling each map to the input size;
the deepest layer is the one that runs last in the forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

import camkit
from camkit.plugin import normalize


class LayerCAM(camkit.Method):
    """LayerCAM element-wise weights ``ReLU(g)``, ``(N, C, *S)``, and its multi-layer fusion."""

    name = "layercam"
    differentiable = True
    aliases = ("layer-cam",)
    citation = (
        "Jiang et al. 2021, LayerCAM: Exploring Hierarchical Class Activation Maps for "
        "Localization (IEEE TIP)"
    )
    needs_gradients = True
    class_discriminative = True
    cost = "1 forward + 1 backward from the earliest layer"
    options = {"gamma": 2.0}

    def check_options(self, options: Mapping[str, Any]) -> None:
        gamma = options["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
            raise camkit.OptionError(f"option 'gamma' expects a positive number, got {gamma!r}.")

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None
        return ctx.gradients.clamp_min(0)

    def fuse(self, maps: Sequence[torch.Tensor], options: Mapping[str, Any]) -> torch.Tensor:
        *shallow, deepest = maps
        fused = normalize(deepest) if options["normalize"] else deepest
        for m in shallow:
            peak = m.flatten(1).amax(dim=1).reshape((-1,) + (1,) * (m.ndim - 1))
            safe = torch.where(peak > 0, peak, torch.ones_like(peak))
            fused = torch.maximum(fused, torch.tanh(options["gamma"] * m / safe))
        return fused


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(LayerCAM())
