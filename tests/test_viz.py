"""overlay: colours, blending, image layouts and value ranges."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import camkit


def _jet(v: int) -> np.ndarray:
    return cv2.applyColorMap(np.full((1, 1), v, np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]


def test_alpha_extremes_and_blend() -> None:
    image = np.full((4, 6, 3), 100, np.uint8)
    cam = np.zeros((4, 6), np.float32)
    cam[0, 0] = 1.0
    assert np.array_equal(camkit.overlay(image, cam, alpha=0.0), image)
    full = camkit.overlay(image, cam, alpha=1.0)
    assert np.array_equal(full[0, 0], _jet(255)) and np.array_equal(full[1, 1], _jet(0))
    half = camkit.overlay(image, cam, alpha=0.5)
    expected = np.rint(0.5 * 100 + 0.5 * _jet(255).astype(np.float32)).astype(np.uint8)
    assert np.array_equal(half[0, 0], expected)
    assert half.dtype == np.uint8 and half.shape == (4, 6, 3)


def test_layouts_float_bgr_and_resize() -> None:
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[..., 0] = 1.0  # pure red, as float in [0, 1]
    cam = torch.zeros(2, 2)
    out = camkit.overlay(rgb, cam, alpha=0.0)
    assert np.array_equal(out[0, 0], [255, 0, 0])
    bgr = camkit.overlay(rgb[..., ::-1].copy(), cam, alpha=0.0, bgr=True)
    assert np.array_equal(bgr, out)
    chw = camkit.overlay(torch.from_numpy(rgb).permute(2, 0, 1), cam, alpha=0.0)
    assert np.array_equal(chw, out)
    grey = camkit.overlay(np.full((4, 4), 255, np.uint8), cam, alpha=0.0)
    assert np.array_equal(grey[2, 2], [255, 255, 255])
    # a 2x2 map resized to 4x4 bilinearly
    big = camkit.overlay(
        np.zeros((4, 4, 3), np.uint8), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), alpha=1.0
    )
    assert np.array_equal(big[0, 0], _jet(0)) and np.array_equal(big[0, 3], _jet(255))


def test_overlay_errors() -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(camkit.InputError, match=r"float image in \[0, 1\]"):
        camkit.overlay(img.astype(np.float32) + 2.0, np.zeros((4, 4)))
    with pytest.raises(camkit.InputError, match="one 2D map"):
        camkit.overlay(img, np.zeros((1, 4, 4)))
    with pytest.raises(camkit.InputError, match="alpha"):
        camkit.overlay(img, np.zeros((4, 4)), alpha=2)
    with pytest.raises(camkit.InputError, match="colormap"):
        camkit.overlay(img, np.zeros((4, 4)), colormap="rainbow")
    with pytest.raises(camkit.InputError, match=r"\(H, W, 3\)"):
        camkit.overlay(np.zeros((4, 4, 5)), np.zeros((4, 4)))
