"""The captured forward, and what it needs: input checks, model state, gradients.

:func:`captured_forward` runs the model once through a :class:`~camkit.capture.Capture`, scores
the target (:func:`camkit.targets.score_target`) and, when asked, differentiates the scores to
the target layers only. The helpers around it check the inputs, keep the model's buffers and
unwrap wrappers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .call import Call
from .capture import Capture
from .checks import check_input_devices
from .deferred import is_finite, require_finite
from .errors import CamkitWarning, InputError, LayerError, TargetError, user_stacklevel
from .targets import Target, score_target
from .walk import any_training

__all__ = [
    "FLOAT16_SCALE",
    "Forward",
    "buffers_kept",
    "captured_forward",
    "check_inputs",
    "check_layer_output",
    "detector_transform",
    "missing_layers",
    "normal_tensor",
    "outside_inference_mode",
    "unwrap",
]


def check_inputs(x: Any) -> tuple[Tensor, ...]:
    inputs = x if isinstance(x, tuple) else (x,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        got = type(x).__name__ if not isinstance(x, tuple) else [type(t).__name__ for t in x]
        raise InputError(
            f"x expects a tensor (N, C, *S) or a tuple of tensors; got {got}. Convert images "
            "with torch.as_tensor(...) and stack them into a batch."
        )
    first = inputs[0]
    if first.ndim < 2:
        raise InputError(
            f"x expects a batch (N, C, *S); got shape {tuple(first.shape)}. Add the batch "
            "dimension with x.unsqueeze(0)."
        )
    if first.shape[0] == 0:
        raise InputError(
            f"x is an empty batch, shape {tuple(first.shape)}; pass at least one sample."
        )
    check_input_devices(inputs)
    for i, t in enumerate(inputs):
        # the sum is non-finite whenever an element is (or it overflows): the full check then
        if (
            t.is_floating_point()
            and not bool(torch.isfinite(t.sum()))
            and not bool(torch.isfinite(t).all())
        ):
            raise InputError(
                f"input {i} holds NaN or infinite values; expected finite numbers. Check the "
                "preprocessing (division by a zero std, an unreadable image)."
            )
    # inference tensors cannot enter autograd; a plain copy can (callers leave inference mode
    # first: see outside_inference_mode)
    return tuple(normal_tensor(t) for t in inputs)


def normal_tensor(t: Any) -> Any:
    """``t``, or a plain copy of it when it is an inference tensor (made under
    ``torch.inference_mode()``), which autograd cannot save; call outside inference mode."""
    return t.clone() if isinstance(t, Tensor) and t.is_inference() else t


@contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Leave ``torch.inference_mode()`` for the block, if it is on (autograd is needed after the
    layer); the caller's mode is back afterwards. Lightning's test and predict loops run in it."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False):
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``nn.DataParallel`` (explained on its own device, with a warning) or
    inside ``torch.compile`` (explained eagerly: hooks and layer names are the original
    module's)."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
        return unwrap(original)
    if isinstance(model, nn.DataParallel):
        warnings.warn(
            "camkit explains the module inside nn.DataParallel on its own device (one "
            "replica); layer names are those of model.module.",
            CamkitWarning,
            stacklevel=user_stacklevel(),
        )
        inner: nn.Module = model.module
        return inner
    return model


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every buffer afterwards when some module is in training mode.

    The values are written through ``.data``, which leaves the buffers' version counters
    alone: the graph of a differentiable call saves batch norms' running statistics, and a
    counted in-place write would make the caller's backward fail (the values it reads are
    the ones the forward used: batch statistics in training mode, unchanged ones in eval)."""
    if not any_training(model):
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.data.copy_(v)


#: Scale of the scores before a float16 backward, undone on the float32 gradients: small
#: gradients would otherwise underflow to zero (as gradient scalers do for training).
FLOAT16_SCALE = 2.0**12


def _non_finite(name: str, what: str, t: Tensor) -> str:
    return (
        f"layer {name!r} has non-finite {what} ({t.dtype}): the model overflows or divides by "
        "zero on this input. Check the input's preprocessing; for float16 models, try bfloat16 "
        "or float32."
    )


def check_layer_output(name: str, a: Tensor, batch: int) -> None:
    """The layer's output holds one row per sample (or is sequence-first) and is finite."""
    if a.ndim >= 2 and a.shape[0] != batch and a.shape[1] != batch:
        raise LayerError(
            f"layer {name!r} gives an output of shape {tuple(a.shape)}, whose first dimension "
            f"is not the batch size {batch}: it does not hold one map per sample (a detector's "
            "region head works on proposals, for instance). Choose a layer of the backbone."
        )
    require_finite(a, lambda: LayerError(_non_finite(name, "activations", a)))


def _layer_error(name: str, what: str, t: Tensor) -> Callable[[], Exception]:
    return lambda: LayerError(_non_finite(name, what, t))


def _hessian_vectors(
    scores: Tensor, acts: list[Tensor], differentiable: bool = False
) -> tuple[list[Tensor | None], ...]:
    """Gradients ``g`` of the summed scores and Hessian-vector products ``H A``, per layer.

    The first backward keeps its graph (``create_graph``), so ``g`` is differentiable with
    respect to the activations ``A``; the second differentiates ``g . A`` (``A`` held fixed),
    which is ``H A``. Both run from the scores to the layers only. With ``differentiable`` the
    second backward keeps its graph too, ``A`` included as the vector (a third derivative of
    the score reaches the map's gradient), and nothing is detached.
    """
    found = torch.autograd.grad(scores.sum(), acts, allow_unused=True, create_graph=True)
    hvps: list[Tensor | None] = []
    for a, g in zip(acts, found, strict=True):
        hv = None
        if g is not None and g.requires_grad:
            (hv,) = torch.autograd.grad(
                g,
                a,
                grad_outputs=a if differentiable else a.detach(),
                retain_graph=True,
                allow_unused=True,
                create_graph=differentiable,
            )
        # no path from the gradient back to A: the score is linear in the layer, H A = 0
        if hv is not None and not differentiable:
            hv = hv.detach()
        hvps.append(None if g is None else torch.zeros_like(a) if hv is None else hv)
    if differentiable:
        return list(found), hvps
    return [None if g is None else g.detach() for g in found], hvps


def _one_target(scores: Tensor) -> None:
    if scores.ndim != 1:
        raise TargetError(
            "this method differentiates the score twice, or to the input, and explains one "
            "target per sample; got several targets per sample. Call it once per target."
        )


def _gradients(
    scores: Tensor, acts: list[Tensor], create_graph: bool = False
) -> list[Tensor | None]:
    """d(sum of scores)/d(activations); float16 layers get a scaled backward. With
    ``create_graph`` the gradients keep a graph of their own (differentiable maps).

    Scores ``(N, K)`` (several targets per sample) get one batched backward: gradients
    ``(K, N, ...)``, one per target.
    """

    def grad(scale: float, retain: bool) -> tuple[Tensor | None, ...]:
        if scores.ndim == 1:
            return torch.autograd.grad(
                scores.sum() * scale,
                acts,
                allow_unused=True,
                retain_graph=retain or create_graph,
                create_graph=create_graph,
            )
        k = scores.shape[1]
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device) * scale
        outputs = eye[:, None, :].expand(k, *scores.shape)
        return torch.autograd.grad(
            scores,
            acts,
            grad_outputs=outputs,
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain or create_graph,
            create_graph=create_graph,
        )

    if not any(a.dtype == torch.float16 for a in acts):
        return list(grad(1.0, False))
    scaled = grad(FLOAT16_SCALE, True)
    if all(g is None or is_finite(g) for g in scaled):
        return [None if g is None else g.float() / FLOAT16_SCALE for g in scaled]
    # the scaled gradients overflowed: the plain ones are the best float16 can give
    return list(grad(1.0, False))


@dataclass
class Forward:
    """What one captured forward gives: the scored output, the target and per-layer tensors."""

    output: Any
    target: Target
    classes: Tensor | None
    scores: Tensor  # (N,) detached
    activations: list[Tensor]  # per layer, as the layer returned them; detached unless the
    # call is differentiable
    gradients: list[Tensor | None]  # per layer, or None when not needed
    order: list[str]  # layer names in the order they ran
    geometry: tuple[tuple[int, int], list[tuple[int, int]]] | None = None
    hessian_vectors: list[Tensor | None] | None = None  # per layer, H A, when asked
    input_gradient: Tensor | None = None  # of the first input, when asked


def missing_layers(missing: list[str]) -> LayerError:
    return LayerError(
        f"layer(s) {', '.join(map(repr, missing))} did not run in the model's forward on this "
        "input; choose layers the forward uses (camkit.layers(model, x))."
    )


def detector_transform(model: nn.Module) -> nn.Module | None:
    """The resize-and-pad transform of a torchvision detector, whose geometry maps follow back."""
    transform = getattr(model, "transform", None)
    return transform if isinstance(transform, nn.Module) else None


def captured_forward(
    call: Call,
    needs_gradients: bool,
    index: Tensor,
    second_order: bool = False,
    input_gradient: bool = False,
) -> Forward:
    """One forward of ``call.inputs`` through a fresh capture of ``call.layers``; the target
    scored (``index``: the sample of each row); gradients of the scores to the layers if
    ``needs_gradients``; with ``second_order`` the Hessian-vector products ``H A`` at the
    layers (a second backward from them); with ``input_gradient`` the graph from the first
    input, and its gradient from the same backward."""
    names = [name for name, _ in call.layers]
    m = int(call.inputs[0].shape[0])
    differentiable = bool(call.options.get("differentiable", False))
    inputs = call.inputs
    if input_gradient:
        if not inputs[0].is_floating_point():
            raise InputError(
                "this method differentiates the score with respect to the input, which must be "
                f"floating point; got {inputs[0].dtype}."
            )
        first = inputs[0]
        if not (differentiable and first.requires_grad):  # a differentiable call keeps the
            first = first.detach().requires_grad_(True)  # caller's graph to the input
        inputs = (first, *inputs[1:])
    capture = Capture(
        call.layers,
        needs_gradients=needs_gradients,
        transform=detector_transform(call.model),
        from_input=input_gradient,
        differentiable=differentiable,
    )
    with capture:
        raw_output = call.model(*inputs, **call.kwargs)
        missing = capture.missing()
        if missing:
            raise missing_layers(missing)
        for name in names:
            check_layer_output(name, capture.activations[name], m)
        target, classes, output, scores = score_target(
            raw_output, call.target, call.options["output"], index, call.n
        )
        acts = [capture.activations[name] for name in names]
        grads: list[Tensor | None] = [None] * len(acts)
        hvps: list[Tensor | None] | None = None
        input_grad: Tensor | None = None
        if needs_gradients:
            if not scores.requires_grad:
                raise LayerError(
                    f"the target score does not depend on layer(s) {', '.join(names)}: no "
                    "gradient flows from it to them. Choose a layer on the path to the scored "
                    "output (camkit.layers(model, x))."
                )
            if second_order or input_gradient:
                _one_target(scores)
            if second_order:
                found, hvps = _hessian_vectors(scores, acts, differentiable)
            elif input_gradient:
                *got, input_grad = torch.autograd.grad(
                    scores.sum(), [*acts, inputs[0]], create_graph=differentiable
                )
                found = [g if differentiable else g.detach() for g in got]
            else:
                found = _gradients(scores, acts, create_graph=differentiable)
            for name, g in zip(names, found, strict=True):
                if g is None:
                    raise LayerError(
                        f"the target score does not depend on layer {name!r}: no gradient "
                        "flows to it. Choose a layer on the path to the scored output."
                    )
                require_finite(g, _layer_error(name, "gradients", g))
            grads = list(found)
    return Forward(
        output=output,
        target=target,
        classes=classes,
        scores=scores.detach(),
        activations=acts if differentiable else [a.detach() for a in acts],
        gradients=grads,
        order=list(capture.activations),
        geometry=capture.geometry,
        hessian_vectors=hvps,
        input_gradient=input_grad,
    )
