"""SESS: the authors' algorithm in float64 with cv2's resizing and blur, options, base methods."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ResidualNet
from torch import nn

import camkit


def _windows(size: int, window: int, step: int) -> list[int]:
    """The authors' sliding window along one dimension: stop at the first window that reaches
    the border, moved back to end there."""
    out, start = [], 0
    while True:
        if start + window >= size:
            return [*out, size - window]
        out.append(start)
        start += step


def _gradcam(model: nn.Module, layer: nn.Module, patch: torch.Tensor, c: int) -> torch.Tensor:
    """Grad-CAM of one patch, float64, ReLU, upsampled to the patch, min-max normalised."""
    keep: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        keep["a"] = out.detach().clone().requires_grad_(True)
        return keep["a"]

    handle = layer.register_forward_hook(hook)
    try:
        score = model(patch)[0, c]
    finally:
        handle.remove()
    a = keep["a"]
    (g,) = torch.autograd.grad(score, a)
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))[0].detach()
    cam = F.interpolate(cam[None, None], patch.shape[2:], mode="bilinear")[0, 0]
    return (cam - cam.min()) / (cam.max() - cam.min())


def _sess_reference(model, x, c, scales, window, step, pre_filter, theta, smooth):  # type: ignore[no-untyped-def]
    """One sample, float64, following the paper's steps with cv2 for the resizing back and
    the blur, as the authors' code does."""
    m64 = model.double()
    layer = m64.bn
    h, w = x.shape[2:]
    patches = []
    for s in scales:
        rh, rw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        img = F.interpolate(x.double(), (rh, rw), mode="bilinear") if (rh, rw) != (h, w) else x
        for y0 in _windows(rh, window, step):
            for x0 in _windows(rw, window, step):
                patches.append(
                    (img[..., y0 : y0 + window, x0 : x0 + window].double(), rh, rw, y0, x0)
                )
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m64(p[0]), 1)[0, c] for p in patches])
    order = np.argsort(probs.numpy(), kind="stable")
    kept = order[int(len(order) * pre_filter) :]
    fused = []
    for k in kept:
        patch, rh, rw, y0, x0 = patches[k]
        heat = _gradcam(m64, layer, patch, c).numpy() * float(probs[k] / probs.max())
        canvas = np.zeros((rh, rw))
        canvas[y0 : y0 + window, x0 : x0 + window] = heat
        fused.append(cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR))
    maps = np.array(fused)
    count = (maps > theta).sum(axis=0)
    total = np.where(maps > theta, maps, 0).sum(axis=0)
    out = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    if smooth:
        out = cv2.GaussianBlur(out, (11, 11), 5.0, 0)
    model.float()
    return torch.from_numpy(out)


@pytest.mark.parametrize(
    "pre_filter,theta,smooth", [(0.0, 0.0, True), (0.5, 0.1, False), (0.25, 0.0, True)]
)
def test_sess_equals_the_authors_algorithm_in_float64(
    pre_filter: float, theta: float, smooth: bool
) -> None:
    torch.manual_seed(0)
    model = ResidualNet(inplace=False).eval()
    x = torch.randn(2, 3, 8, 8)
    kw = dict(scales=[8, 11, 14], step=3, pre_filter=pre_filter, theta=theta, smooth=smooth)
    res = camkit.explain(
        model.double(), x.double(), method="sess", layer="bn", target=[0, 2],
        normalize=False, batch_size=5, **kw,
    )  # fmt: skip
    model.float()
    for i, c in enumerate([0, 2]):
        ref = _sess_reference(model, x[i : i + 1], c, [8, 11, 14], 8, 3, pre_filter, theta, smooth)
        # cv2 interpolates with float32 coefficients: agreement to about 1e-7 of the maximum
        torch.testing.assert_close(res.raw[i], ref, rtol=1e-6, atol=1e-6 * float(ref.max()))
        corr = torch.corrcoef(torch.stack([res.raw[i].flatten(), ref.flatten()]))[0, 1]
        assert corr > 0.99999


def test_window_positions_and_blur() -> None:
    from camkit_plugins.sess import gaussian_blur, window_starts

    assert window_starts(8, 8, 8) == [0]
    assert window_starts(11, 8, 3) == [0, 3]
    assert window_starts(14, 8, 3) == [0, 3, 6]
    assert window_starts(480, 224, 224) == [0, 224, 256]
    for size in ((64, 64), (7, 12)):
        m = torch.rand(size, dtype=torch.float64)
        ref = cv2.GaussianBlur(m.numpy(), (11, 11), 5.0, 0)
        torch.testing.assert_close(gaussian_blur(m[None])[0], torch.from_numpy(ref))


def test_resizing_matches_torchvision_resize() -> None:
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.randn(1, 3, 8, 10, dtype=torch.float64)
    # the shorter side becomes 11, upscaling: torchvision's Resize(11) is plain bilinear
    ours = F.interpolate(x, (11, int(11 * 10 / 8)), mode="bilinear")
    torch.testing.assert_close(tvf.resize(x, 11, antialias=True), ours)


def test_sess_over_other_bases_and_base_options() -> None:
    torch.manual_seed(0)
    model = ResidualNet(inplace=False).eval()
    x = torch.randn(1, 3, 8, 8)
    kw = dict(layer="bn", target=1, scales=[8, 10], step=2, smooth=False)
    a = camkit.explain(model, x, method="sess", base="gradcampp", **kw)
    b = camkit.explain(
        model, x, method="sess", base=camkit.default_registry().get("gradcam++"), **kw
    )
    assert torch.equal(a.maps, b.maps)
    c = camkit.explain(model, x, method="sess", base="layercam", base_options={"gamma": 3.0}, **kw)
    assert c.maps.shape == (1, 8, 8)
    # one scale equal to the input and one window: the base's own normalised map, weight 1
    one = camkit.explain(model, x, method="sess", base="hirescam", scales=[8], layer="bn",
                         target=1, smooth=False, normalize=False)  # fmt: skip
    plain = camkit.explain(model, x, method="hirescam", layer="bn", target=1)
    torch.testing.assert_close(one.raw[0], plain.maps[0], rtol=1e-5, atol=1e-6)


def test_option_errors() -> None:
    model = ResidualNet(inplace=False).eval()
    x = torch.randn(1, 3, 8, 8)

    def run(**opts: object) -> None:
        camkit.explain(model, x, method="sess", layer="bn", **opts)

    for opts, match in [
        ({"base": "ablationcam"}, "cannot be 'ablationcam'"),
        ({"base": "sess"}, "cannot be 'sess'"),
        ({"base": "gradcamm"}, "option 'base': unknown method 'gradcamm'"),
        ({"base": 3}, "'base' expects a method name"),
        ({"base_options": {"gamma": 2.0}}, r"has \['gamma'\], which 'gradcam' does not take"),
        ({"base": "layercam", "base_options": {"gamma": -1}}, "'gamma'"),
        ({"base_options": [1]}, "'base_options' expects a dict"),
        ({"scales": [8, 0]}, "'scales' expects None or positive ints"),
        ({"window": (8, 8)}, "'window' expects one int or None"),
        ({"step": 0}, "'step' expects None or positive ints"),
        ({"pre_filter": 1.0}, r"'pre_filter' expects the fraction of patches to drop, in \[0, 1\)"),
        ({"theta": float("inf")}, "'theta' expects a finite number"),
        ({"smooth": 1}, "'smooth' expects True or False"),
        ({"score": "x"}, "'score' expects one of"),
        ({"eigen_smooth": True}, "eigen_smooth=True does not apply"),
        ({"scales": [6, 8]}, "below the window"),
    ]:
        with pytest.raises(camkit.OptionError, match=match):
            run(**opts)
    with pytest.raises(camkit.InputError, match="smooth=True blurs"):
        camkit.explain(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(64, 2)),
                       torch.randn(1, 3, 4, 4), method="sess", layer="0")  # fmt: skip


@pytest.mark.parametrize("smooth", [False, True])
def test_sess_matches_grad_cam_1_5_7(smooth: bool) -> None:
    peer = pytest.importorskip("pytorch_grad_cam")
    torch.manual_seed(0)
    model = ResidualNet(inplace=False).eval()
    x = torch.randn(2, 3, 8, 8)
    kw = dict(scales=[8, 11, 14], smooth=smooth)
    ours = camkit.explain(model, x, method="sess", layer="bn", target=[0, 2], step=3, **kw)
    targets = [peer.utils.model_targets.ClassifierOutputTarget(c) for c in (0, 2)]
    sess = peer.SESS(model, [model.bn], window_size=8, step_size=3, **kw)
    theirs = torch.from_numpy(sess(x, targets)).float()
    # float32 both; the peer blurs with OpenCV and divides by max + 1e-7
    torch.testing.assert_close(ours.maps, theirs, rtol=0, atol=3e-5)
    corr = torch.corrcoef(torch.stack([ours.maps.flatten(), theirs.flatten()]))[0, 1]
    assert corr > 0.99999
