"""Guided backpropagation and Guided Grad-CAM."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, hook_count, snapshot
from torch import nn

import camkit


class TwoLayer(nn.Module):
    """1x1 conv (2 channels) -> ReLU -> 1x1 conv (1 channel) -> sum over positions."""

    def __init__(self, style: str = "module") -> None:
        super().__init__()
        self.style = style
        self.a = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU(inplace=style == "inplace")
        self.b = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
            self.b.weight.copy_(torch.tensor([2.0, -3.0]).reshape(1, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.style == "functional":
            h = F.relu(h)
        elif self.style == "method":
            h = h.relu()
        else:
            h = self.relu(h)
        return self.b(h).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("style", ["module", "inplace", "functional", "method"])
def test_guided_rule_by_hand(style: str) -> None:
    # x = [1, -2, 0.5]: h0 = x (live where x > 0), h1 = -x (live where x < 0)
    # plain gradient:  dy/dx = 2 [x > 0] + (-3)(-1) [x < 0] = [2, 3, 2]
    # guided: positive part of the incoming gradient only: channel 1 gets -3 -> 0,
    # so dy/dx = 1 * clamp(2, 0) [x > 0] + (-1) * clamp(-3, 0) [x < 0] = [2, 0, 2]
    model = TwoLayer(style).eval()
    x = torch.tensor([1.0, -2.0, 0.5]).reshape(1, 1, 1, 3)
    before = snapshot(model)
    g = camkit.guided_backprop(model, x, target=0)
    assert torch.equal(g, torch.tensor([2.0, 0.0, 2.0]).reshape(1, 1, 1, 3))
    plain = torch.func.grad(lambda t: model(t).sum())(x)
    assert torch.equal(plain, torch.tensor([2.0, 3.0, 2.0]).reshape(1, 1, 1, 3))
    assert_unchanged(before, model)


def test_gelu_model_is_an_error_and_model_restored() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.GELU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    before = snapshot(model)
    with pytest.raises(camkit.ModelError, match="GELU"):
        camkit.guided_backprop(model, torch.randn(1, 1, 2, 2))
    assert_unchanged(before, model)
    assert hook_count(model) == 0


class GuidedReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):  # type: ignore[no-untyped-def]
                ctx.save_for_backward(t)
                return t.clamp_min(0)

            @staticmethod
            def backward(ctx, g):  # type: ignore[no-untyped-def]
                (t,) = ctx.saved_tensors
                return g.clamp_min(0) * (t > 0)

        return Fn.apply(x)


def _swap_relus(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, GuidedReLU())
        else:
            _swap_relus(child)
    return model


def test_resnet18_against_a_float64_reference_per_sample() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    target = [1, 8]
    g = camkit.guided_backprop(model, x, target=target)
    ref_model = _swap_relus(copy.deepcopy(model)).double()
    for i, c in enumerate(target):
        xi = x[i : i + 1].double().requires_grad_(True)
        (ref,) = torch.autograd.grad(ref_model(xi)[0, c], xi)
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(
            g[i : i + 1], ref.float(), rtol=1e-3, atol=1e-4 * float(ref.abs().max())
        )
    assert all(p.grad is None for p in model.parameters())


def test_guided_gradcam_is_the_product() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    # the random network's Grad-CAM of class 2 for the first sample is blank, and said so
    with pytest.warns(camkit.BlankMapWarning, match="'layer3': 1 of 2"):
        gg = camkit.guided_gradcam(model, x, layer="layer3", target=[2, 5])
    with pytest.warns(camkit.BlankMapWarning, match="'layer3': 1 of 2"):
        maps = camkit.explain(model, x, layer="layer3", target=[2, 5]).maps
    guided = camkit.guided_backprop(model, x, target=[2, 5])
    torch.testing.assert_close(gg, guided * maps[:, None])
    assert gg.shape == (2, 3, 64, 64)
    # None explains the predicted class in both halves
    auto = camkit.guided_gradcam(model, x, layer="layer3")
    pred = model(x).argmax(1)
    torch.testing.assert_close(
        auto, camkit.guided_gradcam(model, x, layer="layer3", target=pred.tolist())
    )
