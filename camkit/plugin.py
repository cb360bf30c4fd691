"""The public surface for plugin authors: everything a method, metric or adapter plugin may use.

A plugin imports ``camkit`` and this namespace only, so any built-in plugin can be copied out of
the tree and still work::

    import camkit
    from camkit import plugin

    class Toy(plugin.Method):
        name = "toy"
        def weights(self, ctx: plugin.Context) -> torch.Tensor:
            return plugin.normalize(ctx.activations.flatten(2).mean(2))

What is here:

- the contract: :class:`Method`, :class:`Context`, :data:`hookimpl`, :data:`Register`;
- the errors and the warning class;
- map helpers on batched tensors (shapes in each docstring): :func:`weighted_sum`,
  :func:`principal_component`, :func:`eigen_combine`, :func:`normalize`, :func:`upsample`,
  :func:`fuse_mean`;
- :func:`chunk_spans` for methods that chunk their own re-runs of the model (the
  ``batch_size`` option as spans of rows; ``"auto"`` on the CPU probes for the fastest chunk),
  and :func:`resolve_batch_size` (the option as one number of rows, by the rule);
- :func:`progress_bar` for long loops (quiet unless the call's ``progress`` option asks);
- option checkers that raise :class:`OptionError` with the option's name, the expected and
  the received value: :func:`check_bool`, :func:`check_int`, :func:`check_number`,
  :func:`check_choice`;
- the targets a method may construct (:class:`ClassTarget`, :class:`Target`, ...), and
  :class:`LogitsTarget`, the base of targets that score the logits; a method that needs one
  class per sample asks the call's target for it with ``class_indices(n)`` (``None``: the
  target scores no single class);
- for metrics: :class:`Metric`, :class:`MetricContext`, :data:`RegisterMetric`, :func:`peaks`,
  :func:`masks_from_boxes`, and the batched measures :func:`spearman`, :func:`ranks`,
  :func:`ssim`, :func:`gaussian_blur`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .batching import chunk_spans, resolve_batch_size
from .cam import eigen_combine, fuse_mean, normalize, principal_component, upsample, weighted_sum
from .errors import (
    BlankMapWarning,
    CamkitError,
    CamkitWarning,
    InputError,
    LayerError,
    ModelError,
    OptionError,
    PluginError,
    TargetError,
)
from .hookspecs import hookimpl
from .method import Context, Method
from .metric import Metric, MetricContext, MetricResult, masks_from_boxes, peaks
from .progress import bar as progress_bar
from .similarity import gaussian_blur, ranks, spearman, ssim
from .targets import (
    BoxTarget,
    ClassTarget,
    DifferenceTarget,
    FinerTarget,
    FunctionTarget,
    LogitsTarget,
    ProbabilityTarget,
    RegressionTarget,
    ReSTTarget,
    SegmentationTarget,
    SimilarityTarget,
    Target,
    TopK,
)

#: The type of the ``register`` callback a plugin's ``register_methods`` receives.
Register = Callable[[Method], None]
#: The type of the ``register`` callback a plugin's ``register_metrics`` receives.
RegisterMetric = Callable[[Metric], None]

__all__ = [
    "BlankMapWarning",
    "BoxTarget",
    "CamkitError",
    "CamkitWarning",
    "ClassTarget",
    "Context",
    "DifferenceTarget",
    "FinerTarget",
    "FunctionTarget",
    "InputError",
    "LayerError",
    "LogitsTarget",
    "Method",
    "Metric",
    "MetricContext",
    "MetricResult",
    "ModelError",
    "OptionError",
    "PluginError",
    "ProbabilityTarget",
    "ReSTTarget",
    "Register",
    "RegisterMetric",
    "RegressionTarget",
    "SegmentationTarget",
    "SimilarityTarget",
    "Target",
    "TargetError",
    "TopK",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "chunk_spans",
    "eigen_combine",
    "fuse_mean",
    "gaussian_blur",
    "hookimpl",
    "masks_from_boxes",
    "normalize",
    "peaks",
    "principal_component",
    "progress_bar",
    "ranks",
    "resolve_batch_size",
    "spearman",
    "ssim",
    "upsample",
    "weighted_sum",
]


def check_bool(options: Mapping[str, Any], name: str) -> bool:
    """``options[name]`` if it is ``True`` or ``False``; else an :class:`OptionError`."""
    value = options[name]
    if not isinstance(value, bool):
        raise OptionError(
            f"option {name!r} expects True or False, got {value!r} ({type(value).__name__})."
        )
    return value


def check_int(options: Mapping[str, Any], name: str, *, minimum: int | None = None) -> int:
    """``options[name]`` if it is an int (not a bool) of at least ``minimum``."""
    value = options[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
    ):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise OptionError(f"option {name!r} expects an int{bound}, got {value!r}.")
    return value


def check_number(
    options: Mapping[str, Any],
    name: str,
    *,
    minimum: float | None = None,
    exclusive: bool = False,
) -> float:
    """``options[name]`` if it is a finite real number above (or at least) ``minimum``."""
    value = options[name]
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value
    ok = ok and abs(value) != float("inf")
    if ok and minimum is not None:
        ok = value > minimum if exclusive else value >= minimum
    if not ok:
        bound = ""
        if minimum is not None:
            bound = f" {'>' if exclusive else '>='} {minimum}"
        raise OptionError(f"option {name!r} expects a finite number{bound}, got {value!r}.")
    return float(value)


def check_choice(options: Mapping[str, Any], name: str, choices: Iterable[Any]) -> Any:
    """``options[name]`` if it is one of ``choices``; the error lists them."""
    value = options[name]
    allowed = tuple(choices)
    if value not in allowed:
        raise OptionError(
            f"option {name!r} expects one of {', '.join(map(repr, allowed))}; got {value!r}."
        )
    return value
