"""differentiable=True: maps that carry the autograd graph to the inputs and the parameters."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn
from torch.func import functional_call

import camkit


class Smooth(nn.Module):
    """conv -> tanh -> conv (``mid``) -> tanh -> 1x1 conv -> tanh -> pool -> linear: smooth
    everywhere, so that finite differences check the analytic gradient of a map."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 3, 3, padding=1)
        self.mix = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.mid(torch.tanh(self.stem(x))))
        return self.fc(torch.tanh(self.mix(a)).mean(dim=(2, 3)))


class WithWeight(nn.Module):
    """``model`` with ``mid.weight`` replaced by a given tensor, for gradcheck over it."""

    def __init__(self, model: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.inner = model
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(self.inner, {"mid.weight": self.weight}, (x,))
        return out


GRADIENT_METHODS = ["gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigengradcam"]


@pytest.mark.parametrize("method", [*GRADIENT_METHODS, "eigencam", "gradcam-elementwise"])
def test_gradcheck_through_inputs_and_parameters(method: str) -> None:
    model = Smooth().double().eval()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight = model.mid.weight.detach().clone()

    def raw(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # res.raw: the map in the model's precision (res.maps is float32, too coarse for
        # finite differences); the steps after it are checked below
        res = camkit.explain(
            WithWeight(model, w), x, method=method, layer="inner.mid", target=1, relu=False,
            differentiable=True,
        )  # fmt: skip
        return res.raw

    inputs = (x.requires_grad_(True), weight.requires_grad_(True))
    # fast mode: finite differences along random directions, against the analytic products
    assert torch.autograd.gradcheck(raw, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_maps_carry_the_graph_of_upsampling_and_normalising() -> None:
    model = Smooth().double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    res = camkit.explain(model, x, layer="mid", target=[0, 1], differentiable=True)
    v = torch.randn(res.maps.shape, dtype=torch.float32)
    (ours,) = torch.autograd.grad((res.maps * v).sum(), x, retain_graph=True)
    # the same steps by hand from res.raw: ReLU is in raw, then upsample (same size here) and
    # per-sample min-max
    flat = res.raw.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    by_hand = ((flat - lo) / (hi - lo)).reshape(res.raw.shape).float()
    (theirs,) = torch.autograd.grad((by_hand * v).sum(), x)
    torch.testing.assert_close(ours, theirs)


def test_default_maps_carry_no_graph_and_the_model_is_left_alone() -> None:
    model = Smooth().eval()
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    before = snapshot(model)
    plain = camkit.explain(model, x, layer="mid", target=[0, 1])
    assert not plain.maps.requires_grad
    res = camkit.explain(model, x, layer="mid", target=[0, 1], differentiable=True)
    assert res.maps.requires_grad
    torch.testing.assert_close(res.maps.detach(), plain.maps)  # the same maps
    assert_unchanged(before, model)  # no .grad written, hooks gone, grad mode restored
    res.maps.sum().backward()
    assert x.grad is not None and model.mid.weight.grad is not None
    assert model.stem.weight.grad is not None  # the graph reaches before the layer


def test_inside_no_grad_with_several_targets_and_full_gradcheck() -> None:
    model = Smooth().double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # the call was asked for a graph: it builds one all the same
        res = camkit.explain(
            model, x, layer="mid", target=camkit.targets.TopK(2), differentiable=True
        )
    assert res.maps.shape == (2, 2, 5, 5) and res.maps.requires_grad
    res.maps[:, 1].sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)

    def raw(x: torch.Tensor) -> torch.Tensor:
        return camkit.explain(
            model, x, layer="mid", target=[0, 1], relu=False, differentiable=True
        ).raw

    # every entry of the Jacobian by finite differences
    x0 = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(raw, (x0,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_a_training_step_reduces_a_cam_loss() -> None:
    torch.manual_seed(0)
    model = Smooth(seed=3).train()
    x = torch.randn(8, 2, 6, 6)
    wanted = torch.zeros(8, 6, 6)
    wanted[:, :3, :3] = 1.0  # the map should light the top-left corner
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def cam_loss() -> torch.Tensor:
        res = camkit.explain(model, x, layer="mid", target=0, differentiable=True)
        return ((res.maps - wanted) ** 2).mean()

    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = cam_loss()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_methods_whose_weights_have_no_graph_refuse() -> None:
    model = Smooth().eval()
    x = torch.randn(1, 2, 5, 5)
    for method in ("scorecam", "ablationcam", "smoothgradcampp", "rise", "occlusion", "random"):
        with pytest.raises(camkit.OptionError, match="differentiable=True"):
            camkit.explain(model, x, method=method, layer="mid", differentiable=True)
    with pytest.raises(camkit.OptionError, match="'differentiable' expects True or False"):
        camkit.explain(model, x, layer="mid", differentiable=1)


def test_inference_mode_refuses_and_the_flag_must_be_a_bool() -> None:
    model = Smooth().eval()
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(camkit.InputError, match="inference_mode"), torch.inference_mode():
        camkit.explain(model, x, layer="mid", differentiable=True)

    class Flagged(camkit.Method):
        name = "flagged"
        differentiable = "yes"  # type: ignore[assignment]

        def weights(self, ctx: camkit.Context) -> torch.Tensor:
            return ctx.activations.new_ones(ctx.activations.shape[:2])

    from camkit.testing import fresh_registry

    with (
        fresh_registry(load_entrypoints=False) as reg,
        pytest.raises(camkit.PluginError, match="differentiable must be a bool"),
    ):
        reg.add(Flagged(), "test")
