"""Ablation-CAM, Score-CAM, SS-CAM and IS-CAM: hand values, references, exact skipping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FlattenHead, ResidualNet, assert_unchanged, snapshot
from torch import nn

import camkit
from camkit.testing import check_method

A = torch.tensor(
    [[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 2.0]]]]
)  # (1, 3, 2, 2): channel 1 is all zero
W = torch.tensor([[1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0, -1.0, 0.0, 0.0, -2.0]])


def test_ablation_by_hand() -> None:
    # y = W . vec(A) + b = (1 + 4) + 0 + (-2 - 4) + b; with b = 3: y = 2
    # zeroing channel k removes its contribution: y_0 = 2 - 5 = -3, y_1 = 2, y_2 = 2 + 6 = 8
    # w_k = (y - y_k) / |y| = (5/2, 0, -6/2)
    model = FlattenHead(A, W, bias=torch.tensor([3.0])).eval()
    res = camkit.explain(
        model,
        torch.zeros(1, 1, 2, 2),
        method="ablationcam",
        layer="layer",
        target=0,
        relu=False,
        normalize=False,
    )
    assert torch.equal(res.weights, torch.tensor([[2.5, 0.0, -3.0]]))
    assert torch.equal(res.raw[0], 2.5 * A[0, 0] - 3.0 * A[0, 2])
    # a negative score: the paper's y flips every weight, |y| does not
    neg = FlattenHead(A, W, bias=torch.tensor([-3.0])).eval()  # y = -4
    kw = dict(method="ablationcam", layer="layer", target=0, relu=False, normalize=False)
    absolute = camkit.explain(neg, torch.zeros(1, 1, 2, 2), **kw)
    paper = camkit.explain(neg, torch.zeros(1, 1, 2, 2), denominator="paper", **kw)
    assert torch.equal(absolute.weights, torch.tensor([[1.25, 0.0, -1.5]]))
    assert torch.equal(paper.weights, -absolute.weights)


def _ablation_reference(model: nn.Module, x: torch.Tensor, layer: str, target: list[int]):
    """Float64 per-sample, per-channel full forwards with the channel zeroed (eq. 3)."""
    m64 = model.double()
    module = dict(m64.named_modules())[layer]
    weights = []
    for i, c in enumerate(target):
        xi = x[i : i + 1].double()
        keep: dict[str, torch.Tensor] = {}
        h = module.register_forward_hook(
            lambda mod, a, o, keep=keep: keep.__setitem__("a", o.clone())
        )
        with torch.no_grad():
            y = m64(xi)[0, c]
        h.remove()
        a = keep["a"]
        row = []
        for k in range(a.shape[1]):
            ablated = a.clone()
            ablated[:, k] = 0
            h = module.register_forward_hook(lambda mod, args, o, r=ablated: r)
            with torch.no_grad():
                yk = m64(xi)[0, c]
            h.remove()
            row.append((y - yk) / y.abs())
        weights.append(torch.stack(row))
    model.float()
    return torch.stack(weights)


def test_ablation_matches_reference_with_residual_and_fallback() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = ResidualNet().eval()
    before = snapshot(model)
    for layer in ("conv", "bn"):  # the residual `s` crosses both cuts
        res = camkit.explain(model, x, method="ablationcam", layer=layer, target=[0, 2])
        ref = _ablation_reference(model, x, layer, [0, 2]).float()
        torch.testing.assert_close(res.weights, ref, rtol=1e-4, atol=1e-5)
    assert_unchanged(before, model)


def test_ablation_same_through_fallback() -> None:
    class Keeper(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            self.saved = t.mean((1, 2, 3))
            return t

    class SideEffect(ResidualNet):
        def __init__(self) -> None:
            super().__init__()
            self.keep = Keeper()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.keep(x)) + self.keep.saved[:, None]

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = SideEffect().eval()
    with pytest.warns(camkit.CamkitWarning, match="Falling back"):
        res = camkit.explain(model, x, method="ablationcam", layer="bn", target=[0, 2])
    ref = _ablation_reference(model, x, "bn", [0, 2]).float()
    torch.testing.assert_close(res.weights, ref, rtol=1e-4, atol=1e-5)


def _scorecam_reference(model, x, layer, target, probability=False):  # type: ignore[no-untyped-def]
    """Float64, every channel scored (no skipping), per sample."""
    m64 = model.double()
    module = dict(m64.named_modules())[layer]
    out = []
    for i, c in enumerate(target):
        xi = x[i : i + 1].double()
        keep: dict[str, torch.Tensor] = {}
        h = module.register_forward_hook(
            lambda mod, a, o, keep=keep: keep.__setitem__("a", o.clone())
        )
        with torch.no_grad():
            m64(xi)
        h.remove()
        scores = []
        for k in range(keep["a"].shape[1]):
            up = F.interpolate(
                keep["a"][:, k : k + 1], size=x.shape[2:], mode="bilinear", align_corners=False
            )
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
            with torch.no_grad():
                o = m64(xi * mask)
            scores.append(F.softmax(o, 1)[0, c] if probability else o[0, c])
        s = torch.stack(scores)
        out.append(s if probability else torch.softmax(s, 0))
    model.float()
    return torch.stack(out)


@pytest.mark.parametrize("probability", [False, True])
def test_scorecam_matches_reference_and_skipping_is_exact(probability: bool) -> None:
    torch.manual_seed(0)
    model = ResidualNet(width=6).eval()  # (2, 8, 8, 8) at the bare ReLU would fit both layouts
    x = torch.randn(2, 3, 8, 8)
    # a large negative batch-norm bias makes channel 1 of the ReLU output all zero
    with torch.no_grad():
        model.bn.bias[1] = -100.0
    opts = {"weights": "probability"} if probability else {}
    res = camkit.explain(model, x, method="scorecam", layer="relu", target=[0, 2], **opts)
    acts = {}
    h = model.relu.register_forward_hook(lambda m, a, o: acts.__setitem__("a", o.clone()))
    model(x)
    h.remove()
    assert (acts["a"][:, 1] == 0).all() and (acts["a"][:, 0] != 0).any()
    ref = _scorecam_reference(model, x, "relu", [0, 2], probability).float()
    torch.testing.assert_close(res.weights, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "method,dtype,tolerance",
    [
        ("scorecam", torch.float32, 1e-5),
        ("ablationcam", torch.float64, 1e-9),
        # float32: weights are differences of nearly equal scores, summed with mixed signs;
        # with the unablated score taken in the same replay, kernel rounding that depends on
        # the batch size shows at up to about 2e-5 of the map's max (1e-3 without)
        ("ablationcam", torch.float32, 5e-5),
    ],
)
def test_batch_size_does_not_change_maps(method: str, dtype: torch.dtype, tolerance: float) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=5).eval().to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    a = camkit.explain(model, x, method=method, layer="layer4", target=[1, 3], batch_size=512)
    b = camkit.explain(model, x, method=method, layer="layer4", target=[1, 3], batch_size=7)
    scale = float(a.raw.abs().max())
    assert scale > 0
    torch.testing.assert_close(a.raw, b.raw, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("method", ["sscam", "iscam"])
def test_smoothed_and_integrated_maps_do_not_depend_on_the_batch_size(method: str) -> None:
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    a, b = (
        camkit.explain(
            model, x, method=method, layer="conv", target=[0, 2], n_samples=3, batch_size=size
        )
        for size in (512, 3)
    )
    scale = float(a.raw.abs().max())
    assert scale > 0
    torch.testing.assert_close(a.raw, b.raw, rtol=0, atol=1e-5 * scale)


def test_sscam_and_iscam_definitions() -> None:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(1, 3, 8, 8)
    ss = camkit.explain(model, x, method="sscam", layer="head", target=1, n_samples=4, seed=5)
    again = camkit.explain(model, x, method="sscam", layer="head", target=1, n_samples=4, seed=5)
    other = camkit.explain(model, x, method="sscam", layer="head", target=1, n_samples=4, seed=6)
    assert torch.equal(ss.weights, again.weights) and not torch.equal(ss.weights, other.weights)
    # with std=0 every draw is the plain mask: SS-CAM equals Score-CAM
    flat = camkit.explain(model, x, method="sscam", layer="head", target=1, n_samples=3, std=0.0)
    score = camkit.explain(model, x, method="scorecam", layer="head", target=1)
    torch.testing.assert_close(flat.weights, score.weights)
    # IS-CAM: softmax over channels of the mean score over mask scales i/n
    n = 4
    iscam = camkit.explain(model, x, method="iscam", layer="head", target=1, n_samples=n)
    acts = {}
    h = model.head.register_forward_hook(lambda m, a, o: acts.__setitem__("a", o))
    model(x)
    h.remove()
    a = acts["a"][0]
    scores = []
    for k in range(a.shape[0]):
        up = F.interpolate(a[None, k : k + 1], size=(8, 8), mode="bilinear", align_corners=False)
        span = up.max() - up.min()
        mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
        with torch.no_grad():
            s = torch.stack([model(x * (i / n) * mask)[0, 1] for i in range(1, n + 1)]).mean()
        scores.append(s)
    torch.testing.assert_close(
        iscam.weights[0], torch.softmax(torch.stack(scores), 0), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    "method,options",
    [
        ("ablationcam", {}),
        ("scorecam", {}),
        ("sscam", {"n_samples": 2}),
        ("iscam", {"n_samples": 2}),
    ],
)
def test_conformance(method: str, options: dict[str, object]) -> None:
    check_method(method, **options)


def test_option_errors() -> None:
    model = ResidualNet().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(camkit.OptionError, match="'denominator'"):
        camkit.explain(model, x, method="ablationcam", layer="bn", denominator="y")
    with pytest.raises(camkit.OptionError, match="'noise_on'"):
        camkit.explain(model, x, method="sscam", layer="bn", noise_on="both")
    with pytest.raises(camkit.TargetError, match="probability"):
        camkit.explain(
            model,
            x,
            method="scorecam",
            layer="bn",
            weights="probability",
            target=lambda out: out[:, 0],
        )
