"""Occlusion: the drop of the score when a sliding patch of the input is covered.

Zeiler & Fergus (2014), "Visualizing and Understanding Convolutional Networks", ECCV, section
4.2: a patch of the input is set to a constant (grey) and the score of the explained class is
recorded for each position of the patch. As in the attribution form that DeepExplain (Ancona et
al. 2018) and captum compute, each input position gets the mean score drop over the patches
that cover it:

.. math::

    S(λ) = \\frac{1}{|\\{w : λ \\in w\\}|} \\sum_{w \\ni λ} \\big(y - y_w\\big)

with ``y`` the target score and ``y_w`` the score with patch ``w`` (every input channel) set to
``baseline``. Patches of size ``patch`` start at ``0, stride, 2 stride, ...`` in each spatial
dimension until the input is covered, ``ceil((S - patch) / stride) + 1`` positions; the last may
run past the border and is then cut off there. ``stride <= patch``, so every position is covered.

The map does not use the layer: :meth:`Occlusion.combine` returns it at the input's resolution
(``res.raw`` is ``(N, *S_in)``; signed before the ``relu`` option) and the channel weights are
zeros. The score is the call's target (a logit for class targets, as for the other methods;
pass ``target=camkit.targets.ProbabilityTarget(c)`` for the paper's probability).

Cost model: one forward per patch position and sample, through ``ctx.score`` in chunks of
``batch_size`` occluded copies built on the device chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import camkit
from camkit.plugin import check_number, chunk_spans
from camkit.plugin import progress_bar as bar


def _sizes(value: Any, name: str) -> tuple[int, ...]:
    """An int or a tuple of ints, each >= 1; else an :class:`OptionError`."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise camkit.OptionError(
            f"option {name!r} expects a positive int or a tuple of positive ints (one per "
            f"spatial dimension), got {value!r}."
        )
    return tuple(items)


def _per_dim(sizes: tuple[int, ...], rank: int, name: str) -> tuple[int, ...]:
    if len(sizes) == 1:
        return sizes * rank
    if len(sizes) != rank:
        raise camkit.OptionError(
            f"option {name!r} has {len(sizes)} values but the input has {rank} spatial "
            "dimensions; give one int or one per spatial dimension."
        )
    return sizes


def patch_indicators(size: int, patch: int, stride: int, device: torch.device) -> Tensor:
    """``(P, size)`` bool: which positions of one dimension each of its ``P`` patches covers."""
    count = math.ceil((size - patch) / stride) + 1
    starts = torch.arange(count, device=device)[:, None] * stride
    positions = torch.arange(size, device=device)
    return (positions >= starts) & (positions < starts + patch)


class Occlusion(camkit.Method):
    """Mean score drop under the sliding patches covering each input position, ``(N, *S_in)``."""

    name = "occlusion"
    citation = "Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks (ECCV)"
    needs_gradients = False
    class_discriminative = True
    cost = "1 forward + 1 forward per patch position"
    options = {"patch": 16, "stride": 8, "baseline": 0.0}

    def check_options(self, options: Mapping[str, Any]) -> None:
        patch = _sizes(options["patch"], "patch")
        stride = _sizes(options["stride"], "stride")
        check_number(options, "baseline")
        n = max(len(patch), len(stride))
        # comparable before the input's rank is known when each gives one value or n values
        comparable = {len(patch), len(stride)} <= {1, n}
        if comparable and any(
            s > p
            for p, s in zip(_per_dim(patch, n, "patch"), _per_dim(stride, n, "stride"), strict=True)
        ):
            raise camkit.OptionError(
                f"option 'stride' ({options['stride']!r}) must not exceed 'patch' "
                f"({options['patch']!r}) in any dimension, or some positions are never covered."
            )
        if options["eigen_smooth"]:
            raise camkit.OptionError(
                "occlusion forms its map from occluded scores, not from a layer's channels, so "
                "eigen_smooth=True does not apply to it; leave eigen_smooth out."
            )

    def weights(self, ctx: camkit.Context) -> Tensor:
        a = ctx.activations
        return a.new_zeros(a.shape[:2])  # Occlusion weighs no channel: see combine

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        x, rest = ctx.inputs[0], ctx.inputs[1:]
        size = tuple(int(s) for s in x.shape[2:])
        rank = len(size)
        if rank < 1:
            raise camkit.InputError(
                f"occlusion slides a patch over spatial dimensions; got an input of shape "
                f"{tuple(x.shape)} with none."
            )
        patch = _per_dim(_sizes(ctx.options["patch"], "patch"), rank, "patch")
        stride = _per_dim(_sizes(ctx.options["stride"], "stride"), rank, "stride")
        if any(p > s for p, s in zip(patch, size, strict=True)):
            raise camkit.InputError(
                f"the occlusion patch {patch} is larger than the input's spatial size {size}; "
                "pass a smaller patch=..."
            )
        if any(s > p for p, s in zip(patch, stride, strict=True)):
            raise camkit.OptionError(
                f"option 'stride' {stride} must not exceed 'patch' {patch} in any dimension."
            )
        masks = _Patches(size, patch, stride, x.device)
        n, device = x.shape[0], x.device
        dtype = x.dtype if x.is_floating_point() else torch.float32
        baseline = torch.tensor(float(ctx.options["baseline"]), dtype=x.dtype, device=device)
        y = ctx.scores.double()
        drops = torch.zeros(n, math.prod(size), dtype=torch.float64, device=device)
        batch_size, row = ctx.options["batch_size"], tuple(t[:1] for t in ctx.inputs)
        with bar(n * len(masks), self.name, ctx.options) as progress:
            for start, stop in chunk_spans(batch_size, len(masks), row, ctx.model, work="score"):
                covered = masks.chunk(start, stop - start)  # (m, *S) bool
                m = covered.shape[0]
                flat = covered.flatten(1).double()
                for i in range(n):
                    index = torch.full((m,), i, dtype=torch.long, device=device)
                    occluded = torch.where(covered.unsqueeze(1), baseline, x[i : i + 1])
                    scores = ctx.score((occluded, *(t[index] for t in rest)), index)
                    drops[i] += (y[i] - scores.double()) @ flat
                    progress.update(m)
        return (drops / masks.counts()).reshape(n, *size).to(dtype)


class _Patches:
    """The patch positions of a grid, in row-major order, built chunk by chunk."""

    def __init__(
        self,
        size: Sequence[int],
        patch: Sequence[int],
        stride: Sequence[int],
        device: torch.device,
    ) -> None:
        self.per_dim = [
            patch_indicators(s, p, t, device) for s, p, t in zip(size, patch, stride, strict=True)
        ]
        self.grid = tuple(len(ind) for ind in self.per_dim)

    def __len__(self) -> int:
        return math.prod(self.grid)

    def chunk(self, start: int, size: int) -> Tensor:
        """``(m, *S)`` bool: the positions covered by patches ``start .. start + m``."""
        ids = torch.arange(start, min(start + size, len(self)), device=self.per_dim[0].device)
        out: Tensor | None = None
        for ind, k in zip(self.per_dim, torch.unravel_index(ids, self.grid), strict=True):
            part = ind[k]  # (m, S_d)
            out = (
                part
                if out is None
                else out.unsqueeze(-1)
                & part.reshape(part.shape[0], *([1] * (out.ndim - 1)), part.shape[1])
            )
        assert out is not None
        return out

    def counts(self) -> Tensor:
        """``(prod S,)`` float64: how many patches cover each position (each at least 1)."""
        total: Tensor | None = None
        for ind in self.per_dim:
            c = ind.sum(dim=0).double()
            total = c if total is None else (total.unsqueeze(-1) * c)
        assert total is not None
        return total.flatten()


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(Occlusion())
