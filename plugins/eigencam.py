"""Eigen-CAM and Eigen-Grad-CAM.

Muhammad & Yeasin (2020), "Eigen-CAM: Class Activation Map using Principal Components", IJCNN.
The map is the projection of the activations on their first principal component: arrange a
sample's activations as a ``(P, C)`` matrix over positions, take its first right singular vector
``v_1`` and project,

.. math:: L = (A - \\bar{A}) \\, v_1

Eigen-Grad-CAM does the same with the gradient times the activation, ``g * A``, in place of
``A`` (as offered by other CAM libraries).

Eigen-CAM uses no gradient and no target: it is **not class-discriminative**, the map is the
same whatever class is asked for. Eigen-Grad-CAM depends on the class through ``g``.

Departures from the paper: camkit centres the matrix over positions by default (principal
component analysis proper); the paper's uncentred projection is ``center=False``. The sign of a
singular vector is arbitrary; camkit orients it so that the projection correlates positively with
the channel sum, so maps do not flip between BLAS builds. Batched on the device, through the
smaller Gram matrix (see :func:`camkit.plugin.principal_component`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import camkit
from camkit.plugin import principal_component


def _check_center(options: Mapping[str, Any]) -> None:
    if not isinstance(options["center"], bool):
        raise camkit.OptionError(
            f"option 'center' expects True or False, got {options['center']!r}."
        )


class EigenCAM(camkit.Method):
    """First principal component of the activations; weights are ones, ``(N, C)``."""

    name = "eigencam"
    differentiable = True
    aliases = ("eigen-cam",)
    citation = (
        "Muhammad & Yeasin 2020, Eigen-CAM: Class Activation Map using Principal Components (IJCNN)"
    )
    needs_gradients = False
    class_discriminative = False
    cost = "1 forward + 1 principal component per sample"
    options = {"center": True}

    def check_options(self, options: Mapping[str, Any]) -> None:
        _check_center(options)

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        return ctx.activations.new_ones(ctx.activations.shape[:2])

    def combine(self, ctx: camkit.Context, weights: torch.Tensor) -> torch.Tensor:
        return principal_component(ctx.activations, center=ctx.options["center"])


class EigenGradCAM(camkit.Method):
    """First principal component of ``g * A``; weights are the gradients, ``(N, C, *S)``."""

    name = "eigengradcam"
    differentiable = True
    aliases = ("eigen-grad-cam",)
    citation = EigenCAM.citation + ", applied to gradient times activation"
    needs_gradients = True
    class_discriminative = True
    cost = "1 forward + 1 backward from the layer + 1 principal component per sample"
    options = {"center": True}

    def check_options(self, options: Mapping[str, Any]) -> None:
        _check_center(options)

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None
        return ctx.gradients

    def combine(self, ctx: camkit.Context, weights: torch.Tensor) -> torch.Tensor:
        return principal_component(weights * ctx.activations, center=ctx.options["center"])


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(EigenCAM())
    register(EigenGradCAM())
