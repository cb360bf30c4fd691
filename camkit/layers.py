"""Finding the layer to explain.

A layer is given as a dotted name (``"layer4.1.conv2"``; integers index a module's children,
negative too: ``"features.-1"``), a module of the model, a list of those, or ``None``. ``None``
picks the last module, in the order modules finish, that

- runs once per forward;
- has an output with spatial extent > 1 in a layout camkit recognises (see
  :mod:`camkit.layout`); a pooled output ``(N, C, 1)`` is not a row of one-channel tokens;
- is one the target score depends on at more than one position: the search runs one forward
  with autograd and takes the gradient of the score to every such output. A final norm whose
  patch tokens feed only the class token, a pooler, the head a target does not read: their
  gradient is zero at every position (or all but one), and they are passed over.

Among modules returning that very tensor it takes the outermost one (``layer4`` for a
torchvision ResNet). When no module qualifies, the error names the last ones and why each was
passed over.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .capture import is_compiled, refuse_compiled
from .errors import LayerError, UnknownLayerError, did_you_mean
from .inputs import KeywordModel, input_spatial, split_mapping
from .layout import has_spatial_extent, told_layout
from .targets import ClassTarget, score_target, select_output
from .walk import any_training, module_names

__all__ = [
    "LayerInfo",
    "LayerSpec",
    "cached_default_layer",
    "default_layer",
    "fits_input",
    "has_spatial_extent",
    "layers",
    "maps_onto_input",
    "probe",
    "probe_dependence",
    "resolve_layers",
    "still_resolves",
    "target_key",
    "target_scorer",
]

_PROBING: ContextVar[object | None] = ContextVar("camkit_probing", default=None)

LayerSpec = str | nn.Module | Sequence[str | nn.Module] | None


@dataclass(frozen=True)
class LayerInfo:
    """A module seen in one forward.

    Attributes:
        name: dotted name in ``model.named_modules()``.
        type: the module's class name.
        shape: output shape, or ``None`` when the output is not a tensor.
        calls: how many times the module ran in the forward.
        candidate: output has spatial extent > 1 and the module runs once.
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    calls: int
    candidate: bool


def maps_onto_input(
    t: Any, input_spatial: tuple[int, ...] | None, batch: int, module: nn.Module | None = None
) -> bool:
    """``t`` has a recognised layout (see :mod:`camkit.layout`) with more than one position;
    a shape that fits both channels first and last only where ``module`` tells which."""
    if not isinstance(t, Tensor) or t.ndim < 3:
        return False
    if batch and t.shape[0] != batch and t.shape[1] != batch:
        return False  # not one row per sample (a detector's proposals, say)
    if input_spatial is None:
        return has_spatial_extent(t)
    layout = told_layout(tuple(t.shape), input_spatial, batch, module)
    if layout is None:
        return False
    if layout.kind == "tokens":
        # a pooled (N, C, 1) output is not C tokens of one channel
        return math.prod(layout.grid) > 1 and t.shape[-1] > 1
    spatial = t.shape[2:] if layout.kind == "channels_first" else t.shape[1:-1]
    return math.prod(spatial) > 1


def fits_input(
    t: Tensor, input_spatial: tuple[int, ...] | None, batch: int, module: nn.Module | None = None
) -> bool:
    """``t``'s spatial size is the input's divided by one stride (tokens, channels last and
    1D always fit; see :func:`camkit.layout.told_layout`)."""
    if input_spatial is None or len(input_spatial) < 2 or t.ndim != len(input_spatial) + 2:
        return True
    layout = told_layout(tuple(t.shape), input_spatial, batch, module)
    if layout is None or layout.kind != "channels_first":
        return True
    stride = max(i / s for s, i in zip(t.shape[2:], input_spatial, strict=True))
    return all(
        math.floor(i / stride + 1e-9) <= s <= math.ceil(i / stride - 1e-9)
        for s, i in zip(t.shape[2:], input_spatial, strict=True)
    ) and all(s <= i for s, i in zip(t.shape[2:], input_spatial, strict=True))


def _by_name(model: nn.Module, name: str) -> nn.Module:
    if name == "":
        return model
    mod = model
    for i, part in enumerate(name.split(".")):
        children = mod._modules
        if part in children and children[part] is not None:
            mod = children[part]  # type: ignore[assignment]
            continue
        try:
            idx = int(part)
        except ValueError:
            idx = None
        kids = [m for m in children.values() if m is not None]
        if idx is not None and -len(kids) <= idx < len(kids):
            mod = kids[idx]
            continue
        so_far = ".".join(name.split(".")[:i]) or "the model"
        all_names = [n for n, _ in model.named_modules() if n]
        hint = did_you_mean(name, all_names)
        raise UnknownLayerError(
            f"no layer {name!r} in {type(model).__name__}: {so_far} has no child {part!r}.{hint} "
            "List layers with camkit.layers(model, x)."
        )
    return mod


def _one(model: nn.Module, spec: Any, names: dict[nn.Module, str]) -> tuple[str, nn.Module]:
    if isinstance(spec, str):
        mod = _by_name(model, spec)
        return names[mod], mod
    if isinstance(spec, nn.Module):
        if spec not in names:
            raise UnknownLayerError(
                f"the module {type(spec).__name__} passed as layer is not part of the model "
                f"{type(model).__name__}. Pass a submodule of the model or its dotted name."
            )
        return names[spec], spec
    raise LayerError(
        "layer expects None, a dotted name, a module of the model or a list of those; "
        f"got {type(spec).__name__}."
    )


def resolve_layers(model: nn.Module, spec: LayerSpec) -> list[tuple[str, nn.Module]]:
    """Resolve explicit layer specs (not ``None``) to ``(name, module)`` pairs, in given order."""
    names = module_names(model)
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise LayerError("layer expects at least one layer; got an empty list.")
    out = [_one(model, s, names) for s in specs]
    seen = set()
    for name, _ in out:
        if name in seen:
            raise LayerError(f"layer {name!r} is listed twice; list each layer once.")
        seen.add(name)
    return out


def still_resolves(model: nn.Module, resolved: Sequence[tuple[str, nn.Module]]) -> bool:
    """Each ``(name, module)`` of an earlier :func:`resolve_layers` still names that module of
    ``model`` (a walk along each name, not over the whole model)."""
    try:
        return all(_by_name(model, name) is module for name, module in resolved)
    except UnknownLayerError:
        return False


@dataclass(frozen=True)
class _Seen:
    name: str
    module: nn.Module
    shape: tuple[int, ...] | None
    spatial: bool
    calls: int
    #: positions (of one sample, at most) where the score's gradient is not zero; ``None``
    #: when not measured
    reached: int | None = None
    #: the layout fits the input's size (a channels-first output whose spatial size is no
    #: stride of the input's, attention heads (N, heads, T, d) say, does not)
    exact: bool = True


def probe(
    model: nn.Module,
    run: Callable[[], Any],
    input_spatial: tuple[int, ...] | None = None,
    batch: int = 0,
) -> list[_Seen]:
    """Run ``run()`` (one forward) with hooks on every module, without gradients.

    Only shapes are kept, never the outputs themselves, so the forward frees its intermediate
    tensors as inference does.

    Returns:
        One record per module that ran, in the order they finished (their last call).
    """
    refuse_compiled(model, "camkit")
    # a compiled part (not the model itself) runs as one graph: its inner modules never run
    # as modules, and it takes no hooks
    names = {m: n for m, n in module_names(model).items() if not is_compiled(m)}
    seen: dict[nn.Module, list[Any]] = {}
    owner = object()
    token = _PROBING.set(owner)

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        if _PROBING.get() is not owner:
            return  # another thread's forward, or another probe
        rec = seen.pop(mod, [None, False, 0])  # re-inserted: dict order is finishing order
        rec[0] = tuple(output.shape) if isinstance(output, Tensor) else None
        rec[1] = maps_onto_input(output, input_spatial, batch, mod)
        rec[2] += 1
        seen[mod] = rec

    handles = []
    try:
        handles = [m.register_forward_hook(hook) for m in names]
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        _PROBING.reset(token)
    return [
        _Seen(names[m], m, shape, spatial, calls) for m, (shape, spatial, calls) in seen.items()
    ]


def default_layer(records: list[_Seen]) -> tuple[str, nn.Module]:
    """The layer ``None`` stands for, from :func:`probe` or :func:`probe_dependence` records
    (see the module docstring)."""
    # walking back from the end, the first usable module is also the outermost one returning
    # that tensor: a parent finishes after the child whose output it returns
    # a layer whose size fits the input's first; one that does not (valid convolutions on a
    # non-square input) only when no layer fits
    for r in reversed(records):
        if r.name != "" and r.exact and _passed_over(r) is None:
            return r.name, r.module
    passed: list[str] = []
    for r in reversed(records):
        if r.name == "":
            continue
        why = _passed_over(r)
        if why is None:
            return r.name, r.module
        if why and len(passed) < 6:
            passed.append(f"{r.name!r} {r.shape}: {why}")
    detail = ("; ".join(passed) + ".") if passed else "no module returned a tensor."
    raise LayerError(
        "found no layer to explain: no module runs once per forward, has an output (N, C, *S), "
        "(N, *S, C) or transformer tokens with more than one spatial position, and reaches the "
        f"target score at more than one position. The last modules passed over: {detail} "
        "Pass layer=... explicitly (camkit.layers(model, x) lists them) and, for outputs of "
        "another layout, reshape=... ."
    )


def _passed_over(r: _Seen) -> str | None:
    """Why ``r`` is not the default layer (``""``: not worth naming), or ``None``."""
    if r.shape is None:
        return ""
    if r.calls != 1:
        return f"runs {r.calls} times per forward" if r.spatial else ""
    if not r.spatial:
        if len(r.shape) == 3 and r.shape[-1] == 1 and r.shape[1] > 1:
            return "a pooled output (N, C, 1), not tokens"
        return ""
    if r.reached is not None and r.reached < 2:
        if r.reached == 0:
            return "the target score does not depend on it (zero gradient at every position)"
        return "the target score depends on one of its positions only"
    return None


def probe_dependence(
    model: nn.Module,
    run: Callable[[], Any],
    score: Callable[[Any], Tensor],
    input_spatial: tuple[int, ...] | None = None,
    batch: int = 0,
) -> list[_Seen]:
    """:func:`probe` that also measures where the target score depends on each module.

    One forward with autograd: every output that :func:`maps_onto_input` is kept (the hook
    hands a copy on, so that later in-place operations leave it as it was; an output outside
    any graph gets a zero that carries one), ``score(output)`` gives the scores ``(N,)`` and
    one ``torch.autograd.grad`` their sum's gradient to each kept output, read in its layout as
    ``(N, C, *S)``. The graph is freed before returning; parameters get no ``.grad``.

    Returns:
        As :func:`probe`, with ``reached``: for each kept output, the most positions of one
        sample where the gradient is not zero. When the scores carry no gradient at all (the
        model detaches its output), ``reached`` stays ``None``.
    """
    names = module_names(model)
    seen: dict[nn.Module, list[Any]] = {}
    kept: dict[nn.Module, Tensor] = {}
    owner = object()
    token = _PROBING.set(owner)

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        if _PROBING.get() is not owner:
            return None
        rec = seen.pop(mod, [None, False, 0, True])
        rec[0] = tuple(output.shape) if isinstance(output, Tensor) else None
        rec[1] = maps_onto_input(output, input_spatial, batch, mod)
        rec[2] += 1
        rec[3] = not rec[1] or fits_input(output, input_spatial, batch, mod)
        seen[mod] = rec
        if not (rec[1] and rec[2] == 1 and output.is_floating_point()):
            kept.pop(mod, None)
            return None
        if not output.requires_grad:
            output = (
                output + torch.zeros((), dtype=output.dtype, device=output.device).requires_grad_()
            )
        kept[mod] = output
        return output.clone()

    handles = []
    reached: dict[nn.Module, int] = {}
    try:
        handles = [m.register_forward_hook(hook) for m in names]
        with torch.enable_grad():
            scores = score(run())
            if isinstance(scores, Tensor) and scores.requires_grad and kept:
                mods = list(kept)
                total = scores.sum()
                grads = torch.autograd.grad(total, [kept[m] for m in mods], allow_unused=True)
                for mod, g in zip(mods, grads, strict=True):
                    reached[mod] = 0 if g is None else _positions(g, input_spatial, batch, mod)
    finally:
        for h in handles:
            h.remove()
        _PROBING.reset(token)
        kept.clear()
    measured = bool(reached)
    return [
        _Seen(
            names[m],
            m,
            shape,
            spatial,
            calls,
            reached.get(m, 0) if measured and spatial and calls == 1 else None,
            exact,
        )
        for m, (shape, spatial, calls, exact) in seen.items()
    ]


def _positions(
    g: Tensor, input_spatial: tuple[int, ...] | None, batch: int, module: nn.Module
) -> int:
    """The most positions of one sample where the gradient ``g`` (a layer's layout) is not 0."""
    layout = told_layout(tuple(g.shape), input_spatial, batch, module) if input_spatial else None
    maps = layout.to_maps(g) if layout is not None else g  # (N, C, *S)
    nonzero = maps.detach().abs().sum(1).flatten(1) != 0  # (N, P)
    return int(nonzero.sum(1).max()) if nonzero.numel() else 0


_DEFAULTS: weakref.WeakKeyDictionary[nn.Module, dict[Any, str]] = weakref.WeakKeyDictionary()
_DEFAULTS_LOCK = threading.Lock()


def cached_default_layer(
    model: nn.Module,
    key: Any,
    run: Callable[[], Any],
    input_spatial: tuple[int, ...] | None = None,
    batch: int = 0,
    score: Callable[[Any], Tensor] | None = None,
) -> str:
    """The default layer's name for ``model`` on inputs described by ``key``, found once.

    With ``score`` (the target's scores of the model output) the search is
    :func:`probe_dependence`: one forward and one backward; without, :func:`probe`: one
    no-grad forward. Its result is remembered per model (weakly: the cache does not keep the
    model alive) and ``key`` (the input signature and what the target reads).
    """
    with _DEFAULTS_LOCK:
        name = _DEFAULTS.get(model, {}).get(key)
    if name is not None:
        return name
    if score is None:
        records = probe(model, run, input_spatial, batch)
    else:
        records = probe_dependence(model, run, score, input_spatial, batch)
    name = default_layer(records)[0]
    with _DEFAULTS_LOCK:
        _DEFAULTS.setdefault(model, {})[key] = name
    return name


def target_scorer(target: Any, choice: Any, n: int) -> Callable[[Any], Tensor]:
    """The scores ``(N,)`` (or ``(N, K)``) the search measures dependence on: ``target`` (as
    ``explain`` takes it) on the part of the output the ``output`` option ``choice`` selects
    (:func:`camkit.targets.score_target`, the explained call's own scoring step)."""

    def score(output: Any) -> Tensor:
        selected = select_output(output, choice)
        device = selected.device if isinstance(selected, Tensor) else None
        return score_target(output, target, choice, torch.arange(n, device=device), n)[3]

    return score


def target_key(target: Any, choice: Any) -> Any:
    """What the search's result depends on in ``target`` and the ``output`` option: class
    targets read the same outputs whatever the classes; a callable is known by its code."""

    def key(obj: Any) -> Any:
        if obj is None or isinstance(obj, (int, str)):
            return obj if obj is None or isinstance(obj, str) else "int"
        code = getattr(obj, "__code__", None)
        return code if code is not None else type(obj)

    if target is None or isinstance(target, (int, Sequence, Tensor, ClassTarget)):
        return ("class", key(choice))
    return (key(target), key(choice))


def layers(model: nn.Module, x: Any, **model_kwargs: Any) -> list[LayerInfo]:
    """List the modules of ``model`` that run on ``x``, with output shapes, in finishing order.

    Args:
        model: the model.
        x: an input batch (a tensor, a tuple of tensors, or a mapping of the model's keyword
            arguments with the image under one of :data:`camkit.inputs.IMAGE_KEYS`).
        **model_kwargs: extra keyword arguments for the model.

    Returns:
        One :class:`LayerInfo` per module that ran; ``candidate`` marks usable layers.
    """
    runner = model
    if isinstance(x, Mapping):
        keys, x, rest = split_mapping(x, None)
        runner, model_kwargs = KeywordModel(model, keys), {**rest, **model_kwargs}
    inputs = x if isinstance(x, tuple) else (x,)
    first = inputs[0]
    spatial = input_spatial(first) if isinstance(first, Tensor) else None
    batch = int(first.shape[0]) if isinstance(first, Tensor) else 0
    # a train-mode model updates its batch-norm statistics in any forward: put them back
    training = any_training(model)
    saved = [(b, b.detach().clone()) for b in model.buffers()] if training else []
    try:
        records = probe(model, lambda: runner(*inputs, **model_kwargs), spatial, batch)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return [
        LayerInfo(
            name=r.name,
            type=type(r.module).__name__,
            shape=r.shape,
            calls=r.calls,
            candidate=r.calls == 1 and r.spatial and r.name != "",
        )
        for r in records
    ]
