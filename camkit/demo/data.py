"""Generated scenes for the demo: shapes at random positions over texture and clutter.

Each scene is an RGB image, float32 in [0, 1], ``(size, size, 3)``. The background is a random
colour with stripes of random orientation, frequency and colour plus Gaussian noise; on it lie
small clutter items (dots, short lines, small rectangles) that belong to no class; on top, one
object (single-object scenes: training, accuracy, pointing game) or two objects of different
classes (two-object scenes: class discrimination). An object is one of :data:`CLASSES`, filled,
of random size, colour and rotation; its mask holds exactly the pixels it covers.

Every scene is drawn from its own random stream, keyed by ``(split, seed, objects, index)``:
scene ``i`` is the same whatever ``n`` is, and the splits never share a stream, so the held-out
scenes (``split="test"`` and ``"val"``) are not the training scenes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["CLASSES", "SPLITS", "Scenes", "generate"]

#: The classes, in the order of the model's outputs.
CLASSES = ("circle", "square", "triangle", "cross")

#: Data splits, each its own family of random streams.
SPLITS = {"train": 0, "val": 1, "test": 2}

_SIZES = {1: (15, 24), 2: (13, 19)}  # object extent in pixels (at size 64), by objects per scene
_GAP = 4  # pixels between the bounding circles of the two objects of a scene
_STRIPES = 0.12  # largest stripe amplitude per channel
_NOISE = (0.02, 0.05)  # range of the noise's standard deviation
_CONTRAST = 0.9  # smallest L1 distance of an object's colour from the background under it


@dataclass(frozen=True)
class Scenes:
    """A batch of generated scenes.

    Attributes:
        images: ``(N, H, W, 3)`` float32 RGB in [0, 1].
        labels: ``(N, K)`` int64, the class index of each of the ``K`` objects of a scene.
        masks: ``(N, K, H, W)`` bool, the pixels of each object.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensor(self) -> Tensor:
        """The images as a float32 batch ``(N, 3, H, W)``, as the model takes them."""
        return torch.from_numpy(np.ascontiguousarray(self.images.transpose(0, 3, 1, 2)))


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    base = rng.uniform(0.25, 0.75, 3)
    theta = rng.uniform(0.0, math.pi)
    freq = rng.uniform(0.25, 1.0) * 64 / size  # radians per pixel
    wave = np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 7))
    stripes = rng.uniform(-_STRIPES, _STRIPES, 3)
    img = base + wave[..., None] * stripes
    img = img + rng.normal(0.0, rng.uniform(*_NOISE), (size, size, 3))
    return img.astype(np.float32)


def _clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    size = img.shape[0]
    s = size / 64
    for _ in range(int(rng.integers(5, 12))):
        color = tuple(float(c) for c in rng.uniform(0.0, 1.0, 3))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        kind = int(rng.integers(3))
        if kind == 0:  # a dot
            cv2.circle(img, (x, y), max(1, round(rng.uniform(1, 2.5) * s)), color, -1)
        elif kind == 1:  # a short line
            angle = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(5, 11) * s
            end = (round(x + length * math.cos(angle)), round(y + length * math.sin(angle)))
            cv2.line(img, (x, y), end, color, 1)
        else:  # a small rectangle
            w, h = (max(1, round(v * s)) for v in rng.uniform(2, 4.5, 2))
            cv2.rectangle(img, (x, y), (x + w, y + h), color, -1)


def _rotated(points: np.ndarray, angle: float, center: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = points @ np.array([[c, s], [-s, c]])
    out: np.ndarray = np.rint(rot + np.asarray(center)).astype(np.int32)
    return out


def _shape_mask(
    cls: int, center: tuple[float, float], extent: float, angle: float, size: int
) -> np.ndarray:
    """The pixels of one object: ``(size, size)`` bool."""
    mask = np.zeros((size, size), np.uint8)
    r = extent / 2
    name = CLASSES[cls]
    if name == "circle":
        cv2.circle(mask, (round(center[0]), round(center[1])), round(r), 1, -1)
        return mask.astype(bool)
    if name == "square":
        h = r / math.sqrt(2) * 1.15  # a square of about the same extent as the circle
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif name == "triangle":
        angles = [math.radians(a) for a in (-90, 30, 150)]
        pts = np.array([[r * math.cos(a), r * math.sin(a)] for a in angles])
    else:  # cross: a plus sign of two bars a third of its extent thick
        t = r / 3
        pts = np.array(
            [
                [-t, -r],
                [t, -r],
                [t, -t],
                [r, -t],
                [r, t],
                [t, t],
                [t, r],
                [-t, r],
                [-t, t],
                [-r, t],
                [-r, -t],
                [-t, -t],
            ]
        )
    cv2.fillPoly(mask, [_rotated(pts, angle, center)], 1)
    return mask.astype(bool)


def _object_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background under the object."""
    ref = under.mean(axis=0)
    best, best_d = rng.uniform(0, 1, 3), -1.0
    for _ in range(20):
        c = rng.uniform(0.0, 1.0, 3)
        d = float(np.abs(c - ref).sum())
        if d >= _CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _scene(
    rng: np.random.Generator, objects: int, size: int
) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    img = _background(rng, size)
    _clutter(rng, img)
    classes = [int(c) for c in rng.choice(len(CLASSES), objects, replace=False)]
    lo, hi = _SIZES[objects]
    extents = [rng.uniform(lo, hi) * size / 64 for _ in classes]
    centers: list[tuple[float, float]] = []
    for extent in extents:
        r = extent / 2
        for _ in range(200):
            c = (float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1)))
            if all(
                math.dist(c, o) >= r + e / 2 + _GAP for o, e in zip(centers, extents, strict=False)
            ):
                break
        centers.append(c)
    masks = []
    for cls, center, extent in zip(classes, centers, extents, strict=True):
        mask = _shape_mask(cls, center, extent, float(rng.uniform(0, 2 * math.pi)), size)
        color = _object_color(rng, img[mask])
        shade = rng.normal(0.0, 0.03, (int(mask.sum()), 3))
        img[mask] = color + shade
        masks.append(mask)
    np.clip(img, 0.0, 1.0, out=img)
    return img, classes, masks


def generate(
    n: int, split: str = "train", seed: int = 0, objects: int = 1, size: int = 64, start: int = 0
) -> Scenes:
    """``n`` scenes of one split.

    Args:
        n: how many scenes.
        split: ``"train"``, ``"val"`` or ``"test"``; each split has its own random streams.
        seed: selects another family of scenes within the split.
        objects: objects per scene: 1, or 2 (of two different classes).
        size: image height and width in pixels (object sizes scale with it).
        start: index of the first scene (scenes ``start`` to ``start + n - 1``).

    Returns:
        :class:`Scenes`; scene ``i`` depends only on ``(split, seed, objects, size, i)``.
    """
    if split not in SPLITS:
        raise InputError(f"split expects one of {', '.join(SPLITS)}; got {split!r}.")
    if objects not in _SIZES:
        raise InputError(f"objects expects 1 or 2 objects per scene; got {objects!r}.")
    if n < 0 or size < 32:
        raise InputError(f"expected n >= 0 and size >= 32; got n={n}, size={size}.")
    images = np.empty((n, size, size, 3), np.float32)
    labels = np.empty((n, objects), np.int64)
    masks = np.empty((n, objects, size, size), bool)
    for i in range(n):
        rng = np.random.default_rng([SPLITS[split], seed, objects, size, start + i])
        img, classes, object_masks = _scene(rng, objects, size)
        images[i], labels[i], masks[i] = img, classes, np.stack(object_masks)
    return Scenes(images=images, labels=labels, masks=masks)
