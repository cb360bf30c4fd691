"""Grad-CAM++.

Chattopadhay, Sarkar, Howlader & Balasubramanian (2018), "Grad-CAM++: Generalized
Gradient-Based Visual Explanations for Deep Convolutional Networks", WACV. With the exponential
score ``Y = exp(S)`` (eq. 19), the pixel weights need only powers of the gradient
``g = dS/dA``:

.. math::

    \\alpha^{kc}_{ij} = \\frac{g_{ij}^2}{2 g_{ij}^2 + \\sum_{ab} A^k_{ab} \\, g_{ij}^3}, \\qquad
    w^c_k = \\sum_{ij} \\alpha^{kc}_{ij} \\, \\mathrm{ReLU}(g_{ij})

``alpha`` is zero where ``g = 0``. The factor ``exp(S)`` that eq. 19 carries into
``ReLU(dY/dA)`` is a positive constant per sample and vanishes in normalisation; it is left out.

Departure from the paper: the paper assumes non-negative activations (post-ReLU), where the
denominator ``g^2 (2 + sum A * g)`` is positive wherever ``g > 0``. With signed activations
(transformer tokens, batch-norm outputs) it can vanish or change sign and ``alpha`` explodes.
camkit uses ``max(sum_ab A_ab, 0)`` in the denominator, which equals the paper whenever its
assumption holds and keeps ``alpha`` in ``(0, 1/2]`` otherwise. With averaged gradient powers
(Smooth Grad-CAM++) the denominator ``2 D_2 + sum A * D_3`` can still be zero or negative where
``D_3 < 0``; there ``alpha`` is set to 0 rather than taking an unbounded or negative value.
"""

from __future__ import annotations

import torch

import camkit


def gradcampp_weights(
    activations: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor
) -> torch.Tensor:
    """Channel weights ``(N, C)`` from activations and the gradient's powers, each ``(N, C, *S)``.

    ``g1, g2, g3`` are ``g, g^2, g^3`` (or their means over noisy copies, for Smooth Grad-CAM++).
    """
    dims = tuple(range(2, activations.ndim))
    total = activations.sum(dim=dims, keepdim=True).clamp_min(0)  # sum_ab A_ab, kept >= 0
    denom = 2 * g2 + total * g3
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    alpha = torch.where((g2 > 0) & (denom > 0), g2 / safe, torch.zeros_like(g2))
    return (alpha * g1.clamp_min(0)).sum(dim=dims)


class GradCAMPlusPlus(camkit.Method):
    """Grad-CAM++ channel weights, ``(N, C)``."""

    name = "gradcampp"
    differentiable = True
    aliases = ("gradcam++", "grad-cam++")
    citation = (
        "Chattopadhay et al. 2018, Grad-CAM++: Generalized Gradient-Based Visual Explanations "
        "for Deep Convolutional Networks (WACV)"
    )
    needs_gradients = True
    class_discriminative = True
    cost = "1 forward + 1 backward from the layer"

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None
        g = ctx.gradients
        return gradcampp_weights(ctx.activations, g, g * g, g * g * g)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(GradCAMPlusPlus())
