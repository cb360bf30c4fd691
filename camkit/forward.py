"""One captured forward, and what it needs: input checks, model state, gradients, layouts.

:func:`_forward` runs the model once through a :class:`~camkit.capture.Capture`, turns the
target into scores and, when asked, differentiates them to the target layers only. The helpers
around it check the inputs, keep the model's buffers, unwrap wrappers, and turn a layer's output
(and gradient) into channels-first maps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .capture import Capture
from .errors import (
    CamkitError,
    CamkitWarning,
    InputError,
    LayerError,
    TargetError,
    user_stacklevel,
)
from .layout import batch_dim
from .suffix import Primed, Replays, record_prefix
from .targets import ClassTarget, MultiClassTarget, Target, select_output


def _check_inputs(x: Any) -> tuple[Tensor, ...]:
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
    if torch.is_inference_mode_enabled():
        raise InputError(
            "camkit cannot compute maps inside torch.inference_mode(): it needs autograd from "
            "the target layer on. Call it outside inference_mode (torch.no_grad() is fine)."
        )
    # inference tensors cannot enter autograd; a plain copy can
    return tuple(t.clone() if t.is_inference() else t for t in inputs)


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


def scored_output(output: Any, target: Target, choice: Any) -> Any:
    """What ``target`` scores: class targets the selected output (:func:`select_output`);
    other targets the raw output, unless the caller chose a part with the ``output`` option."""
    if choice is None and not isinstance(target, ClassTarget):
        return output
    return select_output(output, choice)


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every buffer afterwards when some module is in training mode."""
    if not any(m.training for m in model.modules()):
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


#: Scale of the scores before a float16 backward, undone on the float32 gradients: small
#: gradients would otherwise underflow to zero (as gradient scalers do for training).
FLOAT16_SCALE = 2.0**12


def _non_finite(name: str, what: str, t: Tensor) -> str:
    return (
        f"layer {name!r} has non-finite {what} ({t.dtype}): the model overflows or divides by "
        "zero on this input. Check the input's preprocessing; for float16 models, try bfloat16 "
        "or float32."
    )


def _check_layer_output(name: str, a: Tensor, batch: int) -> None:
    """The layer's output holds one row per sample (or is sequence-first) and is finite."""
    if a.ndim >= 2 and a.shape[0] != batch and a.shape[1] != batch:
        raise LayerError(
            f"layer {name!r} gives an output of shape {tuple(a.shape)}, whose first dimension "
            f"is not the batch size {batch}: it does not hold one map per sample (a detector's "
            "region head works on proposals, for instance). Choose a layer of the backbone."
        )
    if not _finite(a):
        raise LayerError(_non_finite(name, "activations", a))


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _gradients(scores: Tensor, acts: list[Tensor]) -> list[Tensor | None]:
    """d(sum of scores)/d(activations); float16 layers get a scaled backward.

    Scores ``(N, K)`` (several targets per sample) get one batched backward: gradients
    ``(K, N, ...)``, one per target.
    """

    def grad(scale: float, retain: bool) -> tuple[Tensor | None, ...]:
        if scores.ndim == 1:
            return torch.autograd.grad(
                scores.sum() * scale, acts, allow_unused=True, retain_graph=retain
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
            retain_graph=retain,
        )

    if not any(a.dtype == torch.float16 for a in acts):
        return list(grad(1.0, False))
    scaled = grad(FLOAT16_SCALE, True)
    if all(g is None or _finite(g) for g in scaled):
        return [None if g is None else g.float() / FLOAT16_SCALE for g in scaled]
    # the scaled gradients overflowed: the plain ones are the best float16 can give
    return list(grad(1.0, False))


@dataclass
class _Forward:
    """What one captured forward gives: the scored output, the target and per-layer tensors."""

    output: Any
    target: Target
    classes: Tensor | None
    scores: Tensor  # (N,) detached
    activations: list[Tensor]  # per layer, detached, as the layer returned them
    gradients: list[Tensor | None]  # per layer, or None when not needed
    order: list[str]  # layer names in the order they ran
    geometry: tuple[tuple[int, int], list[tuple[int, int]]] | None = None


def _missing_layers(missing: list[str]) -> LayerError:
    return LayerError(
        f"layer(s) {', '.join(map(repr, missing))} did not run in the model's forward on this "
        "input; choose layers the forward uses (camkit.layers(model, x))."
    )


def _target_scores(
    raw_output: Any,
    opts: Mapping[str, Any],
    make_target: Callable[[Any], tuple[Target, Tensor | None]],
    index: Tensor,
    m: int,
) -> tuple[Target, Tensor | None, Any, Tensor]:
    """The target made from the model's output, the scored output and the scores ``(M,)``
    (``(M, K)`` for several targets per sample), checked."""
    target, classes = make_target(select_output(raw_output, opts["output"]))
    output = scored_output(raw_output, target, opts["output"])
    scores = target.scores(output, index)
    if isinstance(scores, Tensor) and not _finite(scores):
        raise TargetError(
            f"the target scores are not finite ({scores.detach().flatten()[:4].tolist()}...): "
            "the model overflows or divides by zero on this input. Check the input's "
            "preprocessing; for float16 models, try bfloat16 or float32."
        )
    several = isinstance(target, MultiClassTarget)
    if several and isinstance(scores, Tensor) and scores.ndim == 2 and scores.shape[0] == m:
        pass  # (M, K): several targets per sample
    elif not isinstance(scores, Tensor) or scores.shape != (m,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise TargetError(f"the target must give one score per sample, ({m},); got {got}.")
    return target, classes, output, scores


def _forward(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    kwargs: Mapping[str, Any],
    layers: list[tuple[str, nn.Module]],
    needs_gradients: bool,
    opts: Mapping[str, Any],
    make_target: Callable[[Any], tuple[Target, Tensor | None]],
    index: Tensor,
) -> _Forward:
    """One forward through a fresh capture; gradients of the scores to the layers if needed."""
    names = [name for name, _ in layers]
    m = int(inputs[0].shape[0])
    transform = getattr(model, "transform", None)  # torchvision detection resizes and pads
    capture = Capture(
        layers,
        needs_gradients=needs_gradients,
        transform=transform if isinstance(transform, nn.Module) else None,
    )
    with capture:
        raw_output = model(*inputs, **kwargs)
        missing = capture.missing()
        if missing:
            raise _missing_layers(missing)
        for name in names:
            _check_layer_output(name, capture.activations[name], m)
        target, classes, output, scores = _target_scores(raw_output, opts, make_target, index, m)
        acts = [capture.activations[name] for name in names]
        grads: list[Tensor | None] = [None] * len(acts)
        if needs_gradients:
            if not scores.requires_grad:
                raise LayerError(
                    f"the target score does not depend on layer(s) {', '.join(names)}: no "
                    "gradient flows from it to them. Choose a layer on the path to the scored "
                    "output (camkit.layers(model, x))."
                )
            found = _gradients(scores, acts)
            for name, g in zip(names, found, strict=True):
                if g is None:
                    raise LayerError(
                        f"the target score does not depend on layer {name!r}: no gradient "
                        "flows to it. Choose a layer on the path to the scored output."
                    )
                if not _finite(g):
                    raise LayerError(_non_finite(name, "gradients", g))
            grads = list(found)
    return _Forward(
        output=output,
        target=target,
        classes=classes,
        scores=scores.detach(),
        activations=[a.detach() for a in acts],
        gradients=grads,
        order=list(capture.activations),
        geometry=capture.geometry,
    )


def _forward_primed(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    kwargs: Mapping[str, Any],
    layer: tuple[str, nn.Module],
    opts: Mapping[str, Any],
    make_target: Callable[[Any], tuple[Target, Tensor | None]],
    index: Tensor,
) -> tuple[_Forward, Primed] | None:
    """The explained forward of a method that uses ``ctx.run_suffix``, without gradients, one
    layer: the forward that explains also records the prefix and checks the replay.

    The layer's output is captured as usual, but the rest of the model sees it with the first
    sample scaled by 1/2 (set to ones where it is all zero): that forward's output is the exact
    output of a perturbed copy. The explained output is the replay of the captured output; the
    replay of the perturbed copy must match the forward's score of it, and the replayed scores
    of the other samples the forward's. Then ``ctx.run_suffix`` needs no forward of its own:
    one forward fewer than :func:`_forward` and a later check. Returns ``None`` where the replay
    is not exact or raises: the caller then runs :func:`_forward`, and ``ctx.run_suffix``
    checks (and warns) on its own. With several targets per sample (scores ``(N, K)``) every
    target's score is compared; the record is for the ``N`` samples, so the caller hands it to
    ``ctx.run_suffix`` only for one target per sample.
    """
    name, module = layer
    m = int(inputs[0].shape[0])
    perturbed: list[Tensor] = []

    def replace(a: Tensor) -> Tensor:
        copy = a.clone()
        first = copy.select(batch_dim(a, m), 0)
        if bool(first.ne(0).any()):
            first.mul_(0.5)
        else:
            first.fill_(1.0)
        perturbed.append(first.clone())  # as the layer gave it, before any in-place op after
        return copy

    transform = getattr(model, "transform", None)
    capture = Capture(
        [layer],
        needs_gradients=False,
        transform=transform if isinstance(transform, nn.Module) else None,
        replace=replace,
    )
    outputs: list[Any] = []
    with capture:
        try:
            recorded = record_prefix(
                model, module, lambda: outputs.append(model(*inputs, **kwargs))
            )
        except CamkitError:
            raise
        except Exception:  # the perturbed copy may be what fails: leave it to _forward
            return None
        if capture.missing():
            raise _missing_layers(capture.missing())
        act = capture.activations[name]
        _check_layer_output(name, act, m)
    bd = batch_dim(act, m)
    replays = Replays(model, inputs, dict(kwargs), module, act, recorded, bd)
    try:
        raw = replays.output(act, index)
        if replays.written():
            return None
        target, classes, output, scores = _target_scores(raw, opts, make_target, index, m)
        exact = target.scores(scored_output(outputs[0], target, opts["output"]), index)
        own = perturbed[0].unsqueeze(bd)
        version = own._version
        fast = target.scores(
            scored_output(replays.output(own, index[:1]), target, opts["output"]), index[:1]
        )
        copy_layer = own._version != version
        if replays.written():
            return None
        tol = 1e-4 * max(1.0, float(exact.detach().abs().max()))
        got = torch.cat([fast, scores[1:]]).detach()
        if got.shape != exact.shape or not bool(torch.isfinite(got).all()):
            return None
        if float((got - exact.detach()).abs().max()) > tol:
            return None
    except CamkitError:
        raise  # the caller's mistake (a target, an option), not the replay's
    except Exception:  # not replayable: the ordinary forward, then run_suffix's own check
        return None
    forward = _Forward(
        output=output,
        target=target,
        classes=classes,
        scores=scores.detach(),
        activations=[act],
        gradients=[None],
        order=[name],
        geometry=capture.geometry,
    )
    return forward, Primed(recorded, copy_layer)
