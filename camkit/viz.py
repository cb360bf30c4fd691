"""Visualisation: heatmap overlays. numpy and cv2 appear only here and in I/O."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from torch import Tensor

from .errors import InputError

__all__ = ["overlay"]

_COLORMAPS = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "hot": cv2.COLORMAP_HOT,
}


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a)


def _image_rgb_uint8(image: Any, bgr: bool) -> np.ndarray:
    img = _to_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))  # (C, H, W) -> (H, W, C)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise InputError(
            f"overlay expects an image (H, W, 3), (H, W) or (3, H, W); got shape {img.shape}."
        )
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        if img.max(initial=0.0) > 1.0 + 1e-6 or img.min(initial=0.0) < -1e-6:
            raise InputError(
                "overlay expects a float image in [0, 1] or a uint8 image; got values in "
                f"[{img.min():.3g}, {img.max():.3g}]. Undo the normalisation first."
            )
        img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if bgr:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def overlay(
    image: Any,
    cam: Any,
    alpha: float = 0.5,
    colormap: str = "jet",
    bgr: bool = False,
) -> np.ndarray:
    """Blend a heatmap of ``cam`` over ``image``.

    Args:
        image: ``(H, W, 3)`` RGB (``bgr=True`` for BGR), ``(H, W)`` or ``(3, H, W)``; uint8 or
            float in [0, 1]; a numpy array or a tensor.
        cam: ``(h, w)`` map in [0, 1]; resized to ``(H, W)`` bilinearly when sizes differ.
        alpha: weight of the heatmap in the blend, in [0, 1].
        colormap: one of ``jet``, ``turbo``, ``viridis``, ``inferno``, ``magma``, ``hot``.
        bgr: the image is BGR (as ``cv2.imread`` gives); the result is RGB either way.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"overlay alpha expects a value in [0, 1]; got {alpha}.")
    if colormap not in _COLORMAPS:
        raise InputError(
            f"overlay colormap expects one of {', '.join(_COLORMAPS)}; got {colormap!r}."
        )
    img = _image_rgb_uint8(image, bgr)
    heat: np.ndarray = _to_numpy(cam).astype(np.float32)
    if heat.ndim != 2:
        raise InputError(
            f"overlay expects one 2D map (h, w); got shape {heat.shape}. Pass res.maps[i]."
        )
    h, w = img.shape[:2]
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    heat8 = np.clip(np.rint(np.nan_to_num(heat) * 255.0), 0, 255).astype(np.uint8)
    colored = cv2.applyColorMap(heat8, _COLORMAPS[colormap])[:, :, ::-1]  # BGR -> RGB
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * colored.astype(np.float32)
    out: np.ndarray = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out
