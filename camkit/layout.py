"""Activation layouts: turning a layer's output into ``(N, C, *S)`` maps and back.

camkit's methods work on channels-first activations ``(N, C, *S)``. Layers of other models give
other layouts, recognised from the output's shape and the input's spatial size:

- channels first ``(N, C, *S)`` (CNNs), kept as they are;
- channels last ``(N, *S, C)`` (Swin-style stages), permuted;
- tokens ``(N, T, C)`` of vision transformers on 2D inputs: the leading class, distillation and
  register tokens (at most :data:`MAX_EXTRA_TOKENS`) are dropped and the rest laid on the grid
  ``h x w`` with ``h * w = T - extra`` and ``h / w`` the input's aspect ratio; sequence-first
  ``(T, N, C)`` tokens are recognised by the batch size.

A shape that fits both channels first and channels last is read from the layer's modules
(:mod:`camkit.channels`), and refused where none tells. A layout the rules cannot settle is an
error that names the shape and the ``reshape`` option.
One rule tells where the batch lies in a layer's output (:func:`batch_dim`): dimension 1 for
sequence-first tokens ``(T, N, C)``, else 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .channels import channels_by_module
from .checks import check_reshaped
from .errors import LayerError

__all__ = [
    "MAX_EXTRA_TOKENS",
    "Layout",
    "batch_dim",
    "batch_rows",
    "has_spatial_extent",
    "infer_layout",
    "layer_layout",
    "layout_or_error",
    "no_extent_error",
    "prepare_maps",
    "target_major",
    "told_layout",
]

#: Leading tokens that may precede the patch tokens (class, distillation, registers).
MAX_EXTRA_TOKENS = 8


@dataclass(frozen=True)
class Layout:
    """How a layer's output maps to ``(N, C, *grid)``.

    Attributes:
        kind: ``"channels_first"``, ``"channels_last"`` or ``"tokens"``.
        extra: leading tokens dropped (``tokens`` only).
        grid: the spatial shape of the maps (``tokens`` only; others keep theirs).
        seq_first: tokens come as ``(T, N, C)``.
    """

    kind: str
    extra: int = 0
    grid: tuple[int, ...] = ()
    seq_first: bool = False

    def to_maps(self, t: Tensor) -> Tensor:
        """The layer's output (or its gradient) as ``(N, C, *S)``."""
        if self.kind == "channels_first":
            return t
        if self.kind == "channels_last":
            return t.movedim(-1, 1)
        tokens = t.transpose(0, 1) if self.seq_first else t  # (N, T, C)
        patches = tokens[:, self.extra :, :]
        return patches.transpose(1, 2).reshape(t.shape[1 if self.seq_first else 0], -1, *self.grid)

    @property
    def batch_dim(self) -> int:
        """The dimension of the layer's output that holds the batch."""
        return 1 if self.seq_first else 0

    def to_native(self, maps: Tensor, native: Tensor, rows: Tensor) -> Tensor:
        """Maps ``(M, C, *S)`` back in the layer's layout.

        Args:
            maps: ``(M, C, *S)``, row ``j`` a modified copy of sample ``rows[j]``.
            native: the layer's output on the batch, in its own layout; for tokens it gives
                the leading tokens the maps do not hold (only those rows are gathered).
            rows: ``(M,)``.
        """
        if self.kind == "channels_first":
            return maps
        if self.kind == "channels_last":
            return maps.movedim(1, -1)
        tokens = maps.flatten(2).transpose(1, 2)  # (M, P, C)
        if self.extra:
            batch_first = native.transpose(0, 1) if self.seq_first else native
            leading = batch_first[:, : self.extra, :][rows.to(native.device)]
            tokens = _cat(leading, tokens)
        return tokens.transpose(0, 1) if self.seq_first else tokens

    def describe(self) -> str:
        if self.kind == "tokens":
            grid = "x".join(map(str, self.grid))
            return f"tokens on a {grid} grid" + (
                f", {self.extra} leading dropped" if self.extra else ""
            )
        return self.kind.replace("_", " ")


def _cat(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([a.to(b.dtype), b], dim=1)


def _consistent(spatial: tuple[int, ...], input_spatial: tuple[int, ...]) -> bool:
    """``spatial`` is ``input_spatial`` divided by one stride, up to rounding (one position)."""
    if len(spatial) != len(input_spatial) or any(s < 1 for s in spatial):
        return False
    if any(s > i for s, i in zip(spatial, input_spatial, strict=True)):
        return False
    stride = max(i / s for s, i in zip(spatial, input_spatial, strict=True))
    # each size is the input's divided by the stride, rounded down or up
    return all(
        math.floor(i / stride + 1e-9) <= s <= math.ceil(i / stride - 1e-9)
        for s, i in zip(spatial, input_spatial, strict=True)
    )


def _token_grid(tokens: int, input_spatial: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
    height, width = input_spatial
    for extra in range(0, min(MAX_EXTRA_TOKENS, tokens - 2) + 1):  # at least two patches
        p = tokens - extra
        h = round(math.sqrt(p * height / width))
        for hh in (h, h - 1, h + 1):
            if hh >= 1 and p % hh == 0 and _consistent((hh, p // hh), input_spatial):
                return extra, (hh, p // hh)
    return None


def infer_layout(
    shape: tuple[int, ...], input_spatial: tuple[int, ...], batch: int
) -> Layout | None:
    """The layout of an output of ``shape`` for inputs of spatial size ``input_spatial``.

    Returns:
        A :class:`Layout`, or ``None`` when the rules cannot settle it.
    """
    rank = len(input_spatial)
    if len(shape) == rank + 2 and rank >= 1:
        if rank == 1 or _consistent(tuple(shape[2:]), input_spatial):
            return Layout("channels_first")
        if _consistent(tuple(shape[1:-1]), input_spatial):
            return Layout("channels_last")
        return Layout("channels_first")
    if len(shape) == 3 and rank == 2:
        seq_first = shape[0] != batch and shape[1] == batch
        tokens = shape[0] if seq_first else shape[1]
        found = _token_grid(tokens, (input_spatial[0], input_spatial[1]))
        if found is not None:
            return Layout("tokens", extra=found[0], grid=found[1], seq_first=seq_first)
    if (len(shape) >= 3 and rank == 0) or (len(shape) > 3 and rank == 1):
        # no input axis to compare with, or a signal model's layer with more axes than the
        # signal (N, C, L', 1): channels first, the map brought to the input's rank later
        return Layout("channels_first")
    return None


def ambiguous(shape: tuple[int, ...], input_spatial: tuple[int, ...]) -> bool:
    """``shape`` fits both channels first and channels last for ``input_spatial``."""
    rank = len(input_spatial)
    return (
        rank >= 2
        and len(shape) == rank + 2
        and _consistent(tuple(shape[2:]), input_spatial)
        and _consistent(tuple(shape[1:-1]), input_spatial)
    )


def told_layout(
    shape: tuple[int, ...], input_spatial: tuple[int, ...], batch: int, module: nn.Module | None
) -> Layout | None:
    """:func:`infer_layout`, with a shape that fits both channels first and channels last read
    from what ``module`` is (:func:`camkit.channels.channels_by_module`); ``None`` where the
    rules cannot settle it or no module tells."""
    if ambiguous(shape, input_spatial):
        said = channels_by_module(module, shape) if module is not None else None
        if said is None:
            return None
        return Layout("channels_last" if said == "last" else "channels_first")
    return infer_layout(shape, input_spatial, batch)


def layout_or_error(
    name: str,
    shape: tuple[int, ...],
    input_spatial: tuple[int, ...],
    batch: int,
    module: nn.Module | None = None,
) -> Layout:
    """:func:`told_layout`, or a :class:`LayerError` naming the shape and the fix.

    A shape that fits both channels first and channels last is read from what ``module`` is;
    a layer whose modules do not tell is refused, never guessed.
    """
    layout = told_layout(shape, input_spatial, batch, module)
    if layout is not None:
        return layout
    if ambiguous(shape, input_spatial):
        rank = len(input_spatial)
        last = ", ".join(map(str, (0, rank + 1, *range(1, rank + 1))))
        raise LayerError(
            f"layer {name!r} gives an output of shape {shape}, which fits both channels first "
            f"(N, C, *S) and channels last (N, *S, C) for the input's spatial size "
            f"{input_spatial}, and none of its modules tells which (a convolution, norm or "
            "linear layer of that many channels, a permutation): camkit does not guess. Pass "
            "reshape=... (a callable turning the output into (N, C, *S): "
            f"lambda a: a.permute({last}) for channels last, lambda a: a for channels first), "
            "or choose the layer that computes it (the stage rather than the activation after "
            "it)."
        )
    raise LayerError(
        f"layer {name!r} gives an output of shape {shape}, whose layout camkit cannot map "
        f"onto the input's spatial size {input_spatial}: expected (N, C, *S), (N, *S, C) or "
        "vision-transformer tokens (N, T, C). Pass reshape=... (a callable turning the "
        "output into (N, C, *S)), or choose another layer."
    )


def batch_dim(a: Tensor, batch: int) -> int:
    """1 for sequence-first tokens ``(T, N, C)``, else 0."""
    return 1 if a.ndim >= 2 and a.shape[0] != batch and a.shape[1] == batch else 0


def batch_rows(a: Tensor, rows: Tensor, batch: int) -> Tensor:
    """Rows ``rows`` of a layer's output with ``batch`` rows on its batch dimension."""
    if batch_dim(a, batch) == 1:
        return a.index_select(1, rows)
    return a[rows]


def target_major(g: Tensor, a: Tensor, n: int) -> Tensor:
    """Gradients ``(K, *a.shape)`` of ``K`` targets as ``N * K`` sample-major rows, on the batch
    dimension of the activations ``a``."""
    if batch_dim(a, n) == 1:
        return g.movedim(0, 2).flatten(1, 2)
    return g.transpose(0, 1).flatten(0, 1)


def has_spatial_extent(t: Any) -> bool:
    """``t`` is a tensor ``(N, C, *S)`` with at least one spatial dim and more than one position."""
    return isinstance(t, Tensor) and t.ndim >= 3 and math.prod(t.shape[2:]) > 1


def no_extent_error(name: str, a: Tensor) -> LayerError:
    """The error for a layer output with nothing to map."""
    return LayerError(
        f"layer {name!r} gives an output of shape {tuple(a.shape)}, which has no spatial "
        "extent to map: expected (N, C, *S) with more than one position. Choose an earlier "
        "layer (before global pooling or flattening), or pass reshape=... for token outputs."
    )


def layer_layout(
    name: str,
    a: Tensor,
    reshape: Any,
    input_spatial: tuple[int, ...],
    batch: int,
    module: nn.Module | None = None,
) -> Layout | None:
    """The layer's layout, or ``None`` when the caller's ``reshape`` takes its place."""
    if reshape is not None:
        return None
    if a.ndim < 3:
        raise no_extent_error(name, a)
    return layout_or_error(name, tuple(a.shape), input_spatial, batch, module)


def prepare_maps(
    name: str,
    a: Tensor,
    g: Tensor | None,
    reshape: Callable[[Tensor], Tensor] | None,
    layout: Layout | None,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Activations and gradients as ``(N, C, *S)``, float32 for half-precision layers;
    detached unless ``differentiable``."""
    if not differentiable:
        a = a.detach()
    if reshape is not None:
        a = check_reshaped(name, "activations", reshape(a))
        g = check_reshaped(name, "gradients", reshape(g)) if g is not None else None
    elif layout is not None:
        a = layout.to_maps(a)
        g = layout.to_maps(g) if g is not None else None
    if not has_spatial_extent(a):
        raise no_extent_error(name, a)
    if a.dtype in (torch.float16, torch.bfloat16):  # weights and sums in float32
        a = a.float()
        g = g.float() if g is not None else None
    return a, g
