"""The capabilities a method's context carries: ``ctx.score`` and ``ctx.recapture``
(``ctx.run_suffix`` is :func:`camkit.suffix.suffix_runner`).

Each re-runs the model for a method (masked inputs, noisy copies) in chunks of ``batch_size``
(:func:`camkit.batching.chunk_spans`), with the capture hooks of the call switched off and the
caller's autocast settings restored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .batching import chunk_spans
from .call import Call
from .capture import hooks_paused
from .errors import PluginError
from .forward import captured_forward
from .layout import layer_layout, prepare_maps
from .targets import Target, scored_output

__all__ = ["recapturer", "scorer"]


def _check_index(what: str, m: int, index: Tensor) -> None:
    if index.shape != (m,):
        raise PluginError(
            f"{what} got {m} input rows but an index of shape {tuple(index.shape)}; "
            f"expected ({m},)."
        )


def scorer(call: Call, target: Target) -> Callable[..., Tensor]:
    """``ctx.score``: re-score new inputs in chunks, hooks off, no gradients."""
    opts = call.options

    def score(new_inputs: Any, index: Tensor, other: Target | None = None) -> Tensor:
        scoring = target if other is None else other
        batch = new_inputs if isinstance(new_inputs, tuple) else (new_inputs,)
        m = int(batch[0].shape[0])
        _check_index("ctx.score", m, index)
        out = []
        row = tuple(t[:1] for t in batch)
        with hooks_paused(), torch.no_grad(), call.autocast():
            for start, stop in chunk_spans(opts["batch_size"], m, row, call.model, work="score"):
                o = call.model(*(t[start:stop] for t in batch), **call.kwargs)
                o = scored_output(o, scoring, opts["output"])
                out.append(scoring.scores(o, index[start:stop]).detach())
        return torch.cat(out)

    return score


def recapturer(
    call: Call, layer: tuple[str, nn.Module], target: Target
) -> Callable[[Any, Tensor], tuple[Tensor, Tensor | None]]:
    """``ctx.recapture``: the layer's activations (and gradients) for new inputs, in chunks."""
    opts = call.options

    def recapture(new_inputs: Any, index: Tensor) -> tuple[Tensor, Tensor | None]:
        batch = new_inputs if isinstance(new_inputs, tuple) else (new_inputs,)
        m = int(batch[0].shape[0])
        _check_index("ctx.recapture", m, index)
        acts, grads = [], []
        row = tuple(t[:1] for t in batch)
        work = ("recapture", layer[0], call.method.needs_gradients)
        for start, stop in chunk_spans(opts["batch_size"], m, row, call.model, work=work):
            sl = slice(start, stop)
            part = tuple(t[sl] for t in batch)
            sub = dataclasses.replace(call, inputs=part, layers=[layer], target=target)
            with call.autocast():
                fwd = captured_forward(sub, call.method.needs_gradients, index[sl])
            act = fwd.activations[0]
            layout = layer_layout(layer[0], act, opts["reshape"], sub.spatial, sub.n, layer[1])
            a, g = prepare_maps(layer[0], act, fwd.gradients[0], opts["reshape"], layout)
            acts.append(a)
            if g is not None:
                grads.append(g)
        return torch.cat(acts), (torch.cat(grads) if grads else None)

    return recapture
