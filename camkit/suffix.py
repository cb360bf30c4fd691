"""``ctx.run_suffix``: re-run only the part of the model after the target layer.

Perturbation methods score the model on many modified copies of one layer's activations. Running
the whole model per copy repeats the part before the layer (the prefix), which at a late layer is
almost all the work. camkit runs the prefix once:

1. **Record.** One forward of the batch records the output of every *maximal prefix call*: each
   module call that finished before the layer started and whose caller is still running then
   (``conv1``, ``layer1`` ... ``layer3`` for ``layer4`` of a ResNet). The same forward, with the
   layer's output replaced for one copy, gives that copy's exact score.
2. **Replay.** For each chunk of copies, the model's forward runs again with those calls answered
   from the record (rows gathered per copy, so a residual crossing the cut still sees its own
   sample's values) and the layer answered with the copies; only the code after the layer
   computes. Module calls are answered by temporarily overriding ``forward`` on those module
   instances, with a dispatch that acts only for this thread's replay.
3. **Check.** The replayed score of the recorded copy must equal its exact score. If it does
   not, or the replay raises (the forward keeps tensors or batch sizes from before the layer,
   random layers, train-mode batch-norm), the call warns and falls back to full re-runs, which
   are exact for any model. A silently wrong map is never returned.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from .capture import hooks_paused, output_replaced
from .errors import CamkitError, CamkitWarning, user_stacklevel

__all__ = ["Primed", "Replays", "SuffixRunner", "record_prefix"]

_REPLAY: ContextVar[_Replay | None] = ContextVar("camkit_replay", default=None)
_RECORDING: ContextVar[object | None] = ContextVar("camkit_recording", default=None)
_PATCH_LOCK = threading.Lock()
_PATCHED: dict[nn.Module, tuple[Any, int]] = {}  # module -> (its own forward attribute, users)
_MISSING = object()


class _Replay:
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
            return tuple(self.rows_of(o, dim) for o in out)
        if isinstance(out, list):
            return [self.rows_of(o, dim) for o in out]
        if isinstance(out, dict):
            return {k: self.rows_of(v, dim) for k, v in out.items()}
        return out


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
def _patched(modules: list[nn.Module]) -> Iterator[None]:
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


def _versions(recorded: dict[nn.Module, list[Any]]) -> list[int]:
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


def _run_replay(
    model: nn.Module, inputs: tuple[Tensor, ...], kwargs: dict[str, Any], replay: _Replay
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
    :func:`camkit.forward._forward_primed`) gets its output and checks its copy with them.

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
        self.versions = _versions(recorded)

    def output(self, activations: Tensor, rows: Tensor) -> Any:
        """The model's output with the layer answering ``activations`` (``M`` rows of samples
        ``rows``); the recorded values are borrowed (see :meth:`written`). ``activations`` is
        handed to the model as it is, unless it is the captured output, which is copied."""
        n = int(self.inputs[0].shape[0])
        replay = _Replay(
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
        with hooks_paused(), torch.no_grad(), _patched([*self.recorded, self.layer]):
            return _run_replay(self.model, self.inputs, self.kwargs, replay)

    def written(self) -> bool:
        """A replay wrote into a recorded value: the record no longer holds the prefix."""
        return _versions(self.recorded) != self.versions


class SuffixRunner:
    """Scores of the model with the layer's output replaced; the prefix runs once per call.

    Args:
        model: the model.
        inputs: the batch, ``N`` rows.
        kwargs: the model's keyword arguments.
        layer: the target module.
        activations: ``(N, C, *S)`` the layer's output on ``inputs``.
        score: ``score(output, index) -> (M,)``: selects the output and applies the target.
        batch_size: rows per replay.
        batch_dim: the dimension of the layer's output that holds the batch (1 for
            sequence-first tokens).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: tuple[Tensor, ...],
        kwargs: dict[str, Any],
        layer: tuple[str, nn.Module],
        activations: Tensor,
        score: Callable[[Any, Tensor], Tensor],
        batch_size: int,
        batch_dim: int = 0,
    ) -> None:
        self.model, self.inputs, self.kwargs = model, inputs, kwargs
        self.name, self.layer = layer
        self.activations, self.score, self.batch_size = activations, score, batch_size
        self.batch_dim = batch_dim
        self.recorded: dict[nn.Module, list[Any]] | None = None
        self.fast: bool | None = None  # None until checked
        self.views = True  # broadcast views of recorded values for copies of one sample
        self.copy_layer = True  # until the check shows the suffix never writes into it
        self.fallback_reason = ""

    def __call__(self, activations: Tensor, index: Tensor) -> Tensor:
        """Scores ``(M,)`` of copies ``activations`` (the layer's layout, ``M`` rows on the
        batch dimension) of samples ``index`` ``(M,)``."""
        index = index.to(self.inputs[0].device)
        bd, total = self.batch_dim, int(index.shape[0])
        with hooks_paused(), torch.no_grad():
            if self.fast is None:
                self._check(activations.select(bd, 0), index[0])
            out = []
            with self._patches():
                for start in range(0, total, self.batch_size):
                    part = activations.narrow(bd, start, min(self.batch_size, total - start))
                    rows = index[start : start + self.batch_size]
                    if self.fast:
                        try:
                            out.append(self._replay_chunk(part, rows))
                            continue
                        except CamkitError:
                            raise
                        except Exception as exc:  # not valid for this model after all
                            self._fall_back(f"the replay raised {type(exc).__name__}: {exc}")
                    out.append(self._full(part, rows))
        return torch.cat(out)

    def prime(self, primed: Primed) -> None:
        """Use a record the explained forward made and checked (no record, no check here)."""
        self.recorded, self.copy_layer, self.fast = primed.recorded, primed.copy_layer, True

    def _patches(self) -> contextlib.AbstractContextManager[None]:
        """Replay dispatch on the recorded modules and the layer, for a whole call."""
        if not self.fast or self.recorded is None:
            return contextlib.nullcontext()
        return _patched([*self.recorded, self.layer])

    def _full(self, activations: Tensor, rows: Tensor) -> Tensor:
        """Exact for any model: the whole forward on the copies' own samples."""
        with output_replaced(self.layer, activations):
            o = self.model(*(t[rows] for t in self.inputs), **self.kwargs)
        return self.score(o, rows).detach()

    def _replay_chunk(self, activations: Tensor, rows: Tensor) -> Tensor:
        if self.views:
            try:
                return self._replay(activations, rows)
            except RuntimeError as exc:
                if "single memory location" not in str(exc):
                    raise
                self.views = False  # the forward writes in place into a recorded value
        return self._replay(activations, rows)

    def _replay(self, activations: Tensor, rows: Tensor, borrow: bool = False) -> Tensor:
        """Scores of the copies; the recorded modules and the layer must be patched.
        ``borrow``: a single copy sees views of the recorded values, not copies."""
        assert self.recorded is not None
        n = int(self.inputs[0].shape[0])
        replacement = activations.to(self.activations.dtype)
        replay = _Replay(
            self.recorded,
            self.layer,
            n,
            rows,
            replacement,
            self.views,
            self.batch_dim,
            self.copy_layer,
            borrow,
        )
        return self.score(_run_replay(self.model, self.inputs, self.kwargs, replay), rows).detach()

    def _check(self, copy: Tensor, row: Tensor) -> None:
        """Record the prefix and the exact score of one copy; replay that copy and compare.

        The replay of the check gets its own copy of the layer's output, and later replays
        hand the method's tensor to the model without copying it unless this one was written
        into (an in-place operation right after the layer)."""
        bd = self.batch_dim
        replacement = self.activations.clone()
        replacement.select(bd, int(row)).copy_(copy)
        n = int(self.inputs[0].shape[0])
        rows = row.reshape(1)
        outputs: list[Any] = []

        def run() -> None:
            with output_replaced(self.layer, replacement):
                outputs.append(self.model(*self.inputs, **self.kwargs))

        # the replay borrows the recorded values; if it writes into them, record again and
        # replay on copies
        for borrow in (True, False):
            outputs.clear()
            self.recorded = record_prefix(self.model, self.layer, run)
            exact = self.score(outputs[0], torch.arange(n, device=row.device))[int(row)]
            exact = exact.reshape(1)
            before = _versions(self.recorded)
            try:
                own = copy.unsqueeze(bd).to(self.activations.dtype, copy=True)
                version = own._version
                self.copy_layer = False
                with _patched([*self.recorded, self.layer]):
                    fast = self._replay(own, rows, borrow)
                self.copy_layer = own._version != version
            except CamkitError:
                raise  # the caller's mistake (a target, an option), not the replay's
            except Exception as exc:  # any other failure of the replay: not valid here
                self._fall_back(f"the replay raised {type(exc).__name__}: {exc}")
                return
            if _versions(self.recorded) == before:
                break
        tol = 1e-4 * max(1.0, float(exact.abs().max()))
        gap = float((fast - exact).abs().max())
        same = bool(torch.isfinite(fast).all()) and gap <= tol
        reason = (
            f"the replayed score {float(fast[0]):.8g} differs from a full forward's "
            f"{float(exact[0]):.8g} by {gap:.3g}, over the tolerance {tol:.3g}"
        )
        self.fast = same
        if not same:
            self._fall_back(reason)

    def _fall_back(self, reason: str) -> None:
        self.fast = False
        self.fallback_reason = reason
        warnings.warn(
            f"run_suffix: the part of the model after layer {self.name!r} cannot be re-run "
            f"on its own: {reason}. Typical causes: the forward keeps something from before "
            "the layer besides its output, is random, or is in train mode. Falling back to "
            "full re-runs, which are exact but slower.",
            CamkitWarning,
            stacklevel=user_stacklevel(),
        )
