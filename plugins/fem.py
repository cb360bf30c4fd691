"""FEM, the Feature Explanation Method.

Fuad, Martin, Giot, Bourqui, Benois-Pineau & Zemmari (2020), "Features Understanding in 3D CNNs
for Actions Recognition in Video", IPTA. Each channel ``k`` of the layer is binarised by a
``k``-sigma rule over its own positions, and the binary maps are summed, each weighted by its
channel's mean activation:

.. math::

    B^k = \\mathbb{1}\\big[A^k > \\mu_k + K \\sigma_k\\big], \\qquad
    L = \\sum_k \\mu_k \\, B^k

with ``mu_k`` and ``sigma_k`` the mean and (population) standard deviation of channel ``k`` over
positions and ``K = 2`` in the paper (option ``k``). The weights are ``mu`` ``(N, C)``; the map
is their sum over the binary maps, not over the activations (:meth:`FEM.combine`).

FEM uses no gradient and no target: it is **not class-discriminative**. No departure from the
paper; other CAM libraries sum ``mean(B^k) * A^k`` instead, which is not the paper's map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import camkit
from camkit.plugin import check_number, eigen_combine, weighted_sum


def binary_maps(activations: torch.Tensor, k: float) -> torch.Tensor:
    """``B`` ``(N, C, *S)``: 1 where a channel exceeds its mean + ``k`` std over positions."""
    flat = activations.flatten(2)
    mean = flat.mean(dim=2, keepdim=True)
    std = flat.std(dim=2, correction=0, keepdim=True)
    return (flat > mean + k * std).to(activations.dtype).reshape(activations.shape)


class FEM(camkit.Method):
    """FEM channel weights: each channel's mean activation, ``(N, C)``."""

    name = "fem"
    citation = (
        "Fuad et al. 2020, Features Understanding in 3D CNNs for Actions Recognition in Video "
        "(IPTA)"
    )
    needs_gradients = False
    class_discriminative = False
    cost = "1 forward"
    options = {"k": 2.0}

    def check_options(self, options: Mapping[str, Any]) -> None:
        check_number(options, "k")

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        return ctx.activations.flatten(2).mean(dim=2)

    def combine(self, ctx: camkit.Context, weights: torch.Tensor) -> torch.Tensor:
        masks = binary_maps(ctx.activations, float(ctx.options["k"]))
        if ctx.options["eigen_smooth"]:
            return eigen_combine(weights, masks)
        return weighted_sum(weights, masks)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(FEM())
