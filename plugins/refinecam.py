"""RefineCAM: a base method's maps at several layers, multiplied.

A meta-method over any base method (Grad-CAM++ by default): the base method's map is computed
at each of the given layers (the core's multi-layer capture: one forward, one backward), each
after the ReLU, upsampled to a common size and min-max normalised to ``M_l`` in [0, 1]; the
maps are fused by their product,

.. math:: M = \\prod_l M_l

then normalised again. A position keeps a high value only where every layer agrees, which
removes the noise of shallow layers' maps while keeping their resolution.

Domeniconi, Stramiglio, Lombardi & Salti (2026), "How to Evaluate and Refine your CAM",
arXiv:2605.14641 (University of Bologna), introduce RefineCAM as the aggregation of CAMs
computed at several layers of one network into a higher-resolution map. The aggregation
defined here, the product of the min-max normalised per-layer maps, is the one of the authors'
code (its multiplicative mixer, over maps ordered from coarse to fine), whose example runs it
with Grad-CAM++ through grad-cam's ``RefineCAM``; the paper's own equations were not available
to check against, so the method is defined by the equation above. The authors' code also offers
other mixers (an n-th root of the product, log-sum-exp forms) and an upsampling through the
effective receptive field; camkit implements the product with bilinear upsampling only.

Cost model: the base method's cost at all layers at once; for a gradient method, one forward
and one backward from the earliest layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import camkit
from camkit.plugin import normalize


def _base(options: Mapping[str, Any]) -> camkit.Method:
    value = options["base"]
    if isinstance(value, camkit.Method):
        base = value
    elif isinstance(value, str):
        try:
            base = camkit.default_registry().get(value)
        except camkit.CamkitError as exc:
            raise camkit.OptionError(f"option 'base': {exc}") from exc
    else:
        raise camkit.OptionError(
            f"option 'base' expects a method name or a camkit.Method, got {value!r}."
        )
    if isinstance(base, RefineCAM):
        raise camkit.OptionError("option 'base' cannot be 'refinecam' itself.")
    return base


def _base_options(base: camkit.Method, options: Mapping[str, Any]) -> dict[str, Any]:
    given = options["base_options"]
    if not isinstance(given, (dict, type(None))):
        raise camkit.OptionError(
            f"option 'base_options' expects a dict of the base method's options or None, got "
            f"{given!r}."
        )
    unknown = sorted(set(given or {}) - set(base.options))
    if unknown:
        raise camkit.OptionError(
            f"option 'base_options' has {unknown}, which {base.name!r} does not take; its "
            f"options are {sorted(base.options) or 'none'}."
        )
    return {**options, **dict(base.options), **dict(given or {})}


class RefineCAM(camkit.Method):
    """The base method's per-layer maps, normalised and multiplied (``fuse``)."""

    name = "refinecam"
    aliases = ("refine-cam",)
    citation = (
        "Domeniconi, Stramiglio, Lombardi & Salti 2026, How to Evaluate and Refine your CAM "
        "(arXiv:2605.14641)"
    )
    needs_gradients = True  # the base method may need them; computed at every layer at once
    class_discriminative = True
    cost = "the base method's, at every layer in one pass (Grad-CAM++: 1 forward + 1 backward)"
    options = {"base": "gradcampp", "base_options": None}

    def check_options(self, options: Mapping[str, Any]) -> None:
        base = _base(options)
        base.check_options(_base_options(base, options))

    def _with_base_options(self, ctx: camkit.Context) -> tuple[camkit.Method, camkit.Context]:
        base = _base(ctx.options)
        return base, dataclasses.replace(ctx, options=_base_options(base, ctx.options))

    def weights(self, ctx: camkit.Context) -> Tensor:
        base, sub = self._with_base_options(ctx)
        return base.weights(sub)

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        base, sub = self._with_base_options(ctx)
        return base.combine(sub, weights)

    def fuse(self, maps: Sequence[Tensor], options: Mapping[str, Any]) -> Tensor:
        """The product of the layers' maps, each min-max normalised to [0, 1]."""
        out = torch.ones_like(maps[0])
        for m in maps:
            out = out * normalize(m)
        return out


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(RefineCAM())
