"""Deep Feature Factorization: the layer's activations as a few non-negative concepts.

Collins, Achanta & Süsstrunk (2018), "Deep Feature Factorization for Concept Discovery", ECCV.
The activations of a sample, a non-negative ``(P, C)`` matrix ``V`` over positions, are
factorised into ``K`` concepts, ``V ~ W H`` with ``W >= 0`` ``(P, K)`` (where each concept is)
and ``H >= 0`` ``(K, C)`` (what each concept is, in channels), by non-negative matrix
factorisation with the multiplicative updates of Lee & Seung (2001) on the Frobenius norm:

.. math::

    H \\leftarrow H \\odot \\frac{W^\\top V}{W^\\top W H}, \\qquad
    W \\leftarrow W \\odot \\frac{V H^\\top}{W H H^\\top}

for ``n_iter`` iterations from a seeded uniform start (the ``seed`` option). Each concept ``k``
is scaled so that its map ``W_k`` peaks at 1, and scored through the part of the model after the
layer: the target's score when every position holds the concept's embedding ``H_k`` (for a
head of global average pooling and a linear layer, the classifier applied to ``H_k``, as in the
paper). Concepts come sorted by that score, best first.

``res.extras`` holds ``"concepts"`` ``(N, K, *S)`` (the maps ``W_k`` at the layer's resolution),
``"concept_embeddings"`` ``(N, K, C)`` and ``"concept_scores"`` ``(N, K)``. The method's map is
the best concept's (the weights are its embedding ``H_1``, ``(N, C)``): class-discriminative
through that choice only.

Departures: the paper factorises the activations of a whole set of images jointly, to find the
concepts they share; camkit factorises each sample on its own (so a sample's concepts do not
depend on the rest of the batch), batched on the device in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import camkit
from camkit.plugin import check_int

EPS = 1e-12


def nmf(v: Tensor, k: int, n_iter: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Batched NMF of ``v`` ``(N, P, C) >= 0`` into ``W`` ``(N, P, K)`` and ``H`` ``(N, K, C)``.

    The start is one seeded uniform draw shared by the samples, scaled by each sample's
    ``sqrt(mean(V) / K)``; then ``n_iter`` multiplicative updates of ``H`` then ``W``.
    """
    p, c = v.shape[1:]
    w0 = torch.rand(p, k, generator=generator, device=v.device, dtype=torch.float64)
    h0 = torch.rand(k, c, generator=generator, device=v.device, dtype=torch.float64)
    scale = (v.mean(dim=(1, 2)) / k).sqrt()[:, None, None]
    w, h = w0.to(v.dtype) * scale, h0.to(v.dtype) * scale
    vt = v.transpose(1, 2)
    for _ in range(n_iter):
        h = h * (w.transpose(1, 2) @ v) / ((w.transpose(1, 2) @ w) @ h + EPS)
        w = w * (h @ vt).transpose(1, 2) / (w @ (h @ h.transpose(1, 2)) + EPS)
    return w, h


class DeepFeatureFactorization(camkit.Method):
    """DFF: the best-scoring concept's map; weights are its embedding, ``(N, C)``."""

    name = "dff"
    aliases = ("deep-feature-factorization",)
    citation = (
        "Collins, Achanta & Süsstrunk 2018, Deep Feature Factorization for Concept Discovery (ECCV)"
    )
    needs_gradients = False
    uses_run_suffix = True
    class_discriminative = True
    cost = "1 forward + n_iter NMF updates + K copies through the part after the layer"
    options = {"n_components": 4, "n_iter": 200}

    def check_options(self, options: Mapping[str, Any]) -> None:
        check_int(options, "n_components", minimum=1)
        check_int(options, "n_iter", minimum=1)

    def weights(self, ctx: camkit.Context) -> Tensor:
        a = ctx.activations
        n, c = a.shape[:2]
        k = ctx.options["n_components"]
        if bool((a < 0).any()):
            raise camkit.LayerError(
                f"dff factorises non-negative activations, but layer {ctx.layer!r} has "
                f"negative values (min {float(a.min()):.3g}). Choose a layer that ends in a "
                "ReLU (a ResNet's layer4, for instance)."
            )
        v = a.flatten(2).transpose(1, 2).double()  # (N, P, C)
        if k > min(v.shape[1], c):
            raise camkit.OptionError(
                f"option 'n_components' expects at most min(positions, channels) = "
                f"{min(v.shape[1], c)} at layer {ctx.layer!r}; got {k}."
            )
        w, h = nmf(v, k, ctx.options["n_iter"], ctx.generator)
        peak = w.amax(dim=1, keepdim=True).clamp_min(EPS)  # (N, 1, K)
        w, h = w / peak, h * peak.transpose(1, 2)
        # each concept spread over every position, scored through the rest of the model
        spread = h.to(a.dtype)[..., None].expand(n, k, c, v.shape[1]).reshape(n * k, *a.shape[1:])
        index = torch.arange(n, device=a.device).repeat_interleave(k)
        scores = ctx.run_suffix(spread, index).reshape(n, k)
        order = scores.argsort(dim=1, descending=True)
        scores = scores.gather(1, order)
        h = h.gather(1, order[..., None].expand(n, k, c))
        w = w.gather(2, order[:, None, :].expand(n, v.shape[1], k))
        concepts = w.transpose(1, 2).reshape(n, k, *a.shape[2:]).to(a.dtype)
        ctx.extras.update(
            concepts=concepts, concept_embeddings=h.to(a.dtype), concept_scores=scores
        )
        return h[:, 0].to(a.dtype)

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        concepts: Tensor = ctx.extras["concepts"]
        return concepts[:, 0]


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(DeepFeatureFactorization())
