"""Small models defined in the package: for the quick start, tests and conformance checks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SquareDetector", "TinyCNN", "square_image"]


class TinyCNN(nn.Module):
    """A small random-init CNN, ``(N, C_in, *S) -> (N, num_classes)``, for 1D, 2D or 3D inputs.

    ``features`` ends in a ReLU at input resolution / 2; ``head`` pools and classifies.
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 5, dims: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
        gen = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            conv(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            conv(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(pool(1), nn.Flatten(), nn.Linear(16, num_classes))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x))
        return out


class SquareDetector(nn.Module):
    """A hand-weighted CNN on grey images ``(N, 1, H, W)`` with two classes.

    Channel 0 of ``features`` responds to bright pixels, channel 1 to dark ones; class 0
    ("bright square") reads channel 0 and class 1 ("dark background") channel 1. Grad-CAM of
    class 0 therefore lights the bright square, and of class 1 the background.
    """

    classes = ("bright square", "dark background")

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(1, 2, 3, padding=1)
        self.features = nn.Sequential(conv, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            conv.weight.copy_(
                torch.stack([torch.full((1, 3, 3), 1 / 9), torch.full((1, 3, 3), -1 / 9)])
            )
            assert conv.bias is not None
            conv.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight.copy_(torch.eye(2) * 4)
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.pool(self.features(x)).flatten(1))
        return out


def square_image(
    height: int = 12, width: int = 24, top: int = 3, left: int = 15, size: int = 5
) -> Tensor:
    """A ``(1, 1, height, width)`` dark image with a bright ``size`` square at ``(top, left)``."""
    img = torch.zeros(1, 1, height, width)
    img[..., top : top + size, left : left + size] = 1.0
    return img
