"""KPCA-CAM: the activations' first kernel principal component.

Karmani, Sheth, Kaliyaperumal, Zhang & Kar (2024), "KPCA-CAM: Visual Explainability of Deep
Computer Vision Models using Kernel PCA", arXiv:2410.00267. Eigen-CAM with kernel PCA in place of
PCA: arrange a sample's activations as ``P`` positions ``x_i`` in ``R^C``, centred over positions,
form the kernel matrix ``K_ij = k(x_i, x_j)``, centre it in feature space and take its top
eigenpair ``(lambda, alpha)``, ``|alpha| = 1``. Position ``i``'s projection on the first kernel
principal component is

.. math::

    \\tilde K = K - 1_P K - K 1_P + 1_P K 1_P, \\qquad
    \\tilde K \\alpha = \\lambda \\alpha, \\qquad
    L_i = (\\tilde K \\alpha)_i / \\sqrt{\\lambda} = \\sqrt{\\lambda} \\, \\alpha_i

with ``1_P`` the ``P x P`` matrix of ``1/P``. Kernels (``gamma`` defaults to ``1/C``):
``linear`` ``x.y`` (which is Eigen-CAM), ``poly`` ``(gamma x.y + coef0)^degree``, ``rbf``
``exp(-gamma |x - y|^2)``, ``sigmoid`` ``tanh(gamma x.y + coef0)`` (the default, as in the
authors' reference code).

KPCA-CAM uses no gradient and no target: it is **not class-discriminative**. Departure: the sign
of an eigenvector is arbitrary; camkit orients it so that the map correlates positively with the
channel sum, as for Eigen-CAM. Batched on the device, in float64, through ``torch.linalg.eigh``
of the ``(P, P)`` kernel matrices: its cost grows as ``P^3`` (positions), which is small at late
layers (49 at a ResNet's ``layer4``) and large at early ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import camkit
from camkit.plugin import check_bool, check_choice, check_int, check_number

KERNELS = ("linear", "poly", "rbf", "sigmoid")


def kernel_matrix(
    x: Tensor, kernel: str, gamma: float, coef0: float = 1.0, degree: int = 3
) -> Tensor:
    """The kernel matrices ``(N, P, P)`` of positions ``x`` ``(N, P, C)``."""
    dot = x @ x.transpose(1, 2)
    if kernel == "linear":
        return dot
    if kernel == "poly":
        return (gamma * dot + coef0) ** degree
    if kernel == "sigmoid":
        return torch.tanh(gamma * dot + coef0)
    sq = (x * x).sum(dim=2)
    dist = (sq[:, :, None] + sq[:, None, :] - 2 * dot).clamp_min(0)
    return torch.exp(-gamma * dist)


def kernel_component(x: Tensor, kernel: str, gamma: float, coef0: float, degree: int) -> Tensor:
    """Each sample's projection ``(N, P)`` on its first kernel principal component."""
    k = kernel_matrix(x, kernel, gamma, coef0, degree)
    # centring in feature space: K - 1K - K1 + 1K1, with 1 the (P, P) matrix of 1/P
    row = k.mean(dim=1, keepdim=True)
    col = k.mean(dim=2, keepdim=True)
    k = k - row - col + k.mean(dim=(1, 2), keepdim=True)
    values, vectors = torch.linalg.eigh(k)
    proj: Tensor = vectors[..., -1] * values[..., -1:].clamp_min(0).sqrt()
    return proj


class KPCACAM(camkit.Method):
    """First kernel principal component of the activations; weights are ones, ``(N, C)``."""

    name = "kpcacam"
    aliases = ("kpca-cam",)
    citation = (
        "Karmani et al. 2024, KPCA-CAM: Visual Explainability of Deep Computer Vision Models "
        "using Kernel PCA (arXiv:2410.00267)"
    )
    needs_gradients = False
    class_discriminative = False
    cost = "1 forward + 1 (P, P) kernel eigendecomposition per sample"
    options = {"kernel": "sigmoid", "gamma": None, "coef0": 1.0, "degree": 3, "center": True}

    def check_options(self, options: Mapping[str, Any]) -> None:
        check_choice(options, "kernel", KERNELS)
        if options["gamma"] is not None:
            check_number(options, "gamma", minimum=0.0, exclusive=True)
        check_number(options, "coef0")
        check_int(options, "degree", minimum=1)
        check_bool(options, "center")

    def weights(self, ctx: camkit.Context) -> Tensor:
        return ctx.activations.new_ones(ctx.activations.shape[:2])

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        a = ctx.activations
        opts = ctx.options
        x = a.flatten(2).transpose(1, 2).double()  # (N, P, C)
        if opts["center"]:
            x = x - x.mean(dim=1, keepdim=True)
        gamma = 1.0 / a.shape[1] if opts["gamma"] is None else float(opts["gamma"])
        proj = kernel_component(x, opts["kernel"], gamma, float(opts["coef0"]), opts["degree"])
        plain = a.flatten(2).sum(dim=1).double()
        corr = ((proj - proj.mean(1, keepdim=True)) * (plain - plain.mean(1, keepdim=True))).sum(1)
        proj = torch.where(corr[:, None] < 0, -proj, proj)
        return proj.to(a.dtype).reshape(a.shape[:1] + a.shape[2:])


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(KPCACAM())
