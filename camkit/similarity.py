"""Similarity of maps and image filters in torch, batched, for metrics: Spearman rank
correlation, SSIM, Gaussian blur.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_blur", "ranks", "spearman", "ssim"]


def ranks(values: Tensor) -> Tensor:
    """Ranks ``(N, P)`` float64 of each row of ``values`` ``(N, P)``, from 1; tied values share
    the mean of their ranks (as Spearman's coefficient needs)."""
    n, p = values.shape
    order = values.argsort(dim=1, stable=True)
    sorted_values = values.gather(1, order)
    new = torch.ones_like(sorted_values, dtype=torch.bool)
    new[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group = new.long().cumsum(1) - 1 + torch.arange(n, device=values.device)[:, None] * p
    position = torch.arange(1, p + 1, device=values.device, dtype=torch.float64).expand(n, p)
    flat_group = group.reshape(-1)
    total = torch.zeros(n * p, dtype=torch.float64, device=values.device)
    count = torch.zeros(n * p, dtype=torch.float64, device=values.device)
    total.index_add_(0, flat_group, position.reshape(-1))
    count.index_add_(0, flat_group, torch.ones_like(position).reshape(-1))
    mean_rank = (total / count.clamp(min=1))[flat_group].reshape(n, p)
    out = torch.empty_like(mean_rank)
    out.scatter_(1, order, mean_rank)
    return out


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation of each pair of maps, ``(N,)`` float64.

    Args:
        a, b: ``(N, *S)`` maps.

    Returns:
        The Pearson correlation of the tie-averaged ranks; ``NaN`` where a map is constant (its
        ranks do not vary, so the correlation is undefined).
    """
    ra = ranks(a.reshape(a.shape[0], -1).double())
    rb = ranks(b.reshape(b.shape[0], -1).double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    denominator = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    r = (ra * rb).sum(1) / denominator
    return torch.where(denominator > 0, r, torch.full_like(r, math.nan))


def _gaussian_kernel(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    k = torch.exp(-(coords**2) / (2 * sigma**2))
    return k / k.sum()


def _separable(x: Tensor, kernel: Tensor, padding: str) -> Tensor:
    """``x`` ``(B, 1, H, W)`` filtered by ``kernel`` along both axes."""
    size = kernel.numel()
    if padding == "reflect":
        x = F.pad(x, (size // 2,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.reshape(1, 1, 1, size))
    return F.conv2d(x, kernel.reshape(1, 1, size, 1))


def gaussian_blur(images: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """Images ``(N, C, H, W)`` blurred by a Gaussian of ``sigma`` pixels (window ``size``), edges
    reflected; the same shape and dtype."""
    n, c, h, w = images.shape
    size = min(size, 2 * min(h, w) - 1)  # reflection needs a pad below the side
    kernel = _gaussian_kernel(size, sigma, images.dtype, images.device)
    return _separable(images.reshape(n * c, 1, h, w), kernel, "reflect").reshape(n, c, h, w)


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity of each pair of maps ``(N, H, W)``, ``(N,)`` float64.

    Wang et al. 2004, "Image quality assessment: from error visibility to structural
    similarity": a Gaussian window of 11 pixels and sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``,
    ``L = data_range``, averaged over the positions where the whole window lies inside the
    map (no padding); maps smaller than 11 pixels use a window of their smaller side.
    """
    x = a.double()[:, None]
    y = b.double()[:, None]
    size = min(11, x.shape[-1], x.shape[-2])
    kernel = _gaussian_kernel(size, 1.5, torch.float64, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _separable(x, kernel, "valid"), _separable(y, kernel, "valid")
    vx = _separable(x * x, kernel, "valid") - mx**2
    vy = _separable(y * y, kernel, "valid") - my**2
    cxy = _separable(x * y, kernel, "valid") - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
