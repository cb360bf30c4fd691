"""The metric contract: a :class:`Metric` scores maps, one value per sample, from a
:class:`MetricContext`.

Metrics are plugins like methods: :class:`Metric` subclasses registered by a
``register_metrics(register)`` hook implementation (see :mod:`camkit.hookspecs`). A metric is
stateless; per-call options arrive in ``ctx.options``. :func:`camkit.evaluate` builds the
context and checks the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .targets import Target

__all__ = [
    "METRIC_OPTIONS",
    "NEEDS",
    "Metric",
    "MetricContext",
    "MetricResult",
    "masks_from_boxes",
    "peaks",
]

#: Options every metric accepts, with their defaults.
METRIC_OPTIONS: Mapping[str, Any] = {
    "batch_size": "auto",
    "seed": 0,
    "progress": None,
}

#: What a metric can declare in ``Metric.needs``: ground-truth ``"masks"`` (or boxes),
#: ``"other-objects"`` (masks of other objects besides the explained one: ``K >= 2``), or the
#: ``"method"`` that made the maps (metrics that explain again: sanity checks).
NEEDS = ("masks", "other-objects", "method")


@dataclass
class MetricContext:
    """Everything a metric sees for one batch.

    Attributes:
        model: the model, scored as it is (never modified; metrics that change weights copy it).
        inputs: the input batch as a tuple of tensors, the first ``(N, C_in, *S)``.
        maps: ``(N, *S)`` float32 maps at the first input's spatial size, on its device.
        target: the target the maps explain; ``target.scores(output, index)`` scores rows.
        classes: ``(N,)`` long, the explained classes, or ``None`` for targets that are not
            classes.
        masks: ``(N, K, *S)`` bool ground-truth regions, ``masks[:, 0]`` the explained object's,
            ``masks[:, 1:]`` other objects' (``K == 1`` when there are none); or ``None``.
        options: the metric's options and the common ones (:data:`METRIC_OPTIONS`), with values.
        generator: a ``torch.Generator`` on the inputs' device seeded with ``options["seed"]``.
        score: ``score(inputs, index) -> (M,)`` scores new inputs ``(M, ...)`` (a tensor or a
            tuple like ``inputs``) whose row ``m`` comes from sample ``index[m]``: the explained
            class's softmax probability (the target's own score for other targets), no
            gradients, in chunks of ``options["batch_size"]`` (an int: "auto" is resolved before).
        scores: ``(N,)`` ``score`` of the unmodified inputs.
        explain: ``explain(model, inputs) -> (N, *S)`` the maps of the same method, layer,
            target and options for another model (a copy) or other inputs ``(N, ...)``; only
            for metrics that need ``"method"``, ``None`` otherwise.
    """

    model: nn.Module
    inputs: tuple[Tensor, ...]
    maps: Tensor
    target: Target
    classes: Tensor | None
    masks: Tensor | None
    options: Mapping[str, Any]
    generator: torch.Generator
    score: Callable[..., Tensor] = field(repr=False)
    scores: Tensor
    explain: Callable[[nn.Module, Any], Tensor] | None = field(default=None, repr=False)


class Metric:
    """Base class of explanation-quality metrics; subclasses set ``name`` and implement
    :meth:`compute`.

    Attributes:
        name: canonical name, lowercase words joined by hyphens (``"deletion"``).
        aliases: other names that resolve to this metric.
        citation: the paper, as authors, year and title.
        higher_is_better: the direction of the metric.
        needs: what the metric needs besides the model, inputs and maps: a subset of
            :data:`NEEDS`.
        cost: forwards per sample, in words.
        options: the metric's own options and their defaults.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    citation: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = ()
    cost: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Any]] = {}

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise :class:`~camkit.errors.OptionError` for bad values of the metric's options."""

    def compute(self, ctx: MetricContext) -> Tensor:
        """One value per sample, ``(N,)`` float; ``NaN`` where the metric is undefined for a
        sample (the docstring of the metric says when)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement compute(ctx)")

    def __repr__(self) -> str:
        return f"<camkit metric {self.name!r} ({type(self).__module__}.{type(self).__qualname__})>"


@dataclass(frozen=True)
class MetricResult:
    """The values of one metric on one batch.

    Attributes:
        values: ``(N,)`` float32 on the CPU, one value per sample (``NaN`` where undefined).
        metric: the canonical metric name.
        higher_is_better: the metric's direction.
    """

    values: Tensor
    metric: str
    higher_is_better: bool

    def mean(self) -> float:
        """The mean over the samples where the value is defined (``NaN`` if none is), summed in
        float64."""
        return float(self.values.double().nanmean())

    def __len__(self) -> int:
        return int(self.values.shape[0])


def peaks(maps: Tensor) -> Tensor:
    """Flat index of each map's maximum (the first one), ``(N,)`` long; ``-1`` for a constant map,
    which has none.

    Args:
        maps: ``(N, *S)``.
    """
    flat = maps.reshape(maps.shape[0], -1)
    idx = flat.argmax(dim=1)
    constant = flat.amax(dim=1) <= flat.amin(dim=1)
    return torch.where(constant, torch.full_like(idx, -1), idx)


def masks_from_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks ``(N, K, H, W)`` bool from boxes ``(N, K, 4)`` or ``(N, 4)`` as ``(x0, y0, x1, y1)``
    in pixels, ``x1`` and ``y1`` exclusive; the first box of a sample is the explained object's.
    """
    b = boxes if boxes.ndim == 3 else boxes[:, None]
    h, w = size
    ys = torch.arange(h, device=b.device)[:, None]
    xs = torch.arange(w, device=b.device)[None, :]
    x0, y0, x1, y1 = (b[..., i, None, None] for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
