"""Which dimension of a layer's output holds the channels, decided by what the layer is.

An output ``(N, A, *S')`` whose shape fits both channels first ``(N, C, *S)`` and channels last
``(N, *S, C)`` (torchvision's ``swin_t`` at 384 x 384 gives ``(N, 96, 96, 96)`` at
``features.1``) cannot be read from its shape. The layer's own modules tell: the last module
registered in the layer (itself included) that fixes where the channels are:

- convolutions, batch, instance and group norms write channels at dimension 1, and pooling
  and upsampling modules keep them there;
- ``nn.Linear`` and ``nn.LayerNorm`` at the last dimension;
- a permutation module (torchvision's ``Permute``, anything with a ``dims`` attribute) moves
  them where its ``dims`` say, which is how ConvNeXt blocks return to channels first.

Each counts only when its channel count is the ambiguous size. When no module tells, the
layout is refused with an error that asks for ``reshape``: never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["channels_by_module"]

_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Upsample,
)


def _says(module: nn.Module, first: int, last: int, rank: int) -> str | None:
    """``"first"``, ``"last"`` or ``None``: where ``module``'s output keeps its channels, for
    an output of ``rank`` dimensions with ``first`` entries at dimension 1 and ``last`` at the
    last one."""
    if isinstance(module, _CONVS):
        return "first" if module.out_channels == first else None
    if isinstance(module, nn.GroupNorm):
        return "first" if module.num_channels == first else None
    if isinstance(module, _NORMS):
        return "first" if getattr(module, "num_features", None) == first else None
    if isinstance(module, _POOLS):  # they pool or resample the trailing (spatial) dimensions
        return "first"
    if isinstance(module, nn.Linear):
        return "last" if module.out_features == last else None
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        if type(module).__name__ == "LayerNorm2d":  # torchvision's and timm's: channels first
            return "first" if shape == (first,) else None
        return "last" if shape == (last,) else None
    dims = getattr(module, "dims", None)
    if isinstance(dims, Sequence) and len(dims) == rank and all(isinstance(d, int) for d in dims):
        order = [d % rank for d in dims]
        if sorted(order) == list(range(rank)) and order[0] == 0:
            if order[1] == rank - 1:
                return "first"  # (N, *S, C) -> (N, C, *S)
            if order[-1] == 1:
                return "last"  # (N, C, *S) -> (N, *S, C)
    return None


def channels_by_module(module: nn.Module, shape: Sequence[int]) -> str | None:
    """Where ``module``'s output of ``shape`` ``(N, A, ..., B)`` holds its channels.

    Returns:
        ``"first"`` (``A`` channels), ``"last"`` (``B`` channels), or ``None`` when none of
        its modules tells.
    """
    found = None
    for m in module.modules():  # the module, then its descendants in registration order
        said = _says(m, int(shape[1]), int(shape[-1]), len(shape))
        if said is not None:
            found = said
    return found
