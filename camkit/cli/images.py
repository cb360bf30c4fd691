"""Reading and writing RGB images with OpenCV (any path, including non-ASCII ones), and the early
check that a file is an image camkit can read.

A small file can decode to a huge image (a 102 KiB PNG of one colour to 378 MiB), so an image
larger than a pixel limit (:data:`DEFAULT_MAX_PIXELS` unless raised) is refused: from its header
before anything is decoded for PNG, JPEG, BMP, GIF and WebP (a few KiB read), after decoding for
other formats.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from ..errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "check_image",
    "header_size",
    "path_text",
    "read_image",
    "write_image",
]

#: Images with more pixels are refused unless the limit is raised (``--max-pixels``): 2**26,
#: 8192 x 8192, 192 MiB decoded as RGB.
DEFAULT_MAX_PIXELS = 2**26


def path_text(p: Path) -> str:
    """A path for a one-line message: quoted when it holds control characters (a newline)."""
    text = str(p)
    return text if text.isprintable() else repr(text)


def _image_problem(p: Path) -> str | None:
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "no such file" + (" (a link to a missing file)" if p.is_symlink() else "")
    except OSError as exc:  # a symlink loop, a name too long, a folder without access
        return exc.strerror or str(exc)
    if stat.S_ISDIR(mode):
        return "it is a directory; pass image files (a shell glob such as dir/*.jpg)"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe, a device or a socket); pass image files"
    if not os.access(p, os.R_OK):
        return "permission denied"
    return None


def _check_pixels(p: Path, size: tuple[int, int], max_pixels: int, where: str) -> None:
    h, w = size
    if h < 1 or w < 1:
        raise ImageError(
            f"cannot read image {path_text(p)}: its {where} gives no pixels ({h} x {w})."
        )
    if h * w > max_pixels:
        raise ImageError(
            f"image {path_text(p)} is {h} x {w} = {h * w} pixels ({where}), more than the limit of "
            f"{max_pixels}; raise it with --max-pixels (max_pixels=...) if you trust the file."
        )


def _checked_header(p: Path, max_pixels: int) -> bool:
    """Check the file and the size its header claims; ``True`` when the header gave one."""
    problem = _image_problem(p)
    if problem:
        raise ImageError(f"cannot read image {path_text(p)}: {problem}.")
    try:
        with open(p, "rb") as f:
            size = header_size(f)
    except OSError as exc:
        raise ImageError(f"cannot read image {path_text(p)}: {exc.strerror or exc}.") from exc
    if size is not None:
        _check_pixels(p, size, max_pixels, "from its header")
    return size is not None


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    Grey images are repeated to three channels, an alpha channel is dropped and 16-bit images
    are scaled to 8 bits (OpenCV's ``IMREAD_COLOR``).

    Args:
        path: the file.
        max_pixels: refuse images with more pixels (checked from the header before decoding
            where the format allows).

    Raises:
        ImageError: the file does not exist, is not a regular file, cannot be read, is not a
            decodable image, or has more than ``max_pixels`` pixels.
    """
    p = Path(path)
    _checked_header(p, max_pixels)
    try:
        data = np.fromfile(p, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"cannot read image {path_text(p)}: {exc.strerror or exc}.") from exc
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error as exc:  # OpenCV's own limits (size, memory)
        raise ImageError(
            f"cannot read image {path_text(p)}: OpenCV refused to decode it "
            f"({str(exc).strip().splitlines()[-1]})."
        ) from exc
    if img is None:
        raise ImageError(
            f"cannot read image {path_text(p)}: not an image OpenCV can decode (PNG, JPEG, BMP, "
            "TIFF, WebP, ...), or the file is damaged."
        )
    _check_pixels(p, (int(img.shape[0]), int(img.shape[1])), max_pixels, "decoded")
    return np.ascontiguousarray(img[:, :, ::-1])


def check_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise :class:`ImageError` unless ``path`` looks like an image OpenCV can read, with at
    most ``max_pixels`` pixels.

    Only the file's header is read when OpenCV recognises it and its size can be read from it;
    otherwise the file is decoded to be sure.
    """
    p = Path(path)
    sized = _checked_header(p, max_pixels)
    try:
        known = bool(cv2.haveImageReader(str(p)))
    except cv2.error:
        known = False
    if not (known and sized):
        read_image(p, max_pixels)


# -- image sizes from headers -----------------------------------------------------------------
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_MAX_JPEG_SCAN = 1 << 20  # markers before the frame header (EXIF, ICC profiles) fit in this


def _png(head: bytes) -> tuple[int, int] | None:
    if len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return int(height), int(width)
    return None


def _jpeg(f: BinaryIO) -> tuple[int, int] | None:
    f.seek(2)
    while f.tell() < _MAX_JPEG_SCAN:
        byte = f.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:  # markers without a length
            continue
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            return None
        (length,) = struct.unpack(">H", length_bytes)
        if code in _JPEG_SOF:
            frame = f.read(5)
            if len(frame) < 5:
                return None
            _, height, width = struct.unpack(">BHH", frame)
            return int(height), int(width)
        if length < 2:
            return None
        f.seek(length - 2, 1)
    return None


def _bmp(head: bytes) -> tuple[int, int] | None:
    if len(head) >= 26:
        (size,) = struct.unpack("<I", head[14:18])
        if size == 12:  # OS/2 header: 16-bit sizes
            width, height = struct.unpack("<HH", head[18:22])
        else:
            width, height = struct.unpack("<ii", head[18:26])
        return abs(int(height)), abs(int(width))
    return None


def _gif(head: bytes) -> tuple[int, int] | None:
    if len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return int(height), int(width)
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return height, width
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return int(height) & 0x3FFF, int(width) & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    return None


def header_size(f: BinaryIO) -> tuple[int, int] | None:
    """``(height, width)`` an image file's header claims, or ``None`` for a format whose
    header is not read here (or a header too short to hold the size).

    Args:
        f: the file, opened in binary mode; read from the start.
    """
    f.seek(0)
    head = f.read(32)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg(f)
    if head.startswith(b"BM"):
        return _bmp(head)
    if head.startswith((b"GIF87a", b"GIF89a")):
        return _gif(head)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp(head)
    return None


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
        raise ImageError(f"cannot encode image {path_text(p)}: {str(exc).strip()}") from exc
    if not ok:
        raise ImageError(f"cannot encode image {path_text(p)} as {p.suffix or '.png'}.")
    try:
        buf.tofile(p)
    except OSError as exc:
        raise ImageError(f"cannot write image {path_text(p)}: {exc.strerror or exc}.") from exc
