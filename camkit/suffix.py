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

The mechanism (records, replays, the forward dispatch) lives in :mod:`camkit.replay`. Here:
:class:`SuffixRunner` (record, check, replay in chunks), :func:`suffix_runner` (the
``ctx.run_suffix`` of one layer) and :func:`primed_forward`, the explained forward that records
the prefix and checks the replay itself.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .batching import chunk_spans
from .call import Call
from .capture import Capture, hooks_paused, output_replaced
from .errors import CamkitError, CamkitWarning, OptionError, PluginError, user_stacklevel
from .forward import Forward, check_layer_output, detector_transform, missing_layers
from .layers import target_key
from .layout import Layout, batch_dim
from .replay import Primed, Replay, Replays, patched, record_prefix, run_replay, versions
from .targets import Target, score_target, scored_output
from .walk import any_training

__all__ = ["SuffixRunner", "primed_forward", "suffix_runner", "verdict_key"]

# the replay checks that passed: per model (weakly), per verdict_key, whether the part after
# the layer writes into the layer's output (copy_layer)
_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[Any, bool]] = weakref.WeakKeyDictionary()
_VERDICTS_LOCK = threading.Lock()


class SuffixRunner:
    """Scores of the model with the layer's output replaced; the prefix runs once per call.

    Args:
        model: the model.
        inputs: the batch, ``N`` rows.
        kwargs: the model's keyword arguments.
        layer: the target module.
        activations: ``(N, C, *S)`` the layer's output on ``inputs``.
        score: ``score(output, index) -> (M,)``: selects the output and applies the target.
        batch_size: rows per replay (the ``batch_size`` option: an int or ``"auto"``).
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
        batch_size: int | str,
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
            row = self.activations.narrow(bd, 0, 1)
            work = ("suffix", self.name)
            with self._patches():
                for start, stop in chunk_spans(self.batch_size, total, row, self.model, work=work):
                    part = activations.narrow(bd, start, stop - start)
                    rows = index[start:stop]
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
        return patched([*self.recorded, self.layer])

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
        replay = Replay(
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
        return self.score(run_replay(self.model, self.inputs, self.kwargs, replay), rows).detach()

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
            before = versions(self.recorded)
            try:
                own = copy.unsqueeze(bd).to(self.activations.dtype, copy=True)
                version = own._version
                self.copy_layer = False
                with patched([*self.recorded, self.layer]):
                    fast = self._replay(own, rows, borrow)
                self.copy_layer = own._version != version
            except CamkitError:
                raise  # the caller's mistake (a target, an option), not the replay's
            except Exception as exc:  # any other failure of the replay: not valid here
                self._fall_back(f"the replay raised {type(exc).__name__}: {exc}")
                return
            if versions(self.recorded) == before:
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


def suffix_runner(
    call: Call,
    layer: tuple[str, nn.Module],
    activations: Tensor,
    layout: Layout | None,
    target: Target,
    primed: Primed | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``ctx.run_suffix`` of ``layer``: scores of ``target`` with the layer's output
    ``activations`` replaced; ``primed``: the record and check the explained forward made."""
    runner: SuffixRunner | None = None
    opts = call.options

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
                call.model,
                call.inputs,
                call.kwargs,
                layer,
                activations,
                lambda o, idx: target.scores(scored_output(o, target, opts["output"]), idx),
                opts["batch_size"],
                layout.batch_dim,
            )
            if primed is not None:
                runner.prime(primed)
        native = layout.to_native(replacement.to(activations.dtype), activations, index)
        with call.autocast():
            return runner(native, index)

    return run_suffix


def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return (tuple(value.shape), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value)


def _state(model: nn.Module) -> Any:
    """What a change to the model changes: its modules (identity, class, mode, an instance
    ``forward``), its parameters and buffers (identity, storage, version counter)."""
    modules = tuple(
        (id(m), type(m), m.training, id(m.__dict__.get("forward"))) for m in model.modules()
    )
    tensors = []
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_inference():  # no version counter: changes cannot be seen
            return None
        tensors.append((id(t), t.data_ptr(), t._version))
    return modules, tuple(tensors)


def verdict_key(call: Call, name: str, module: nn.Module) -> Any:
    """The key of a passed replay check of ``call`` at layer ``name``, or ``None`` where none
    is kept (a module in training mode, inference-mode parameters)."""
    model = call.model
    if any_training(model):
        return None  # batch statistics, dropout: checked on every call
    state = _state(model)
    if state is None:
        return None
    device = call.inputs[0].device.type
    return (
        name,
        id(module),
        tuple(_signature(t) for t in call.inputs),
        tuple(sorted((k, _signature(v)) for k, v in call.kwargs.items())),
        target_key(call.target, call.options["output"]),
        (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)),
        state,
    )


def _verdict(model: nn.Module, key: Any) -> bool | None:
    """``copy_layer`` of a passed check under ``key``, or ``None``."""
    if key is None:
        return None
    with _VERDICTS_LOCK:
        return _VERDICTS.get(model, {}).get(key)


def _remember(model: nn.Module, key: Any, copy_layer: bool) -> None:
    if key is None:
        return
    with _VERDICTS_LOCK:
        # one model keeps the verdicts of its latest state only
        kept = {k: v for k, v in _VERDICTS.get(model, {}).items() if k[-1] == key[-1]}
        kept[key] = copy_layer
        _VERDICTS[model] = kept


def primed_forward(call: Call, index: Tensor) -> tuple[Forward, Primed | None]:
    """The explained forward of a method that uses ``ctx.run_suffix``, without gradients, one
    layer: the forward that explains also records the prefix, and the replay is checked.

    The explained forward is the model's own forward on the batch, unchanged: its output is
    what the caller's hooks, the target and ``CamResult.scores`` see. It also records the part
    of the model before the layer. The check then runs one forward of a perturbed copy of the
    first sample (its layer output scaled by 1/2, or set to ones where it is all zero) and
    compares its exact score with the replay of that copy, and the replayed scores of the
    batch with the forward's. Then ``ctx.run_suffix`` needs no check of its own. A passed check
    is remembered per model (weakly) and :func:`verdict_key` (layer, input signature, target
    kind, autocast, the model's modules, modes, parameters and buffers): later calls under the
    same key skip the perturbed copy's forward and its replay, and compare only the batch's
    replayed scores with the forward's. Where the
    replay is not exact or raises, the record is not handed on (``None``): ``ctx.run_suffix``
    then checks (and warns) on its own. A failure of the model itself, in the explained forward
    or on the perturbed copy, reaches the caller as it is. With several targets per sample
    (scores ``(N, K)``) every target's score is compared; the record is for the ``N`` samples,
    so the caller hands it to ``ctx.run_suffix`` only for one target per sample.
    """
    model, inputs, kwargs = call.model, call.inputs, call.kwargs
    name, module = call.layers[0]
    m = int(inputs[0].shape[0])
    choice = call.options["output"]
    key = verdict_key(call, name, module)
    known = _verdict(model, key)  # copy_layer of a check passed before, or None
    capture = Capture(call.layers[:1], needs_gradients=False, transform=detector_transform(model))
    outputs: list[Any] = []
    with capture:
        recorded = record_prefix(model, module, lambda: outputs.append(model(*inputs, **kwargs)))
        if capture.missing():
            raise missing_layers(capture.missing())
        act = capture.activations[name]
        check_layer_output(name, act, m)
    target, classes, output, scores = score_target(outputs[0], call.target, choice, index, call.n)
    forward = Forward(
        output=output,
        target=target,
        classes=classes,
        scores=scores.detach(),
        activations=[act],
        gradients=[None],
        order=[name],
        geometry=capture.geometry,
    )
    bd = batch_dim(act, m)
    reference, got = forward.scores, []
    if known is None:
        own = act.select(bd, 0).clone()
        if bool(own.ne(0).any()):
            own.mul_(0.5)
        else:
            own.fill_(1.0)
        own = own.unsqueeze(bd)
        # the exact score of the perturbed copy: one forward of the first sample
        with hooks_paused(), torch.no_grad(), output_replaced(module, own):
            first = model(*(t[:1] for t in inputs), **kwargs)
        exact = target.scores(scored_output(first, target, choice), index[:1]).detach()
        reference = torch.cat([exact, forward.scores])
    replays = Replays(model, inputs, dict(kwargs), module, act, recorded, bd)
    try:
        raw = replays.output(act, index)
        if replays.written():
            return forward, None
        again = target.scores(scored_output(raw, target, choice), index).detach()
        copy_layer = known
        if known is None:
            version = own._version
            fast = target.scores(
                scored_output(replays.output(own, index[:1]), target, choice), index[:1]
            ).detach()
            copy_layer = own._version != version
            got.append(fast)
            if replays.written():
                return forward, None
    except CamkitError:
        raise  # the caller's mistake (a target, an option), not the replay's
    except Exception:  # not replayable: run_suffix's own check decides, and warns
        return forward, None
    got.append(again)
    replayed = torch.cat(got)
    tol = 1e-4 * max(1.0, float(reference.abs().max()))
    if replayed.shape != reference.shape or not bool(torch.isfinite(replayed).all()):
        return forward, None
    if float((replayed - reference).abs().max()) > tol:
        return forward, None
    assert copy_layer is not None
    if known is None:
        _remember(model, key, copy_layer)
    return forward, Primed(recorded, copy_layer)
