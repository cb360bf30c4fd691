"""RISE: randomized input sampling, a black-box saliency map at the input's resolution.

Petsiuk, Das & Saenko (2018), "RISE: Randomized Input Sampling for Explanation of Black-box
Models", BMVC. Equation 6: the saliency of pixel ``λ`` is the score of the input under random
masks ``M_i``, averaged with the masks as weights and divided by the masks' mean value ``p``,

.. math::

    S(λ) = \\frac{1}{p \\, N_M} \\sum_{i=1}^{N_M} f(I \\odot M_i) \\, M_i(λ)

with ``f`` the probability of the explained class (``score="auto"`` for class targets; any
other target's own score otherwise). The masks are built as in section 3.2: a binary grid of
``cells`` cells per spatial dimension, each cell on with probability ``p``, upsampled
(bi/trilinearly) to ``(cells + 1) * ceil(S / cells)`` and cropped at a random offset in
``[0, ceil(S / cells))`` per dimension, so the soft mask edges fall anywhere.

The map does not use the layer: :meth:`RISE.combine` returns it at the input's resolution
(``res.raw`` is ``(N, *S_in)``) and the channel weights are zeros. The masks are drawn once per
call from the call's seeded generator and shared by every sample, so a sample's map does not
depend on its batch or on ``batch_size``.

Departure from the reference code: masks are upsampled by torch's (bi/tri)linear interpolation
with half-pixel centres, whose border pixels repeat the edge cell; the reference code's
``skimage.transform.resize(mode="reflect")`` mirrors the grid there. The two differ only in the
outer half cell of the upsampled grid, which the random crop mostly cuts away.

Cost model: ``n_masks`` masked forwards per sample, through ``ctx.score`` in chunks of
``batch_size`` masks; the masks of a chunk are built on the device when needed (never all
``n_masks`` at the input's size at once) and reused for every sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import camkit
from camkit.plugin import (
    ClassTarget,
    ProbabilityTarget,
    check_choice,
    check_int,
    check_number,
    chunk_spans,
    upsample,
)
from camkit.plugin import progress_bar as bar


def rise_masks(grids: Tensor, shifts: Tensor, size: tuple[int, ...]) -> Tensor:
    """Soft RISE masks from binary grids.

    Args:
        grids: ``(M, *[cells] * d)`` zeros and ones.
        shifts: ``(M, d)`` long, each mask's crop offset per dimension, in
            ``[0, ceil(size[k] / cells))``.
        size: the input's spatial size ``(S_1, ..., S_d)``.

    Returns:
        ``(M, *size)`` masks in [0, 1].
    """
    cells = grids.shape[1]
    cell = [math.ceil(s / cells) for s in size]
    up = upsample(grids, [(cells + 1) * c for c in cell], "auto")
    for dim, s in enumerate(size):
        # crop [shift, shift + s) along spatial dimension `dim`, a different shift per mask
        idx = shifts[:, dim, None] + torch.arange(s, device=grids.device)  # (M, s)
        shape = [up.shape[0]] + [1] * (up.ndim - 1)
        shape[dim + 1] = s
        up = up.gather(
            dim + 1, idx.reshape(shape).expand(*up.shape[: dim + 1], s, *up.shape[dim + 2 :])
        )
    return up


class RISE(camkit.Method):
    """RISE saliency at the input's resolution, ``(N, *S_in)``, from ``n_masks`` masked scores."""

    name = "rise"
    citation = (
        "Petsiuk, Das & Saenko 2018, RISE: Randomized Input Sampling for Explanation of "
        "Black-box Models (BMVC)"
    )
    needs_gradients = False
    class_discriminative = True
    cost = "1 forward + n_masks masked forwards"
    options = {"n_masks": 4000, "cells": 7, "p": 0.5, "score": "auto"}

    def check_options(self, options: Mapping[str, Any]) -> None:
        check_int(options, "n_masks", minimum=1)
        check_int(options, "cells", minimum=1)
        p = check_number(options, "p", minimum=0.0, exclusive=True)
        if p > 1:
            raise camkit.OptionError(f"option 'p' expects a probability in (0, 1], got {p!r}.")
        check_choice(options, "score", ("auto", "probability", "target"))
        if options["eigen_smooth"]:
            raise camkit.OptionError(
                "rise forms its map from masked scores, not from a layer's channels, so "
                "eigen_smooth=True does not apply to it; leave eigen_smooth out."
            )

    def weights(self, ctx: camkit.Context) -> Tensor:
        a = ctx.activations
        return a.new_zeros(a.shape[:2])  # RISE weighs no channel: see combine

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        x, rest = ctx.inputs[0], ctx.inputs[1:]
        size = tuple(int(s) for s in x.shape[2:])
        if not 1 <= len(size) <= 3:
            raise camkit.InputError(
                f"rise masks inputs with 1 to 3 spatial dimensions (N, C, *S); got an input of "
                f"shape {tuple(x.shape)}."
            )
        n = x.shape[0]
        count: int = ctx.options["n_masks"]
        cells: int = ctx.options["cells"]
        p = float(ctx.options["p"])
        device, g = x.device, ctx.generator
        dtype = x.dtype if x.is_floating_point() else torch.float32
        # every random draw up front, in one order: the masks do not depend on batch_size
        grids = (torch.rand((count, *[cells] * len(size)), generator=g, device=device) < p).to(
            dtype
        )
        shifts = torch.stack(
            [
                torch.randint(math.ceil(s / cells), (count,), generator=g, device=device)
                for s in size
            ],
            dim=1,
        )
        target = _score_target(ctx)
        saliency = torch.zeros(n, math.prod(size), dtype=torch.float64, device=device)
        batch_size, row = ctx.options["batch_size"], tuple(t[:1] for t in ctx.inputs)
        with bar(n * count, self.name, ctx.options) as progress:
            for start, stop in chunk_spans(batch_size, count, row, ctx.model, work="score"):
                masks = rise_masks(grids[start:stop], shifts[start:stop], size)
                m = masks.shape[0]
                flat = masks.flatten(1).double()
                for i in range(n):
                    index = torch.full((m,), i, dtype=torch.long, device=device)
                    masked = x[i : i + 1] * masks.unsqueeze(1)
                    scores = ctx.score((masked, *(t[index] for t in rest)), index, target)
                    saliency[i] += scores.double() @ flat
                    progress.update(m)
        return (saliency / (count * p)).reshape(n, *size).to(dtype)


def _score_target(ctx: camkit.Context) -> Any:
    """The score ``f`` of eq. 6: ``None`` keeps the call's target."""
    choice = ctx.options["score"]
    target = ctx.target
    plain_class = type(target) in (ClassTarget, ProbabilityTarget)
    if choice == "target" or (choice == "auto" and not plain_class):
        return None
    if not plain_class:
        raise camkit.TargetError(
            "score='probability' needs class targets (None, an int or one class per sample); "
            f"got a {type(target).__name__}. Use score='target' to mask its own score."
        )
    assert isinstance(target, (ClassTarget, ProbabilityTarget))
    return ProbabilityTarget(target.classes)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(RISE())
