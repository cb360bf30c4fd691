"""The capabilities a method's context carries: ``ctx.score``, ``ctx.run_suffix``,
``ctx.recapture``.

Each re-runs the model for a method (masked inputs, modified activations, noisy copies) in
chunks of ``batch_size``, with the capture hooks of the call switched off and the caller's
autocast settings restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .capture import hooks_paused
from .errors import OptionError, PluginError
from .forward import _forward, scored_output
from .layout import Layout, layer_layout, prepare_maps
from .method import Method
from .suffix import Primed, SuffixRunner
from .targets import Target


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


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
    primed: Primed | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``ctx.run_suffix``: scores with the layer's output replaced (see :mod:`camkit.suffix`);
    ``primed``: the record and check the explained forward already made."""
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
                layout.batch_dim,
            )
            if primed is not None:
                runner.prime(primed)
        native = layout.to_native(replacement.to(activations.dtype), activations, index)
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
            rows = int(batch[0][sl].shape[0])
            layout = layer_layout(layer[0], act, opts["reshape"], tuple(batch[0].shape[2:]), rows)
            a, g = prepare_maps(layer[0], act, fwd.gradients[0], opts["reshape"], layout)
            acts.append(a)
            if g is not None:
                grads.append(g)
        return torch.cat(acts), (torch.cat(grads) if grads else None)

    return recapture
