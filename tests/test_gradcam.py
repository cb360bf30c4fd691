"""Grad-CAM values derived by hand on tiny models with known weights, and a float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import FlattenHead, MaxPoolHead, ResidualNet

import camkit
from camkit.testing import check_method

# two samples, two channels, 2x2 positions; sums below are exact in float32
A = torch.tensor(
    [
        [[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [2.0, -2.0]]],
        [[[0.0, 1.0], [1.0, 0.0]], [[2.0, 2.0], [0.0, 4.0]]],
    ]
)
# linear weights over the flattened (C=2, 2, 2) activation: they vary across space and the
# channels get gradients of mixed sign
W = torch.tensor(
    [
        [1.0, -1.0, 2.0, 0.0, -2.0, -2.0, 0.0, 0.0],  # class 0
        [0.0, 4.0, 0.0, 0.0, 1.0, -1.0, 1.0, 2.0],  # class 1
    ]
)


def test_flatten_head_by_hand() -> None:
    model = FlattenHead(A, W).eval()
    x = torch.zeros(2, 1, 2, 2)
    res = camkit.explain(model, x, layer="layer", target=[0, 1], relu=False, normalize=False)
    # sample 0, class 0: alpha = mean of W[0] per channel = (0.5, -1)
    # raw = 0.5 * A0 - 1 * A1 = [[1.5, 1], [-0.5, 4]]
    # sample 1, class 1: alpha = (1, 0.75); raw = A0 + 0.75 * A1 = [[1.5, 2.5], [1, 3]]
    assert torch.equal(res.weights, torch.tensor([[0.5, -1.0], [1.0, 0.75]]))
    assert torch.equal(res.raw, torch.tensor([[[1.5, 1.0], [-0.5, 4.0]], [[1.5, 2.5], [1.0, 3.0]]]))
    assert torch.equal(res.targets, torch.tensor([0, 1]))
    # scores are the logits: W[c] . vec(A_n)
    assert torch.equal(res.scores, torch.tensor([1.0 - 2.0 + 6.0 + 2.0, 4.0 + 2.0 - 2.0 + 8.0]))


def test_flatten_head_relu_and_normalize() -> None:
    model = FlattenHead(A, W).eval()
    res = camkit.explain(model, torch.zeros(2, 1, 2, 2), layer="layer", target=[0, 1])
    assert torch.equal(res.raw[0], torch.tensor([[1.5, 1.0], [0.0, 4.0]]))  # ReLU
    assert torch.equal(res.maps[0], torch.tensor([[0.375, 0.25], [0.0, 1.0]]))
    assert torch.equal(res.maps[1], torch.tensor([[0.25, 0.75], [0.0, 1.0]]))


def test_maxpool_head_by_hand() -> None:
    # y0 = 3 max(A0) - 2 max(A1): the gradient is 3 at A0's argmax, -2 at A1's, zero elsewhere
    model = MaxPoolHead(A[:1], torch.tensor([[3.0, -2.0], [1.0, 1.0]])).eval()
    res = camkit.explain(
        model, torch.zeros(1, 1, 2, 2), layer="layer", target=0, relu=False, normalize=False
    )
    assert torch.equal(res.weights, torch.tensor([[0.75, -0.5]]))
    assert torch.equal(res.raw, torch.tensor([[[1.25, 1.5], [1.25, 4.0]]]))
    assert float(res.scores[0]) == 3 * 4.0 - 2 * 2.0


def test_default_target_is_argmax() -> None:
    model = FlattenHead(A, W).eval()
    res = camkit.explain(model, torch.zeros(2, 1, 2, 2), layer="layer")
    logits = model(torch.zeros(2, 1, 2, 2))
    assert torch.equal(res.targets, logits.argmax(1))


def _reference_gradcam(
    model: torch.nn.Module, x: torch.Tensor, layer: str, target: list[int]
) -> torch.Tensor:
    """Float64, per-sample, full graph: eq. 1-2 of Selvaraju et al. written out directly."""
    m64 = model.double()
    module = dict(m64.named_modules())[layer]
    maps = []
    for i, c in enumerate(target):
        store: dict[str, torch.Tensor] = {}

        def keep(mod, args, out, store=store):
            out.retain_grad()
            store["a"] = out

        h = module.register_forward_hook(keep)
        try:
            y = m64(x[i : i + 1].double())[0, c]
            y.backward()
        finally:
            h.remove()
        a, g = store["a"][0].detach(), store["a"].grad[0]
        alpha = g.mean(dim=(1, 2))
        maps.append(torch.relu((alpha[:, None, None] * a).sum(0)))
    model.zero_grad(set_to_none=True)
    return torch.stack(maps)


@pytest.mark.parametrize("layer", ["relu", "bn"])
def test_residual_net_matches_float64_reference(layer: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    target = [0, 1, 2]
    width = 6 if layer == "relu" else 8  # (3, 8, 8, 8) at the bare ReLU would fit both layouts
    ref = _reference_gradcam(ResidualNet(False, width=width).eval(), x, layer, target).float()
    # the model modifies the hooked output in place (+= after batch-norm, ReLU(inplace))
    res = camkit.explain(
        ResidualNet(inplace=True, width=width).eval(),
        x,
        layer=layer,
        target=target,
        normalize=False,
        upsample=None,
    )
    torch.testing.assert_close(res.raw, ref, rtol=1e-4, atol=1e-5)


def test_resnet18_matches_float64_reference() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    target = [3, 7]
    for layer in ("layer4", "layer2"):
        res = camkit.explain(model, x, layer=layer, target=target, normalize=False, upsample=None)
        ref = _reference_gradcam(model, x, layer, target).float()
        model.float()
        for i in range(2):
            r, e = res.raw[i].flatten(), ref[i].flatten()
            assert float(e.max()) > 0, "degenerate reference map"
            corr = torch.corrcoef(torch.stack([r, e]))[0, 1]
            assert corr > 0.9999
            torch.testing.assert_close(r, e, rtol=1e-3, atol=1e-4 * float(e.abs().max()))


def test_gradcam_passes_conformance_checks() -> None:
    check_method("gradcam")


def test_gradcam_metadata() -> None:
    m = camkit.default_registry().get("gradcam")
    assert m.name == "gradcam" and "Selvaraju" in m.citation and m.needs_gradients
    assert camkit.default_registry().get("grad-cam") is m
    assert camkit.default_registry().owner("gradcam") == "gradcam"
