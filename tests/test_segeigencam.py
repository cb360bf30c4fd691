"""Seg-Eigen-CAM (Chung & Ying 2025): sign-corrected first principal component of |g| * A."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import capture64, correlation, small_net

import camkit
from camkit.testing import check_method

SIGNED = {"relu": False, "normalize": False, "upsample": None}
TARGETS = [3, 7]


@pytest.fixture(scope="module")
def rn() -> dict:
    """The model, the batch, and float64 (activations, gradients) at block1 and block2."""
    model, x = small_net()
    refs = {layer: capture64(model, layer, x, TARGETS) for layer in ("block1", "block2")}
    return {"model": model, "x": x, **refs}


def _reference(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The paper's map for one sample (C, H, W), float64 numpy: eq. 10 (|g| * A), eq. 11-12
    (centred SVD, projection on the first right singular vector), eq. 13 (sign correction)."""
    x = (np.abs(g.numpy()) * a.numpy()).reshape(a.shape[0], -1).T
    x = x - x.mean(0)
    _, sigma, vt = np.linalg.svd(x, full_matrices=False)
    assert sigma[0] > 1.01 * sigma[1], "first component not well separated"
    proj = x @ vt[0]
    if abs(proj.min()) > abs(proj.max()):
        proj = -proj
    return torch.from_numpy(proj).reshape(a.shape[1:])


@pytest.mark.parametrize("layer", ["block1", "block2"])
def test_segeigencam_matches_float64_reference(layer: str, rn: dict) -> None:
    model, x = rn["model"], rn["x"]
    a64, g64 = rn[layer]
    assert bool((g64 > 0).any()) and bool((g64 < 0).any())  # gradients of both signs
    res = camkit.explain(model, x, "segeigencam", layer=layer, target=TARGETS, **SIGNED)
    torch.testing.assert_close(res.weights.double(), g64.abs(), rtol=1e-4, atol=1e-6)
    for i in range(2):
        ref = _reference(a64[i], g64[i])
        assert correlation(res.raw[i], ref) > 0.9999
        torch.testing.assert_close(
            res.raw[i].double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())
        )
        assert float(ref.max()) >= float(-ref.min())  # the corrected sign


def test_segeigencam_sign_correction_by_hand() -> None:
    # one channel, A = [[1, 1], [1, 5]] with |g| = 1: centred [-1, -1, -1, 3], a rank-one
    # matrix whose projection is +-[-1, -1, -1, 3]; |min| = 1 < |max| = 3 keeps the 3 positive,
    # and negating A (max 1, min -3) flips the projection back to the same map
    a = torch.tensor([[[[1.0, 1.0], [1.0, 5.0]]]])

    class Head(torch.nn.Module):
        def __init__(self, a: torch.Tensor) -> None:
            super().__init__()
            self.layer = torch.nn.Identity()
            self.register_buffer("a", a)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.a + 0 * x.sum()).flatten(1).sum(1, keepdim=True)  # g = 1

    x = torch.zeros(1, 1, 2, 2)
    for sign in (1.0, -1.0):
        res = camkit.explain(Head(sign * a), x, "segeigencam", layer="layer", target=0, **SIGNED)
        torch.testing.assert_close(res.raw, torch.tensor([[[-1.0, -1.0], [-1.0, 3.0]]]))


def test_segeigencam_is_class_discriminative(rn: dict) -> None:
    model, x = rn["model"], rn["x"]
    a = camkit.explain(model, x, "segeigencam", layer="block2", target=TARGETS, **SIGNED).raw
    b = camkit.explain(model, x, "segeigencam", layer="block2", target=[0, 0], **SIGNED).raw
    assert not torch.allclose(a, b)


def test_segeigencam_has_no_options() -> None:
    with pytest.raises(camkit.OptionError, match="center"):
        camkit.explain(*small_net(), "segeigencam", center=False)


def test_segeigencam_passes_conformance_checks() -> None:
    check_method("segeigencam")


@pytest.mark.parametrize("layer", ["block1", "block2"])
def test_segeigencam_matches_the_peer(layer: str, rn: dict) -> None:
    """grad-cam 1.5.7's SegEigenCAM on the same activations and gradients."""
    seg = pytest.importorskip("pytorch_grad_cam.seg_eigen_cam")
    model, x = rn["model"], rn["x"]
    a64, g64 = rn[layer]
    module = dict(model.named_modules())[layer]
    peer = seg.SegEigenCAM(model, [module])
    got = torch.as_tensor(peer.get_cam_image(x, module, None, a64.numpy(), g64.numpy(), False))
    res = camkit.explain(model, x, "segeigencam", layer=layer, target=TARGETS, **SIGNED)
    for i in range(2):
        assert correlation(res.raw[i], got[i]) > 0.9999
        torch.testing.assert_close(
            res.raw[i].double(), got[i].double(), rtol=1e-4, atol=1e-4 * float(got[i].abs().max())
        )
