"""Score-CAM, SS-CAM and IS-CAM: channel weights from the scores of masked inputs.

Score-CAM. Wang, Wang, Du, Yang, Zhang, Ding, Mardziel & Hu (2020), "Score-CAM: Score-Weighted
Visual Explanations for Convolutional Neural Networks", CVPR workshops. Each activation map is
upsampled to the input size and min-max normalised to a mask ``M_k`` in [0, 1]; the input
masked by it is scored, and the weights are the softmax over channels of those scores
(Algorithm 1, as the widely used implementations compute it):

.. math:: w_k = \\mathrm{softmax}_k\\big(f^c(X \\odot M_k)\\big)

The official code's variant weighs each channel by the masked input's softmax probability of
the target class instead: ``weights="probability"`` (for class targets).

SS-CAM. Wang, Naidu et al. (2020), "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature
Localization", arXiv:2006.14255. Each score is averaged over ``n_samples`` masks with Gaussian
noise, ``f^c(X ⊙ (M_k + ε_t))`` with ``ε_t ~ N(0, std²)`` (the paper's choice);
``noise_on="input"`` puts the noise on the input instead, ``f^c((X + ε_t) ⊙ M_k)``.

IS-CAM. Naidu, Ghosh, Maurya, Nayak & Kundu (2020), "IS-CAM: Integrated Score-CAM for
axiomatic-based explanations", arXiv:2010.03023. Each score is integrated along the path from
the zero mask to the full mask, ``(1/n) Σ_{i=1..n} f^c(X ⊙ (i/n) M_k)``; deterministic.

Cost model: ``C`` masked forwards for Score-CAM, ``n_samples * C`` for SS-CAM and IS-CAM, each
scored through ``ctx.score`` in chunks of ``batch_size`` (``"auto"``: by device and the size of
one input row, on the CPU probed once per model and row shape, see :mod:`camkit.batching`);
masks are built chunk by chunk on the device (never ``N * C`` masked inputs at once). Channels
whose normalised mask is all zero (a constant activation map) share one score, that of the
zero-masked input (with the same noise draw for SS-CAM: the noise of draw ``t`` is shared by
every channel), computed once and counted for each of them in the softmax, so skipping them is
exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import camkit
from camkit.plugin import ClassTarget, chunk_spans, upsample
from camkit.plugin import progress_bar as bar


def masks_of(activations: Tensor, size: tuple[int, ...]) -> Tensor:
    """Upsampled activation maps, each min-max normalised to [0, 1] (constant maps to zeros).

    Args:
        activations: ``(K, *S)`` some channels of one sample.
        size: the input's spatial size.

    Returns:
        ``(K, *size)``.
    """
    up = upsample(activations, size, "auto")
    flat = up.flatten(1)
    shape = (-1,) + (1,) * len(size)
    lo = flat.min(dim=1).values.reshape(shape)
    span = flat.max(dim=1).values.reshape(shape) - lo
    return torch.where(span > 0, (up - lo) / torch.where(span > 0, span, 1.0), 0.0)


class _MaskScore(camkit.Method):
    """Shared engine: subclasses give the masked inputs of each draw (``_draws``)."""

    needs_gradients = False
    class_discriminative = True
    #: Score constant channels once (exact); ``False`` scores every channel, for comparisons.
    skip_constant = True

    def _draws(self, ctx: camkit.Context) -> list[Callable[[Tensor, Tensor], Tensor]]:
        """For each draw, ``(x (1, C_in, *S), masks (K, 1, *S)) -> (K, C_in, *S)``; a channel's
        score is the mean over draws."""
        raise NotImplementedError

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        a = ctx.activations
        x, rest = ctx.inputs[0], ctx.inputs[1:]
        n, c = a.shape[:2]
        size = tuple(x.shape[2:])
        if a.ndim - 2 != len(size):
            raise camkit.LayerError(
                f"{self.name} multiplies upsampled activation maps into the input, so the layer "
                f"needs the input's spatial rank: layer output {tuple(a.shape)}, input "
                f"{tuple(x.shape)}."
            )
        probability = ctx.options.get("weights") == "probability"
        batch_size = ctx.options["batch_size"]
        target = _probability_target(ctx) if probability else None
        draws = self._draws(ctx)
        row = (x[:1], *(t[:1] for t in rest))  # one masked input: the chunks' rows
        flat = a.flatten(2)
        # a constant map (all zeros after ReLU, typically) upsamples to a constant, whose
        # normalised mask is all zero: those channels share the zero-masked input's score
        constant = flat.amax(dim=2) == flat.amin(dim=2)  # (N, C)
        if not self.skip_constant:
            constant = torch.zeros_like(constant)
        scores = torch.zeros(n, c, dtype=torch.float64, device=a.device)
        with bar(n * c * len(draws), self.name, ctx.options) as progress:
            for i in range(n):
                live = (~constant[i]).nonzero().flatten()
                dead = constant[i].nonzero().flatten()
                rows = torch.cat([live, dead[:1]])  # the last row stands for every dead one
                m = len(rows)
                index = torch.full((m,), i, dtype=torch.long, device=a.device)
                for make in draws:
                    total = torch.empty(m, dtype=torch.float64, device=a.device)
                    # the masked inputs of each span are built when it runs: at most one
                    # chunk of them exists at a time
                    for start, stop in chunk_spans(batch_size, m, row, ctx.model, work="score"):
                        masks = masks_of(a[i, rows[start:stop]], size)
                        masked = make(x[i : i + 1], masks.unsqueeze(1).to(x.dtype))
                        idx = index[start:stop]
                        batch = (masked, *(t[idx] for t in rest))
                        total[start:stop] = ctx.score(batch, idx, target).double()
                    if not bool(torch.isfinite(total).all()):
                        raise camkit.TargetError(
                            f"{self.name}: the scores of masked inputs of sample {i} are not "
                            f"finite ({total.flatten()[:4].tolist()}...): the model overflows "
                            "or divides by zero on masked inputs. Check the model on inputs "
                            "with zeroed regions; for float16 models, try float32."
                        )
                    scores[i, live] += total[: len(live)]
                    if dead.numel():
                        scores[i, dead] += total[-1]
                    progress.update(c)
        scores /= len(draws)
        if probability:
            return scores.to(a.dtype)
        return torch.softmax(scores, dim=1).to(a.dtype)


def _probability_target(ctx: camkit.Context) -> Any:
    """The target class's softmax probability, for ``weights="probability"``."""
    ask = getattr(ctx.target, "class_indices", None)
    classes: torch.Tensor | None = ask(int(ctx.activations.shape[0])) if callable(ask) else None
    if classes is None:
        raise camkit.TargetError(
            "weights='probability' needs class targets (None, an int, one class per sample "
            "or a target whose class_indices(n) names them); got a "
            f"{type(ctx.target).__name__}. Use weights='softmax'."
        )

    class Probability(ClassTarget):
        """The softmax probability of the class, from the logits class targets see."""

        def scores(self, output: Any, index: Tensor) -> Tensor:
            p = F.softmax(output.float(), dim=1)
            return p[torch.arange(p.shape[0], device=p.device), self.classes.to(p.device)[index]]

    return Probability(classes)


def _scaled_mask(s: float) -> Callable[[Tensor, Tensor], Tensor]:
    def make(x: Tensor, masks: Tensor) -> Tensor:
        return x * (s * masks) if s != 1.0 else x * masks

    return make


def _noisy_mask(eps: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    def make(x: Tensor, masks: Tensor) -> Tensor:
        return x * (masks + eps)

    return make


def _noisy_input(eps: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    def make(x: Tensor, masks: Tensor) -> Tensor:
        return (x + eps) * masks

    return make


def _check_weights_option(options: Mapping[str, Any]) -> None:
    if options["weights"] not in ("softmax", "probability"):
        raise camkit.OptionError(
            f"option 'weights' expects 'softmax' or 'probability', got {options['weights']!r}."
        )


def _check_samples(options: Mapping[str, Any]) -> None:
    n = options["n_samples"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise camkit.OptionError(f"option 'n_samples' expects a positive int, got {n!r}.")


class ScoreCAM(_MaskScore):
    """Score-CAM channel weights: softmax over channels of masked-input scores, ``(N, C)``."""

    name = "scorecam"
    aliases = ("score-cam",)
    citation = (
        "Wang et al. 2020, Score-CAM: Score-Weighted Visual Explanations for Convolutional "
        "Neural Networks (CVPR workshops)"
    )
    cost = "1 forward + C masked forwards (all-zero masks share one)"
    options = {"weights": "softmax"}

    def check_options(self, options: Mapping[str, Any]) -> None:
        _check_weights_option(options)

    def _draws(self, ctx: camkit.Context) -> list[Callable[[Tensor, Tensor], Tensor]]:
        return [_scaled_mask(1.0)]


class SSCAM(_MaskScore):
    """SS-CAM: Score-CAM with each score averaged over noisy masks, ``(N, C)``."""

    name = "sscam"
    aliases = ("ss-cam",)
    citation = (
        "Wang, Naidu et al. 2020, SS-CAM: Smoothed Score-CAM for Sharper Visual Feature "
        "Localization (arXiv:2006.14255)"
    )
    cost = "1 forward + n_samples * C masked forwards"
    options = {"n_samples": 35, "std": 2.0, "noise_on": "mask", "weights": "softmax"}

    def check_options(self, options: Mapping[str, Any]) -> None:
        _check_weights_option(options)
        _check_samples(options)
        std = options["std"]
        if (
            isinstance(std, bool)
            or not isinstance(std, (int, float))
            or not math.isfinite(std)
            or std < 0
        ):
            raise camkit.OptionError(
                f"option 'std' expects a finite, non-negative number, got {std!r}."
            )
        if options["noise_on"] not in ("mask", "input"):
            raise camkit.OptionError(
                f"option 'noise_on' expects 'mask' or 'input', got {options['noise_on']!r}."
            )

    def _draws(self, ctx: camkit.Context) -> list[Callable[[Tensor, Tensor], Tensor]]:
        x = ctx.inputs[0]
        std, on = float(ctx.options["std"]), ctx.options["noise_on"]
        shape = (1, *x.shape[2:]) if on == "mask" else tuple(x.shape[1:])
        draws = []
        for _ in range(ctx.options["n_samples"]):
            eps = torch.randn(shape, generator=ctx.generator, device=x.device, dtype=x.dtype) * std
            draws.append(_noisy_mask(eps) if on == "mask" else _noisy_input(eps))
        return draws


class ISCAM(_MaskScore):
    """IS-CAM: Score-CAM with each score integrated over mask scales ``i/n``, ``(N, C)``."""

    name = "iscam"
    aliases = ("is-cam",)
    citation = (
        "Naidu et al. 2020, IS-CAM: Integrated Score-CAM for axiomatic-based explanations "
        "(arXiv:2010.03023)"
    )
    cost = "1 forward + n_samples * C masked forwards"
    options = {"n_samples": 10, "weights": "softmax"}

    def check_options(self, options: Mapping[str, Any]) -> None:
        _check_weights_option(options)
        _check_samples(options)

    def _draws(self, ctx: camkit.Context) -> list[Callable[[Tensor, Tensor], Tensor]]:
        n = ctx.options["n_samples"]
        return [_scaled_mask(i / n) for i in range(1, n + 1)]


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(ScoreCAM())
    register(SSCAM())
    register(ISCAM())
