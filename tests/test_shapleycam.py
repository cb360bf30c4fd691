"""Shapley-CAM (Cai 2025): w_k = mean over positions of (g - H A / 2), with the ReST target."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import correlation, small_net
from torch import Tensor, nn

import camkit
from camkit.targets import ReSTTarget
from camkit.testing import check_method

SIGNED = {"relu": False, "normalize": False, "upsample": None}
TARGETS = [3, 7]


def _rest(y: Tensor, c: list[int]) -> Tensor:
    """ReST per row, from its definition: y_c - cross-entropy(y, c)."""
    return y[torch.arange(len(c)), c] - nn.functional.cross_entropy(
        y, torch.tensor(c), reduction="none"
    )


def _suffix(model: nn.Module, layer: str) -> nn.Module:
    """The part of :class:`SmallNet` after ``layer``, written out."""
    m = copy.deepcopy(model).double()
    after = {"block1": [m.block2, m.block3], "block2": [m.block3]}[layer]
    return nn.Sequential(*after, m.pool, nn.Flatten(), m.fc)


def _reference(model: nn.Module, x: Tensor, layer: str, rest: bool) -> Tensor:
    """The paper's signed map per sample, float64: g by one backward through the suffix, H A by
    central differences of g along A (not by a double backward), w = mean(g - H A / 2)."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        act = m64.block1(x.double())
        act = m64.block2(act) if layer == "block2" else act
    suffix = _suffix(model, layer)

    def grad_at(v: Tensor) -> Tensor:
        v = v.clone().requires_grad_(True)
        y = suffix(v)
        s = _rest(y, TARGETS) if rest else y[torch.arange(2), TARGETS]
        (g,) = torch.autograd.grad(s.sum(), v)
        return g

    eps = 1e-6
    g = grad_at(act)
    hv = (grad_at(act * (1 + eps)) - grad_at(act * (1 - eps))) / (2 * eps)
    w = (g - 0.5 * hv).flatten(2).mean(2)
    return (w[:, :, None, None] * act).sum(1), hv


@pytest.mark.parametrize("layer", ["block1", "block2"])
def test_shapleycam_matches_float64_reference_with_rest(layer: str) -> None:
    model, x = small_net()
    ref, hv = _reference(model, x, layer, rest=True)
    assert float(hv.abs().max()) > 1e-3  # the ReST utility is curved: H A matters
    res = camkit.explain(model, x, "shapleycam", layer=layer, target=ReSTTarget(TARGETS), **SIGNED)
    grad = camkit.explain(model, x, "gradcam", layer=layer, target=ReSTTarget(TARGETS), **SIGNED)
    for i in range(2):
        assert correlation(res.raw[i], ref[i]) > 0.9999
        torch.testing.assert_close(
            res.raw[i].double(), ref[i], rtol=1e-4, atol=1e-5 * float(ref[i].abs().max())
        )
        assert correlation(grad.raw[i], ref[i]) < 0.9999  # not Grad-CAM


def test_shapleycam_on_logits_of_a_relu_network_is_gradcam() -> None:
    # after the layer, ReLU convolutions, pooling and a linear head: piecewise linear, H = 0
    model, x = small_net()
    res = camkit.explain(model, x, "shapleycam", layer="block1", target=TARGETS, **SIGNED)
    grad = camkit.explain(model, x, "gradcam", layer="block1", target=TARGETS, **SIGNED)
    torch.testing.assert_close(res.raw, grad.raw)
    ref, hv = _reference(model, x, "block1", rest=False)
    assert float(hv.abs().max()) < 1e-6
    for i in range(2):
        assert correlation(res.raw[i], ref[i]) > 0.9999


def test_shapleycam_where_the_gradient_does_not_depend_on_the_layer() -> None:
    # the demo's CNN after its last layer: pooling and a linear head, so the logit's gradient
    # is a constant of the layer (no graph back to it): H A = 0, Shapley-CAM is Grad-CAM
    from camkit.demo import load_demo_model
    from camkit.demo.data import generate

    model = load_demo_model(torch.device("cpu"))
    scenes = generate(2, split="test", seed=0, objects=1)
    x = torch.as_tensor(scenes.images).permute(0, 3, 1, 2)
    res = camkit.explain(model, x, "shapleycam", layer="features", **SIGNED)
    grad = camkit.explain(model, x, "gradcam", layer="features", **SIGNED)
    torch.testing.assert_close(res.raw, grad.raw)


def test_rest_target_by_hand() -> None:
    # logits (0, ln 3): softmax (1/4, 3/4); ReST of class 1 = ln 3 + ln 3/4, class 0 = ln 1/4
    y = torch.tensor([[0.0, float(torch.tensor(3.0).log())]])
    got = ReSTTarget([1]).scores(y, torch.tensor([0]))
    expected = torch.tensor(3.0).log() + torch.tensor(0.75).log()
    torch.testing.assert_close(got, expected.reshape(1))
    got = ReSTTarget(0).scores(y, torch.tensor([0]))
    torch.testing.assert_close(got, torch.tensor(0.25).log().reshape(1))


def test_shapleycam_refuses_several_targets_per_sample() -> None:
    model, x = small_net()
    with pytest.raises(camkit.TargetError, match="once per target"):
        camkit.explain(model, x, "shapleycam", layer="block1", target=camkit.targets.TopK(2))


def test_shapleycam_leaves_the_model_as_it_was() -> None:
    model, x = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    camkit.explain(model, x, "shapleycam", layer="block1", target=ReSTTarget(TARGETS))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shapleycam_passes_conformance_checks() -> None:
    check_method("shapleycam")


def test_shapleycam_matches_the_peer() -> None:
    """grad-cam 1.5.7's ShapleyCAM with its ClassifierOutputReST targets, at a layer of the
    input's resolution (no resizing on either side): the same normalised maps."""
    shapley = pytest.importorskip("pytorch_grad_cam.shapley_cam")
    targets = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    model, x = small_net()
    peer = shapley.ShapleyCAM(model, [model.block1[1]])
    got = torch.as_tensor(peer(x, [targets.ClassifierOutputReST(c) for c in TARGETS]))
    res = camkit.explain(model, x, "shapleycam", layer="block1.1", target=ReSTTarget(TARGETS))
    assert res.maps.shape == got.shape == (2, 16, 16)
    for i in range(2):
        assert correlation(res.maps[i], got[i]) > 0.9999
    torch.testing.assert_close(res.maps, got, rtol=1e-4, atol=1e-4)
