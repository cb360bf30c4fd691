"""Guided backpropagation and Guided Grad-CAM.

Springenberg, Dosovitskiy, Brox & Riedmiller (2015), "Striving for Simplicity: The All
Convolutional Net", ICLR workshop, section 3.4: through each ReLU, only positive gradients that
arrive at positive inputs pass back,

.. math:: R^{l} = (f^{l} > 0) \\cdot (R^{l+1} > 0) \\cdot R^{l+1}

Selvaraju et al. (2017), section 3.2: Guided Grad-CAM multiplies that input gradient by the
upsampled Grad-CAM map, element-wise.

The rule is applied to every ReLU the forward calls (``nn.ReLU`` modules, in place or not,
``F.relu``, ``torch.relu``, ``Tensor.relu``; ``nn.ReLU6`` and ``hardtanh`` with ``min_val=0``
with the same rule on their linear range) through a ``TorchFunctionMode`` active for this call
in this thread only: the model is never modified. The activations GELU, SiLU, ELU, SELU, CELU,
LeakyReLU, PReLU, Mish, Hardswish and Softplus have no guided rule and are an error; other
functions (sigmoid and tanh gates, ``hardtanh`` with other bounds, ``clamp``) pass gradients
unchanged, as in plain backpropagation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .capture import refuse_compiled
from .errors import InputError, ModelError, TargetError
from .explain import explain
from .forward import buffers_kept, check_inputs, outside_inference_mode, unwrap
from .layers import LayerSpec
from .method import Method
from .targets import as_target, scored_output, select_output

__all__ = ["guided_backprop", "guided_gradcam"]


class _GuidedReLU(torch.autograd.Function):
    """``clamp(x, lo, hi)`` forward; backward passes positive gradients inside (lo, hi)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lo: float, hi: float | None) -> Tensor:
        inside = x > lo
        if hi is not None:
            inside &= x < hi
        # a mask, not a saved tensor: in-place operations on x or the result stay legal
        ctx.inside = inside
        return x.clamp(min=lo, max=hi)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad.clamp_min(0) * ctx.inside.to(grad.dtype), None, None


_RELU = {F.relu, torch.relu, Tensor.relu}
_RELU_ = {torch.relu_, Tensor.relu_, F.relu_}
_NO_RULE = {
    F.gelu: "GELU",
    F.silu: "SiLU",
    F.elu: "ELU",
    F.selu: "SELU",
    F.celu: "CELU",
    F.leaky_relu: "LeakyReLU",
    F.prelu: "PReLU",
    F.mish: "Mish",
    F.hardswish: "Hardswish",
    F.softplus: "Softplus",
}


class _GuidedMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _RELU or func in _RELU_:
            x = args[0]
            inplace = func in _RELU_ or bool(kwargs.get("inplace", False))
            return _apply(x, 0.0, None, inplace)
        if func is F.hardtanh or func is F.relu6:
            x = args[0]
            lo = float(kwargs.get("min_val", args[1] if len(args) > 1 else -1.0))
            hi = float(kwargs.get("max_val", args[2] if len(args) > 2 else 1.0))
            if func is F.relu6:
                lo, hi = 0.0, 6.0
            if lo == 0.0:
                return _apply(x, lo, hi, bool(kwargs.get("inplace", False)))
        if func in _NO_RULE:
            raise ModelError(
                f"guided backpropagation defines a rule for ReLU only; this model calls "
                f"{_NO_RULE[func]}, which has none. Use a gradient CAM method (gradcam) "
                "instead, or a model with ReLU activations."
            )
        return func(*args, **kwargs)


def _apply(x: Tensor, lo: float, hi: float | None, inplace: bool) -> Tensor:
    out: Tensor = _GuidedReLU.apply(x, lo, hi)
    if inplace:  # keep the in-place contract: x holds the result and routes the gradient
        return x.copy_(out)
    return out


def guided_backprop(
    model: nn.Module,
    x: Any,
    target: Any = None,
    output: Any = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Guided backpropagation of the target score to the input, for every sample of a batch.

    Args:
        model: any ``nn.Module`` whose activations are ReLUs (modules or functional).
        x: ``(N, C_in, *S)`` tensor, or a tuple of tensors (gradients go to the first).
        target: as for :func:`camkit.explain`.
        output: as the ``output`` option of :func:`camkit.explain`.
        model_kwargs: extra keyword arguments for the model.

    Returns:
        ``(N, C_in, *S)`` signed input gradients under the guided ReLU rule.
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model expects a torch.nn.Module; got {type(model).__name__}. Pass the model "
            "object, not its output or state_dict."
        )
    model = unwrap(model)
    refuse_compiled(model, "guided backpropagation")
    with outside_inference_mode():
        inputs = check_inputs(x)
        first = inputs[0].detach().requires_grad_(True)
        n = int(first.shape[0])
        # the gradient is taken inside: grad mode on whatever the caller's, and before the
        # buffers are restored (a train-mode batch norm saved them for its backward)
        with buffers_kept(model), torch.enable_grad():
            with _GuidedMode():
                raw = model(first, *inputs[1:], **(model_kwargs or {}))
                tgt, _ = as_target(target, select_output(raw, output), n)
                out = scored_output(raw, tgt, output)
                scores = tgt.scores(out, torch.arange(n, device=first.device))
            if not bool(torch.isfinite(scores.detach()).all()):
                raise TargetError(
                    f"the target scores are not finite ({scores.detach().flatten()[:4].tolist()}"
                    "...): the model overflows or divides by zero on this input. Check the "
                    "input's preprocessing; for float16 models, try bfloat16 or float32."
                )
            if not scores.requires_grad:
                raise ModelError(
                    "the target score does not depend on the input (no gradient flows back to "
                    "it); guided backpropagation needs a model whose output is computed from x."
                )
            (grad,) = torch.autograd.grad(scores.sum(), first)
    if not bool(torch.isfinite(grad).all()):
        raise ModelError(
            "guided backpropagation gave non-finite input gradients: the model overflows or "
            "divides by zero on this input. Check the input's preprocessing; for float16 "
            "models, try float32."
        )
    return grad


def guided_gradcam(
    model: nn.Module,
    x: Any,
    layer: LayerSpec = None,
    target: Any = None,
    method: str | Method = "gradcam",
    **options: Any,
) -> Tensor:
    """Guided Grad-CAM: guided backpropagation times the upsampled CAM, ``(N, C_in, *S)``.

    The CAM (``method``, default Grad-CAM) is computed with ``options``; its target classes are
    then explained by guided backpropagation, so both halves explain the same class.
    """
    res = explain(model, x, method=method, layer=layer, target=target, **options)
    explained = res.targets if res.targets is not None else target
    guided = guided_backprop(
        model, x, explained, output=options.get("output"), model_kwargs=options.get("model_kwargs")
    )
    maps = res.maps
    if maps.shape[1:] != guided.shape[2:]:
        raise ModelError(
            f"the CAM has shape {tuple(maps.shape)} but the input gradient "
            f"{tuple(guided.shape)}; leave upsample='auto' for guided_gradcam."
        )
    return guided * maps.unsqueeze(1).to(guided.dtype)
