"""``camkit.evaluate``: score maps with one metric, one value per sample.

The metric re-scores perturbed inputs on the model's device, in chunks of ``batch_size``, with no
gradients; the model is scored as it is and left as it was (its buffers too).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .batching import resolve_batch_size
from .errors import CamkitWarning, InputError, OptionError, PluginError, did_you_mean
from .explain import explain
from .method import Method
from .metric import METRIC_OPTIONS, Metric, MetricContext, MetricResult
from .registry import Registry, default_registry
from .result import CamResult
from .targets import ProbabilityTarget, Target, as_target, select_output
from .walk import any_training

__all__ = ["evaluate", "metric_options", "model_kept"]


def metric_options(metric: Metric, options: Mapping[str, Any]) -> dict[str, Any]:
    """The metric's options with defaults filled in and values checked."""
    known = {**METRIC_OPTIONS, **metric.options}
    unknown = sorted(set(options) - set(known))
    if unknown:
        hint = did_you_mean(unknown[0], known)
        raise OptionError(
            f"metric {metric.name!r} has no option {unknown[0]!r}.{hint} Its options: "
            f"{', '.join(sorted(known))}."
        )
    opts = {**known, **options}
    size = opts["batch_size"]
    if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise OptionError(f"option 'batch_size' expects 'auto' or an int >= 1, got {size!r}.")
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int):
        raise OptionError(f"option 'seed' expects an int, got {opts['seed']!r}.")
    if opts["progress"] not in (None, True, False):
        raise OptionError(
            f"option 'progress' expects None, True or False; got {opts['progress']!r}."
        )
    metric.check_options(opts)
    return opts


@contextmanager
def model_kept(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers afterwards when some module is in training mode (batch-norm
    statistics would otherwise move while scoring)."""
    if not any_training(model):
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _scorer(model: nn.Module, target: Target, batch_size: int) -> Callable[..., Tensor]:
    def score(new_inputs: Any, index: Tensor) -> Tensor:
        batch = new_inputs if isinstance(new_inputs, tuple) else (new_inputs,)
        m = int(batch[0].shape[0])
        out = []
        with torch.no_grad():
            for start in range(0, m, batch_size):
                sl = slice(start, min(start + batch_size, m))
                output = select_output(model(*(t[sl] for t in batch)), None)
                out.append(target.scores(output, index[sl]).detach().float())
        return torch.cat(out) if out else torch.zeros(0)

    return score


def _check_maps(maps: Tensor, first: Tensor) -> Tensor:
    spatial = tuple(first.shape[2:])
    if maps.ndim == first.ndim and maps.shape[1] == 1:
        maps = maps[:, 0]  # (N, 1, *S) as some libraries return
    if tuple(maps.shape) != (first.shape[0], *spatial):
        raise InputError(
            f"maps expects shape {(first.shape[0], *spatial)} (one map per sample at the input's "
            f"spatial size); got {tuple(maps.shape)}. Explain with upsample='auto' (the default) "
            "so maps match the input."
        )
    if not bool(torch.isfinite(maps).all()):
        raise InputError("maps hold NaN or infinite values; expected finite numbers.")
    out: Tensor = maps.detach().to(device=first.device, dtype=torch.float32)
    return out


def _check_masks(masks: Any, maps: Tensor) -> Tensor:
    if not isinstance(masks, Tensor):
        raise InputError(
            f"masks expects a bool tensor (N, *S) or (N, K, *S); got {type(masks).__name__}."
        )
    if masks.ndim == maps.ndim:
        masks = masks[:, None]
    if masks.ndim != maps.ndim + 1 or masks.shape[0] != maps.shape[0]:
        raise InputError(
            f"masks expects shape {tuple(maps.shape)} or {(maps.shape[0], 'K', *maps.shape[1:])} "
            f"(region 0: the explained object's); got {tuple(masks.shape)}."
        )
    if tuple(masks.shape[2:]) != tuple(maps.shape[1:]):
        raise InputError(
            f"masks have the spatial size {tuple(masks.shape[2:])}, the maps "
            f"{tuple(maps.shape[1:])}; resize the masks to the input's size."
        )
    out: Tensor = masks.to(device=maps.device, dtype=torch.bool)
    return out


def evaluate(
    model: nn.Module,
    x: Any,
    maps: Tensor | CamResult,
    metric: str | Metric = "deletion",
    target: Any = None,
    masks: Tensor | None = None,
    *,
    method: str | Method | None = None,
    layer: Any = None,
    method_options: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
    **options: Any,
) -> MetricResult:
    """Score ``maps`` of the batch ``x`` with ``metric``: one value per sample.

    Args:
        model: the model the maps explain; scored as it is and never modified.
        x: ``(N, C_in, *S)`` tensor, or a tuple of tensors whose first gives the maps' size.
        maps: ``(N, *S)`` maps at the input's size, or the :class:`camkit.CamResult` of
            ``camkit.explain`` (its classes, method and layer are then used by default).
        metric: a metric name (see :func:`camkit.list_metrics`) or a :class:`camkit.Metric`.
        target: what the maps explain: ``None`` (the result's classes, else the predicted
            class), an int, ``N`` ints, or any target ``camkit.explain`` accepts.
        masks: ``(N, *S)`` or ``(N, K, *S)`` bool ground-truth regions, region 0 the explained
            object's (see :func:`camkit.metric.masks_from_boxes` for boxes); for metrics that
            need masks.
        method, layer, method_options: how the maps were made, for metrics that explain again
            (``model-randomization``, ``max-sensitivity``); the method and layer default to the
            result's.
        registry: the registry to look the metric up in (default: the process-wide one).
        **options: the metric's options and ``batch_size``, ``seed``, ``progress``.

    Returns:
        A :class:`camkit.MetricResult`: ``values`` ``(N,)`` on the CPU, ``higher_is_better``,
        ``metric``.
    """
    reg = registry or default_registry()
    m = reg.get_metric(metric)
    opts = metric_options(m, options)
    inputs = x if isinstance(x, tuple) else (x,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs) or inputs[0].ndim < 3:
        raise InputError(
            f"x expects a tensor (N, C, *S) with spatial dimensions, or a tuple of tensors; got "
            f"{type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}."
        )
    # "auto": rows of one perturbed copy of each input, as the methods chunk theirs
    opts["batch_size"] = resolve_batch_size(opts["batch_size"], tuple(t[:1] for t in inputs))
    if isinstance(maps, CamResult):
        if target is None and maps.targets is not None:
            target = maps.targets
        layer = maps.layer if layer is None else layer
        method = maps.method if method is None else method
        maps = maps.maps
    maps = _check_maps(maps, inputs[0])
    if "masks" in m.needs and masks is None:
        raise InputError(
            f"metric {m.name!r} needs ground-truth masks (or boxes through "
            "camkit.metric.masks_from_boxes); pass masks=..."
        )
    region = None if masks is None else _check_masks(masks, maps)
    if "other-objects" in m.needs and (region is None or region.shape[1] < 2):
        raise InputError(
            f"metric {m.name!r} expects masks (N, K, *S) with K >= 2: region 0 the explained "
            "object, regions 1 and up the objects of other classes; got "
            f"{None if region is None else tuple(region.shape)}."
        )
    how = method if "method" in m.needs else "gradcam"
    if how is None:
        raise InputError(
            f"metric {m.name!r} explains again: pass the CamResult as maps, or method=... "
            "(and layer=..., method_options=...) as the maps were made."
        )
    n = int(inputs[0].shape[0])
    with model_kept(model), torch.no_grad():
        output = select_output(model(*inputs), None)
        tgt, classes = as_target(target, output, n)
        if classes is not None and classes.ndim != 1:
            raise InputError(
                f"evaluate expects one target per sample; got classes of shape "
                f"{tuple(classes.shape)}. Evaluate each target on its own."
            )
        scorer_target: Target = ProbabilityTarget(classes) if classes is not None else tgt
        score = _scorer(model, scorer_target, opts["batch_size"])
        index = torch.arange(n, device=inputs[0].device)
        scores = scorer_target.scores(output, index).detach().float()  # the forward above
    generator = torch.Generator(device=inputs[0].device).manual_seed(opts["seed"])

    explain_again = None
    if "method" in m.needs:
        chosen = classes if classes is not None else tgt
        extra = dict(method_options or {})

        def explain_again(other: nn.Module, new_x: Any) -> Tensor:
            res = explain(other, new_x, method=how, layer=layer, target=chosen, **extra)
            return res.maps.detach().float()

    ctx = MetricContext(
        model=model,
        inputs=inputs,
        maps=maps,
        target=tgt,
        classes=classes,
        masks=region,
        options=opts,
        generator=generator,
        score=score,
        scores=scores,
        explain=explain_again,
    )
    with model_kept(model):
        values = m.compute(ctx)
    if not isinstance(values, Tensor) or tuple(values.shape) != (n,):
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise PluginError(f"metric {m.name!r} returned {got}; expected a tensor of shape ({n},).")
    values = values.detach().float().cpu()
    undefined = int(values.isnan().sum())
    if undefined:
        warnings.warn(
            f"metric {m.name!r} is undefined for {undefined} of {n} samples (NaN); means leave "
            "them out. See the metric's documentation for when this happens.",
            CamkitWarning,
            stacklevel=2,
        )
    return MetricResult(values=values, metric=m.name, higher_is_better=m.higher_is_better)
