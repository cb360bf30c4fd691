"""``camkit.explain`` and ``camkit.Explainer``: one call, top to bottom.

1. check the inputs and resolve the target layer(s);
2. open a :class:`~camkit.capture.Capture` for this call and run the forward;
3. turn the target into one score per sample;
4. if the method needs them, ``torch.autograd.grad`` of the scores to the activations only;
5. the method computes weights; the core combines, applies ReLU, normalises, upsamples, fuses;
6. return a :class:`~camkit.result.CamResult`; nothing of the call stays on the model.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from . import cam
from .capture import Capture, hooks_paused
from .errors import CamkitWarning, InputError, LayerError, OptionError, PluginError, TargetError
from .layers import LayerSpec, cached_default_layer, has_spatial_extent, resolve_layers
from .layout import Layout, layout_or_error
from .method import Context, Method
from .options import resolve_options
from .registry import Registry, default_registry
from .result import CamResult
from .suffix import SuffixRunner
from .targets import ClassTarget, MultiClassTarget, Target, as_target, select_output

__all__ = ["Explainer", "explain"]


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
            stacklevel=3,
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


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class Explainer:
    """Explain one model with one method; reusable, thread-safe, and a context manager.

    Args:
        model: the model (any ``nn.Module``).
        layer: target layer(s): a dotted name, a module, a list of those, or ``None`` for the
            last spatial layer (found by one extra no-grad forward the first time a model sees
            an input shape, then remembered for that model).
        method: a method name (see :func:`camkit.list_methods`) or a :class:`camkit.Method`.
        registry: the registry to look names up in (default: the process-wide one).
        **options: options shared by every method (``relu``, ``normalize``, ``upsample``,
            ``batch_size``, ...; see the options table) and the method's own.

    Examples:
        >>> with camkit.Explainer(model, layer="layer4", method="gradcam") as ex:
        ...     res = ex(x, target=[281, 282])
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        method: str | Method = "gradcam",
        *,
        registry: Registry | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(
                f"model expects a torch.nn.Module; got {type(model).__name__}. Pass the model "
                "object, not its output or state_dict."
            )
        model = unwrap(model)
        self.registry = registry or default_registry()
        self.method = self.registry.get(method)
        self.options = resolve_options(
            self.method.name, self.method.options, options, self.method.check_options
        )
        self.model: nn.Module | None = model
        self.layer = layer
        if layer is not None:
            resolve_layers(model, layer)  # fail early on unknown names

    def __enter__(self) -> Explainer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop the reference to the model; the explainer cannot be called afterwards."""
        self.model = None

    # -- one call --------------------------------------------------------------------------
    def __call__(self, x: Any, target: Any = None, **options: Any) -> CamResult:
        """Explain the batch ``x`` for ``target``.

        Args:
            x: ``(N, C_in, *S_in)`` tensor, or a tuple of tensors whose first gives the map's size.
            target: ``None`` (predicted class), an int, ``N`` ints, a callable
                ``f(output) -> (N,)`` or a target object.
            **options: options overriding the explainer's for this call.

        Returns:
            A :class:`CamResult`.
        """
        model = self.model
        if model is None:
            raise InputError("this Explainer was closed; create a new one to explain more inputs.")
        opts = (
            resolve_options(
                self.method.name,
                self.method.options,
                {**{k: v for k, v in self.options.items()}, **options},
                self.method.check_options,
            )
            if options
            else self.options
        )
        inputs = _check_inputs(x)
        kwargs = dict(opts["model_kwargs"] or {})
        layers = self._layers(model, inputs, kwargs)
        with _buffers_kept(model):
            if opts["aug_smooth"]:
                return _run_augmented(model, inputs, kwargs, layers, self.method, target, opts)
            return _run(model, inputs, kwargs, layers, self.method, target, opts)

    def _layers(
        self, model: nn.Module, inputs: tuple[Tensor, ...], kwargs: dict[str, Any]
    ) -> list[tuple[str, nn.Module]]:
        if self.layer is not None:
            return resolve_layers(model, self.layer)
        proposed = self.registry.default_layers(model)
        if proposed:
            try:
                return resolve_layers(model, proposed)
            except LayerError as exc:
                raise PluginError(
                    f"an architecture adapter proposed layer(s) {proposed} for "
                    f"{type(model).__name__}, which do not resolve: {exc} Pass layer=... to "
                    "choose one, and report it to the adapter's authors."
                ) from exc
        key = (
            tuple((tuple(t.shape), t.dtype, t.device) for t in inputs),
            tuple(sorted(kwargs)),
        )
        with _buffers_kept(model):
            name = cached_default_layer(
                model,
                key,
                lambda: model(*inputs, **kwargs),
                tuple(inputs[0].shape[2:]),
                int(inputs[0].shape[0]),
            )
        return resolve_layers(model, name)


def explain(
    model: nn.Module,
    x: Any,
    method: str | Method = "gradcam",
    layer: LayerSpec = None,
    target: Any = None,
    **options: Any,
) -> CamResult:
    """Explain ``model`` on the batch ``x`` with ``method`` at ``layer``.

    Args:
        model: any ``nn.Module``.
        x: ``(N, C_in, *S_in)`` tensor (1D, 2D or 3D spatial), or a tuple of tensors.
        method: a registered method name or a :class:`camkit.Method` instance.
        layer: a dotted name, a module, a list of those, or ``None`` (the last spatial layer).
        target: ``None`` (predicted class), an int, ``N`` ints, a callable or a target object.
        **options: see the options table (``relu``, ``normalize``, ``upsample``, ...).

    Returns:
        A :class:`CamResult` with ``maps`` ``(N, *S_in)`` in [0, 1].
    """
    with Explainer(model, layer=layer, method=method, **options) as ex:
        return ex(x, target=target)


#: Scale of the scores before a float16 backward, undone on the float32 gradients: small
#: gradients would otherwise underflow to zero (as gradient scalers do for training).
FLOAT16_SCALE = 2.0**12


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
            raise LayerError(
                f"layer(s) {', '.join(map(repr, missing))} did not run in the model's forward "
                "on this input; choose layers the forward uses (camkit.layers(model, x))."
            )
        target, classes = make_target(select_output(raw_output, opts["output"]))
        output = scored_output(raw_output, target, opts["output"])
        scores = target.scores(output, index)
        several = isinstance(target, MultiClassTarget)
        if several and isinstance(scores, Tensor) and scores.ndim == 2 and scores.shape[0] == m:
            pass  # (M, K): several targets per sample
        elif not isinstance(scores, Tensor) or scores.shape != (m,):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise TargetError(f"the target must give one score per sample, ({m},); got {got}.")
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
            for name, a, g in zip(names, acts, found, strict=True):
                if g is None:
                    raise LayerError(
                        f"the target score does not depend on layer {name!r}: no gradient "
                        "flows to it. Choose a layer on the path to the scored output."
                    )
                for what, t in (("activations", a), ("gradients", g)):
                    if not _finite(t):
                        raise LayerError(
                            f"layer {name!r} has non-finite {what} ({t.dtype}): the model "
                            "overflows or divides by zero on this input. Check the input's "
                            "preprocessing; for float16 models, try bfloat16 or float32."
                        )
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


def _run(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    kwargs: dict[str, Any],
    layers: list[tuple[str, nn.Module]],
    method: Method,
    target_spec: Any,
    opts: Mapping[str, Any],
) -> CamResult:
    n = int(inputs[0].shape[0])
    names = [name for name, _ in layers]
    rows = torch.arange(n, device=inputs[0].device)
    fwd = _forward(
        model,
        inputs,
        kwargs,
        layers,
        method.needs_gradients,
        opts,
        lambda output: as_target(target_spec, output, n),
        rows,
    )
    output, target, scores = fwd.output, fwd.target, fwd.scores
    several = fwd.classes.shape[1] if fwd.classes is not None and fwd.classes.ndim == 2 else 0
    # from here on, layers in the order they ran: fusion rules tell shallow from deep
    ranks = {name: i for i, name in enumerate(fwd.order)}
    order = sorted(range(len(layers)), key=lambda i: ranks[layers[i][0]])
    layers = [layers[i] for i in order]
    names = [names[i] for i in order]
    acts = [fwd.activations[i] for i in order]
    grads = [fwd.gradients[i] for i in order]
    if several:
        # N samples x K targets become N * K rows, sample-major; gradients come (K, N, ...)
        rep = torch.arange(n, device=inputs[0].device).repeat_interleave(several)
        inputs = tuple(t[rep] for t in inputs)
        output = output[rep] if isinstance(output, Tensor) else output
        assert fwd.classes is not None
        target = ClassTarget(fwd.classes.reshape(-1))
        scores = scores.reshape(-1)
        acts = [a[rep] for a in acts]
        grads = [None if g is None else g.transpose(0, 1).flatten(0, 1) for g in grads]

    # weights, sums and resampling in full precision even under the caller's autocast; the
    # model runs that methods ask for (ctx.score, ...) get the caller's autocast back
    device_type = inputs[0].device.type
    caller_autocast = _autocast_state(device_type)
    with torch.autocast(device_type=device_type, enabled=False):
        generator = torch.Generator(device=inputs[0].device).manual_seed(opts["seed"])
        score_fn = _scorer(model, kwargs, target, opts)
        spatial = tuple(inputs[0].shape[2:])
        maps: list[Tensor] = []
        raws: dict[str, Tensor] = {}
        weights_out: dict[str, Tensor] = {}
        for (name, module), act, grad in zip(layers, acts, grads, strict=True):
            layout = _layout(name, act, opts["reshape"], spatial)
            activations, gradients = _prepare(name, act, grad, opts["reshape"], layout)
            ctx = Context(
                model=model,
                inputs=inputs,
                output=output,
                layer=name,
                activations=activations,
                gradients=gradients,
                scores=scores,
                target=target,
                options=opts,
                generator=generator,
                score=score_fn,
                run_suffix=_suffix_runner(
                    model,
                    inputs,
                    kwargs,
                    (name, module),
                    act,
                    layout,
                    target,
                    opts,
                    caller_autocast,
                ),
                recapture=_recapturer(
                    model, kwargs, (name, module), method, target, opts, caller_autocast
                ),
            )
            w = method.weights(ctx)
            _check_weights(method, w, activations)
            raw = method.combine(ctx, w).detach()
            if opts["relu"]:
                raw = raw.clamp_min(0)
            raws[name], weights_out[name] = raw, w.detach()
            m = raw
            if opts["upsample"] is not None and len(spatial) == m.ndim - 1:
                if fwd.geometry is not None:
                    m = _through_resize(m, fwd.geometry, several, spatial, opts["upsample"])
                else:
                    m = cam.upsample(m, spatial, opts["upsample"])
            maps.append(m)
        if len(maps) > 1:
            size = max((tuple(m.shape[1:]) for m in maps), key=math.prod)
            maps = [cam.upsample(m, size, "auto") for m in maps]
            final = method.fuse(maps, opts)
        else:
            final = maps[0]
        # normalised after upsampling (and fusion), so that every map spans exactly [0, 1]
        final = cam.normalize(final) if opts["normalize"] else final
    single = len(names) == 1

    def per_sample(t: Tensor) -> Tensor:  # (N * K, ...) -> (N, K, ...)
        return t.reshape(n, several, *t.shape[1:]) if several else t

    return CamResult(
        maps=per_sample(final.float()),
        raw=per_sample(raws[names[0]]) if single else {k: per_sample(v) for k, v in raws.items()},
        weights=(
            per_sample(weights_out[names[0]])
            if single
            else {k: per_sample(v) for k, v in weights_out.items()}
        ),
        targets=fwd.classes,
        scores=per_sample(scores),
        layer=names[0] if single else names,
        method=method.name,
    )


def _through_resize(
    maps: Tensor,
    geometry: tuple[tuple[int, int], list[tuple[int, int]]],
    several: int,
    size: tuple[int, ...],
    mode: str,
) -> Tensor:
    """Maps of a model that resized and padded its inputs, back onto the inputs.

    The layer saw the padded canvas: each map is upsampled to the canvas, cropped to its image's
    resized extent (the padding lies right and below), and resized to the input's size.
    """
    canvas, sizes = geometry
    out = []
    for i in range(maps.shape[0]):
        h, w = sizes[i // several] if several else sizes[i]
        full = cam.upsample(maps[i : i + 1], canvas, mode)
        out.append(cam.upsample(full[:, :h, :w], size, mode))
    return torch.cat(out)


def _layout(name: str, a: Tensor, reshape: Any, input_spatial: tuple[int, ...]) -> Layout | None:
    """The layer's layout, or ``None`` when the caller's ``reshape`` takes its place."""
    if reshape is not None:
        return None
    if a.ndim < 3:
        _no_extent(name, a)
    return layout_or_error(name, tuple(a.shape), input_spatial, int(a.shape[0]))


def _no_extent(name: str, a: Tensor) -> None:
    raise LayerError(
        f"layer {name!r} gives an output of shape {tuple(a.shape)}, which has no spatial "
        "extent to map: expected (N, C, *S) with more than one position. Choose an earlier "
        "layer (before global pooling or flattening), or pass reshape=... for token outputs."
    )


def _prepare(
    name: str,
    a: Tensor,
    g: Tensor | None,
    reshape: Callable[[Tensor], Tensor] | None,
    layout: Layout | None,
) -> tuple[Tensor, Tensor | None]:
    """Activations and gradients as ``(N, C, *S)``, float32 for half-precision layers."""
    a = a.detach()
    if reshape is not None:
        a = reshape(a)
        g = reshape(g) if g is not None else None
    elif layout is not None:
        a = layout.to_maps(a)
        g = layout.to_maps(g) if g is not None else None
    if not has_spatial_extent(a):
        _no_extent(name, a)
    if a.dtype in (torch.float16, torch.bfloat16):  # weights and sums in float32
        a = a.float()
        g = g.float() if g is not None else None
    return a, g


def _check_weights(method: Method, w: Any, activations: Tensor) -> None:
    n, c = activations.shape[:2]
    ok = isinstance(w, Tensor) and (
        tuple(w.shape) == (n, c) or tuple(w.shape) == tuple(activations.shape)
    )
    if not ok:
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise PluginError(
            f"method {method.name!r} returned weights of shape {got}; expected ({n}, {c}) or "
            f"{tuple(activations.shape)} for activations {tuple(activations.shape)}."
        )


def _autocast_state(device_type: str) -> Callable[[], Any]:
    """A factory of autocast contexts restoring the caller's current autocast settings."""
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


def _scorer(
    model: nn.Module,
    kwargs: dict[str, Any],
    target: Target,
    opts: Mapping[str, Any],
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> Callable[..., Tensor]:
    """``ctx.score``: re-score new inputs in chunks, hooks off, no gradients."""

    def score(new_inputs: Any, index: Tensor, other: Target | None = None) -> Tensor:
        scorer = target if other is None else other
        batch = new_inputs if isinstance(new_inputs, tuple) else (new_inputs,)
        m = int(batch[0].shape[0])
        if index.shape != (m,):
            raise PluginError(
                f"ctx.score got {m} input rows but an index of shape {tuple(index.shape)}; "
                f"expected ({m},)."
            )
        out = []
        with hooks_paused(), torch.no_grad(), autocast():
            for sl in _chunks(m, opts["batch_size"]):
                o = scored_output(model(*(t[sl] for t in batch), **kwargs), scorer, opts["output"])
                out.append(scorer.scores(o, index[sl]).detach())
        return torch.cat(out)

    return score


def _suffix_runner(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    kwargs: dict[str, Any],
    layer: tuple[str, nn.Module],
    activations: Tensor,
    layout: Layout | None,
    target: Target,
    opts: Mapping[str, Any],
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``ctx.run_suffix``: scores with the layer's output replaced (see :mod:`camkit.suffix`)."""
    runner: SuffixRunner | None = None

    def run_suffix(replacement: Tensor, index: Tensor) -> Tensor:
        nonlocal runner
        if layout is None:
            raise OptionError(
                "ctx.run_suffix replaces the layer's output, but with reshape=... camkit cannot "
                "turn the method's (N, C, *S) activations back into the layer's layout. Leave "
                "reshape out where camkit recognises the layout (channels last, transformer "
                "tokens), or choose a layer whose output is (N, C, *S)."
            )
        m = int(replacement.shape[0])
        if index.shape != (m,):
            raise PluginError(
                f"ctx.run_suffix got {m} activation rows but an index of shape "
                f"{tuple(index.shape)}; expected ({m},)."
            )
        if runner is None:
            runner = SuffixRunner(
                model,
                inputs,
                kwargs,
                layer,
                activations,
                lambda o, idx: target.scores(scored_output(o, target, opts["output"]), idx),
                opts["batch_size"],
            )
        native = layout.to_native(
            replacement.to(activations.dtype), activations[index.to(activations.device)]
        )
        with autocast():
            return runner(native, index)

    return run_suffix


def _recapturer(
    model: nn.Module,
    kwargs: dict[str, Any],
    layer: tuple[str, nn.Module],
    method: Method,
    target: Target,
    opts: Mapping[str, Any],
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> Callable[[Any, Tensor], tuple[Tensor, Tensor | None]]:
    """``ctx.recapture``: the layer's activations (and gradients) for new inputs, in chunks."""

    def recapture(new_inputs: Any, index: Tensor) -> tuple[Tensor, Tensor | None]:
        batch = new_inputs if isinstance(new_inputs, tuple) else (new_inputs,)
        m = int(batch[0].shape[0])
        if index.shape != (m,):
            raise PluginError(
                f"ctx.recapture got {m} input rows but an index of shape "
                f"{tuple(index.shape)}; expected ({m},)."
            )
        acts, grads = [], []
        for sl in _chunks(m, opts["batch_size"]):
            with autocast():
                fwd = _forward(
                    model,
                    tuple(t[sl] for t in batch),
                    kwargs,
                    [layer],
                    method.needs_gradients,
                    opts,
                    lambda output: (target, None),
                    index[sl],
                )
            act = fwd.activations[0]
            layout = _layout(layer[0], act, opts["reshape"], tuple(batch[0].shape[2:]))
            a, g = _prepare(layer[0], act, fwd.gradients[0], opts["reshape"], layout)
            acts.append(a)
            if g is not None:
                grads.append(g)
        return torch.cat(acts), (torch.cat(grads) if grads else None)

    return recapture


#: Intensity factors of the ``scale`` augmentation (the identity, 1.0, is always included).
AUG_FACTORS = (0.9, 1.1)


def _augmentations(spec: Any, first: Tensor) -> list[tuple[bool, float]]:
    """``(flip, factor)`` pairs for ``aug_smooth``, the identity first."""
    names = ("hflip", "scale") if spec is True else tuple(spec)
    if "hflip" in names and first.ndim < 4:
        raise OptionError(
            "aug_smooth's 'hflip' flips the last spatial dimension of images (N, C, H, W, ...); "
            f"the input has shape {tuple(first.shape)}. Pass aug_smooth=('scale',) instead."
        )
    if "scale" in names and not first.is_floating_point():
        raise OptionError(
            "aug_smooth's 'scale' multiplies the input's values, which needs floating-point "
            f"inputs; got {first.dtype} (token ids?). Pass aug_smooth=('hflip',) or leave it off."
        )
    flips = (False, True) if "hflip" in names else (False,)
    factors = (1.0, *AUG_FACTORS) if "scale" in names else (1.0,)
    return [(f, s) for f in flips for s in factors]


class _IndexedTarget:
    """A target scoring copies: row ``m`` of a copy batch belongs to sample ``index[m]``."""

    def __init__(self, target: Target, index: Tensor) -> None:
        self.target, self.index = target, index

    def scores(self, output: Any, index: Tensor) -> Tensor:
        return self.target.scores(output, self.index.to(index.device)[index])


def _run_augmented(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    kwargs: dict[str, Any],
    layers: list[tuple[str, nn.Module]],
    method: Method,
    target_spec: Any,
    opts: Mapping[str, Any],
) -> CamResult:
    """``aug_smooth``: the mean of the maps of augmented copies, each mapped back.

    The identity runs first and fixes the classes explained (for ``target=None``, those predicted
    on the original inputs); the other copies (horizontal flip; intensities x0.9 and x1.1) run as
    one batched call. Flipped maps, raw maps and element-wise weights are flipped back before
    averaging; the mean map is normalised again.
    """
    augs = _augmentations(opts["aug_smooth"], inputs[0])
    plain = {**opts, "aug_smooth": False}
    base = _run(model, inputs, kwargs, layers, method, target_spec, plain)
    if len(augs) == 1:
        return base
    n, k = int(inputs[0].shape[0]), len(augs) - 1
    index = torch.arange(n, device=inputs[0].device).repeat(k)
    copies = torch.cat(
        [(inputs[0].flip(-1) if flip else inputs[0]) * factor for flip, factor in augs[1:]]
    )
    target: Any
    if base.targets is not None:
        target = base.targets[index]
    else:
        target = _IndexedTarget(as_target(target_spec, None, n)[0], index)
    extra = tuple(t[index] for t in inputs[1:])
    res = _run(model, (copies, *extra), kwargs, layers, method, target, plain)
    flips = torch.tensor([flip for flip, _ in augs[1:]], device=copies.device).repeat_interleave(n)

    def back(t: Tensor, spatial_from: int) -> Tensor:
        """Un-flip the flipped copies of ``t`` ``(k*n, ...)`` and split them ``(k, n, ...)``."""
        if t.ndim > spatial_from:
            shape = (-1,) + (1,) * (t.ndim - 1)
            t = torch.where(flips.reshape(shape), t.flip(-1), t)
        return t.reshape(k, n, *t.shape[1:])

    def mean(identity: Tensor, copies_t: Tensor, spatial_from: int) -> Tensor:
        return torch.cat([identity.unsqueeze(0), back(copies_t, spatial_from)]).mean(0)

    maps = mean(base.maps, res.maps, 1)
    if opts["normalize"]:
        maps = cam.normalize(maps)

    def merge(a: Tensor | dict[str, Tensor], b: Tensor | dict[str, Tensor], sp: int) -> Any:
        if isinstance(a, dict):
            assert isinstance(b, dict)
            return {name: mean(a[name], b[name], sp) for name in a}
        assert isinstance(b, Tensor)
        return mean(a, b, sp)

    return CamResult(
        maps=maps.float(),
        raw=merge(base.raw, res.raw, 1),
        weights=merge(base.weights, res.weights, 2),
        targets=base.targets,
        scores=base.scores,
        layer=base.layer,
        method=base.method,
    )
