"""The weighted-sum class activation map and what follows it.

For weights ``w`` and activations ``A`` of a layer, the map is

.. math:: M = \\mathrm{ReLU}\\Big(\\sum_c w_c \\, A_c\\Big)

with ``w`` of shape ``(N, C)`` (one weight per channel, broadcast over positions) or
``(N, C, *S)`` (one per element). Each sample's map is then upsampled to the input's spatial
size and min-max normalised to [0, 1] (a constant map becomes zeros), in that order so every
map spans exactly [0, 1]; maps of several layers are fused after that. All of it runs batched
on the activations' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import TargetError

__all__ = [
    "eigen_combine",
    "fit_mask",
    "fuse_mean",
    "normalize",
    "principal_component",
    "through_resize",
    "upsample",
    "weighted_sum",
]

_AUTO_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """``sum_c w * A`` over channels.

    Args:
        weights: ``(N, C)`` per channel or ``(N, C, *S)`` per element.
        activations: ``(N, C, *S)``.

    Returns:
        ``(N, *S)``.
    """
    if weights.ndim == 2:
        flat = activations.flatten(2)  # (N, C, P)
        out = torch.einsum("nc,ncp->np", weights.to(flat.dtype), flat)
        return out.reshape(activations.shape[:1] + activations.shape[2:])
    return (weights.to(activations.dtype) * activations).sum(dim=1)


def principal_component(values: Tensor, center: bool = True) -> Tensor:
    """Each sample's projection on its first principal component over channels.

    For each sample, ``values`` ``(C, *S)`` is arranged as a ``(P, C)`` matrix over positions,
    centred over positions (unless ``center=False``) and projected on its first right singular
    vector, giving ``(P,)``. A singular vector's sign is arbitrary; it is chosen so that the
    projection correlates positively with the channel sum (the plain, unit-weight map), so maps
    do not flip between BLAS builds. Batched on the device: the top eigenvector of the smaller
    of the ``(P, P)`` and ``(C, C)`` Gram matrices in float64 (``torch.linalg.eigh``), which
    gives the same projection as a singular value decomposition at a fraction of its cost.

    Args:
        values: ``(N, C, *S)``.
        center: subtract the mean over positions first (principal component analysis); ``False``
            projects the raw matrix.

    Returns:
        ``(N, *S)``.
    """
    mat = values.flatten(2).transpose(1, 2)  # (N, P, C)
    if center:
        mat = mat - mat.mean(dim=1, keepdim=True)
    wide = mat.double()
    if mat.shape[1] <= mat.shape[2]:  # fewer positions than channels: (P, P)
        values_, vectors = torch.linalg.eigh(wide @ wide.transpose(1, 2))
        # mat v = sigma u, with sigma^2 the top eigenvalue and u its eigenvector
        top: Tensor = vectors[..., -1] * values_[..., -1:].clamp_min(0).sqrt()
        proj = top.to(mat.dtype)
    else:  # (C, C): the top right singular vector v directly
        _, vectors = torch.linalg.eigh(wide.transpose(1, 2) @ wide)
        proj = torch.einsum("npc,nc->np", wide, vectors[..., -1]).to(mat.dtype)  # (N, P)
    plain = values.flatten(2).sum(dim=1)
    corr = ((proj - proj.mean(1, keepdim=True)) * (plain - plain.mean(1, keepdim=True))).sum(1)
    sign = torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)
    return (proj * sign[:, None]).reshape(values.shape[:1] + values.shape[2:])


def eigen_combine(weights: Tensor, activations: Tensor) -> Tensor:
    """``eigen_smooth``: the first principal component of ``w * A`` in place of the channel sum.

    Args:
        weights: ``(N, C)`` or ``(N, C, *S)``.
        activations: ``(N, C, *S)``.

    Returns:
        ``(N, *S)``, see :func:`principal_component`.
    """
    w = (
        weights
        if weights.ndim > 2
        else weights.reshape(weights.shape + (1,) * (activations.ndim - 2))
    )
    return principal_component(w.to(activations.dtype) * activations)


def normalize(maps: Tensor) -> Tensor:
    """Min-max each sample of ``maps`` ``(N, *S)`` to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - lo) / safe, torch.zeros_like(flat))
    return out.reshape(maps.shape)


def upsample(maps: Tensor, size: Sequence[int], mode: str | None) -> Tensor:
    """Resize ``maps`` ``(N, *S)`` to ``size``; ``mode`` ``"auto"`` picks (bi/tri)linear by rank.

    Maps already of that size, and ``mode=None``, are returned as they are. Each sample is
    clamped to its own range: bicubic overshoots, and interpolation weights round (a constant
    map stays exactly constant).
    """
    size = tuple(int(s) for s in size)
    if mode is None or tuple(maps.shape[1:]) == size:
        return maps
    rank = maps.ndim - 1
    if mode == "auto":
        mode = _AUTO_MODES[rank]
    kwargs = (
        {"align_corners": False} if mode in ("linear", "bilinear", "bicubic", "trilinear") else {}
    )
    out = F.interpolate(maps.unsqueeze(1), size=size, mode=mode, **kwargs).squeeze(1)
    # each sample within its own range: bicubic overshoots, and (bi/tri)linear weights round,
    # which would turn a constant map into rounding noise that normalising blows up to [0, 1]
    shape = (-1,) + (1,) * rank
    lo = maps.flatten(1).amin(1).reshape(shape)
    hi = maps.flatten(1).amax(1).reshape(shape)
    return torch.minimum(torch.maximum(out, lo), hi)


def fuse_mean(maps: Sequence[Tensor]) -> Tensor:
    """Fuse per-layer maps of one shape ``(N, *S)`` by their mean."""
    return torch.stack(list(maps)).mean(dim=0)


def through_resize(
    maps: Tensor,
    geometry: tuple[tuple[int, int], list[tuple[int, int]]],
    several: int,
    size: tuple[int, ...],
    mode: str,
) -> Tensor:
    """Maps ``(M, h, w)`` of a model that resized and padded its inputs, back onto the inputs.

    The layer saw the padded canvas (``geometry``: the canvas size and each image's resized
    size): each map is upsampled to the canvas, cropped to its image's resized extent (the
    padding lies right and below), and resized to ``size``. ``several``: ``K`` maps per image
    (rows sample-major), or 0 for one.
    """
    canvas, sizes = geometry
    out = []
    for i in range(maps.shape[0]):
        h, w = sizes[i // several] if several else sizes[i]
        full = upsample(maps[i : i + 1], canvas, mode)
        out.append(upsample(full[:, :h, :w], size, mode))
    return torch.cat(out)


def fit_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """A mask ``(..., *S)`` laid on a grid of ``size``.

    At ``size`` it is returned as is. At another size with the same aspect ratio (``size`` is
    the mask's size divided by one stride, up to rounding: a mask at the input's size for
    logits at a quarter of it) it is resized: by area averaging when shrinking (each cell
    weighted by the share of it the mask covers, so sums over the mask keep their meaning),
    nearest when enlarging.

    Raises:
        TargetError: for any other size, naming both.
    """
    have, want = tuple(mask.shape[-len(size) :]), tuple(size)
    if have == want:
        return mask
    stride = max(h / w for h, w in zip(have, want, strict=True))
    ok = all(int(h / stride) <= w <= -int(-h // stride) for h, w in zip(have, want, strict=True))
    if mask.ndim < len(size) or not ok:
        raise TargetError(
            f"the mask {tuple(mask.shape)} does not fit the output's {want} grid: expected that "
            "size, or one with its aspect ratio (resized to it); pass a mask at the input's or "
            "the output's size."
        )
    lead = mask.shape[: mask.ndim - len(size)]
    flat = mask.reshape(-1, 1, *have).float()
    mode = "area" if stride > 1 else "nearest"
    return F.interpolate(flat, size=want, mode=mode).reshape(*lead, *want)
