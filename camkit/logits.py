"""Targets that score the logits ``(N, K)``: their base, and the scores that compare a class
with the other classes (ReST for Shapley-CAM, Finer-CAM's comparison).

:class:`LogitsTarget` is the base of every target that scores the logits the ``output`` option
selects (see :mod:`camkit.targets`, which re-exports everything here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import TargetError

__all__ = [
    "FinerTarget",
    "LogitsTarget",
    "ReSTTarget",
    "check_classes",
    "class_logits",
    "class_range_error",
]


def class_logits(output: Any) -> Tensor:
    """``output`` if it is logits ``(N, K)``; else a :class:`TargetError` that says what to do."""
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TargetError(
            "a class target expects the scored model output to be logits of shape (N, K), "
            f"got {shape}. Pass output=... to choose a tensor, or a callable target "
            "f(output) -> (N,) for other outputs."
        )
    return output


def class_range_error(classes: Tensor, k: int) -> TargetError:
    """The :class:`TargetError` for classes some of which lie outside ``[0, k)``."""
    bad = (classes < 0) | (classes >= k)
    return TargetError(
        f"target classes must lie in [0, {k - 1}] for a model with {k} outputs; "
        f"got {sorted(set(classes[bad].tolist()))}."
    )


def check_classes(classes: Tensor, k: int) -> None:
    """Raise :class:`TargetError` unless every class lies in ``[0, k)``."""
    if bool(((classes < 0) | (classes >= k)).any()):
        raise class_range_error(classes, k)


class LogitsTarget:
    """Base of the targets that score the logits ``(N, K)``: the part of the output the
    ``output`` option selects (:func:`camkit.targets.select_output`), with their classes
    range-checked.

    Subclasses implement ``scores`` and ``check``, and say which class each sample's score is
    about with :meth:`class_indices` (methods such as CAM, which use a class's classifier
    weights, ask it).
    """

    def check(self, output: Any) -> None:
        """Raise :class:`TargetError` when a class is out of range for the logits ``output``."""

    def scores(self, output: Any, index: Tensor) -> Tensor:
        """Score each row of ``output``: returns ``(M,)`` for ``index`` of shape ``(M,)``."""
        raise NotImplementedError

    def class_indices(self, n: int) -> Tensor | None:
        """The one class each of ``n`` samples is scored for, ``(n,)`` long, or ``None`` when
        the score is not one class's (a difference of two, several per sample)."""
        return None


def _per_sample(classes: Tensor, n: int, what: str) -> Tensor:
    if classes.numel() == 1:
        return classes.expand(n)
    if classes.numel() != n:
        raise TargetError(
            f"{what} holds {classes.numel()} classes for a batch of {n} samples; pass one class "
            "per sample, or a single int for all."
        )
    return classes


class ReSTTarget(LogitsTarget):
    """The residual softmax target-class score (ReST) of a class: the logit plus the log of
    its softmax probability, ``y_c + log softmax(y)_c = y_c - CE(y, c)``.

    Cai (2025), "CAMs as Shapley Value-based Explainers", arXiv:2501.06261: the logit alone
    ignores the other classes, the probability saturates; ReST keeps both. It is the utility
    Shapley-CAM is defined with.

    Args:
        classes: one class per sample ``(N,)``, or an int for all.
    """

    def __init__(self, classes: int | Sequence[int] | Tensor) -> None:
        self.classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)

    def check(self, output: Any) -> None:
        check_classes(self.classes, class_logits(output).shape[1])

    def scores(self, output: Any, index: Tensor) -> Tensor:
        logits = class_logits(output)
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        classes = self.classes.to(logits.device)
        chosen = classes.expand(logits.shape[0]) if classes.numel() == 1 else classes[index]
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, chosen] + torch.log_softmax(logits, dim=1)[rows, chosen]

    def class_indices(self, n: int) -> Tensor | None:
        """The class of each of ``n`` samples."""
        return _per_sample(self.classes, n, "ReSTTarget")


class FinerTarget(LogitsTarget):
    """Finer-CAM's target: a class against the classes the model finds closest to it.

    Zhang et al. (2025), "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
    Explanation", CVPR. For class ``c`` (the predicted one by default), the ``n_compare`` classes
    ``d`` whose logits on the explained forward are closest to ``y_c`` are fixed per sample
    (:meth:`resolve`), and the score is the difference ``y_c - alpha y_d`` averaged with the
    softmax probabilities ``p_d`` as weights (as in the authors' implementation)::

        sum_d p_d (y_c - alpha y_d) / sum_d p_d

    ``alpha`` is the comparison strength: 0 explains ``y_c`` alone, 1 the full difference.

    Args:
        classes: ``None`` (the predicted class), an int, or one class per sample.
        alpha: comparison strength.
        n_compare: how many closest classes to compare with (at least 1).
    """

    def __init__(
        self,
        classes: int | Sequence[int] | Tensor | None = None,
        alpha: float = 1.0,
        n_compare: int = 3,
    ) -> None:
        if isinstance(n_compare, bool) or not isinstance(n_compare, int) or n_compare < 1:
            raise TargetError(f"FinerTarget's n_compare expects an int >= 1, got {n_compare!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != alpha:
            raise TargetError(f"FinerTarget's alpha expects a number, got {alpha!r}.")
        self.given = classes is not None
        self.classes = torch.as_tensor(
            [] if classes is None else classes, dtype=torch.long
        ).reshape(-1)
        self.alpha, self.n_compare = float(alpha), n_compare
        self.compare: Tensor | None = None  # (N, n_compare) once resolved

    def resolve(self, output: Any, n: int) -> FinerTarget:
        """The target for this batch: the classes and their closest classes, fixed from the
        logits ``output`` ``(N, K)`` of the explained forward."""
        logits = class_logits(output).detach()
        k = logits.shape[1]
        if self.n_compare >= k:
            raise TargetError(
                f"FinerTarget compares with {self.n_compare} classes, but the model has {k} "
                f"outputs: pass n_compare <= {k - 1}."
            )
        if self.given:
            main = _per_sample(self.classes, n, "FinerTarget").to(logits.device)
            check_classes(main, k)
        else:
            main = logits.argmax(dim=1)
        rows = torch.arange(n, device=logits.device)
        distance = (logits - logits[rows, main][:, None]).abs()
        distance[rows, main] = float("inf")
        out = FinerTarget(main, self.alpha, self.n_compare)
        out.compare = distance.topk(self.n_compare, dim=1, largest=False).indices
        return out

    def check(self, output: Any) -> None:
        if self.given:
            check_classes(self.classes, class_logits(output).shape[1])

    def scores(self, output: Any, index: Tensor) -> Tensor:
        logits = class_logits(output)
        target = self if self.compare is not None else self.resolve(logits, logits.shape[0])
        assert target.compare is not None
        idx = index.to(logits.device)
        main = target.classes.to(logits.device)[idx]
        compare = target.compare.to(logits.device)[idx]
        y_c = logits.gather(1, main[:, None])
        y_d = logits.gather(1, compare)
        p_d = torch.softmax(logits, dim=1).gather(1, compare)
        total = p_d.sum(dim=1).clamp_min(torch.finfo(p_d.dtype).tiny)
        return (p_d * (y_c - self.alpha * y_d)).sum(dim=1) / total

    def class_indices(self, n: int) -> Tensor | None:
        """The class each sample is explained for, once resolved."""
        return self.classes if self.compare is not None else None
