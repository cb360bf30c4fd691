"""Smooth Grad-CAM++.

Omeiza, Speakman, Cintas & Weldemariam (2019), "Smooth Grad-CAM++: An Enhanced Inference Level
Visualization Technique for Deep Convolutional Neural Network Models", arXiv:1908.01224.
Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) with each power of the gradient averaged over
``n`` copies of the input with Gaussian noise (SmoothGrad, Smilkov et al. 2017):

.. math::

    D_p = \\frac{1}{n} \\sum_{t=1}^{n}
          \\Big(\\frac{\\partial S(x + \\epsilon_t)}{\\partial A}\\Big)^p,
    \\qquad \\alpha_{ij} = \\frac{D_2}{2 D_2 + \\sum_{ab} A_{ab} D_3}, \\qquad
    w_k = \\sum_{ij} \\alpha_{ij} \\, \\mathrm{ReLU}(D_1)

with ``epsilon ~ N(0, sigma^2)``, ``sigma = noise * (max x - min x)`` per sample; the ``n`` noise
draws are shared by the samples of a batch, so a sample's map does not depend on its batch. All
``N * n``
copies go through batched forwards (``batch_size`` rows at a time), not a loop per copy. ``A``
is the activation of the clean input, as is the map. The noise is drawn from the call's seeded
generator: the same seed gives the same map. The denominator is kept stable as in Grad-CAM++:
``max(sum A, 0)``, and ``alpha = 0`` where ``2 D_2 + sum A * D_3 <= 0`` (possible only when the
noisy gradients' cube averages below zero, ``D_3 < 0``), instead of an unbounded or negative
pixel weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import camkit

from .gradcampp import gradcampp_weights


class SmoothGradCAMPlusPlus(camkit.Method):
    """Grad-CAM++ weights, ``(N, C)``, from gradient powers averaged over noisy copies."""

    name = "smoothgradcampp"
    aliases = ("smoothgradcam++", "smooth-grad-cam++")
    citation = (
        "Omeiza et al. 2019, Smooth Grad-CAM++: An Enhanced Inference Level Visualization "
        "Technique for Deep Convolutional Neural Network Models (arXiv:1908.01224)"
    )
    needs_gradients = True
    class_discriminative = True
    cost = "1 + n_samples forwards and backwards from the layer, batched"
    options = {"n_samples": 8, "noise": 0.15}

    def check_options(self, options: Mapping[str, Any]) -> None:
        n = options["n_samples"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise camkit.OptionError(f"option 'n_samples' expects a positive int, got {n!r}.")
        noise = options["noise"]
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
            raise camkit.OptionError(
                f"option 'noise' expects a non-negative fraction of the input range, got {noise!r}."
            )

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        x = ctx.inputs[0]
        n, copies = x.shape[0], ctx.options["n_samples"]
        index = torch.arange(n, device=x.device).repeat_interleave(copies)
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).reshape((-1,) + (1,) * (x.ndim - 1))
        sigma = (ctx.options["noise"] * span)[index]
        # one set of noise draws, scaled per sample: a sample's map does not depend on the batch
        noise = torch.randn(
            (copies, *x.shape[1:]), generator=ctx.generator, device=x.device, dtype=x.dtype
        ).repeat(n, *([1] * (x.ndim - 1)))
        noisy = (x[index] + sigma * noise, *(t[index] for t in ctx.inputs[1:]))
        _, grads = ctx.recapture(noisy, index)
        assert grads is not None
        g = grads.reshape(n, copies, *grads.shape[1:])
        d1, d2, d3 = g.mean(1), (g * g).mean(1), (g * g * g).mean(1)
        weights: torch.Tensor = gradcampp_weights(ctx.activations, d1, d2, d3)
        return weights


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(SmoothGradCAMPlusPlus())
