"""LeGrad: gradients of each layer's score with respect to its attention map, for ViTs.

Bousselham, Boggust, Chaybouti, Strobelt & Kuehne (2024), "LeGrad: An Explainability Method
for Vision Transformers via Feature Formation Sensitivity", arXiv:2404.03214 (ICCV 2025). For
each transformer block ``l``, its output tokens ``z^l`` go through the model's final norm and
head, pooled as the model pools (the class token), giving the block's score ``s^l`` of the
explained target; the gradient of ``s^l`` with respect to the block's attention map
``A^l`` ``(heads, T, T)`` is clipped at zero and averaged over heads and query tokens, and the
maps of the blocks are averaged:

.. math::

    E^l = \\frac{1}{H \\, T} \\sum_h \\sum_i \\mathrm{ReLU}\\Big(\\frac{\\partial s^l}{\\partial
    A^l_{h, i, \\cdot}}\\Big), \\qquad E = \\frac{1}{L} \\sum_l E^l

keeping the columns of the patch tokens (after the ``prefix`` class/register tokens), as a grid.

The attention map is not an output of ``nn.MultiheadAttention`` (torchvision calls it with
``need_weights=False``) and the model is not modified: the gradient is taken through the
attention module's output ``Y = O W_o^T + b_o`` with ``O_h = A_h V_h``, so that

.. math::

    \\frac{\\partial s}{\\partial A_{h, i, j}} = \\sum_d \\Big(\\frac{\\partial s}{\\partial Y}
    W_o\\Big)_{h, i, d} \\, V_{h, j, d}

with ``V`` the value projection of the module's value input. A recording forward (through
``ctx.score``, in chunks of ``batch_size``) keeps each block's input and each attention
module's value input; each block is then run again from its input with its attention output
made a leaf (a temporary forward hook), through the final norm and head, for ``s^l`` and
``dl/dY``. Works with blocks holding one ``torch.nn.MultiheadAttention`` (torchvision's
``VisionTransformer``; the module names are options).

The map is at the patch grid's resolution ``(N, h, w)``; the core upsamples it. The channel
weights are zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import camkit
from camkit.plugin import check_int


class LeGrad(camkit.Method):
    """LeGrad's map on the patch grid, ``(N, h, w)``."""

    name = "legrad"
    citation = (
        "Bousselham, Boggust, Chaybouti, Strobelt & Kuehne 2024, LeGrad: An Explainability "
        "Method for Vision Transformers via Feature Formation Sensitivity (arXiv:2404.03214)"
    )
    needs_gradients = False
    class_discriminative = True
    cost = "2 forwards + per block: that block, the norm and the head again, and their backward"
    options = {
        "blocks": "encoder.layers",
        "norm": "encoder.ln",
        "head": "heads",
        "token": 0,
        "prefix": 1,
        "start": 0,
    }

    def check_options(self, options: Mapping[str, Any]) -> None:
        for name in ("blocks", "norm", "head"):
            if not isinstance(options[name], str):
                raise camkit.OptionError(
                    f"option {name!r} expects the dotted name of a module, got {options[name]!r}."
                )
        check_int(options, "token", minimum=0)
        check_int(options, "prefix", minimum=0)
        check_int(options, "start")
        if options["eigen_smooth"]:
            raise camkit.OptionError(
                "legrad forms its map from attention gradients, not from a layer's channels; "
                "eigen_smooth=True does not apply to it. Leave it out."
            )

    def weights(self, ctx: camkit.Context) -> Tensor:
        a = ctx.activations
        return a.new_zeros(a.shape[:2])  # LeGrad weighs no channel: see combine

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        opts = ctx.options
        blocks = list(_module(ctx.model, opts["blocks"]).children())
        norm, head = _module(ctx.model, opts["norm"]), _module(ctx.model, opts["head"])
        start = opts["start"] if opts["start"] >= 0 else len(blocks) + opts["start"]
        if not 0 <= start < len(blocks):
            raise camkit.OptionError(
                f"option 'start' ({opts['start']}) must name one of the {len(blocks)} blocks."
            )
        chosen = blocks[start:]
        attentions = [_attention(b, f"{opts['blocks']}.{start + i}") for i, b in enumerate(chosen)]
        block_inputs, values = _record(ctx, chosen, attentions)
        x = ctx.inputs[0]
        index = torch.arange(x.shape[0], device=x.device)
        total: Tensor | None = None
        for block, attention, inp, value in zip(
            chosen, attentions, block_inputs, values, strict=True
        ):
            e = _layer_map(ctx, block, attention, inp, value, norm, head, index)
            total = e if total is None else total + e
        assert total is not None
        e = (total / len(chosen))[:, opts["prefix"] :]  # (N, patches)
        return e.reshape(e.shape[0], *_grid(int(e.shape[1]), tuple(x.shape[2:])))


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise camkit.LayerError(
            f"legrad looks for the module {name!r} in {type(model).__name__}, which has none. "
            "Name the transformer blocks, the final norm and the head with blocks=..., "
            "norm=..., head=... (torchvision's VisionTransformer: 'encoder.layers', "
            "'encoder.ln', 'heads')."
        ) from exc


def _attention(block: nn.Module, name: str) -> nn.MultiheadAttention:
    found = [m for m in block.modules() if isinstance(m, nn.MultiheadAttention)]
    if len(found) != 1:
        raise camkit.LayerError(
            f"legrad expects one torch.nn.MultiheadAttention in each block; block {name!r} "
            f"has {len(found)}."
        )
    mha = found[0]
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise camkit.LayerError(
            f"the attention of block {name!r} uses separate key/value sizes, bias_k/bias_v or "
            "add_zero_attn, which legrad does not support."
        )
    return mha


def _record(
    ctx: camkit.Context, blocks: list[nn.Module], attentions: list[nn.MultiheadAttention]
) -> tuple[list[Tensor], list[Tensor]]:
    """Each block's input and each attention module's value input, from one recording
    forward through ``ctx.score`` (chunks of ``batch_size``)."""
    inputs: list[list[Tensor]] = [[] for _ in blocks]
    values: list[list[Tensor]] = [[] for _ in blocks]
    handles = []
    try:
        for i, (block, attention) in enumerate(zip(blocks, attentions, strict=True)):
            handles.append(
                block.register_forward_pre_hook(
                    lambda m, args, i=i: inputs[i].append(args[0].detach())
                )
            )
            handles.append(
                attention.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i: values[i].append(
                        (args[2] if len(args) > 2 else kwargs["value"]).detach()
                    ),
                    with_kwargs=True,
                )
            )
        x = ctx.inputs[0]
        ctx.score(ctx.inputs, torch.arange(x.shape[0], device=x.device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(t) for t in inputs], [torch.cat(t) for t in values]


def _layer_map(
    ctx: camkit.Context,
    block: nn.Module,
    attention: nn.MultiheadAttention,
    block_input: Tensor,
    value: Tensor,
    norm: nn.Module,
    head: nn.Module,
    index: Tensor,
) -> Tensor:
    """``E^l`` ``(N, T)``: the block's score's gradient at its attention map, ReLU, averaged."""
    leaf: list[Tensor] = []

    def as_leaf(m: nn.Module, args: Any, output: Any) -> Any:
        y = output[0].detach().requires_grad_(True)
        leaf.append(y)
        return (y, *output[1:])

    handle = attention.register_forward_hook(as_leaf)
    try:
        with torch.enable_grad():
            z = block(block_input)
            logits = head(norm(z)[:, ctx.options["token"]])
            scores = ctx.target.scores(logits, index)
            (grad_y,) = torch.autograd.grad(scores.sum(), leaf[0])
    finally:
        handle.remove()
    if not attention.batch_first:  # (T, N, D) -> (N, T, D)
        grad_y, value = grad_y.transpose(0, 1), value.transpose(0, 1)
    n, t, d = grad_y.shape
    heads = attention.num_heads
    w_v = attention.in_proj_weight[2 * d :]
    b_v = attention.in_proj_bias[2 * d :] if attention.in_proj_bias is not None else None
    v = nn.functional.linear(value, w_v, b_v)  # (N, T, D)
    grad_o = grad_y @ attention.out_proj.weight  # dl/dO, (N, T, D)
    split = (n, t, heads, d // heads)
    grad_a = grad_o.reshape(split).transpose(1, 2) @ v.reshape(split).permute(0, 2, 3, 1)
    return grad_a.detach().clamp_min(0).mean(dim=(1, 2))  # (N, T): columns


def _grid(patches: int, size: tuple[int, ...]) -> tuple[int, int]:
    """The patch grid ``(h, w)`` with ``h * w = patches`` and ``h / w`` closest to the input's
    aspect ratio."""
    if len(size) != 2:
        raise camkit.InputError(f"legrad expects image inputs (N, C, H, W); got spatial {size}.")
    ratio = size[0] / size[1]
    best = min(
        (h for h in range(1, patches + 1) if patches % h == 0),
        key=lambda h: abs(math.log(h / (patches // h)) - math.log(ratio)),
    )
    return best, patches // best


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(LeGrad())
