"""``camkit.explain`` and ``camkit.Explainer``: one call, top to bottom.

1. check the inputs (:mod:`camkit.forward`), resolve the target layer(s)
   (:mod:`camkit.layers`) and build the :class:`~camkit.call.Call`;
2. capture: run the forward through a :class:`~camkit.capture.Capture`
   (:func:`camkit.forward.captured_forward`, or :func:`camkit.suffix.primed_forward` for
   methods that re-run the part after the layer);
3. score: turn the target into one score per sample (:func:`camkit.targets.score_target`) and,
   if the method needs them, ``torch.autograd.grad`` of the scores to the activations only;
4. weights per layer: the layer's layout (:mod:`camkit.layout`), the method's
   :class:`~camkit.method.Context` with its capabilities (:mod:`camkit.capabilities`,
   :mod:`camkit.suffix`), the method's weights and combination, ReLU, upsampling
   (:mod:`camkit.cam`);
5. combine: fuse the layers' maps and normalise;
6. return a :class:`~camkit.result.CamResult`; nothing of the call stays on the model.

``aug_smooth`` runs steps 2 to 6 on the inputs and on their augmented copies
(:mod:`camkit.augment`) and averages the results.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from . import augment, cam
from .call import Call, autocast_state
from .capabilities import recapturer, scorer
from .capture import refuse_compiled
from .checks import check_batched, check_combined, check_weights, warn_blank_maps
from .deferred import deferred_checks, resolve, resolving
from .errors import InputError, LayerError, OptionError, PluginError
from .forward import (
    Forward,
    buffers_kept,
    captured_forward,
    check_inputs,
    normal_tensor,
    outside_inference_mode,
    unwrap,
)
from .inputs import KeywordModel, input_spatial, split_mapping, to_input_rank
from .layers import (
    LayerSpec,
    cached_default_layer,
    resolve_layers,
    still_resolves,
    target_key,
    target_scorer,
)
from .layout import batch_rows, layer_layout, prepare_maps, target_major
from .method import Context, Method
from .options import resolve_options
from .registry import Registry, default_registry
from .replay import Primed
from .result import CamResult
from .suffix import primed_forward, suffix_runner
from .targets import ClassTarget

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
        _check_differentiable(self.method, self.options, self.registry)
        self.model: nn.Module | None = model
        self.layer = layer
        # fail early on unknown names; reused while each name still leads to its module
        self._resolved = resolve_layers(model, layer) if layer is not None else None

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
            x: ``(N, C_in, *S_in)`` tensor, a tuple of tensors whose first gives the map's size,
                or a mapping of the model's keyword arguments (see :mod:`camkit.inputs`).
            target: ``None`` (predicted class), an int, ``N`` ints, a callable
                ``f(output) -> (N,)`` or a target object.
            **options: options overriding the explainer's for this call.

        Returns:
            A :class:`CamResult`.
        """
        # inside torch.inference_mode() (Lightning's test and predict loops) the call leaves it
        # for its own duration, and copies inference tensors so that autograd can use them
        if torch.is_inference_mode_enabled() and {**self.options, **options}.get("differentiable"):
            raise InputError(
                "differentiable=True was asked inside torch.inference_mode(): the maps' graph "
                "could not reach the caller's tensors, which inference mode keeps out of autograd. "
                "Call outside torch.inference_mode() (torch.no_grad() is fine)."
            )
        with outside_inference_mode():
            return self._explain(x, target, options)

    def _explain(self, x: Any, target: Any, options: dict[str, Any]) -> CamResult:
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
        _check_differentiable(self.method, opts, self.registry)
        kwargs = {k: normal_tensor(v) for k, v in (opts["model_kwargs"] or {}).items()}
        runner = model
        if isinstance(x, Mapping):  # keyword inputs: the image and its rows' tensors by name
            keys, values, rest = split_mapping(x, opts["image_key"])
            x, runner = values, KeywordModel(model, keys)
            kwargs = {**{k: normal_tensor(v) for k, v in rest.items()}, **kwargs}
        inputs = check_inputs(x)
        check_batched(model, inputs[0])
        refuse_compiled(model, "camkit")  # before the layer search runs the model
        call = Call(
            model=runner,
            inputs=inputs,
            kwargs=kwargs,
            layers=self._layers(
                model, runner, inputs, kwargs, target, opts["output"], opts["spatial_dims"]
            ),
            method=self.method,
            target=target,
            options=opts,
            autocast=autocast_state(inputs[0].device.type),
        )
        with buffers_kept(model):
            return _run_augmented(call) if opts["aug_smooth"] else _run(call)

    def _layers(
        self,
        model: nn.Module,
        runner: nn.Module,
        inputs: tuple[Tensor, ...],
        kwargs: dict[str, Any],
        target: Any,
        choice: Any,
        spatial_dims: int | None,
    ) -> list[tuple[str, nn.Module]]:
        if self.layer is not None:
            if self._resolved is None or not still_resolves(model, self._resolved):
                self._resolved = resolve_layers(model, self.layer)
            return list(self._resolved)
        own = self.method.layers(model)
        if own:
            return resolve_layers(model, own)
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
            target_key(target, choice),
            spatial_dims,
        )
        with buffers_kept(model):
            name = cached_default_layer(
                model,
                key,
                lambda: runner(*inputs, **kwargs),
                input_spatial(inputs[0], spatial_dims),
                int(inputs[0].shape[0]),
                target_scorer(target, choice, int(inputs[0].shape[0])),
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
        x: ``(N, C_in, *S_in)`` tensor (1D, 2D or 3D spatial), a tuple of tensors, or a
            mapping of the model's keyword arguments with the image under ``image_key``.
        method: a registered method name or a :class:`camkit.Method` instance.
        layer: a dotted name, a module, a list of those, or ``None`` (the last spatial layer).
        target: ``None`` (predicted class), an int, ``N`` ints, a callable or a target object.
        **options: see the options table (``relu``, ``normalize``, ``upsample``, ...).

    Returns:
        A :class:`CamResult` with ``maps`` ``(N, *S_in)`` in [0, 1].
    """
    with Explainer(model, layer=layer, method=method, **options) as ex:
        return ex(x, target=target)


@dataclass(frozen=True)
class _Captured:
    """The captured forward, rows and layers as the weights see them: layers in the order they
    ran (fusion rules tell shallow from deep); with ``several`` (``K``) targets per sample the
    ``N`` samples become ``N * K`` sample-major rows of ``call``."""

    call: Call  # inputs and target of the rows
    fwd: Forward
    output: Any
    scores: Tensor
    activations: list[Tensor]
    gradients: list[Tensor | None]
    hessian_vectors: list[Tensor | None]
    several: int
    primed: Primed | None


def _run(call: Call) -> CamResult:
    """One call without ``aug_smooth``: capture and score, weights per layer, combine, result."""
    # a differentiable call keeps the graph even inside the caller's torch.no_grad()
    # finiteness checks off the CPU are read in one transfer (camkit.deferred): the device is
    # not stopped after each step
    grad = bool(call.options["differentiable"]) or torch.is_grad_enabled()
    with torch.set_grad_enabled(grad), deferred_checks():
        got = _capture(call)
        # weights, sums and resampling in full precision even under the caller's autocast;
        # the model runs that methods ask for (ctx.score, ...) get the caller's autocast back
        with torch.autocast(device_type=call.device.type, enabled=False):
            raws, weights, maps, extras = _weights_per_layer(got)
            final = _combine(got, maps)
            return _result(got, final, raws, weights, extras)


def _run_augmented(call: Call) -> CamResult:
    """``aug_smooth``: the plain call on the inputs, one batched call on the augmented copies
    (target: the classes the first explained), and their mean (see :mod:`camkit.augment`)."""
    augs = augment.augmentations(call.options["aug_smooth"], call.inputs[0])
    plain = dataclasses.replace(call, options={**call.options, "aug_smooth": False})
    base = _run(plain)
    if len(augs) == 1:
        return base
    inputs, index = augment.augmented_inputs(call.inputs, augs)
    target = augment.copies_target(base.targets, call.target, index, call.n)
    res = _run(dataclasses.replace(plain, inputs=inputs, target=target))
    return augment.average(base, res, augs, call.options["normalize"])


def _capture(call: Call) -> _Captured:
    """Steps 2 and 3: the captured forward with the target scored (and differentiated)."""
    method, n = call.method, call.n
    # a method may explain a target of its own built on the caller's (Finer-CAM)
    call = dataclasses.replace(call, target=method.target(call.target, call.options))
    rows = torch.arange(n, device=call.device)
    got = None
    if (
        method.uses_run_suffix
        and not method.needs_gradients
        and len(call.layers) == 1
        and call.options["reshape"] is None
    ):
        # the explained forward records the prefix and checks the replay itself
        got = primed_forward(call, rows)
    if got is None:
        plain = captured_forward(
            call,
            method.needs_gradients,
            rows,
            second_order=method.needs_hessian_vector,
            input_gradient=method.needs_input_gradient,
        )
    fwd, primed = got if got is not None else (plain, None)
    classes = fwd.classes
    several = classes.shape[1] if classes is not None and classes.ndim == 2 else 0
    ranks = {name: i for i, name in enumerate(fwd.order)}
    order = sorted(range(len(call.layers)), key=lambda i: ranks[call.layers[i][0]])
    layers = [call.layers[i] for i in order]
    acts = [fwd.activations[i] for i in order]
    grads = [fwd.gradients[i] for i in order]
    hvps = [None if fwd.hessian_vectors is None else fwd.hessian_vectors[i] for i in order]
    if fwd.input_gradient is not None:
        # the model's input joins the layers, first, under the name ""
        layers = [("", call.model), *layers]
        acts, grads = [call.inputs[0], *acts], [fwd.input_gradient, *grads]
        hvps = [None, *hvps]
    inputs, output, target, scores = call.inputs, fwd.output, fwd.target, fwd.scores
    if several:
        assert classes is not None
        # N samples x K targets become N * K rows, sample-major; gradients come (K, N, ...)
        rep = rows.repeat_interleave(several)
        inputs = tuple(t[rep] for t in inputs)
        output = output[rep] if isinstance(output, Tensor) else output
        target = ClassTarget(classes.reshape(-1))
        scores = scores.reshape(-1)
        grads = [
            None if g is None else target_major(g, a, n) for a, g in zip(acts, grads, strict=True)
        ]
        acts = [batch_rows(a, rep, n) for a in acts]
    return _Captured(
        call=dataclasses.replace(call, inputs=inputs, layers=layers, target=target),
        fwd=fwd,
        output=output,
        scores=scores,
        activations=acts,
        gradients=grads,
        hessian_vectors=hvps,
        several=several,
        primed=primed if not several else None,
    )


def _weights_per_layer(
    got: _Captured,
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[Tensor], dict[str, dict[str, Any]]]:
    """Step 4: per layer, the method's weights and map, ReLU and upsampling to the input."""
    call = got.call
    opts, method, target, spatial = call.options, call.method, call.target, call.spatial
    generator = torch.Generator(device=call.device).manual_seed(opts["seed"])
    score_fn = resolving(scorer(call, target))
    maps: list[Tensor] = []
    raws: dict[str, Tensor] = {}
    weights: dict[str, Tensor] = {}
    extras: dict[str, dict[str, Any]] = {}
    per_layer = zip(call.layers, got.activations, got.gradients, got.hessian_vectors, strict=True)
    for (name, module), act, grad, hvp in per_layer:
        layout = layer_layout(name, act, opts["reshape"], spatial, call.n, module)
        activations, gradients = prepare_maps(
            name, act, grad, opts["reshape"], layout, opts["differentiable"]
        )
        # H A laid out as the gradient is
        hv = (
            None
            if hvp is None
            else prepare_maps(name, act, hvp, opts["reshape"], layout, opts["differentiable"])[1]
        )
        ctx = Context(
            model=call.model,
            inputs=call.inputs,
            output=got.output,
            layer=name,
            activations=activations,
            gradients=gradients,
            scores=got.scores,
            target=target,
            options=opts,
            generator=generator,
            score=score_fn,
            run_suffix=resolving(
                suffix_runner(call, (name, module), act, layout, target, got.primed)
            ),
            recapture=resolving(recapturer(call, (name, module), target)),
            hessian_vector=hv,
        )
        w = method.weights(ctx)
        check_weights(method.name, w, activations)
        raw = method.combine(ctx, w)
        check_combined(method.name, raw, activations, spatial)
        raw = raw if opts["differentiable"] else raw.detach()  # the graph, when asked for
        if opts["relu"]:
            raw = raw.clamp_min(0)
        resolve()  # the checks so far, before the warnings read the map
        warn_blank_maps(name, raw, activations, gradients, opts["relu"])
        raws[name], weights[name], extras[name] = raw, w.detach(), ctx.extras
        m = raw
        if opts["upsample"] is not None and len(spatial) != m.ndim - 1:
            m = to_input_rank(name, m, spatial)
        if opts["upsample"] is not None and len(spatial) == m.ndim - 1:
            if got.fwd.geometry is not None:
                m = cam.through_resize(m, got.fwd.geometry, got.several, spatial, opts["upsample"])
            else:
                m = cam.upsample(m, spatial, opts["upsample"])
        maps.append(m)
    return raws, weights, maps, extras


def _combine(got: _Captured, maps: list[Tensor]) -> Tensor:
    """Step 5: the layers' maps fused at the largest size, then normalised, so that every map
    spans exactly [0, 1]."""
    opts = got.call.options
    if len(maps) > 1:
        size = max((tuple(m.shape[1:]) for m in maps), key=math.prod)
        maps = [cam.upsample(m, size, "auto") for m in maps]
        final = got.call.method.fuse(maps, opts)
    else:
        final = maps[0]
    return cam.normalize(final) if opts["normalize"] else final


def _result(
    got: _Captured,
    final: Tensor,
    raws: dict[str, Tensor],
    weights: dict[str, Tensor],
    extras: dict[str, dict[str, Any]],
) -> CamResult:
    """Step 6: the result, ``(N, K, ...)`` per sample for several targets."""
    names = [name for name, _ in got.call.layers]
    n, several = got.fwd.scores.shape[0], got.several

    def per_sample(t: Tensor) -> Tensor:  # (N * K, ...) -> (N, K, ...)
        return t.reshape(n, several, *t.shape[1:]) if several else t

    def per_layer(d: dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        return (
            per_sample(d[names[0]]) if len(names) == 1 else {k: per_sample(v) for k, v in d.items()}
        )

    return CamResult(
        maps=per_sample(final.float()),
        raw=per_layer(raws),
        weights=per_layer(weights),
        targets=got.fwd.classes,
        scores=per_sample(got.scores),
        layer=names[0] if len(names) == 1 else names,
        method=got.call.method.name,
        extras=extras[names[0]] if len(names) == 1 else {k: v for k, v in extras.items() if v},
    )


def _check_differentiable(method: Method, opts: Mapping[str, Any], registry: Registry) -> None:
    """``differentiable=True`` only for methods whose weights keep the graph."""
    if not opts["differentiable"]:
        return
    if not method.differentiable:
        able = [n for n in registry.names() if registry.get(n).differentiable]
        raise OptionError(
            "differentiable=True needs a method whose weights come from the activations and "
            f"gradients of the explained forward; {method.name!r} scores the model again, "
            "draws its weights or computes its map outside the graph, so its map cannot carry "
            f"one. Use one of {', '.join(able) or 'none registered'}, or leave differentiable "
            "out."
        )
    if opts["aug_smooth"]:
        raise OptionError(
            "differentiable=True does not combine with aug_smooth: the augmented copies are "
            "explained by separate forwards. Leave one of them out."
        )
