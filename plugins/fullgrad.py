"""FullGrad: the input-gradient and the bias-gradients of every layer, summed.

Srinivas & Fleuret (2019), "Full-Gradient Representation for Neural Network Visualization",
NeurIPS. A ReLU network's output decomposes exactly into the input-gradient term and one
bias-gradient term per layer with a bias, ``f(x) = grad_x f . x + sum_b grad_b f . b``. The
saliency map keeps each term's spatial layout (eq. 4): for every convolution and batch norm
with a bias ``b``, the bias-gradient ``grad_z f * b`` (the gradient with respect to the layer's
output ``z``, times the bias broadcast over positions), and for the input ``grad_x f * x``,

.. math::

    S(x) = \\psi\\big(\\nabla_x f \\odot x\\big)
         + \\sum_{l} \\sum_{c} \\psi\\big(\\nabla_{z_l} f \\odot b_l\\big)_c

with ``psi`` the absolute value rescaled to [0, 1] per sample (over channels and positions
together, as the authors' code does), each term summed over its channels and bilinearly
upsampled to the input size. A batch norm's bias is its effective one in evaluation mode,
``beta - gamma mu / sqrt(var + eps)``.

The layers are every ``Conv1d/2d/3d`` and ``BatchNorm1d/2d/3d`` with a bias, found by the method
(``layer=None``) or given; everything comes from one forward from the input and one backward
(``needs_input_gradient``). The model's input is the first "layer", named ``""``. The weights of a
layer are its bias-gradients ``(N, C, *S)`` (the input's, the gradient times the input).

With ``differentiable=True`` the backward keeps its graph (``create_graph``) and the biases
stay in it, so the map is differentiable with respect to the input and every parameter
(through the second derivative of the score); ``|.|`` and the min-max rescaling are
differentiable almost everywhere.

Departures: the upsampling is camkit's bilinear resize (``align_corners=False``; the authors use
``True``), and the final map is min-max normalised like every camkit map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import camkit

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bias_of(module: nn.Module, keep_graph: bool = False) -> Tensor:
    """The bias ``(C,)`` a layer adds: a convolution's, or a batch norm's effective one;
    detached unless ``keep_graph`` (differentiable maps: the map's gradient reaches it)."""
    if isinstance(module, NORMS):
        assert module.running_mean is not None and module.running_var is not None
        scale = module.weight if module.weight is not None else 1.0
        shift = module.bias if module.bias is not None else 0.0
        std = (module.running_var + module.eps).sqrt()
        bias = shift - scale * module.running_mean / std
    else:
        own = getattr(module, "bias", None)
        if not isinstance(own, Tensor):
            raise camkit.LayerError(
                f"fullgrad uses the bias of each layer; {type(module).__name__} has none. "
                "Choose convolutions and batch norms with a bias, or leave layer=None."
            )
        bias = own
    return bias if keep_graph else bias.detach()


def postprocess(values: Tensor) -> Tensor:
    """``psi``: ``|values|`` ``(N, C, *S)`` min-max rescaled per sample, summed over channels."""
    flat = values.abs().flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    span = (flat.max(dim=1, keepdim=True).values - lo).clamp_min(torch.finfo(flat.dtype).tiny)
    return ((flat - lo) / span).reshape(values.shape).sum(dim=1)


class FullGrad(camkit.Method):
    """FullGrad weights: the bias-gradients ``(N, C, *S)`` of each layer (the input's term for
    the input)."""

    name = "fullgrad"
    aliases = ("full-grad",)
    citation = (
        "Srinivas & Fleuret 2019, Full-Gradient Representation for Neural Network "
        "Visualization (NeurIPS)"
    )
    needs_gradients = True
    needs_input_gradient = True
    class_discriminative = True
    differentiable = True
    cost = "1 forward from the input + 1 backward to the input and every biased layer"

    def layers(self, model: nn.Module) -> list[str] | None:
        names = [
            name
            for name, module in model.named_modules()
            if (isinstance(module, CONVS) and module.bias is not None)
            or (isinstance(module, NORMS) and module.track_running_stats)
        ]
        if not names:
            raise camkit.LayerError(
                f"fullgrad sums the bias-gradients of convolutions and batch norms, and "
                f"{type(model).__name__} has none with a bias. Pass layer=... to choose layers."
            )
        return names

    def weights(self, ctx: camkit.Context) -> Tensor:
        assert ctx.gradients is not None
        if ctx.layer == "":  # the input: gradient times input
            return ctx.gradients * ctx.activations
        module = ctx.model.get_submodule(ctx.layer)
        bias = bias_of(module, keep_graph=ctx.options["differentiable"]).to(ctx.gradients)
        return ctx.gradients * bias.reshape((1, -1) + (1,) * (ctx.gradients.ndim - 2))

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        return postprocess(weights)

    def fuse(self, maps: Sequence[Tensor], options: Any) -> Tensor:
        return torch.stack(list(maps)).sum(dim=0)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(FullGrad())
