"""Image to model input the way torchvision's ``weights.transforms()`` do: resize, centre crop,
scale to [0, 1], normalise; the resized, cropped image is kept for overlays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CamkitError, ModelSpecError

__all__ = [
    "DEFAULT_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "Preprocess",
    "preprocess_from_timm",
    "preprocess_from_torchvision",
]


#: ImageNet channel means and standard deviations (RGB, for inputs scaled to [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Input size ``(H, W)`` used when neither the weights nor the caller give one.
DEFAULT_SIZE: tuple[int, int] = (224, 224)
#: The interpolation modes :class:`Preprocess` accepts.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


def _resize(img: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize a ``(3, H, W)`` uint8 image to ``size`` as torchvision does for tensors."""
    if tuple(img.shape[1:]) == size:
        return img
    x = img.unsqueeze(0).float()
    if mode in ("bilinear", "bicubic"):
        y = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    else:
        y = F.interpolate(x, size=size, mode=mode)
    return y.round().clamp(0, 255).to(torch.uint8)[0]


def _centre_crop(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop the centre ``size`` of a ``(3, H, W)`` image, padding with zeros when smaller."""
    ch, cw = size
    h, w = int(img.shape[1]), int(img.shape[2])
    if ch > h or cw > w:
        pad = [
            (cw - w) // 2 if cw > w else 0,
            (cw - w + 1) // 2 if cw > w else 0,
            (ch - h) // 2 if ch > h else 0,
            (ch - h + 1) // 2 if ch > h else 0,
        ]
        img = F.pad(img, pad, value=0)
        h, w = int(img.shape[1]), int(img.shape[2])
        if (h, w) == size:
            return img
    top = round((h - ch) / 2.0)
    left = round((w - cw) / 2.0)
    return img[:, top : top + ch, left : left + cw]


@dataclass(frozen=True)
class Preprocess:
    """Image to model input: resize, centre crop, scale to [0, 1], normalise.

    With ``resize`` set, the shorter side is resized to ``resize`` (keeping the aspect ratio)
    and the centre ``size`` is cropped, as torchvision's ``weights.transforms()`` do; with
    ``resize=None`` the image is resized straight to ``size`` (the aspect ratio is not kept).
    Resizing is antialiased for ``bilinear`` and ``bicubic`` and rounds back to uint8, so the
    input matches torchvision's transforms applied to the decoded image.

    Attributes:
        size: ``(H, W)`` of the model input, and of the maps.
        mean: per-channel mean (RGB, for values in [0, 1]).
        std: per-channel standard deviation.
        resize: the shorter side before the centre crop, or ``None``.
        interpolation: ``bilinear``, ``bicubic``, ``nearest`` or ``nearest-exact``.
        source: where these settings come from, in words.
    """

    size: tuple[int, int] = DEFAULT_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None
    interpolation: str = "bilinear"
    source: str = "defaults"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise CamkitError(f"the input size must be two positive ints (H, W); got {self.size}.")
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, 3):
                raise CamkitError(f"{name} needs 1 or 3 values (RGB); got {len(v)}: {v}.")
        if min(self.std) <= 0:
            raise CamkitError(f"std values must be positive; got {self.std}.")
        if self.resize is not None and self.resize < 1:
            raise CamkitError(f"the resize size must be a positive int; got {self.resize}.")
        if self.interpolation not in INTERPOLATIONS:
            raise CamkitError(
                f"interpolation expects one of {', '.join(INTERPOLATIONS)}; got "
                f"{self.interpolation!r}."
            )

    def display(self, rgb: np.ndarray) -> np.ndarray:
        """The resized, cropped image ``(H, W, 3)`` uint8 RGB the model sees, before scaling."""
        img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        if self.resize is not None:
            h, w = int(img.shape[1]), int(img.shape[2])
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.resize * long / short)
            new = (new_long, self.resize) if w <= h else (self.resize, new_long)
            img = _centre_crop(_resize(img, new, self.interpolation), self.size)
        else:
            img = _resize(img, self.size, self.interpolation)
        out: np.ndarray = img.permute(1, 2, 0).contiguous().numpy()
        return out

    def tensor(self, display: np.ndarray) -> Tensor:
        """The normalised ``(3, H, W)`` float32 input for a :meth:`display` image."""
        x = torch.from_numpy(np.ascontiguousarray(display)).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).reshape(-1, 1, 1)
        return (x - mean) / std

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, Tensor]:
        """``(display image (H, W, 3) uint8, input (3, H, W) float32)`` for an RGB image."""
        shown = self.display(rgb)
        return shown, self.tensor(shown)

    def describe(self) -> str:
        """The steps, in words."""
        h, w = self.size
        if self.resize is not None:
            steps = (
                f"resize shorter side to {self.resize} ({self.interpolation}), centre crop {h}x{w}"
            )
        else:
            steps = f"resize to {h}x{w} ({self.interpolation})"
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return f"{steps}, scale to [0, 1], mean ({mean}), std ({std}) [{self.source}]"

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values."""
        return {
            "size": list(self.size),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "source": self.source,
        }


def _first(v: Any) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def preprocess_from_torchvision(weights: Any) -> Preprocess:
    """The :class:`Preprocess` equal to ``weights.transforms()`` of a torchvision weights enum."""
    t = weights.transforms()
    try:
        crop, resize = _first(t.crop_size), _first(t.resize_size)
        mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
        mode = getattr(t.interpolation, "value", str(t.interpolation))
    except (AttributeError, TypeError, IndexError) as exc:
        raise ModelSpecError(
            f"the transforms of {weights} ({type(t).__name__}) are not a resize, crop and "
            "normalise camkit knows; pass --size, --mean and --std."
        ) from exc
    return Preprocess(
        size=(crop, crop),
        mean=mean,
        std=std,
        resize=resize,
        interpolation=mode if mode in INTERPOLATIONS else "bilinear",
        source=f"{weights}.transforms()",
    )


def preprocess_from_timm(config: Mapping[str, Any], name: str) -> Preprocess:
    """The :class:`Preprocess` of a timm data config (``timm.data.resolve_data_config``)."""
    _, h, w = (int(v) for v in config.get("input_size", (3, *DEFAULT_SIZE)))
    crop_pct = config.get("crop_pct")
    mode = str(config.get("interpolation", "bicubic"))
    resize = None
    if crop_pct and config.get("crop_mode", "center") == "center" and h == w:
        resize = int(h / float(crop_pct))  # timm: floor(size / crop_pct)
    return Preprocess(
        size=(h, w),
        mean=tuple(float(v) for v in config.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in config.get("std", IMAGENET_STD)),
        resize=resize,
        interpolation=mode if mode in INTERPOLATIONS else "bicubic",
        source=f"timm data config of {name}",
    )
