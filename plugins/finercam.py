"""Finer-CAM: a gradient method explaining a class against the classes closest to it.

Zhang, Gu, Chowdhury, Mai, Carlyn, Berger-Wolf, Su & Chao (2025), "Finer-CAM: Spotting the
Difference Reveals Finer Details for Visual Explanation", CVPR. CAM methods explain everything
that raises the target logit ``y^c``, including the evidence shared with visually similar
classes. Finer-CAM explains the difference instead: with ``d`` the classes whose logits are
closest to ``y^c`` on the explained forward,

.. math::

    s = \\frac{\\sum_d p_d \\, (y^c - \\alpha \\, y^d)}{\\sum_d p_d}, \\qquad
    \\alpha^c_k = \\frac{1}{Z} \\sum_{ij} \\frac{\\partial s}{\\partial A^k_{ij}}

for Grad-CAM (``base``), with ``p_d`` the softmax probabilities (the weighting of the authors'
implementation) and ``alpha`` the comparison strength (0: the base method on ``y^c``). The score
is :class:`camkit.targets.FinerTarget`, which works with any method as a target; this method
wraps the caller's class (``None``: the predicted one) in it and computes the base method's
weights and map. Every base is differentiable, so ``differentiable=True`` applies: the
compared classes are fixed on the explained forward, and the score, the probabilities ``p_d``
included, keeps its graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

import camkit
from camkit.plugin import FinerTarget, check_choice, check_int, check_number

#: Gradient methods Finer-CAM may run on (their own options take their defaults).
BASES = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "gradcam-elementwise")


def _base(options: Mapping[str, Any]) -> camkit.Method:
    return camkit.default_registry().get(options["base"])


class FinerCAM(camkit.Method):
    """Finer-CAM: the base method's weights for the Finer-CAM score."""

    name = "finercam"
    aliases = ("finer-cam",)
    citation = (
        "Zhang et al. 2025, Finer-CAM: Spotting the Difference Reveals Finer Details for Visual "
        "Explanation (CVPR)"
    )
    needs_gradients = True
    class_discriminative = True
    differentiable = True  # every base in BASES is
    cost = "1 forward + 1 backward from the layer (the base method's cost)"
    options = {"base": "gradcam", "alpha": 1.0, "n_compare": 3}

    def check_options(self, options: Mapping[str, Any]) -> None:
        check_choice(options, "base", BASES)
        check_number(options, "alpha")
        check_int(options, "n_compare", minimum=1)

    def target(self, target: Any, options: Mapping[str, Any]) -> Any:
        if isinstance(target, FinerTarget):
            return target
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, list, tuple, torch.Tensor))
        ):
            raise camkit.TargetError(
                "finercam compares a class with the classes closest to it: target expects None "
                f"(the predicted class), an int or one class per sample; got "
                f"{type(target).__name__}. Pass a FinerTarget to set everything."
            )
        return FinerTarget(target, float(options["alpha"]), options["n_compare"])

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        return _base(ctx.options).weights(ctx)

    def combine(self, ctx: camkit.Context, weights: torch.Tensor) -> torch.Tensor:
        return _base(ctx.options).combine(ctx, weights)

    def fuse(self, maps: Sequence[torch.Tensor], options: Mapping[str, Any]) -> torch.Tensor:
        return _base(options).fuse(maps, options)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(FinerCAM())
