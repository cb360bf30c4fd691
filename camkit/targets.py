"""What to explain: a target turns the model output into one score per row.

Every target has ``scores(output, index) -> (M,)`` where ``output`` holds M rows and ``index``
``(M,)`` long says which sample of the batch each row comes from. Methods that score copies of
samples (noisy, masked, augmented) pass an ``index`` that repeats samples, so targets keep
working for them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import TargetError

__all__ = ["ClassTarget", "FunctionTarget", "Target", "as_target"]


@runtime_checkable
class Target(Protocol):
    """Anything with ``scores(output, index)``; implement it to explain any output."""

    def scores(self, output: Any, index: Tensor) -> Tensor:
        """Score each row of ``output``: returns ``(M,)`` for ``index`` of shape ``(M,)``."""
        ...


def _logits(output: Any) -> Tensor:
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TargetError(
            "a class target expects the scored model output to be logits of shape (N, K), "
            f"got {shape}. Pass output=... to choose a tensor, or a callable target "
            "f(output) -> (N,) for other outputs."
        )
    return output


class ClassTarget:
    """The output score of one class per sample: ``output[m, classes[index[m]]]``.

    Args:
        classes: ``(N,)`` long, one class index per sample.
    """

    def __init__(self, classes: Tensor) -> None:
        self.classes = classes

    def check(self, output: Any) -> None:
        """Raise :class:`TargetError` when a class is out of range for ``output``."""
        k = _logits(output).shape[1]
        bad = (self.classes < 0) | (self.classes >= k)
        if bool(bad.any()):
            raise TargetError(
                f"target classes must lie in [0, {k - 1}] for a model with {k} outputs; "
                f"got {sorted(set(self.classes[bad].tolist()))}."
            )

    def scores(self, output: Any, index: Tensor) -> Tensor:
        logits = _logits(output)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, self.classes.to(logits.device)[index.to(logits.device)]]


class FunctionTarget:
    """A callable ``f(output) -> (N,)`` or ``f(output, index) -> (M,)`` used as a target."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.takes_index = _accepts_two_args(fn)

    def scores(self, output: Any, index: Tensor) -> Tensor:
        m = _rows(output)
        if self.takes_index:
            result = self.fn(output, index)
        elif m == index.numel() and bool((index == torch.arange(m, device=index.device)).all()):
            result = self.fn(output)
        else:
            raise TargetError(
                "this method scores copies of samples, so a callable target must accept "
                f"(output, index) where index (M,) names each row's sample; {_name(self.fn)} "
                "takes only (output). Add the index parameter."
            )
        if not isinstance(result, Tensor) or result.shape != (m,):
            got = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
            raise TargetError(
                f"the target callable {_name(self.fn)} must return one score per row, shape "
                f"({m},); got {got}."
            )
        return result


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _rows(output: Any) -> int:
    if isinstance(output, Tensor):
        return int(output.shape[0])
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return int(output[0].shape[0])
    if isinstance(output, dict):
        for v in output.values():
            if isinstance(v, Tensor):
                return int(v.shape[0])
    raise TargetError(f"cannot tell the number of rows of a model output of type {type(output)}.")


def _accepts_two_args(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: assume one argument
        return False
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    var = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    return var or len(positional) >= 2


def as_target(target: Any, output: Any, n: int) -> tuple[Target, Tensor | None]:
    """Wrap what the caller passed as ``target`` for a batch of ``n`` samples.

    Args:
        target: ``None`` (argmax of ``output``), an int, a sequence or tensor of ``n`` ints,
            a callable or an object with ``scores(output, index)``.
        output: the model output of the batch, used by ``None`` and range checks.
        n: batch size.

    Returns:
        The target and the ``(n,)`` long class indices it explains, or ``None`` for targets
        that are not classes.
    """
    if target is None:
        classes = _logits(output).argmax(dim=1)
        return ClassTarget(classes), classes
    if isinstance(target, bool):
        raise TargetError(f"target expects a class index, got the bool {target!r}.")
    if isinstance(target, int):
        classes = torch.full((n,), target, dtype=torch.long, device=_device(output))
    elif isinstance(target, Tensor) or (
        isinstance(target, Sequence) and not isinstance(target, str)
    ):
        t = torch.as_tensor(target)
        if t.ndim == 0:
            t = t.reshape(1).expand(n)
        if t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TargetError(
                f"target expects one int class index per sample, shape ({n},); "
                f"got shape {tuple(t.shape)} of {t.dtype}."
            )
        if t.shape[0] != n:
            raise TargetError(
                f"target has {t.shape[0]} entries for a batch of {n} samples; pass one class "
                "per sample, or a single int for all."
            )
        classes = t.to(device=_device(output), dtype=torch.long)
    elif isinstance(target, Target):
        return target, None
    elif callable(target):
        return FunctionTarget(target), None
    else:
        raise TargetError(
            "target expects None, an int, a sequence of ints, a callable f(output) -> (N,) or "
            f"an object with scores(output, index); got {type(target).__name__}."
        )
    ct = ClassTarget(classes)
    ct.check(output)
    return ct, classes


def _device(output: Any) -> torch.device:
    if isinstance(output, Tensor):
        return output.device
    return torch.device("cpu")
