"""The demo's model: a small CNN ending in a spatial feature map, global pooling and a linear layer.

``features`` maps a ``(N, 3, 64, 64)`` image to ``(N, 32, 16, 16)`` activations (the layer the
demo explains), ``head`` averages them over positions and classifies into :data:`CLASSES`. The
trained weights ship in the package (``demo_weights.pt``, written by ``scripts/train_demo.py``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from .data import CLASSES

__all__ = ["WEIGHTS_FILE", "DemoCNN", "load_demo_model"]

#: The weights file, inside the ``camkit.demo`` package.
WEIGHTS_FILE = "demo_weights.pt"


def _block(c_in: int, c_out: int, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class DemoCNN(nn.Module):
    """Four conv blocks (two max-pools, the last block dilated), then pooling and a linear layer.

    The receptive field of a ``features`` position is 34 pixels, more than the largest object.

    Args:
        num_classes: number of outputs.
        width: channels of the first block; later blocks have twice as many.
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(3, width),
            nn.MaxPool2d(2),
            *_block(width, 2 * width),
            nn.MaxPool2d(2),
            *_block(2 * width, 2 * width),
            *_block(2 * width, 2 * width, dilation=2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x))
        return out


def load_checkpoint() -> dict[str, Any]:
    """The shipped checkpoint: ``state_dict``, ``classes``, ``width``, ``seed`` and accuracy."""
    ref = resources.files(__package__).joinpath(WEIGHTS_FILE)
    if not ref.is_file():
        raise ModelError(
            f"the demo's weights file {WEIGHTS_FILE} is missing from the camkit.demo package. "
            "Train it with `python scripts/train_demo.py` from a checkout of the repository."
        )
    with ref.open("rb") as f:
        ckpt: dict[str, Any] = torch.load(f, map_location="cpu", weights_only=True)
    if tuple(ckpt.get("classes", ())) != CLASSES:
        raise ModelError(
            f"the demo's weights file was trained for classes {ckpt.get('classes')!r}, but the "
            f"demo's data has {CLASSES!r}. Retrain it with `python scripts/train_demo.py`."
        )
    return ckpt


def load_demo_model(device: str | torch.device = "cpu") -> nn.Module:
    """The trained demo model on ``device``, in eval mode.

    Args:
        device: where to put the model.

    Returns:
        A :class:`DemoCNN` with the shipped weights; the layer to explain is ``"features"``.
    """
    ckpt = load_checkpoint()
    model = DemoCNN(num_classes=len(CLASSES), width=int(ckpt["width"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()
