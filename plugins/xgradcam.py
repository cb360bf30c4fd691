"""XGrad-CAM.

Fu, Hu, Dong, Guo, Gao & Yu (2020), "Axiom-based Grad-CAM: Towards Accurate Visualization and
Explanation of CNNs", BMVC. Eq. 8: each gradient is weighted by its activation's share of the
channel total,

.. math::

    w^c_k = \\sum_{ij} \\frac{A^k_{ij}}{\\sum_{ab} A^k_{ab}} \\,
            \\frac{\\partial y^c}{\\partial A^k_{ij}}

and a channel whose activations sum to zero gets weight zero (the paper leaves it undefined;
other implementations add an epsilon, which turns such channels into noise).
"""

from __future__ import annotations

import torch

import camkit


class XGradCAM(camkit.Method):
    """XGrad-CAM channel weights, ``(N, C)``."""

    name = "xgradcam"
    differentiable = True
    aliases = ("xgrad-cam",)
    citation = (
        "Fu et al. 2020, Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation "
        "of CNNs (BMVC)"
    )
    needs_gradients = True
    class_discriminative = True
    cost = "1 forward + 1 backward from the layer"

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None
        a = ctx.activations.flatten(2)
        g = ctx.gradients.flatten(2)
        total = a.sum(dim=2)
        safe = torch.where(total != 0, total, torch.ones_like(total))
        return torch.where(total != 0, (a * g).sum(dim=2) / safe, torch.zeros_like(total))


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(XGradCAM())
