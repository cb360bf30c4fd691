"""``camkit.explain`` and ``camkit.Explainer``: one call, top to bottom.

1. check the inputs and resolve the target layer(s);
2. open a :class:`~camkit.capture.Capture` for this call and run the forward;
3. turn the target into one score per sample;
4. if the method needs them, ``torch.autograd.grad`` of the scores to the activations only;
5. the method computes weights; the core combines, applies ReLU, normalises, upsamples, fuses;
6. return a :class:`~camkit.result.CamResult`; nothing of the call stays on the model.

Steps 1 to 4 live in :mod:`camkit.forward`, the capabilities a method's context carries in
:mod:`camkit.capabilities`, and ``aug_smooth`` in :mod:`camkit.augment`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from . import cam
from .augment import _run_augmented
from .capabilities import _autocast_state, _recapturer, _scorer, _suffix_runner
from .errors import InputError, LayerError, PluginError
from .forward import _buffers_kept, _check_inputs, _forward, _forward_primed, unwrap
from .layers import LayerSpec, cached_default_layer, resolve_layers
from .layout import batch_rows, layer_layout, prepare_maps, target_major
from .method import Context, Method
from .options import resolve_options
from .registry import Registry, default_registry
from .result import CamResult
from .suffix import Primed
from .targets import ClassTarget, Target, as_target

__all__ = ["Explainer", "explain"]


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

    def make_target(output: Any) -> tuple[Target, Tensor | None]:
        return as_target(target_spec, output, n)

    primed: Primed | None = None
    got = None
    if (
        method.uses_run_suffix
        and not method.needs_gradients
        and len(layers) == 1
        and opts["reshape"] is None
    ):
        # the explained forward records the prefix and checks the replay itself
        got = _forward_primed(model, inputs, kwargs, layers[0], opts, make_target, rows)
    if got is not None:
        fwd, primed = got
    else:
        fwd = _forward(
            model, inputs, kwargs, layers, method.needs_gradients, opts, make_target, rows
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
        grads = [
            None if g is None else target_major(g, a, n) for a, g in zip(acts, grads, strict=True)
        ]
        acts = [batch_rows(a, rep, n) for a in acts]

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
            layout = layer_layout(name, act, opts["reshape"], spatial, int(inputs[0].shape[0]))
            activations, gradients = prepare_maps(name, act, grad, opts["reshape"], layout)
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
                    primed if not several else None,
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
                    m = cam.through_resize(m, fwd.geometry, several, spatial, opts["upsample"])
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
