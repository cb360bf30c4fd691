"""Random channel weights: the baseline every comparison of methods needs.

One weight per channel is drawn uniformly from [0, 1) with the call's seeded generator and used
for every sample of the batch, so a sample's map does not depend on the batch it is in. The map is
then a random positive mix of the layer's channels: it lights what the network sees, whatever
the class, so it is **not class-discriminative**. A method that does no better than this on a
metric has shown nothing.
"""

from __future__ import annotations

import torch

import camkit


class RandomCAM(camkit.Method):
    """Uniform random channel weights, ``(N, C)``, reproducible for a seed."""

    name = "random"
    aliases = ("random-cam",)
    citation = "baseline: uniform random channel weights"
    needs_gradients = False
    class_discriminative = False
    cost = "1 forward"

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        a = ctx.activations
        w = torch.rand(a.shape[1], generator=ctx.generator, device=a.device)
        return w.to(a.dtype).expand(a.shape[0], -1)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(RandomCAM())
