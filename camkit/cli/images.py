"""Reading and writing RGB images with OpenCV (any path, including non-ASCII ones), and the early
check that a file is an image camkit can read.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ..errors import ImageError

__all__ = [
    "check_image",
    "read_image",
    "write_image",
]


def _image_problem(p: Path) -> str | None:
    if not p.exists():
        return "no such file"
    if p.is_dir():
        return "it is a directory; pass image files (a shell glob such as dir/*.jpg)"
    return None


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    Grey images are repeated to three channels, an alpha channel is dropped and 16-bit images
    are scaled to 8 bits (OpenCV's ``IMREAD_COLOR``).

    Raises:
        ImageError: the file does not exist, cannot be read or is not a decodable image.
    """
    p = Path(path)
    problem = _image_problem(p)
    if problem:
        raise ImageError(f"cannot read image {p}: {problem}.")
    try:
        data = np.fromfile(p, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"cannot read image {p}: {exc.strerror or exc}.") from exc
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ImageError(
            f"cannot read image {p}: not an image OpenCV can decode (PNG, JPEG, BMP, TIFF, "
            "WebP, ...), or the file is damaged."
        )
    return np.ascontiguousarray(img[:, :, ::-1])


def check_image(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ImageError` unless ``path`` looks like an image OpenCV can read.

    Only the file's header is read when OpenCV recognises it; otherwise the file is decoded to
    be sure.
    """
    p = Path(path)
    problem = _image_problem(p)
    if problem:
        raise ImageError(f"cannot read image {p}: {problem}.")
    try:
        known = bool(cv2.haveImageReader(str(p)))
    except cv2.error:
        known = False
    if not known:
        read_image(p)


def write_image(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 RGB image; the format follows the file's suffix.

    Raises:
        ImageError: the format is unknown or the file cannot be written.
    """
    p = Path(path)
    img = np.asarray(rgb)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageError(
            f"write_image expects an (H, W, 3) uint8 RGB image; got shape {img.shape} of "
            f"{img.dtype}."
        )
    try:
        ok, buf = cv2.imencode(p.suffix or ".png", np.ascontiguousarray(img[:, :, ::-1]))
    except cv2.error as exc:
        raise ImageError(f"cannot encode image {p}: {str(exc).strip()}") from exc
    if not ok:
        raise ImageError(f"cannot encode image {p} as {p.suffix or '.png'}.")
    try:
        buf.tofile(p)
    except OSError as exc:
        raise ImageError(f"cannot write image {p}: {exc.strerror or exc}.") from exc
