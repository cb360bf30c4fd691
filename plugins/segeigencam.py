"""Seg-Eigen-CAM: Eigen-CAM of the absolute gradient times the activation, sign corrected.

Chung & Ying (2025), "Seg-Eigen-CAM: Eigen-Value-Based Visual Explanations for Semantic
Segmentation Models", Applied Sciences 15(13), 7562. Two changes to Eigen-CAM for segmentation
models (whose target is usually a class over a region, see ``camkit.targets``):

1. gradient weighting (eq. 10): the element-wise product ``|g| * A`` of the gradient's magnitude
   and the activation replaces ``A``, so positions whose gradient is negative still count;
2. the first principal component of that matrix over positions (eq. 11-12), centred, and a sign
   correction (eq. 13): the projection is negated when its smallest value is larger in magnitude
   than its largest, so that the salient region is positive.

.. math::

    X = |g| \\odot A - \\overline{|g| \\odot A}, \\qquad L = s \\, X v_1, \\qquad
    s = \\begin{cases} -1 & |\\min X v_1| > |\\max X v_1| \\\\ 1 & \\text{otherwise} \\end{cases}

The weights are ``|g|`` ``(N, C, *S)``; the map is the projection (:meth:`SegEigenCAM.combine`).
Class-discriminative through ``g``. No departure from the paper.
"""

from __future__ import annotations

import torch

import camkit
from camkit.plugin import principal_component


class SegEigenCAM(camkit.Method):
    """Seg-Eigen-CAM element-wise weights: the gradients' magnitudes, ``(N, C, *S)``."""

    name = "segeigencam"
    aliases = ("seg-eigen-cam",)
    citation = (
        "Chung & Ying 2025, Seg-Eigen-CAM: Eigen-Value-Based Visual Explanations for Semantic "
        "Segmentation Models (Applied Sciences 15(13))"
    )
    needs_gradients = True
    class_discriminative = True
    cost = "1 forward + 1 backward from the layer + 1 principal component per sample"

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None
        return ctx.gradients.abs()

    def combine(self, ctx: camkit.Context, weights: torch.Tensor) -> torch.Tensor:
        proj = principal_component(weights * ctx.activations)  # (N, *S), either sign
        flat = proj.flatten(1)
        flip = flat.amin(dim=1).abs() > flat.amax(dim=1).abs()  # eq. 13
        sign = torch.where(flip, -1.0, 1.0).to(proj.dtype)
        return proj * sign.reshape((-1,) + (1,) * (proj.ndim - 1))


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(SegEigenCAM())
