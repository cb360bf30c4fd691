"""HiResCAM.

Draelos & Carin (2020), "Use HiResCAM instead of Grad-CAM for faithful explanations of
convolutional neural networks", arXiv:2011.08891. Eq. 4: the gradient multiplies the activation
element-wise before the channel sum, instead of being averaged over positions first:

.. math:: \\tilde{A}^c = \\sum_k \\frac{\\partial y^c}{\\partial A^k} \\odot A^k

The weights are the gradients themselves, ``(N, C, *S)``; the core forms the sum and the ReLU.
"""

from __future__ import annotations

import torch

import camkit


class HiResCAM(camkit.Method):
    """HiResCAM element-wise weights: the gradients, ``(N, C, *S)``."""

    name = "hirescam"
    differentiable = True
    aliases = ("hires-cam",)
    citation = (
        "Draelos & Carin 2020, Use HiResCAM instead of Grad-CAM for faithful explanations of "
        "convolutional neural networks (arXiv:2011.08891)"
    )
    needs_gradients = True
    class_discriminative = True
    cost = "1 forward + 1 backward from the layer"

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None
        return ctx.gradients


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(HiResCAM())
