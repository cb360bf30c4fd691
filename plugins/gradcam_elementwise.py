"""Element-wise Grad-CAM.

The gradient times the activation, ReLU applied element-wise before the channel sum:

.. math:: L^c = \\sum_k \\mathrm{ReLU}\\Big(\\frac{\\partial y^c}{\\partial A^k} \\odot A^k\\Big)

A variant of HiResCAM (Draelos & Carin 2020) in which negative contributions cannot cancel
positive ones at a position, as offered by other CAM libraries. The weights are the gradients,
``(N, C, *S)``; the combination step is overridden.
"""

from __future__ import annotations

import torch

import camkit
from camkit.plugin import principal_component


class GradCAMElementwise(camkit.Method):
    """Element-wise weights (the gradients) and the sum of ``ReLU(g * A)`` over channels."""

    name = "gradcam-elementwise"
    differentiable = True
    citation = (
        "Draelos & Carin 2020, Use HiResCAM instead of Grad-CAM for faithful explanations of "
        "convolutional neural networks (arXiv:2011.08891), element-wise ReLU variant"
    )
    needs_gradients = True
    class_discriminative = True
    cost = "1 forward + 1 backward from the layer"

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None
        return ctx.gradients

    def combine(self, ctx: camkit.Context, weights: torch.Tensor) -> torch.Tensor:
        contributions = (weights * ctx.activations).clamp_min(0)
        if ctx.options["eigen_smooth"]:
            return principal_component(contributions)
        return contributions.sum(dim=1)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(GradCAMElementwise())
