"""Checks between the steps of a call: nothing wrong passes silently into a map.

What a method, an option or the caller's input hands to the next step is checked where it
enters: the input batch's device and batch dimension, a ``reshape`` result, a method's weights
(type, shape, device, dtype, finiteness) and its combined map. A map that comes out blank for a
reason camkit can see (the target's gradient at the layer is zero, the layer's activations are
all zero, the map is constant) gets a :class:`~camkit.errors.BlankMapWarning` naming the reason,
the layer, the share of blank maps and what to try.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .deferred import is_finite, require_finite
from .errors import (
    BlankMapWarning,
    InputError,
    OptionError,
    PluginError,
    TargetError,
    user_stacklevel,
)

__all__ = [
    "SAME_POSITIONS_ULPS",
    "as_class_tensor",
    "check_batched",
    "check_class_range",
    "check_combined",
    "check_input_devices",
    "check_logit_rows",
    "check_reshaped",
    "check_weights",
    "warn_blank_maps",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_input_devices(inputs: Sequence[Tensor]) -> None:
    """Inputs on the ``meta`` device hold no values: refuse them."""
    for i, t in enumerate(inputs):
        if t.device.type == "meta":
            raise InputError(
                f"input {i} is on the 'meta' device, which holds shapes but no values; "
                "expected a tensor with data. Create it on 'cpu' or 'cuda' (x.to_empty() or "
                "torch.randn(..., device='cpu'))."
            )


def check_batched(model: nn.Module, x: Tensor) -> None:
    """Refuse an unbatched ``(C, *S)`` input to a model whose first convolution expects
    ``(N, C, *S)``: PyTorch's convolutions accept unbatched inputs, so the model would either
    fail later or read the ``C`` channels as a batch."""
    first = next((m for m in model.modules() if isinstance(m, _CONV)), None)
    if first is None:
        return
    rank = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
    if x.ndim == rank + 1 and x.shape[0] == first.in_channels:
        raise InputError(
            f"x has shape {tuple(x.shape)}: one unbatched sample (C, *S) for the model's "
            f"first {type(first).__name__} ({first.in_channels} channels); expected a batch "
            f"(N, C, *S). Add the batch dimension with x.unsqueeze(0)."
        )


def check_class_range(target: int, k: int) -> None:
    """An int class target lies in ``[0, k - 1]``, however large it is."""
    if not 0 <= target < k:
        raise TargetError(
            f"target classes must lie in [0, {k - 1}] for a model with {k} outputs; got [{target}]."
        )


def as_class_tensor(target: Any, n: int) -> Tensor:
    """``torch.as_tensor(target)`` for a sequence of class indices, or a :class:`TargetError`
    for values torch cannot read as ints (beyond int64, mixed types)."""
    try:
        return torch.as_tensor(target)
    except (OverflowError, RuntimeError, TypeError, ValueError) as exc:
        raise TargetError(
            f"target expects one int class index per sample, ({n},); got a "
            f"{type(target).__name__} torch cannot read as ints ({exc})."
        ) from exc


def check_logit_rows(output: Any, n: int) -> None:
    """Logits ``(N, K)`` for a class target hold one row per sample: ``(K, N)`` is refused."""
    if isinstance(output, Tensor) and output.ndim == 2 and output.shape[0] != n:
        raise TargetError(
            f"a class target expects logits (N, K) with one row per sample, N = {n}; got "
            f"{tuple(output.shape)}. If the model returns (classes, batch), pass "
            "output=lambda o: o.T; otherwise choose the output with output=... ."
        )


def check_reshaped(layer: str, what: str, t: Any) -> Tensor:
    """The ``reshape`` option's result for the layer's activations (or gradients): a finite
    tensor ``(N, C, *S)``."""
    if not isinstance(t, Tensor):
        raise OptionError(
            f"option 'reshape' returned {type(t).__name__} for the {what} of layer {layer!r}; "
            "expected a tensor (N, C, *S)."
        )
    if not is_finite(t):
        raise OptionError(
            f"option 'reshape' returned non-finite values (NaN or Inf) for the {what} of layer "
            f"{layer!r}, whose output is finite: check the reshape callable."
        )
    return t


def check_weights(method: str, w: Any, activations: Tensor) -> None:
    """A method's weights: a floating-point tensor ``(N, C)`` or ``activations.shape`` on the
    activations' device, finite."""
    n, c = activations.shape[:2]
    shape = tuple(activations.shape)
    expected = f"({n}, {c}) or {shape} for activations {shape}"
    if not isinstance(w, Tensor):
        raise PluginError(
            f"method {method!r} returned weights of type {type(w).__name__}; expected a tensor "
            f"{expected}."
        )
    if tuple(w.shape) != (n, c) and tuple(w.shape) != tuple(activations.shape):
        raise PluginError(
            f"method {method!r} returned weights of shape {tuple(w.shape)}; expected {expected}."
        )
    if w.device != activations.device:
        raise PluginError(
            f"method {method!r} returned weights on device {w.device}; expected the "
            f"activations' device {activations.device} (create them with "
            "ctx.activations.new_*(...) or device=ctx.activations.device)."
        )
    if not w.is_floating_point():
        raise PluginError(
            f"method {method!r} returned weights of dtype {w.dtype}; expected a floating-point "
            f"dtype (the activations' {activations.dtype})."
        )
    weights = w
    require_finite(
        weights,
        lambda: PluginError(
            f"method {method!r} returned non-finite weights (NaN or Inf; first values "
            f"{weights.detach().flatten()[:4].tolist()}): a division by zero or an overflow in "
            "the method. Report it to the method's authors."
        ),
    )


def check_combined(
    method: str, raw: Any, activations: Tensor, spatial: tuple[int, ...] | None = None
) -> None:
    """A method's combined map: a finite tensor ``(N, *S)`` for activations ``(N, C, *S)``, or
    ``(N, *S_in)`` at the input's spatial size ``spatial`` (black-box methods map the input)."""
    n = activations.shape[0]
    expected = (n, *activations.shape[2:])
    allowed = {expected} if spatial is None else {expected, (n, *spatial)}
    if not isinstance(raw, Tensor) or tuple(raw.shape) not in allowed:
        got = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
        also = "" if spatial is None else f" or {(n, *spatial)} (the input's size)"
        raise PluginError(
            f"method {method!r}: combine returned {got}; expected a map {expected}{also} (one "
            f"per sample) for activations {tuple(activations.shape)}."
        )
    if not raw.is_floating_point():
        raise PluginError(
            f"method {method!r}: combine returned a map of dtype {raw.dtype}; expected a "
            "floating-point map."
        )
    require_finite(
        raw,
        lambda: PluginError(
            f"method {method!r}: the combined map holds non-finite values (NaN or Inf): an "
            "overflow or a division by zero in the method's combination. Report it to the "
            "method's authors."
        ),
    )


#: positions whose activations differ by at most this many ulps of the largest activation
#: count as the same position (float rounding)
SAME_POSITIONS_ULPS = 64


def warn_blank_maps(
    layer: str, raw: Tensor, activations: Tensor, gradients: Tensor | None, relu: bool
) -> None:
    """Warn when maps are blank (constant, so all zero once normalised), with the reason.

    Args:
        layer: the layer's name.
        raw: ``(N, *S)`` the combined map, after ReLU when ``relu``.
        activations: ``(N, C, *S)``.
        gradients: ``(N, C, *S)`` or ``None`` for methods without gradients.
        relu: whether ReLU was applied.
    """
    flat = raw.flatten(1)
    blank = flat.amax(1) == flat.amin(1)  # (N,)
    if not bool(blank.any()):
        return
    n = int(raw.shape[0])
    dead = activations.flatten(1).eq(0).all(1) & blank
    still = blank & ~dead
    zero_grad = (
        gradients.flatten(1).eq(0).all(1) & still
        if gradients is not None
        else torch.zeros_like(blank)
    )
    constant = still & ~zero_grad
    # positions whose channel vectors agree to float rounding: no channel weighting can tell
    # them apart (a token mixer that averages every token, a random-init model without
    # positional terms), whatever the weights; only for maps on the layer's grid (a black-box
    # method's map of the input is no weighting of the layer's channels)
    on_grid = tuple(raw.shape[1:]) == tuple(activations.shape[2:])
    flat_a = activations.flatten(2)  # (N, C, P)
    spread = (flat_a.amax(2) - flat_a.amin(2)).amax(1)  # (N,)
    scale = flat_a.abs().flatten(1).amax(1)
    tol = SAME_POSITIONS_ULPS * torch.finfo(activations.dtype).eps
    same = constant & (spread <= tol * scale) & on_grid
    constant = constant & ~same
    reasons = []
    if bool(dead.any()):
        reasons.append(
            f"its activations are all zero for {int(dead.sum())} of {n} samples (a dead "
            "layer: a ReLU that never fires, a zeroed branch); no method can map them. Choose "
            "another layer, or check the input's preprocessing"
        )
    if bool(zero_grad.any()):
        reasons.append(
            f"the target's gradient at the layer is exactly zero for {int(zero_grad.sum())} of "
            f"{n} samples: the score does not depend on this layer (a vision transformer's "
            "final norm feeds only the class token; a zero-initialised head). Choose a layer "
            "on the path to the score, or a trained model"
        )
    if bool(same.any()):
        rel = float((spread / scale.clamp_min(torch.finfo(scale.dtype).tiny))[same].max())
        reasons.append(
            f"the map is constant for {int(same.sum())} of {n} samples because the layer's "
            f"activations are the same at every position (to float rounding: positions differ "
            f"by at most {rel:.1e} of the largest activation), so no weighting of its channels "
            "can tell the positions apart. The model gives every position the same features "
            "here (a token mixer that averages every token with no positional term; a "
            "randomly initialised model whose positional terms are still zero). Choose an "
            "earlier layer, or a trained model"
        )
    if bool(constant.any()):
        what = (
            "every position is negative before the ReLU or the weights cancel"
            if relu
            else "the weights cancel"
        )
        reasons.append(
            f"the map is constant for {int(constant.sum())} of {n} samples ({what}), so "
            "it shows nothing and normalises to zeros. Try relu=False to see the signed map, "
            "another method or another layer"
        )
    warnings.warn(
        f"layer {layer!r}: {int(blank.sum())} of {n} maps are blank: " + "; ".join(reasons) + ".",
        BlankMapWarning,
        stacklevel=user_stacklevel(),
    )
