"""Grad-CAM, the reference plugin: copy this file to write your own method.

Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra (2017), "Grad-CAM: Visual Explanations from
Deep Networks via Gradient-based Localization", ICCV. Equations 1 and 2:

.. math::

    \\alpha^c_k = \\frac{1}{Z} \\sum_i \\sum_j \\frac{\\partial y^c}{\\partial A^k_{ij}}, \\qquad
    L^c = \\mathrm{ReLU}\\Big(\\sum_k \\alpha^c_k A^k\\Big)

The weight of channel ``k`` is the spatial mean of the score's gradient; the core forms the
weighted sum, the ReLU, the normalisation and the upsampling. ``y^c`` is the target score the
model outputs (a logit, before softmax, as in the paper).
"""

from __future__ import annotations

import torch

import camkit


class GradCAM(camkit.Method):
    """Channel weights: gradients averaged over positions, ``(N, C, *S) -> (N, C)``."""

    name = "gradcam"
    differentiable = True
    aliases = ("grad-cam",)
    citation = (
        "Selvaraju et al. 2017, Grad-CAM: Visual Explanations from Deep Networks via "
        "Gradient-based Localization (ICCV)"
    )
    needs_gradients = True
    class_discriminative = True
    cost = "1 forward + 1 backward from the layer"

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None
        return ctx.gradients.flatten(2).mean(dim=2)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(GradCAM())
