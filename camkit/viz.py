"""Visualisation: heatmap overlays, labelled grids and image files.

numpy and cv2 appear only here and in I/O. Images come in as ``(H, W, 3)`` RGB (or BGR when
said so), ``(H, W)`` grey or ``(3, H, W)``, uint8 or float in [0, 1], numpy arrays or tensors;
they come out as ``(H, W, 3)`` uint8 RGB unless BGR is asked for.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch import Tensor

from .errors import InputError

__all__ = ["COLORMAPS", "grid", "overlay", "save_image", "to_rgb_uint8"]

_COLORMAPS = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "cividis": cv2.COLORMAP_CIVIDIS,
    "hot": cv2.COLORMAP_HOT,
}

#: The colormap names ``overlay`` accepts (a ``(256, 3)`` uint8 RGB table is accepted too).
COLORMAPS = tuple(_COLORMAPS)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_EXTENSIONS = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg"}


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a)


def _image_rgb_uint8(image: Any, bgr: bool, what: str = "overlay") -> np.ndarray:
    img = _to_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))  # (C, H, W) -> (H, W, C)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise InputError(
            f"{what} expects an image (H, W, 3), (H, W) or (3, H, W); got shape {img.shape}."
        )
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype != np.uint8:
        if img.dtype == bool or not np.issubdtype(img.dtype, np.number):
            raise InputError(
                f"{what} expects a uint8 image or a float image in [0, 1]; got dtype {img.dtype}."
            )
        img = img.astype(np.float64)
        if not np.isfinite(img).all():
            raise InputError(f"{what} got an image with NaN or infinite values.")
        if img.max(initial=0.0) > 1.0 + 1e-6 or img.min(initial=0.0) < -1e-6:
            raise InputError(
                f"{what} expects a float image in [0, 1] or a uint8 image; got values in "
                f"[{img.min():.3g}, {img.max():.3g}]. Undo the normalisation first."
            )
        img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if bgr:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def to_rgb_uint8(image: Any, bgr: bool = False) -> np.ndarray:
    """``image`` as ``(H, W, 3)`` uint8 RGB.

    Args:
        image: ``(H, W, 3)``, ``(H, W)`` or ``(3, H, W)``; uint8, or float in [0, 1] (rounded
            to the nearest of 256 levels); a numpy array or a tensor.
        bgr: the image is BGR (as ``cv2.imread`` gives); it is reordered to RGB.

    Returns:
        A new contiguous ``(H, W, 3)`` uint8 array in RGB order.
    """
    out: np.ndarray = _image_rgb_uint8(image, bgr, "to_rgb_uint8").copy()
    return out


def _lookup(colormap: str | Any) -> np.ndarray | int:
    if isinstance(colormap, str):
        if colormap not in _COLORMAPS:
            raise InputError(
                f"overlay colormap expects one of {', '.join(_COLORMAPS)} or a (256, 3) uint8 "
                f"RGB table; got {colormap!r}."
            )
        return _COLORMAPS[colormap]
    table = _to_numpy(colormap)
    if table.shape != (256, 3) or table.dtype != np.uint8:
        raise InputError(
            "overlay colormap expects a name or a (256, 3) uint8 RGB table; got an array of "
            f"shape {table.shape} and dtype {table.dtype}."
        )
    return table


def overlay(
    image: Any,
    cam: Any,
    alpha: float = 0.5,
    colormap: str | Any = "jet",
    bgr: bool = False,
    *,
    out_bgr: bool = False,
) -> np.ndarray:
    """Blend a heatmap of ``cam`` over ``image``.

    Args:
        image: ``(H, W, 3)`` RGB (``bgr=True`` for BGR), ``(H, W)`` or ``(3, H, W)``; uint8 or
            float in [0, 1]; a numpy array or a tensor.
        cam: ``(h, w)`` map in [0, 1] (values outside are clipped); resized to ``(H, W)``
            bilinearly when sizes differ.
        alpha: weight of the heatmap in the blend, in [0, 1].
        colormap: one of ``jet``, ``turbo``, ``viridis``, ``inferno``, ``magma``, ``plasma``,
            ``cividis``, ``hot``, or a ``(256, 3)`` uint8 RGB lookup table (row ``v`` is the
            colour of the value ``v / 255``).
        bgr: the image is BGR (as ``cv2.imread`` gives).
        out_bgr: return BGR (for ``cv2.imwrite`` and friends) instead of RGB.

    Returns:
        ``(H, W, 3)`` uint8, RGB (BGR with ``out_bgr=True``), whatever order the input was in.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"overlay alpha expects a value in [0, 1]; got {alpha}.")
    lut = _lookup(colormap)
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
    # cv2's colormaps give BGR: reversed to RGB; a table is RGB already
    colored = cv2.applyColorMap(heat8, lut)[:, :, ::-1] if isinstance(lut, int) else lut[heat8]
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * colored.astype(np.float32)
    out: np.ndarray = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out[:, :, ::-1]) if out_bgr else out


# -- grids ----------------------------------------------------------------------------------


def _text_width(text: str, scale: float) -> int:
    (w, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    return int(w)


def _line_height(scale: float) -> int:
    (_, h), base = cv2.getTextSize("Ag", _FONT, scale, 1)
    return int(h + base + max(2, round(4 * scale)))


def _wrap(text: str, width: int, scale: float) -> list[str]:
    """Lines of ``text`` no wider than ``width`` pixels where breaks allow: at newlines, spaces
    and after hyphens; a word wider than ``width`` stays whole."""
    lines: list[str] = []
    for para in text.split("\n"):
        words = [w for w in re.split(r"(?<=-)|(?= )", para) if w]
        line = ""
        for word in words:
            trial = line + word
            if line and _text_width(trial.rstrip(), scale) > width:
                lines.append(line.rstrip())
                line = word.lstrip()
            else:
                line = trial
        lines.append(line.rstrip())
    return lines


def _fit(text: str, width: int, scale: float) -> tuple[list[str], float]:
    """Wrap ``text`` to ``width``, shrinking the font (down to 60 %) where a word is wider."""
    lines = _wrap(text, width, scale)
    widest = max((_text_width(line, scale) for line in lines), default=0)
    if widest > width:
        scale = max(scale * 0.6, scale * width / widest)
        lines = _wrap(text, width, scale)
    return lines, scale


def _put_lines(
    canvas: np.ndarray,
    lines: list[str],
    scale: float,
    box: tuple[int, int, int, int],
    color: tuple[int, int, int],
    halign: str,
    valign: str,
) -> None:
    """Draw ``lines`` inside ``box = (x, y, w, h)``, aligned as asked."""
    x, y, w, h = box
    step = _line_height(scale)
    total = step * len(lines)
    top = {"top": y, "center": y + (h - total) // 2, "bottom": y + h - total}[valign]
    for i, line in enumerate(lines):
        (tw, th), _ = cv2.getTextSize(line, _FONT, scale, 1)
        left = {"left": x, "center": x + (w - tw) // 2, "right": x + w - tw}[halign]
        baseline_y = top + i * step + th + max(1, (step - th) // 3)
        cv2.putText(canvas, line, (left, baseline_y), _FONT, scale, color, 1, cv2.LINE_AA)


def grid(
    rows: Sequence[Sequence[Any]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    *,
    cell_size: tuple[int, int] | None = None,
    pad: int = 4,
    font_scale: float = 0.45,
    background: tuple[int, int, int] = (255, 255, 255),
    text_color: tuple[int, int, int] = (0, 0, 0),
    bgr: bool = False,
) -> np.ndarray:
    """Lay images out in a labelled grid.

    Column labels go above the columns (wrapped at spaces and hyphens to the cell width, the
    font shrunk where a word is still wider); row labels go left of the rows (``"\\n"`` breaks
    lines). Rows may be of different lengths: missing cells stay blank.

    Args:
        rows: rows of images, each anything :func:`to_rgb_uint8` takes (RGB unless ``bgr``).
        row_labels: one label per row, or ``None``.
        col_labels: one label per column, or ``None``.
        cell_size: ``(height, width)`` every image is resized to (nearest neighbour when
            enlarging, area averaging when shrinking); default: the largest image's size,
            smaller images centred in their cell.
        pad: pixels between cells, labels and the border.
        font_scale: the labels' OpenCV font scale (``0.45`` is about 10 pixels high).
        background: RGB colour of the canvas.
        text_color: RGB colour of the labels.
        bgr: the images are BGR; the grid is RGB either way.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    images = [[_image_rgb_uint8(im, bgr, "grid") for im in row] for row in rows]
    n_rows = len(images)
    n_cols = max((len(r) for r in images), default=0)
    if n_rows == 0 or n_cols == 0:
        raise InputError("grid expects at least one row holding at least one image; got none.")
    if row_labels is not None and len(row_labels) != n_rows:
        raise InputError(f"grid got {len(row_labels)} row labels for {n_rows} rows.")
    if col_labels is not None and len(col_labels) != n_cols:
        raise InputError(f"grid got {len(col_labels)} column labels for {n_cols} columns.")
    if pad < 0 or font_scale <= 0:
        raise InputError(f"grid expects pad >= 0 and font_scale > 0; got {pad}, {font_scale}.")
    if cell_size is None:
        ch = max(im.shape[0] for r in images for im in r)
        cw = max(im.shape[1] for r in images for im in r)
    else:
        ch, cw = (int(v) for v in cell_size)
        if ch <= 0 or cw <= 0:
            raise InputError(f"grid cell_size expects positive (height, width); got {cell_size}.")

    headers = [_fit(str(t), cw, font_scale) for t in col_labels] if col_labels else []
    header_h = max((_line_height(s) * len(ls) for ls, s in headers), default=0)
    labels = [_wrap(str(t), 3 * cw, font_scale) for t in row_labels] if row_labels else []
    label_w = max((_text_width(line, font_scale) for ls in labels for line in ls), default=0)
    left = pad + (label_w + pad if row_labels else 0)
    top = pad + (header_h + pad if col_labels else 0)
    width = left + n_cols * cw + (n_cols - 1) * pad + pad
    height = top + n_rows * ch + (n_rows - 1) * pad + pad
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = np.asarray(background, np.uint8)

    for i, row in enumerate(images):
        y = top + i * (ch + pad)
        for j, im in enumerate(row):
            x = left + j * (cw + pad)
            if cell_size is not None and im.shape[:2] != (ch, cw):
                enlarge = im.shape[0] < ch or im.shape[1] < cw
                interp = cv2.INTER_NEAREST if enlarge else cv2.INTER_AREA
                im = cv2.resize(im, (cw, ch), interpolation=interp)
            dy, dx = (ch - im.shape[0]) // 2, (cw - im.shape[1]) // 2
            canvas[y + dy : y + dy + im.shape[0], x + dx : x + dx + im.shape[1]] = im
        if labels:
            _put_lines(
                canvas, labels[i], font_scale, (pad, y, label_w, ch), text_color, "left", "center"
            )
    for j, (lines, scale) in enumerate(headers):
        box = (left + j * (cw + pad), pad, cw, header_h)
        _put_lines(canvas, lines, scale, box, text_color, "center", "bottom")
    return canvas


# -- files ----------------------------------------------------------------------------------


def save_image(
    path: str | os.PathLike[str], image: Any, *, bgr: bool = False, quality: int = 95
) -> Path:
    """Write ``image`` to a PNG or JPEG file, chosen by the extension.

    Args:
        path: the file to write: ``.png``, ``.jpg`` or ``.jpeg`` (any case). Its folder must
            exist; an existing file is replaced.
        image: anything :func:`to_rgb_uint8` takes, RGB (``bgr=True`` for BGR).
        bgr: the image is BGR.
        quality: JPEG quality, 0 to 100 (ignored for PNG).

    Returns:
        The path written.
    """
    path = Path(path)
    ext = _EXTENSIONS.get(path.suffix.lower())
    if ext is None:
        raise InputError(
            f"save_image writes PNG or JPEG files (.png, .jpg, .jpeg); got {path.name!r}."
        )
    if not 0 <= quality <= 100:
        raise InputError(f"save_image quality expects 0 to 100; got {quality}.")
    rgb = _image_rgb_uint8(image, bgr, "save_image")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == ".jpg" else []
    ok, data = cv2.imencode(ext, np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 (H, W, 3) image
        raise OSError(f"could not encode an image of shape {rgb.shape} as {ext}.")
    path.write_bytes(data.tobytes())
    return path
