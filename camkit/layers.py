"""Finding the layer to explain.

A layer is given as a dotted name (``"layer4.1.conv2"``; integers index a module's children,
negative too: ``"features.-1"``), a module of the model, a list of those, or ``None``. ``None``
picks the last module, in the order modules finish, whose output has spatial extent > 1 and that
runs once per forward; among modules returning that very tensor it takes the outermost one
(``layer4`` for a torchvision ResNet).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .capture import is_compiled, refuse_compiled
from .errors import LayerError, UnknownLayerError, did_you_mean
from .layout import has_spatial_extent, infer_layout

__all__ = [
    "LayerInfo",
    "LayerSpec",
    "cached_default_layer",
    "has_spatial_extent",
    "layers",
    "module_names",
    "resolve_layers",
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


def maps_onto_input(t: Any, input_spatial: tuple[int, ...] | None, batch: int) -> bool:
    """``t`` has a recognised layout (see :mod:`camkit.layout`) with more than one position."""
    if not isinstance(t, Tensor) or t.ndim < 3:
        return False
    if batch and t.shape[0] != batch and t.shape[1] != batch:
        return False  # not one row per sample (a detector's proposals, say)
    if input_spatial is None:
        return has_spatial_extent(t)
    layout = infer_layout(tuple(t.shape), input_spatial, batch)
    if layout is None:
        return False
    if layout.kind == "tokens":
        return math.prod(layout.grid) > 1
    spatial = t.shape[2:] if layout.kind == "channels_first" else t.shape[1:-1]
    return math.prod(spatial) > 1


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Map each module of ``model`` to its first dotted name (``""`` for the model)."""
    names: dict[nn.Module, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(mod, name)
    return names


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


@dataclass(frozen=True)
class _Seen:
    name: str
    module: nn.Module
    shape: tuple[int, ...] | None
    spatial: bool
    calls: int


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
        rec[1] = maps_onto_input(output, input_spatial, batch)
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
    """The layer ``None`` stands for, from :func:`probe` records (see module docstring)."""
    # walking back from the end, the first usable module is also the outermost one returning
    # that tensor: a parent finishes after the child whose output it returns
    for r in reversed(records):
        if r.calls == 1 and r.spatial and r.name != "":
            return r.name, r.module
    raise LayerError(
        "found no layer to explain: no module that runs once per forward has an output of "
        "shape (N, C, *S) with more than one spatial position. Pass layer=... explicitly "
        "(camkit.layers(model, x) lists them) and, for token outputs, reshape=... ."
    )


_DEFAULTS: weakref.WeakKeyDictionary[nn.Module, dict[Any, str]] = weakref.WeakKeyDictionary()
_DEFAULTS_LOCK = threading.Lock()


def cached_default_layer(
    model: nn.Module,
    key: Any,
    run: Callable[[], Any],
    input_spatial: tuple[int, ...] | None = None,
    batch: int = 0,
) -> str:
    """The default layer's name for ``model`` on inputs described by ``key``, found once.

    The search costs one no-grad forward; its result is remembered per model (weakly: the
    cache does not keep the model alive) and input signature.
    """
    with _DEFAULTS_LOCK:
        name = _DEFAULTS.get(model, {}).get(key)
    if name is not None:
        return name
    name = default_layer(probe(model, run, input_spatial, batch))[0]
    with _DEFAULTS_LOCK:
        _DEFAULTS.setdefault(model, {})[key] = name
    return name


def layers(model: nn.Module, x: Any, **model_kwargs: Any) -> list[LayerInfo]:
    """List the modules of ``model`` that run on ``x``, with output shapes, in finishing order.

    Args:
        model: the model.
        x: an input batch (a tensor or a tuple of tensors).
        **model_kwargs: extra keyword arguments for the model.

    Returns:
        One :class:`LayerInfo` per module that ran; ``candidate`` marks usable layers.
    """
    inputs = x if isinstance(x, tuple) else (x,)
    first = inputs[0]
    spatial = tuple(first.shape[2:]) if isinstance(first, Tensor) else None
    batch = int(first.shape[0]) if isinstance(first, Tensor) else 0
    # a train-mode model updates its batch-norm statistics in any forward: put them back
    training = any(m.training for m in model.modules())
    saved = [(b, b.detach().clone()) for b in model.buffers()] if training else []
    try:
        records = probe(model, lambda: model(*inputs, **model_kwargs), spatial, batch)
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
