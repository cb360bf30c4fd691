"""The plugin contract: :class:`Method` computes weights from a :class:`Context`.

A method is a stateless object; per-call options arrive in ``ctx.options``. The core forms the
map from the weights (see :mod:`camkit.cam`). A method whose map is not a plain weighted sum
overrides :meth:`Method.combine`; one that fuses several layers its own way overrides
:meth:`Method.fuse`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import cam
from .targets import Target

__all__ = ["Context", "Method"]


@dataclass
class Context:
    """Everything a method sees for one layer of one call.

    Attributes:
        model: the model being explained.
        inputs: the input batch as a tuple of tensors, the first ``(N, C_in, *S_in)``.
        output: the model output that targets score (after the ``output`` option).
        layer: the layer's dotted name.
        activations: ``(N, C, *S)`` the layer's output, detached (after ``reshape``).
        gradients: ``(N, C, *S)`` d(sum of scores)/d(activations), or ``None`` when the method
            does not need gradients.
        extras: a dict the method may fill with named results beside the map (per-sample
            tensors ``(N, ...)``); they reach ``CamResult.extras``.
        hessian_vector: ``(N, C, *S)`` the Hessian of the sum of scores with respect to the
            activations times the activations, ``H A``, by a second backward from the layer
            (the graph from the layer on only), for methods with ``needs_hessian_vector``;
            ``None`` otherwise.
        scores: ``(N,)`` the target score of each sample.
        target: the target; ``target.scores(output, index)`` scores any rows.
        options: every option of the call, common and the method's own, with values.
        generator: a ``torch.Generator`` on the inputs' device seeded with ``options["seed"]``.
        score: ``score(inputs, index, target=None) -> (M,)`` re-scores new inputs ``(M, ...)``
            (a tensor or a tuple like ``inputs``) whose row ``m`` comes from sample
            ``index[m]``, with the call's target or the one given; the capture hooks are off,
            no gradients, in chunks of ``options["batch_size"]``.
        run_suffix: ``run_suffix(activations, index) -> (M,)`` scores the model with the
            layer's output replaced by ``activations`` ``(M, C, *S)`` whose row ``m`` belongs to
            sample ``index[m]``, in chunks of ``options["batch_size"]``.
        recapture: ``recapture(inputs, index) -> (activations, gradients)`` runs the capture on
            new inputs ``(M, ...)`` whose row ``m`` comes from sample ``index[m]``: the layer's
            activations ``(M, C, *S)`` and, for methods that need them, the gradients of the
            target scores (``None`` otherwise), in chunks of ``options["batch_size"]``. Methods
            that average over noisy or augmented copies use it.
    """

    model: nn.Module
    inputs: tuple[Tensor, ...]
    output: Any
    layer: str
    activations: Tensor
    gradients: Tensor | None
    scores: Tensor
    target: Target
    options: Mapping[str, Any]
    generator: torch.Generator
    score: Callable[..., Tensor] = field(repr=False)
    run_suffix: Callable[[Tensor, Tensor], Tensor] = field(repr=False)
    recapture: Callable[[Any, Tensor], tuple[Tensor, Tensor | None]] = field(repr=False)
    hessian_vector: Tensor | None = field(default=None, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)


class Method:
    """Base class of CAM methods; subclasses set ``name`` and implement :meth:`weights`.

    Attributes:
        name: canonical name, lowercase words joined by hyphens (``"gradcam"``).
        aliases: other names that resolve to this method (``("gradcam++",)``).
        citation: the paper, as authors, year and title.
        needs_gradients: the core computes ``ctx.gradients`` when true.
        needs_input_gradient: the graph starts at the input and the model's input joins the
            layers as the first, named ``""``: its context holds the first input tensor as
            ``activations`` and the gradient of the summed scores with respect to it as
            ``gradients``, from the same single backward as the layers' gradients; implies
            ``needs_gradients``. One target per sample.
        needs_hessian_vector: the core also computes ``ctx.hessian_vector``, the Hessian of the
            scores with respect to the activations times the activations, by differentiating
            the gradient once more (double backward, from the layer on); implies
            ``needs_gradients``. One target per sample.
        uses_run_suffix: the method calls ``ctx.run_suffix``. Without gradients and with one
            layer, the core then records the part of the model before the layer during the
            explained forward itself and checks the replay there, which saves one forward
            (see :mod:`camkit.suffix`).
        class_discriminative: the map changes with the target class.
        differentiable: the weights come from ``ctx.activations``, ``ctx.gradients`` and
            ``ctx.hessian_vector`` (and the model's own parameters, not detached) through
            differentiable operations, so that ``differentiable=True`` gives maps that carry
            the autograd graph; methods that run the model again or draw random weights leave
            it ``False``, and the option refuses them.
        cost: forwards and backwards per sample, in words.
        options: the method's own options and their defaults.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    citation: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = True
    needs_hessian_vector: ClassVar[bool] = False
    needs_input_gradient: ClassVar[bool] = False
    uses_run_suffix: ClassVar[bool] = False
    class_discriminative: ClassVar[bool] = True
    differentiable: ClassVar[bool] = False
    cost: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Any]] = {}

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise :class:`~camkit.errors.OptionError` for bad values of the method's options."""

    def layers(self, model: nn.Module) -> list[str] | None:
        """The layers to explain when the caller passes ``layer=None``: ``None`` leaves the
        choice to the core (an adapter's proposal, or the last spatial layer); a method defined
        on a set of layers (FullGrad: every convolution and batch norm with a bias) names them."""
        return None

    def target(self, target: Any, options: Mapping[str, Any]) -> Any:
        """The target to explain, from the one the caller passed (``None``, ints, a callable or
        a target object): the caller's, unchanged, unless the method explains a target of its
        own built on it (Finer-CAM wraps it in a :class:`~camkit.targets.FinerTarget`)."""
        return target

    def weights(self, ctx: Context) -> Tensor:
        """Weights ``(N, C)`` per channel or ``(N, C, *S)`` per element for ``ctx.activations``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement weights(ctx)")

    def combine(self, ctx: Context, weights: Tensor) -> Tensor:
        """The map before ReLU, ``(N, *S)``: ``sum_c w * A`` (its principal component under
        ``eigen_smooth``)."""
        if ctx.options["eigen_smooth"]:
            return cam.eigen_combine(weights, ctx.activations)
        return cam.weighted_sum(weights, ctx.activations)

    def fuse(self, maps: Sequence[Tensor], options: Mapping[str, Any]) -> Tensor:
        """Fuse the maps of several layers, upsampled to one size, each ``(N, *S)``, in the
        order the layers ran: the mean of the maps, each min-max normalised first when
        ``options["normalize"]``. The core normalises the result again."""
        if options["normalize"]:
            maps = [cam.normalize(m) for m in maps]
        return cam.fuse_mean(maps)

    def __repr__(self) -> str:
        return f"<camkit method {self.name!r} ({type(self).__module__}.{type(self).__qualname__})>"
