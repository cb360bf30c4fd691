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

The attention map is not materialised (``nn.MultiheadAttention`` called with
``need_weights=False``, timm's fused ``scaled_dot_product_attention``, transformers' SDPA) and
the model is not modified, its attention settings included: since the block depends on ``A``
only through ``O_h = A_h V_h``,

.. math::

    \\frac{\\partial s}{\\partial A_{h, i, j}} = \\sum_d \\frac{\\partial s}{\\partial O_{h, i, d}}
    \\, V_{h, j, d}

whatever kernel computed ``O``. A recording forward (through ``ctx.score``, in chunks of
``batch_size``) keeps each block's input; each block is then run again from it, through the
final norm and head, with temporary hooks that make ``O`` a leaf and read ``V``:

- ``torch.nn.MultiheadAttention`` (torchvision's ``VisionTransformer``): its output ``Y`` is the
  leaf, ``dl/dO = (dl/dY) W_o``, and ``V`` is the value projection of its value input;
- a fused ``qkv`` projection with ``proj`` (timm's ``Attention``): ``V`` is the last third of
  ``qkv``'s output, ``O`` the input of its ``norm`` (``nn.Identity`` unless ``scale_norm``);
- ``v_proj`` with ``o_proj`` or ``out_proj`` (transformers 5's ``ViTAttention``; CLIP's and
  SigLIP's attention have the same layout, untested here): ``V`` is ``v_proj``'s output, ``O``
  the input of the output projection;
- ``query``/``key``/``value`` returning ``O`` first (transformers 4's ``ViTSelfAttention``,
  tested on a replica of its layout).

The module names (blocks, final norm, head) are options; a block must hold exactly one such
module, whose projections run as module calls once per forward (otherwise ``LayerError``).

The map is at the patch grid's resolution ``(N, h, w)``; the core upsamples it. The channel
weights are zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
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
        block_inputs = _record(ctx, chosen)
        x = ctx.inputs[0]
        index = torch.arange(x.shape[0], device=x.device)
        total: Tensor | None = None
        for block, attention, inp in zip(chosen, attentions, block_inputs, strict=True):
            e = _layer_map(ctx, block, attention, inp, norm, head, index)
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
            "'encoder.ln', 'heads'; timm's: 'blocks', 'norm', 'head'; transformers' "
            "ViTForImageClassification: 'vit.layers' (transformers 4: 'vit.encoder.layer'), "
            "'vit.layernorm', 'classifier')."
        ) from exc


@dataclass(frozen=True)
class _Projections:
    """An attention module whose output projection reads ``O``, the heads' ``A_h V_h``
    concatenated ``(N, T, H d)``: ``value``'s output holds ``V`` (its columns ``columns``), and
    ``O`` enters ``leaf`` (its first input, ``at_input``) or leaves it (its output, or the
    output's first element)."""

    module: nn.Module
    heads: int
    value: nn.Module
    columns: slice
    leaf: nn.Module
    at_input: bool


Attention = nn.MultiheadAttention | _Projections


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    found = getattr(module, name, None)
    return found if isinstance(found, nn.Linear) else None


def _reader(m: nn.Module) -> Attention | None:
    """How to read ``m``'s attention, or ``None`` when ``m`` is no attention module known here:
    ``torch.nn.MultiheadAttention``; a fused ``qkv`` projection and ``proj`` (timm's
    ``Attention``: ``O`` enters its ``norm``, an ``nn.Identity`` unless ``scale_norm``);
    separate ``v_proj`` and ``o_proj``/``out_proj`` (Hugging Face's ViT family in transformers
    5, CLIP, SigLIP); ``query``/``key``/``value`` returning ``O`` first (Hugging Face's
    ``ViTSelfAttention`` in transformers 4)."""
    if isinstance(m, nn.MultiheadAttention):
        return m
    heads = getattr(m, "num_heads", getattr(m, "num_attention_heads", None))
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return None
    qkv, proj = _linear(m, "qkv"), _linear(m, "proj")
    if qkv is not None and proj is not None:
        width = qkv.out_features // 3
        norm = getattr(m, "norm", None)
        leaf = norm if isinstance(norm, nn.Module) else proj
        return _Projections(m, heads, qkv, slice(2 * width, 3 * width), leaf, True)
    value = _linear(m, "v_proj") or _linear(m, "value")
    if value is None:
        return None
    out = _linear(m, "o_proj") or _linear(m, "out_proj")
    if out is not None:
        return _Projections(m, heads, value, slice(None), out, True)
    if _linear(m, "query") is not None and _linear(m, "key") is not None:
        return _Projections(m, heads, value, slice(None), m, False)
    return None


def _attention(block: nn.Module, name: str) -> Attention:
    found = [r for r in map(_reader, block.modules()) if r is not None]
    if len(found) != 1:
        raise camkit.LayerError(
            f"legrad expects one attention module in each block; block {name!r} has "
            f"{len(found)}. Supported: torch.nn.MultiheadAttention (torchvision), timm's "
            "Attention (qkv and proj), Hugging Face attention with v_proj and o_proj/out_proj "
            "or query/key/value. See the LeGrad page to add another."
        )
    mha = found[0]
    if isinstance(mha, nn.MultiheadAttention) and (
        not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn
    ):
        raise camkit.LayerError(
            f"the attention of block {name!r} uses separate key/value sizes, bias_k/bias_v or "
            "add_zero_attn, which legrad does not support."
        )
    return mha


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """A block's token input: its first positional argument, or its first tensor keyword."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    raise camkit.LayerError("legrad found no tensor among a transformer block's inputs.")


def _record(ctx: camkit.Context, blocks: list[nn.Module]) -> list[Tensor]:
    """Each block's input, from one recording forward through ``ctx.score`` (chunks of
    ``batch_size``)."""
    inputs: list[list[Tensor]] = [[] for _ in blocks]
    handles = []
    try:
        for i, block in enumerate(blocks):
            handles.append(
                block.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i: inputs[i].append(
                        _first_tensor(args, kwargs).detach()
                    ),
                    with_kwargs=True,
                )
            )
        x = ctx.inputs[0]
        ctx.score(ctx.inputs, torch.arange(x.shape[0], device=x.device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(t) for t in inputs]


def _layer_map(
    ctx: camkit.Context,
    block: nn.Module,
    attention: Attention,
    block_input: Tensor,
    norm: nn.Module,
    head: nn.Module,
    index: Tensor,
) -> Tensor:
    """``E^l`` ``(N, T)``: the block's score's gradient at its attention map, ReLU, averaged."""
    leaf: list[Tensor] = []
    values: list[Tensor] = []

    def leaf_output(m: nn.Module, args: Any, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        y = first.detach().requires_grad_(True)
        leaf.append(y)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def leaf_input(m: nn.Module, args: Any) -> Any:
        y = args[0].detach().requires_grad_(True)
        leaf.append(y)
        return (y, *args[1:])

    handles = []
    try:
        if isinstance(attention, nn.MultiheadAttention):
            handles.append(
                attention.register_forward_pre_hook(
                    lambda m, args, kwargs: values.append(
                        (args[2] if len(args) > 2 else kwargs["value"]).detach()
                    ),
                    with_kwargs=True,
                )
            )
            handles.append(attention.register_forward_hook(leaf_output))
        else:
            cols = attention.columns
            handles.append(
                attention.value.register_forward_hook(
                    lambda m, args, out: values.append(out[..., cols].detach())
                )
            )
            if attention.at_input:
                handles.append(attention.leaf.register_forward_pre_hook(leaf_input))
            else:
                handles.append(attention.leaf.register_forward_hook(leaf_output))
        with torch.enable_grad():
            z = block(block_input)
            z = z[0] if isinstance(z, tuple) else z
            if len(leaf) != 1 or len(values) != 1:
                raise camkit.LayerError(
                    f"legrad read {len(values)} value projection(s) and {len(leaf)} attention "
                    f"output(s) in one forward of a block ({type(block).__name__}), expected "
                    "one of each: the attention module calls its projections functionally or "
                    "more than once. See the LeGrad page to add another attention module."
                )
            logits = head(norm(z)[:, ctx.options["token"]])
            scores = ctx.target.scores(logits, index)
            (grad,) = torch.autograd.grad(scores.sum(), leaf[0])
    finally:
        for h in handles:
            h.remove()
    value = values[0]
    if isinstance(attention, nn.MultiheadAttention):
        grad, value = _mha_output_and_value(attention, grad, value)
        heads = attention.num_heads
    else:
        heads = attention.heads
    n, t, d = value.shape
    split = (n, t, heads, d // heads)
    # dl/dA_h = (dl/dO_h) V_h^T, (N, H, T, T)
    grad_a = grad.reshape(split).transpose(1, 2) @ value.reshape(split).permute(0, 2, 3, 1)
    return grad_a.detach().clamp_min(0).mean(dim=(1, 2))  # (N, T): columns


def _mha_output_and_value(
    attention: nn.MultiheadAttention, grad_y: Tensor, value: Tensor
) -> tuple[Tensor, Tensor]:
    """``dl/dO = (dl/dY) W_o`` and ``V``, ``(N, T, D)`` each, from the gradient at
    ``nn.MultiheadAttention``'s output ``Y`` and its value input."""
    if not attention.batch_first:  # (T, N, D) -> (N, T, D)
        grad_y, value = grad_y.transpose(0, 1), value.transpose(0, 1)
    d = grad_y.shape[2]
    w_v = attention.in_proj_weight[2 * d :]
    b_v = attention.in_proj_bias[2 * d :] if attention.in_proj_bias is not None else None
    v = nn.functional.linear(value, w_v, b_v)
    return grad_y @ attention.out_proj.weight, v


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
