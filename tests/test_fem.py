"""FEM (Fuad et al. 2020): L = sum_k mu_k 1[A_k > mu_k + K sigma_k], against the paper."""

from __future__ import annotations

import pytest
import torch
from helpers import capture64, correlation, small_net

import camkit
from camkit.testing import check_method
from camkit.toy import TinyCNN

SIGNED = {"relu": False, "normalize": False, "upsample": None}
TARGETS = [3, 7]


@pytest.fixture(scope="module")
def rn() -> dict:
    """The model, the batch, and float64 activations at block1 and block2."""
    model, x = small_net()
    acts = {layer: capture64(model, layer, x, TARGETS)[0] for layer in ("block1", "block2")}
    return {"model": model, "x": x, **acts}


def _reference(a: torch.Tensor, k: float) -> torch.Tensor:
    """The paper's map for one sample ``a`` (C, H, W), float64, channel by channel."""
    out = torch.zeros(a.shape[1:], dtype=torch.float64)
    for ch in a:
        mu = ch.mean()
        sigma = ((ch - mu) ** 2).mean().sqrt()  # population standard deviation
        out += mu * (ch > mu + k * sigma).double()
    return out


class _Fixed(torch.nn.Module):
    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.layer = torch.nn.Identity()
        self.register_buffer("a", a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.a + 0 * x.sum()).flatten(1)[:, :3]


def test_fem_by_hand() -> None:
    # channel 0: [0, 0, 0, 4], mean 1, std sqrt(3); K = 1: threshold 2.73, only 4 passes;
    # channel 1: [2, 2, 2, 2], std 0: threshold 2, nothing passes (strictly above);
    # channel 2: [1, 3, 1, 3], mean 2, std 1: K = 0.5 gives threshold 2.5, both 3s pass.
    a = torch.tensor(
        [[[[0.0, 0.0], [0.0, 4.0]], [[2.0, 2.0], [2.0, 2.0]], [[1.0, 3.0], [1.0, 3.0]]]]
    )
    x = torch.zeros(1, 1, 2, 2)
    res = camkit.explain(_Fixed(a), x, "fem", layer="layer", target=0, k=1.0, **SIGNED)
    torch.testing.assert_close(res.weights, torch.tensor([[1.0, 2.0, 2.0]]))
    torch.testing.assert_close(res.raw, torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))
    res = camkit.explain(_Fixed(a), x, "fem", layer="layer", target=0, k=0.5, **SIGNED)
    # K = 0.5: channel 0 threshold 1.87 (4 passes, weight 1), channel 2 threshold 2.5 (the 3s
    # pass, weight 2); with K = 1 channel 2's threshold is 3, which 3 does not exceed
    torch.testing.assert_close(res.raw, torch.tensor([[[0.0, 2.0], [0.0, 3.0]]]))


@pytest.mark.parametrize("k", [2.0, 1.0])
@pytest.mark.parametrize("layer", ["block1", "block2"])
def test_fem_matches_float64_reference(layer: str, k: float, rn: dict) -> None:
    model, x, a64 = rn["model"], rn["x"], rn[layer]
    res = camkit.explain(model, x, "fem", layer=layer, target=TARGETS, k=k, **SIGNED)
    for i in range(2):
        ref = _reference(a64[i], k)
        # no activation of a varying channel within 1e-5 of its threshold: float32 and float64
        # binarise alike (a constant channel, all zero after the ReLU, passes nowhere)
        flat = a64[i].flatten(1)
        std = flat.std(1, correction=0, keepdim=True)
        thr = flat.mean(1, keepdim=True) + k * std
        assert float((flat - thr).abs()[std[:, 0] > 0].min()) > 1e-5
        assert float(ref.max() - ref.min()) > 0
        assert correlation(res.raw[i], ref) > 0.9999
        torch.testing.assert_close(res.raw[i].double(), ref, rtol=1e-5, atol=1e-5)


def test_fem_ignores_the_target(rn: dict) -> None:
    model, x = rn["model"], rn["x"]
    a = camkit.explain(model, x, "fem", layer="block1", target=TARGETS, **SIGNED).raw
    b = camkit.explain(model, x, "fem", layer="block1", target=[1, 1], **SIGNED).raw
    assert torch.equal(a, b)
    assert camkit.default_registry().get("fem").class_discriminative is False


@pytest.mark.parametrize("bad", ["2", None, float("nan"), True])
def test_fem_option_k_is_checked(bad: object) -> None:
    with pytest.raises(camkit.OptionError, match="'k'"):
        camkit.explain(TinyCNN(), torch.zeros(1, 3, 8, 8), "fem", k=bad)


def test_fem_passes_conformance_checks() -> None:
    check_method("fem")


def test_fem_peer_aggregates_activations_not_binary_maps(rn: dict) -> None:
    """grad-cam 1.5.7's FEM thresholds alike but sums ``mean(B_k) * A_k``, not the paper's
    ``mu_k * B_k``: its map is that, from the same binary maps."""
    fem = pytest.importorskip("pytorch_grad_cam.fem")
    model, x, a64 = rn["model"], rn["x"], rn["block1"]
    peer = fem.FEM(model, [model.block1], k=2)
    got = peer.get_cam_image(x, model.block1, None, a64.numpy(), None, False)
    for i in range(2):
        flat = a64[i].flatten(1)
        thr = flat.mean(1, keepdim=True) + 2 * flat.std(1, correction=0, keepdim=True)
        frac = (flat > thr).double().mean(1)
        expected = (frac[:, None, None] * a64[i]).sum(0)
        torch.testing.assert_close(torch.as_tensor(got[i]).double(), expected)
        assert correlation(expected, _reference(a64[i], 2.0)) < 0.99
