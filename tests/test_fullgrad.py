"""FullGrad (Srinivas & Fleuret 2019): psi(grad_x f * x) + sum over biased layers of
psi(grad_z f * b), from one forward and one backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import correlation, small_net
from torch import Tensor, nn

import camkit
from camkit.toy import TinyCNN

TARGETS = [3, 7]


def _psi(v: Tensor) -> Tensor:
    """|v| rescaled to [0, 1] per sample over channels and positions, summed over channels."""
    out = []
    for s in v.abs():
        out.append(((s - s.min()) / (s.max() - s.min())).sum(0))
    return torch.stack(out)


def _reference(model: nn.Module, x: Tensor, targets: list[int]) -> tuple[Tensor, list[str]]:
    """The paper's map in float64 through a full graph: ``retain_grad`` on the output of every
    convolution with a bias and every batch norm, ``backward`` from the summed scores."""
    m64 = copy.deepcopy(model).double()
    outs: dict[str, Tensor] = {}
    handles = []
    for name, mod in m64.named_modules():
        conv = isinstance(mod, nn.Conv2d) and mod.bias is not None
        if conv or isinstance(mod, nn.BatchNorm2d):

            def keep(mod: nn.Module, args: object, out: Tensor, name: str = name) -> Tensor:
                out.retain_grad()
                outs[name] = out
                return out.clone()  # what follows may work in place

            handles.append(mod.register_forward_hook(keep))
    x64 = x.double().requires_grad_(True)
    y = m64(x64)
    for h in handles:
        h.remove()
    y[torch.arange(len(targets)), targets].sum().backward()
    assert x64.grad is not None
    total = _psi(x64.grad * x64)
    for name, out in outs.items():
        mod = m64.get_submodule(name)
        if isinstance(mod, nn.BatchNorm2d):
            b = mod.bias - mod.weight * mod.running_mean / (mod.running_var + mod.eps).sqrt()
        else:
            b = mod.bias
        assert out.grad is not None
        term = _psi(out.grad * b.detach()[None, :, None, None])
        total = (
            total
            + F.interpolate(term[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[
                :, 0
            ]
        )
    return total.detach(), list(outs)


def _resnet() -> tuple[nn.Module, Tensor]:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=10).eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return model, torch.randn(2, 3, 48, 48)  # layer4: 2 x 2 positions


@pytest.mark.parametrize("net", ["small", "resnet18"])
def test_fullgrad_matches_float64_reference(net: str) -> None:
    model, x = small_net() if net == "small" else _resnet()
    ref, names = _reference(model, x, TARGETS)
    res = camkit.explain(model, x, "fullgrad", target=TARGETS, normalize=False)
    assert res.layer == ["", *names]  # the input, then every biased layer, in the order run
    for i in range(2):
        assert correlation(res.maps[i], ref[i]) > 0.9999
        torch.testing.assert_close(res.maps[i].double(), ref[i], rtol=1e-4, atol=1e-4)
    # the input's weights: the gradient times the input
    assert res.weights[""].shape == x.shape


def test_fullgrad_on_given_layers() -> None:
    model, x = small_net()
    res = camkit.explain(model, x, "fullgrad", layer=["block2.0"], normalize=False)
    assert res.layer == ["", "block2.0"]
    with pytest.raises(camkit.LayerError, match="has none"):
        camkit.explain(model, x, "fullgrad", layer=["block2.1"])  # a ReLU: no bias


def test_fullgrad_refuses_models_without_biases() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = torch.randn(1, 3, 6, 6)
    model(x)
    with pytest.raises(camkit.LayerError, match="none with a bias"):
        camkit.explain(model, x, "fullgrad")


def test_fullgrad_refuses_several_targets_per_sample() -> None:
    model, x = small_net()
    with pytest.raises(camkit.TargetError, match="once per target"):
        camkit.explain(model, x, "fullgrad", target=camkit.targets.TopK(2))


def test_fullgrad_leaves_the_model_and_input_as_they_were() -> None:
    model, x = small_net()
    before = x.clone()
    camkit.explain(model, x, "fullgrad")
    assert not x.requires_grad and torch.equal(x, before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fullgrad_conformance(dims: int) -> None:
    """What ``check_method`` checks, for a method whose result is always several layers (the
    input and the biased layers): maps in [0, 1] of the input's size, finite weights per layer,
    each sample's map the same alone as in the batch, the same maps twice."""
    model = TinyCNN(dims=dims, seed=dims).eval()
    x = torch.randn((3, 3, *{1: (32,), 2: (12, 16), 3: (6, 8, 8)}[dims]))
    res = camkit.explain(model, x, "fullgrad", target=[0, 1, 2])
    assert res.layer == ["", "features.0", "features.2"]
    assert res.maps.shape == x.shape[:1] + x.shape[2:] and res.maps.dtype == torch.float32
    assert float(res.maps.min()) == 0.0 and float(res.maps.max()) == 1.0
    assert all(bool(torch.isfinite(w).all()) for w in res.weights.values())
    for i in range(3):
        alone = camkit.explain(model, x[i : i + 1], "fullgrad", target=[i]).maps
        torch.testing.assert_close(alone[0], res.maps[i], rtol=1e-4, atol=1e-5)
    again = camkit.explain(model, x, "fullgrad", target=[0, 1, 2]).maps
    assert torch.equal(again, res.maps)
