"""The replay engine behind ``ctx.run_suffix``: record the prefix once, replay the rest.

A *record* holds the outputs of the maximal prefix calls of one forward (see
:func:`record_prefix`). A *replay* runs the model's forward again with those calls answered from
the record (rows gathered per copy) and the target layer answered with a replacement; only the
code after the layer computes. Module calls are answered by temporarily overriding ``forward``
on those module instances (:func:`patched`), with a dispatch that acts only for this thread's
replay. :mod:`camkit.suffix` builds ``ctx.run_suffix`` and the recording forward on it.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from .capture import hooks_paused

__all__ = ["Primed", "Replay", "Replays", "patched", "record_prefix", "run_replay", "versions"]

_REPLAY: ContextVar[Replay | None] = ContextVar("camkit_replay", default=None)
_RECORDING: ContextVar[object | None] = ContextVar("camkit_recording", default=None)
_PATCH_LOCK = threading.Lock()
_PATCHED: dict[nn.Module, tuple[Any, int]] = {}  # module -> (its own forward attribute, users)
_MISSING = object()


class Replay:
    """What one replay answers: recorded calls per module, and the layer's replacement."""

    def __init__(
        self,
        recorded: dict[nn.Module, list[Any]],
        layer: nn.Module,
        n: int,
        rows: Tensor,
        replacement: Tensor,
        views: bool,
        batch_dim: int,
        copy_layer: bool,
        borrow: bool = False,
    ) -> None:
        self.recorded, self.layer, self.n, self.views = recorded, layer, n, views
        self.rows, self.replacement = rows, replacement
        self.batch_dim, self.copy_layer, self.borrow = batch_dim, copy_layer, borrow
        self.calls: dict[nn.Module, int] = {}
        single = bool((rows == rows[0]).all())
        self.single = int(rows[0]) if single else None

    def answer(self, module: nn.Module) -> Any:
        if module is self.layer:
            # in the layer's dtype (see SuffixRunner); a copy where the suffix writes into it
            return self.replacement.clone() if self.copy_layer else self.replacement
        k = self.calls.get(module, 0)
        self.calls[module] = k + 1
        outs = self.recorded.get(module, [])
        return self.rows_of(outs[k]) if k < len(outs) else _MISSING

    def _dim(self, out: Tensor) -> int | None:
        """The batch dimension of a recorded tensor; ``None``: not per sample, kept whole."""
        first = out.ndim > 0 and out.shape[0] == self.n
        if self.batch_dim == 1 and out.ndim > 1 and out.shape[1] == self.n:
            if first:  # (N, N, ...) in a sequence-first model: the replay cannot tell
                raise ValueError(
                    f"a recorded value of shape {tuple(out.shape)} has the batch size on "
                    "both of its first two dimensions"
                )
            return 1
        return 0 if first else None

    def rows_of(self, out: Any, dim: int | None = None) -> Any:
        """The replayed rows of a recorded value (tensors with ``n`` rows on their batch
        dimension, or on ``dim``; structure kept)."""
        if isinstance(out, Tensor):
            d = self._dim(out) if dim is None else dim
            if d is None:
                return out
            m = int(self.rows.shape[0])
            if self.single is not None and (m == 1 or self.views):
                # copies of one sample: a broadcast view costs nothing when the value is not
                # used (the layer's own input); writing into it in place raises, and the
                # chunk is then replayed with gathered rows
                one = out.narrow(d, self.single, 1)
                if m == 1:  # a view only where the caller watches the record (the check)
                    return one if self.borrow else one.clone()
                shape = list(out.shape)
                shape[d] = m
                return one.expand(shape)
            return out.index_select(d, self.rows)
        if isinstance(out, tuple):
            return _same_tuple(out, [self.rows_of(o, dim) for o in out])
        if isinstance(out, list):
            return [self.rows_of(o, dim) for o in out]
        if isinstance(out, dict):
            return _same_dict(out, {k: self.rows_of(v, dim) for k, v in out.items()})
        return out


def _same_tuple(out: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    """``items`` in the tuple type of ``out``: a named tuple or ``torch.return_types`` keeps its
    fields, read by name after the layer."""
    if type(out) is tuple:
        return tuple(items)
    if hasattr(out, "_fields"):  # named tuple
        return type(out)(*items)
    return type(out)(items)  # structseq (torch.return_types), other tuple subclasses


def _same_dict(out: dict[Any, Any], items: dict[Any, Any]) -> dict[Any, Any]:
    """``items`` in the dict type of ``out`` (transformers' ``ModelOutput``, whose fields are
    also attributes; ``OrderedDict``): a shallow copy of ``out`` with each item replaced."""
    if type(out) is dict:
        return items
    new = copy.copy(out)
    for k, v in items.items():
        new[k] = v
    return new


def _dispatch(module: nn.Module, own: Any) -> Callable[..., Any]:
    original = own if own is not _MISSING else type(module).forward.__get__(module)

    def forward(*args: Any, **kwargs: Any) -> Any:
        replay = _REPLAY.get()
        if replay is not None:
            out = replay.answer(module)
            if out is not _MISSING:
                return out
        return original(*args, **kwargs)

    return forward


@contextmanager
def patched(modules: list[nn.Module]) -> Iterator[None]:
    """Route ``forward`` of ``modules`` through the replay dispatch (shared, reference-counted)."""
    done: list[nn.Module] = []
    try:
        with _PATCH_LOCK:
            for m in modules:
                own, users = _PATCHED.get(m, (_MISSING, 0))
                if users == 0:
                    own = m.__dict__.get("forward", _MISSING)
                    m.forward = _dispatch(m, own)
                _PATCHED[m] = (own, users + 1)
                done.append(m)
        yield
    finally:
        with _PATCH_LOCK:
            for m in done:
                own, users = _PATCHED[m]
                if users == 1:
                    del _PATCHED[m]
                    if own is _MISSING:
                        del m.forward
                    else:
                        m.forward = own
                else:
                    _PATCHED[m] = (own, users - 1)


def record_prefix(
    model: nn.Module, layer: nn.Module, run: Callable[[], Any]
) -> dict[nn.Module, list[Any]]:
    """Run ``run()`` once and return the outputs of the maximal prefix calls, per module."""
    owner = object()
    stack: list[tuple[nn.Module, int]] = []
    counts: dict[nn.Module, int] = {}
    finished: list[tuple[nn.Module, Any, tuple[nn.Module, int] | None]] = []
    state: dict[str, Any] = {"ancestors": None}

    def pre(m: nn.Module, args: Any) -> None:
        if _RECORDING.get() is not owner or state["ancestors"] is not None:
            return
        if m is layer:
            state["ancestors"] = set(stack)
            return
        counts[m] = counts.get(m, 0) + 1
        stack.append((m, counts[m]))

    def post(m: nn.Module, args: Any, out: Any) -> None:
        if _RECORDING.get() is not owner or state["ancestors"] is not None:
            return
        stack.pop()
        finished.append((m, out, stack[-1] if stack else None))

    token = _RECORDING.set(owner)
    handles = []
    try:
        for m in _candidates(model, layer):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        run()
    finally:
        for h in handles:
            h.remove()
        _RECORDING.reset(token)
    ancestors = state["ancestors"] or set()
    recorded: dict[nn.Module, list[Any]] = {}
    for m, out, parent in finished:
        if parent in ancestors:
            recorded.setdefault(m, []).append(out)
    return recorded


def _candidates(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The modules whose calls can be maximal prefix calls: the layer's ancestors in the module
    tree, their children and the layer. Hooking only these keeps the record forward close to a
    plain one; a prefix call elsewhere (a module called outside its parent) is recomputed by
    the replay, which is exact. Every module where the layer is not in the tree."""
    parents: dict[nn.Module, nn.Module] = {}
    for m in model.modules():
        for child in m.children():
            parents.setdefault(child, m)
    if layer is not model and layer not in parents:
        return list(model.modules())
    chain = [layer]
    while chain[-1] is not model and chain[-1] in parents:
        chain.append(parents[chain[-1]])
    found = dict.fromkeys(chain)
    for m in chain[1:]:
        found.update(dict.fromkeys(m.children()))
    return list(found)


def versions(recorded: dict[nn.Module, list[Any]]) -> list[int]:
    """The version counters of every recorded tensor (they change when written into)."""
    found: list[int] = []

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            found.append(value._version)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for outs in recorded.values():
        for out in outs:
            walk(out)
    return found


def run_replay(
    model: nn.Module, inputs: tuple[Tensor, ...], kwargs: dict[str, Any], replay: Replay
) -> Any:
    """The model's output with its calls answered by ``replay`` (modules patched)."""
    batch = tuple(replay.rows_of(t, 0) for t in inputs)  # inputs are batch first
    token = _REPLAY.set(replay)
    try:
        return model(*batch, **kwargs)
    finally:
        _REPLAY.reset(token)


class Primed:
    """A record made during the explained forward, with its replay checked there.

    Attributes:
        recorded: the outputs of the maximal prefix calls, per module.
        copy_layer: the part after the layer writes into the layer's output in place.
    """

    def __init__(self, recorded: dict[nn.Module, list[Any]], copy_layer: bool) -> None:
        self.recorded, self.copy_layer = recorded, copy_layer


class Replays:
    """Whole outputs replayed from a record: the explained forward that records (see
    :func:`camkit.suffix.primed_forward`) gets its output and checks its copy with them.

    Args:
        model, inputs, kwargs: the model and the batch, ``N`` rows.
        layer: the target module.
        activations: the layer's output on the batch.
        recorded: :func:`record_prefix` of a forward of the batch.
        batch_dim: the dimension of the layer's output that holds the batch.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: tuple[Tensor, ...],
        kwargs: dict[str, Any],
        layer: nn.Module,
        activations: Tensor,
        recorded: dict[nn.Module, list[Any]],
        batch_dim: int,
    ) -> None:
        self.model, self.inputs, self.kwargs, self.layer = model, inputs, kwargs, layer
        self.activations, self.recorded, self.batch_dim = activations, recorded, batch_dim
        self.versions = versions(recorded)

    def output(self, activations: Tensor, rows: Tensor) -> Any:
        """The model's output with the layer answering ``activations`` (``M`` rows of samples
        ``rows``); the recorded values are borrowed (see :meth:`written`). ``activations`` is
        handed to the model as it is, unless it is the captured output, which is copied."""
        n = int(self.inputs[0].shape[0])
        replay = Replay(
            self.recorded,
            self.layer,
            n,
            rows,
            activations.to(self.activations.dtype),
            True,
            self.batch_dim,
            activations is self.activations,
            True,
        )
        with hooks_paused(), torch.no_grad(), patched([*self.recorded, self.layer]):
            return run_replay(self.model, self.inputs, self.kwargs, replay)

    def written(self) -> bool:
        """A replay wrote into a recorded value: the record no longer holds the prefix."""
        return versions(self.recorded) != self.versions
