"""What to explain: a target turns the model output into one score per row.

Every target has ``scores(output, index) -> (M,)`` where ``output`` holds M rows and ``index``
``(M,)`` long says which sample of the batch each row comes from. Methods that score copies of
samples (noisy, masked, augmented) pass an ``index`` that repeats samples, so targets keep
working for them.

This module is also the scoring step of a call: :func:`as_target` builds the target from what
the caller passed, :func:`scored_output` picks the part of the model output it scores, and
:func:`score_target` does both on a captured output and checks the scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .cam import fit_mask
from .checks import as_class_tensor, check_class_range, check_logit_rows
from .deferred import require, require_finite
from .detection import BoxTarget, box_iou
from .errors import OptionError, TargetError
from .logits import FinerTarget, LogitsTarget, ReSTTarget, class_range_error
from .logits import check_classes as _check_range
from .logits import class_logits as _logits

__all__ = [
    "BoxTarget",
    "ClassTarget",
    "DifferenceTarget",
    "FinerTarget",
    "FunctionTarget",
    "LogitsTarget",
    "ProbabilityTarget",
    "ReSTTarget",
    "RegressionTarget",
    "SegmentationTarget",
    "SimilarityTarget",
    "Target",
    "TopK",
    "as_target",
    "box_iou",
    "score_target",
    "scored_output",
    "select_output",
]


@runtime_checkable
class Target(Protocol):
    """Anything with ``scores(output, index)``; implement it to explain any output."""

    def scores(self, output: Any, index: Tensor) -> Tensor:
        """Score each row of ``output``: returns ``(M,)`` for ``index`` of shape ``(M,)``."""
        ...


def select_output(output: Any, choice: Any) -> Any:
    """The part of the model output that class targets score (the ``output`` option).

    With ``choice=None``: a tensor as it is; a mapping's ``"logits"`` or ``"out"`` entry, or its
    only tensor; an object's ``logits`` attribute (Hugging Face ``ModelOutput``); a tuple's or
    list's first element when it is a tensor; anything else as it is. Otherwise ``choice`` is an
    index, a key (or attribute name) or a callable ``f(output)``.
    """
    if choice is None:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping):
            for key in ("logits", "out"):
                if key in output:
                    return output[key]
            tensors = [v for v in output.values() if isinstance(v, Tensor)]
            return tensors[0] if len(tensors) == 1 else output
        if isinstance(getattr(output, "logits", None), Tensor):
            return output.logits
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return output[0]
        return output
    if callable(choice):
        return choice(output)
    try:
        if isinstance(choice, str) and not isinstance(output, Mapping):
            return getattr(output, choice)
        return output[choice]
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise OptionError(
            f"option output={choice!r} does not select anything from the model output "
            f"of type {type(output).__name__}: {exc}. Pass an index, a key or a callable."
        ) from exc


class ClassTarget(LogitsTarget):
    """The output score of one class per sample: ``output[m, classes[index[m]]]``.

    Args:
        classes: ``(N,)`` long, one class index per sample.
    """

    def __init__(self, classes: Tensor) -> None:
        self.classes = classes
        self._clamp = 0  # > 0: clamp indices to [0, _clamp) until a queued range check resolves

    def check(self, output: Any) -> None:
        """Raise :class:`TargetError` when a class is out of range for ``output``; on a GPU
        inside a call, at the call's next resolution of its checks (:mod:`camkit.deferred`),
        the classes clamped until then so that no index leaves the logits."""
        k = _logits(output).shape[1]
        classes = self.classes
        if classes.device.type == "cpu":
            _check_range(classes, k)
            return
        ok = ((classes >= 0) & (classes < k)).all()
        if not require(ok, lambda: class_range_error(classes, k)):
            self._clamp = k

    def scores(self, output: Any, index: Tensor) -> Tensor:
        logits = _logits(output)
        rows = torch.arange(logits.shape[0], device=logits.device)
        classes = self.classes.to(logits.device)
        if self._clamp:
            classes = classes.clamp(0, self._clamp - 1)
        return logits[rows, classes[index.to(logits.device)]]

    def class_indices(self, n: int) -> Tensor | None:
        """``classes``, one per sample."""
        return self.classes


class FunctionTarget:
    """A callable ``f(output) -> (N,)`` or ``f(output, index) -> (M,)`` used as a target."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.takes_index = _accepts_two_args(fn)

    def scores(self, output: Any, index: Tensor) -> Tensor:
        m = int(index.numel())
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


class TopK:
    """Several targets per sample: the ``k`` highest-scoring classes, best first.

    Explaining it gives maps ``(N, k, *S)`` from one forward and one batched backward.
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise TargetError(f"TopK expects a positive int, got {k!r}.")
        self.k = k


class MultiClassTarget(ClassTarget):
    """Several classes per sample, ``classes`` ``(N, K)``; ``scores`` gives ``(M, K)``."""

    def check(self, output: Any) -> None:
        _check_range(self.classes.reshape(-1), _logits(output).shape[1])

    def class_indices(self, n: int) -> Tensor | None:
        """``None``: ``K`` classes per sample (the call explains them as ``N * K`` rows)."""
        return None

    def scores(self, output: Any, index: Tensor) -> Tensor:
        logits = _logits(output)
        return logits.gather(1, self.classes.to(logits.device)[index.to(logits.device)])


def _several(target: Any, output: Any, n: int) -> MultiClassTarget | None:
    """A :class:`MultiClassTarget` for ``TopK`` or ``N`` lists of ``K`` classes, else ``None``."""
    if isinstance(target, TopK):
        logits = _logits(output)
        if target.k > logits.shape[1]:
            raise TargetError(
                f"TopK({target.k}) asks for more classes than the {logits.shape[1]} outputs."
            )
        return MultiClassTarget(logits.topk(target.k, dim=1).indices)
    nested = isinstance(target, Tensor) and target.ndim == 2
    nested |= (
        isinstance(target, Sequence)
        and not isinstance(target, str)
        and len(target) > 0
        and all(
            (isinstance(t, Tensor) and t.ndim >= 1)
            or (isinstance(t, Sequence) and not isinstance(t, str))
            for t in target
        )
    )
    if not nested:
        return None
    try:
        classes = torch.as_tensor(
            target if isinstance(target, Tensor) else [list(t) for t in target]
        )
    except (ValueError, TypeError) as exc:
        raise TargetError(
            f"several targets per sample expect N lists of the same length K; got {target!r}."
        ) from exc
    if classes.ndim != 2 or classes.shape[0] != n or classes.dtype.is_floating_point:
        raise TargetError(
            f"several targets per sample expect ints of shape ({n}, K); got shape "
            f"{tuple(classes.shape)} of {classes.dtype}."
        )
    multi = MultiClassTarget(classes.to(device=_device(output), dtype=torch.long))
    multi.check(output)
    return multi


def as_target(target: Any, output: Any, n: int) -> tuple[Target, Tensor | None]:
    """Wrap what the caller passed as ``target`` for a batch of ``n`` samples.

    Args:
        target: ``None`` (argmax of ``output``), an int, a sequence or tensor of ``n`` ints,
            a callable or an object with ``scores(output, index)``; one with
            ``resolve(output, n)`` is replaced by the target that returns, settled on this
            output before anything is scored.
        output: the model output of the batch, used by ``None`` and range checks.
        n: batch size.

    Returns:
        The target and the ``(n,)`` long class indices it explains, or ``None`` for targets
        that are not classes.
    """
    if target is None or isinstance(target, (int, Sequence, Tensor)):
        check_logit_rows(output, n)
    if target is None:
        classes = _logits(output).argmax(dim=1)
        return ClassTarget(classes), classes
    if isinstance(target, bool):
        raise TargetError(f"target expects a class index, got the bool {target!r}.")
    several = _several(target, output, n)
    if several is not None:
        return several, several.classes
    if isinstance(target, int):
        check_class_range(target, _logits(output).shape[1])
        classes = torch.full((n,), target, dtype=torch.long, device=_device(output))
    elif isinstance(target, Tensor) or (
        isinstance(target, Sequence) and not isinstance(target, str)
    ):
        t = as_class_tensor(target, n)
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
        # a fresh host tensor copied without waiting for the device's queue
        classes = t.to(device=_device(output), dtype=torch.long, non_blocking=True)
    elif callable(getattr(target, "resolve", None)):  # settled on this output (FinerTarget)
        built = target.resolve(output, n)
        built.check(output)
        return built, built.class_indices(n)
    elif isinstance(target, Target):
        if isinstance(target, LogitsTarget):
            target.check(output)
        return target, None
    elif callable(target):
        return FunctionTarget(target), None
    else:
        raise TargetError(
            "target expects None, an int, a sequence of ints, a callable f(output) -> (N,) or "
            f"an object with scores(output, index); got {type(target).__name__}."
        )
    ct = ClassTarget(classes)
    if not isinstance(target, int):  # an int was checked on the host
        ct.check(output)
    return ct, classes


def _device(output: Any) -> torch.device:
    if isinstance(output, Tensor):
        return output.device
    return torch.device("cpu")


def scored_output(output: Any, target: Target, choice: Any) -> Any:
    """What ``target`` scores: a :class:`LogitsTarget` the selected output
    (:func:`select_output`); other targets the raw output, unless the caller chose a part with
    the ``output`` option."""
    if choice is None and not isinstance(target, LogitsTarget):
        return output
    return select_output(output, choice)


def _non_finite_scores(scores: Tensor) -> TargetError:
    return TargetError(
        f"the target scores are not finite ({scores.detach().flatten()[:4].tolist()}...): "
        "the model overflows or divides by zero on this input. Check the input's "
        "preprocessing; for float16 models, try bfloat16 or float32."
    )


def score_target(
    raw_output: Any, spec: Any, choice: Any, index: Tensor, n: int
) -> tuple[Target, Tensor | None, Any, Tensor]:
    """The scoring step: the target built from ``spec`` (:func:`as_target`) on the model output,
    the output it scores and its scores ``(M,)`` (``(M, K)`` for several targets per sample),
    checked finite and one per row.

    Args:
        raw_output: the model output, ``M`` rows.
        spec: what the caller passed as ``target``, or a built target.
        choice: the ``output`` option.
        index: ``(M,)`` the sample of each row.
        n: the batch size the target is built for.

    Returns:
        ``(target, classes, output, scores)``; ``classes`` as :func:`as_target` gives them.
    """
    target, classes = as_target(spec, select_output(raw_output, choice), n)
    output = scored_output(raw_output, target, choice)
    scores = target.scores(output, index)
    m = int(index.shape[0])
    if isinstance(scores, Tensor):
        require_finite(scores, lambda: _non_finite_scores(scores))
    several = isinstance(target, MultiClassTarget)
    if several and isinstance(scores, Tensor) and scores.ndim == 2 and scores.shape[0] == m:
        pass  # (M, K): several targets per sample
    elif not isinstance(scores, Tensor) or scores.shape != (m,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise TargetError(f"the target must give one score per sample, ({m},); got {got}.")
    return target, classes, output, scores


# -- the targets library -------------------------------------------------------------------------
class ProbabilityTarget(LogitsTarget):
    """The softmax probability of a class: ``softmax(logits)[m, classes[index[m]]]``.

    Args:
        classes: one class per sample ``(N,)``, or an int for all.
    """

    def __init__(self, classes: int | Sequence[int] | Tensor) -> None:
        self.classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)

    def check(self, output: Any) -> None:
        _check_range(self.classes, _logits(output).shape[1])

    def scores(self, output: Any, index: Tensor) -> Tensor:
        logits = _logits(output)
        # float32 at least, so that a float64 model keeps float64 scores
        p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
        classes = self.classes.to(p.device)
        chosen = classes.expand(logits.shape[0]) if classes.numel() == 1 else classes[index]
        return p[torch.arange(p.shape[0], device=p.device), chosen]

    def class_indices(self, n: int) -> Tensor | None:
        """The class of each of ``n`` samples (the one class repeated, when one is given)."""
        if self.classes.numel() == 1:
            return self.classes.expand(n)
        if self.classes.numel() != n:
            raise TargetError(
                f"ProbabilityTarget holds {self.classes.numel()} classes for a batch of {n} "
                "samples; pass one class per sample, or a single int for all."
            )
        return self.classes


class DifferenceTarget(LogitsTarget):
    """How much more the model scores class ``a`` than class ``b``: ``logit_a - logit_b``.

    It scores no single class: :meth:`class_indices` is ``None``.
    """

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b

    def check(self, output: Any) -> None:
        k = _logits(output).shape[1]
        if not (0 <= self.a < k and 0 <= self.b < k):
            raise TargetError(f"classes must lie in [0, {k - 1}]; got {self.a} and {self.b}.")

    def scores(self, output: Any, index: Tensor) -> Tensor:
        logits = _logits(output)
        return logits[:, self.a] - logits[:, self.b]


class RegressionTarget:
    """One output of a regression model: ``output[m, column]`` (or ``output[m]`` for ``(M,)``)."""

    def __init__(self, column: int = 0) -> None:
        self.column = column

    def scores(self, output: Any, index: Tensor) -> Tensor:
        out = select_output(output, None)
        if not isinstance(out, Tensor) or out.ndim not in (1, 2):
            raise TargetError(
                "RegressionTarget expects outputs of shape (N,) or (N, K); got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}."
            )
        return out if out.ndim == 1 else out[:, self.column]


class SimilarityTarget:
    """Cosine similarity of the output embedding to a reference, one per sample or shared.

    Args:
        reference: ``(D,)`` or ``(N, D)``.
    """

    def __init__(self, reference: Tensor) -> None:
        self.reference = reference

    def scores(self, output: Any, index: Tensor) -> Tensor:
        emb = select_output(output, None)
        if not isinstance(emb, Tensor) or emb.ndim != 2:
            raise TargetError(
                "SimilarityTarget expects embeddings of shape (N, D); got "
                f"{tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__}."
            )
        ref = self.reference.to(emb.device, emb.dtype)
        ref = ref.expand(emb.shape[0], -1) if ref.ndim == 1 else ref[index.to(emb.device)]
        return torch.nn.functional.cosine_similarity(emb, ref, dim=1)


class SegmentationTarget:
    """A segmentation class's scores summed over a mask: ``sum_{ij in mask} out[m, c, i, j]``.

    ``category``: the class channel. ``mask``: ``(H, W)`` shared, ``(N, H, W)`` per sample, or
    ``None`` for every pixel; take it from the prediction (``out.argmax(1) == c``) to explain
    what the model segmented. A mask at another size than the output's (the input's, for logits
    at a stride: Segformer's at a quarter) is resized to the output's grid (area averaging,
    :func:`camkit.cam.fit_mask`); ``resized`` then holds ``(mask size, output size)``, else
    ``None``. Another aspect ratio is a :class:`TargetError` naming both sizes.
    """

    def __init__(self, category: int, mask: Tensor | None = None) -> None:
        self.category, self.mask = category, mask
        self.resized: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def scores(self, output: Any, index: Tensor) -> Tensor:
        out = select_output(output, None)
        if not isinstance(out, Tensor) or out.ndim < 3:
            raise TargetError(
                "SegmentationTarget expects per-pixel scores (N, K, *S) (for torchvision's "
                "segmentation models, the 'out' entry); got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}."
            )
        if not 0 <= self.category < out.shape[1]:
            raise TargetError(f"category {self.category} is out of range: {out.shape[1]} classes.")
        plane = out[:, self.category]
        if self.mask is None:
            return plane.flatten(1).sum(1)
        mask = fit_mask(self.mask.to(plane.device), plane.shape[1:]).to(plane.dtype)
        got, want = tuple(self.mask.shape[-(plane.ndim - 1) :]), tuple(plane.shape[1:])
        self.resized = None if got == want else (got, want)
        if mask.ndim == plane.ndim:  # per sample
            mask = mask[index.to(plane.device)]
        return (plane * mask).flatten(1).sum(1)
