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


def test_overlay_output_order_and_colormaps() -> None:
    image = np.zeros((3, 5, 3), np.uint8)
    image[..., 0] = 200  # red
    cam = np.linspace(0, 1, 15, dtype=np.float32).reshape(3, 5)
    rgb = camkit.overlay(image, cam, alpha=0.3)
    assert np.array_equal(camkit.overlay(image, cam, alpha=0.3, out_bgr=True), rgb[..., ::-1])
    assert np.array_equal(camkit.overlay(image, cam, alpha=0.0, out_bgr=True)[0, 0], [0, 0, 200])
    plasma = camkit.overlay(image, cam, alpha=1.0, colormap="plasma")
    top = cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_PLASMA)[0, 0, ::-1]
    assert np.array_equal(plasma[-1, -1], top)
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # (256, 3) RGB table
    table = camkit.overlay(image, cam, alpha=1.0, colormap=grey)
    assert np.array_equal(table[0, 0], [0, 0, 0]) and np.array_equal(table[-1, -1], [255] * 3)
    with pytest.raises(camkit.InputError, match=r"\(256, 3\) uint8"):
        camkit.overlay(image, cam, colormap=grey[:10])


def test_grid_layout_and_labels() -> None:
    from camkit.viz import grid

    cell = np.zeros((10, 12, 3), np.uint8)
    plain = grid([[cell] * 3, [cell] * 3], pad=2)
    assert plain.shape == (2 + 10 + 2 + 10 + 2, 2 + 3 * 12 + 2 * 2 + 2, 3)
    assert plain.dtype == np.uint8
    assert np.array_equal(plain[2:12, 2:14], cell) and (plain[:2] == 255).all()
    labelled = grid(
        [[cell] * 3, [cell] * 2],  # ragged: the missing cell stays blank
        row_labels=["first", "second\nrow"],
        col_labels=["a", "gradcam-elementwise", "c"],
        pad=2,
    )
    h, w = labelled.shape[:2]
    top, left = h - 2 * 10 - 2 * 2, w - 3 * 14  # from the bottom right corner
    assert top > 2 and left > 2
    assert np.array_equal(labelled[top : top + 10, left : left + 12], cell)
    assert (labelled[top + 12 :, left + 28 :] == 255).all()  # the missing cell
    assert not (labelled[:top, left:] == 255).all()  # headers drawn
    assert not (labelled[top:, :left] == 255).all()  # row labels drawn
    big = grid([[cell, np.ones((4, 4), np.float32)]], cell_size=(20, 24), pad=0)
    assert big.shape == (20, 48, 3) and (big[:, 24:] == 255).all()
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 255  # blue, in BGR order
    assert np.array_equal(grid([[bgr]], pad=0, bgr=True)[0, 0], [0, 0, 255])
    with pytest.raises(camkit.InputError, match="row labels"):
        grid([[cell]], row_labels=["a", "b"])
    with pytest.raises(camkit.InputError, match="column labels"):
        grid([[cell]], col_labels=["a", "b"])
    with pytest.raises(camkit.InputError, match="at least one"):
        grid([])


def test_save_image(tmp_path: pytest.TempPathFactory) -> None:
    from pathlib import Path

    from camkit.viz import save_image, to_rgb_uint8

    base = Path(str(tmp_path))
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    png = save_image(base / "a.PNG", rgb)
    back = cv2.imread(str(png))
    assert back is not None and np.array_equal(back[..., ::-1], rgb)  # cv2 reads BGR
    save_image(base / "b.png", rgb[..., ::-1], bgr=True)
    assert np.array_equal(cv2.imread(str(base / "b.png")), back)
    save_image(base / "c.png", torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert np.array_equal(cv2.imread(str(base / "c.png")), back)
    flat = np.full((16, 16, 3), (200, 30, 90), np.uint8)
    save_image(base / "d.jpeg", flat, quality=90)
    jpeg = cv2.imread(str(base / "d.jpeg"))
    assert jpeg is not None and np.abs(jpeg[..., ::-1].astype(int) - flat).max() <= 8
    with pytest.raises(camkit.InputError, match="PNG or JPEG"):
        save_image(base / "e.gif", rgb)
    with pytest.raises(camkit.InputError, match="quality"):
        save_image(base / "e.jpg", rgb, quality=101)
    assert np.array_equal(to_rgb_uint8(np.ones((2, 2))), np.full((2, 2, 3), 255, np.uint8))
