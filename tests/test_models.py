"""Model-agnostic: layouts, output structures, the targets library, 1D/3D, DataParallel."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

import camkit
from camkit.layout import Layout, infer_layout
from camkit.targets import (
    BoxTarget,
    DifferenceTarget,
    ProbabilityTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
    box_iou,
)


@pytest.mark.parametrize(
    "shape,spatial,expected",
    [
        ((2, 2048, 7, 7), (224, 224), Layout("channels_first")),
        ((2, 7, 7, 768), (224, 224), Layout("channels_last")),
        ((2, 197, 768), (224, 224), Layout("tokens", extra=1, grid=(14, 14))),
        ((197, 2, 768), (224, 224), Layout("tokens", extra=1, grid=(14, 14), seq_first=True)),
        ((2, 198, 384), (224, 224), Layout("tokens", extra=2, grid=(14, 14))),  # cls + dist
        ((2, 50, 12), (112, 224), Layout("tokens", extra=0, grid=(5, 10))),
        ((2, 16, 20), (40,), Layout("channels_first")),
        ((2, 16, 4, 4, 4), (8, 8, 8), Layout("channels_first")),
        ((2, 4, 4, 4, 16), (8, 8, 8), Layout("channels_last")),
        ((2, 10), (224, 224), None),
    ],
)
def test_layouts(shape: tuple[int, ...], spatial: tuple[int, ...], expected: Layout | None) -> None:
    assert infer_layout(shape, spatial, 2) == expected


class Tokens(nn.Module):
    """A tiny transformer-like model: patches -> tokens with a class token -> mix -> class score.

    ``blocks`` outputs (N, 1 + 4, C); the class score reads token 0 after ``mix``, which adds
    a fixed combination of the patch tokens to the class token.
    """

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        # three channels: (N, 2, 2, 3) can only be channels last for a 4x4 input, where
        # (N, 2, 2, 2) would read as channels first too
        self.embed = nn.Conv2d(1, 3, 2, stride=2, bias=False)  # (N, 3, 2, 2) for a 4x4 input
        self.blocks = nn.Identity()
        self.fc = nn.Linear(3, 2, bias=False)
        self.channels_last = channels_last
        with torch.no_grad():
            self.embed.weight.copy_(
                torch.tensor([1.0, 2.0, -1.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
            )
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.embed(x)  # (N, 2, 2, 2)
        if self.channels_last:
            h = self.blocks(p.permute(0, 2, 3, 1))  # (N, 2, 2, C)
            pooled = (h * torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)).sum((1, 2))
            return self.fc(pooled)
        tokens = p.flatten(2).transpose(1, 2)  # (N, 4, C)
        cls = torch.zeros(x.shape[0], 1, 3)
        h = self.blocks(torch.cat([cls, tokens], dim=1))  # (N, 5, C)
        mixed = h[:, 0] + (h[:, 1:] * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None]).sum(1)
        return self.fc(mixed)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tokens_and_channels_last_by_hand(channels_last: bool) -> None:
    # y_c = sum_p k_p t_p[c] with k = (1, 2, 3, 4) over the 2x2 patch grid: the gradient of
    # class c at patch p is k_p on channel c, so Grad-CAM's weights are (mean k, 0, 0) =
    # (2.5, 0, 0) for class 0, and HiResCAM's map is k_p * t_p[0]
    model = Tokens(channels_last).eval()
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    res = camkit.explain(
        model, x, layer="blocks", target=0, relu=False, normalize=False, upsample=None
    )
    patches = model.embed(x).detach()[0]  # (3, 2, 2): channel 0 = patch sums
    assert torch.equal(res.weights, torch.tensor([[2.5, 0.0, 0.0]]))
    assert torch.equal(res.raw[0], 2.5 * patches[0])
    hires = camkit.explain(
        model,
        x,
        method="hirescam",
        layer="blocks",
        target=0,
        relu=False,
        normalize=False,
        upsample=None,
    )
    k = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(hires.raw[0], k * patches[0])
    # run_suffix maps the (N, C, h, w) copies back to tokens / channels last
    ablation = camkit.explain(
        model,
        x,
        method="ablationcam",
        layer="blocks",
        target=0,
        relu=False,
        normalize=False,
        upsample=None,
    )
    y = float((k * patches[0]).sum())
    torch.testing.assert_close(ablation.weights, torch.tensor([[y / abs(y), 0.0, 0.0]]))


def test_unresolvable_layout_names_the_shape_and_the_option() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x.flatten(2)).sum((1, 2))[:, None].expand(-1, 2)

    with pytest.raises(camkit.LayerError, match=r"\(1, 3, 7\).*reshape="):
        camkit.explain(Odd(), torch.randn(1, 3, 2, 2), layer="layer", target=0)


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.fc(self.conv(x).mean((2, 3)))
        if self.kind == "tuple":
            return logits, logits.sum()
        if self.kind == "dict":
            return {"logits": logits, "aux": logits * 2}
        if self.kind == "single":
            return {"scores": logits}

        class Out:
            pass

        o = Out()
        o.logits = logits  # type: ignore[attr-defined]
        return o


@pytest.mark.parametrize("kind", ["tuple", "dict", "single", "object"])
def test_structured_outputs_default_to_the_logits(kind: str) -> None:
    torch.manual_seed(0)
    model = Structured(kind).eval()
    plain = Structured("tuple").eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    res = camkit.explain(model, x, layer="conv", target=[0, 2])
    ref = camkit.explain(plain, x, layer="conv", target=[0, 2], output=0)
    torch.testing.assert_close(res.maps, ref.maps)


def test_callables_receive_the_raw_output() -> None:
    torch.manual_seed(0)
    model = Structured("dict").eval()
    x = torch.randn(2, 3, 6, 6)
    seen = {}

    def target(out: Any) -> torch.Tensor:
        seen["type"] = type(out)
        return out["aux"][:, 1]

    res = camkit.explain(model, x, layer="conv", target=target)
    assert seen["type"] is dict
    ref = camkit.explain(model, x, layer="conv", target=1)
    torch.testing.assert_close(res.maps, ref.maps)  # aux = 2 logits: the same normalised map


def test_targets_library_values() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    rows = torch.arange(2)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(ProbabilityTarget([1, 2]).scores(logits, rows), p[[0, 1], [1, 2]])
    torch.testing.assert_close(ProbabilityTarget(0).scores(logits, rows), p[:, 0])
    assert torch.equal(DifferenceTarget(2, 0).scores(logits, rows), torch.tensor([-1.0, 3.0]))
    assert torch.equal(RegressionTarget(1).scores(logits, rows), torch.tensor([2.0, 0.0]))
    emb = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    sim = SimilarityTarget(torch.tensor([0.0, 1.0])).scores(emb, rows)
    torch.testing.assert_close(sim, torch.tensor([0.8, 0.0]))
    seg = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(
        SegmentationTarget(1, mask).scores(seg, rows), torch.tensor([4.0 + 7, 12 + 15])
    )
    assert torch.equal(SegmentationTarget(0).scores({"out": seg}, rows), torch.tensor([6.0, 38.0]))
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
            "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.8]),
        },
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10]]),
            "labels": torch.tensor([2]),
            "scores": torch.tensor([0.7]),
        },
    ]
    target = BoxTarget(torch.tensor([[1.0, 1, 10, 10]]), torch.tensor([1]))
    # sample 0: IoU 81/100 with a label-1 box -> 0.9; sample 1: the only box is label 2 -> 0
    torch.testing.assert_close(target.scores(dets, rows), torch.tensor([0.9, 0.0]))
    torch.testing.assert_close(
        box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])),
        torch.tensor([[1 / 7]]),
    )
    with pytest.raises(camkit.TargetError, match="detection output"):
        target.scores(logits, rows)
    with pytest.raises(camkit.TargetError, match="out of range"):
        SegmentationTarget(5).scores(seg, rows)


def test_probability_target_in_explain_matches_its_gradient() -> None:
    torch.manual_seed(0)
    model = Structured("tuple").eval()
    x = torch.randn(2, 3, 6, 6)
    res = camkit.explain(
        model,
        x,
        layer="conv",
        target=ProbabilityTarget([0, 1]),
        relu=False,
        normalize=False,
        upsample=None,
    )
    p = torch.softmax(model(x)[0], 1)
    torch.testing.assert_close(res.scores, p[[0, 1], [0, 1]].detach())
    with pytest.raises(camkit.TargetError, match=r"\[0, 2\]"):
        camkit.explain(model, x, layer="conv", target=ProbabilityTarget(5))


class Line1D(nn.Module):
    """(N, 1, 4) -> identity layer -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv1d(1, 2, 1, bias=False)
        self.fc = nn.Linear(8, 1, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 2.0, 0.0, 0.0, -4.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer(x).flatten(1))


def test_1d_by_hand() -> None:
    # A = [x, -x] with x = [1, 2, 3, 4]; the gradient is fc's weight: channel means 2 and -1
    # raw = 2 x - 1 (-x) = 3 x; upsampled linearly to the input length it is unchanged
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    res = camkit.explain(Line1D(), x, layer="layer", target=0, normalize=False, relu=False)
    assert torch.equal(res.weights, torch.tensor([[2.0, -1.0]]))
    assert torch.equal(res.raw, torch.tensor([[3.0, 6.0, 9.0, 12.0]]))
    assert torch.equal(res.maps, res.raw)


def test_3d_by_hand() -> None:
    # a 2x2x2 volume through an identity-like 3D layer (2 channels) and a flatten head
    layer = nn.Conv3d(1, 2, 1, bias=False)
    fc = nn.Linear(16, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, 1.0]).reshape(2, 1, 1, 1, 1))
        fc.weight.copy_(torch.cat([torch.full((8,), 0.5), torch.full((8,), -1.0)])[None])
    model = nn.Sequential(layer, nn.Flatten(), fc)
    x = torch.arange(8, dtype=torch.float32).reshape(1, 1, 2, 2, 2)
    with pytest.warns(camkit.BlankMapWarning, match="constant for 1 of 1"):
        res = camkit.explain(model, x, layer="0", target=0, normalize=False, relu=False)
    # weights (0.5, -1); raw = 0.5 * 2x - 1 * x = 0
    assert torch.equal(res.weights, torch.tensor([[0.5, -1.0]]))
    assert torch.equal(res.raw, torch.zeros(1, 2, 2, 2))
    with pytest.warns(camkit.BlankMapWarning, match="constant for 1 of 1"):
        res = camkit.explain(
            model,
            x.expand(1, 1, 2, 2, 2) + 1,
            layer="0",
            target=0,
            upsample="trilinear",
            normalize=False,
            relu=False,
        )
    assert res.maps.shape == (1, 2, 2, 2)


def test_dataparallel_is_unwrapped_with_a_warning() -> None:
    torch.manual_seed(0)
    inner = Structured("tuple").eval()
    x = torch.randn(2, 3, 6, 6)
    ref = camkit.explain(inner, x, layer="conv", target=[0, 1])
    before = snapshot(inner)
    with pytest.warns(camkit.CamkitWarning, match="DataParallel") as warned:
        res = camkit.explain(nn.DataParallel(inner), x, layer="conv", target=[0, 1])
    assert warned[0].filename == __file__  # the warning names the caller's line
    torch.testing.assert_close(res.maps, ref.maps)
    assert_unchanged(before, inner)


def test_segmentation_model_end_to_end() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pred = model(x)["out"].argmax(1)
    target = SegmentationTarget(1, (pred == 1).float())
    res = camkit.explain(model, x, target=target)
    assert res.layer == "backbone.layer4"
    assert res.maps.shape == (1, 64, 64) and bool(torch.isfinite(res.maps).all())


def test_float16_gradients_are_scaled_not_lost() -> None:
    # gradients of 1e-8 underflow in float16 (smallest subnormal ~6e-8); the scaled backward
    # keeps them: the map matches the float32 one
    torch.manual_seed(0)
    model = Structured("tuple").eval()
    with torch.no_grad():
        model.fc.weight.mul_(1e-6)
    x = torch.randn(2, 3, 6, 6)
    ref = camkit.explain(model, x, layer="conv", target=[0, 1])
    half = Structured("tuple").eval()
    half.load_state_dict(model.state_dict())
    half = half.half()
    res = camkit.explain(half, x.half(), layer="conv", target=[0, 1])
    assert float(res.weights.abs().max()) > 0
    corr = torch.corrcoef(torch.stack([res.maps.flatten(), ref.maps.flatten()]))[0, 1]
    assert corr > 0.99


def test_non_finite_activations_are_an_error() -> None:
    class Overflow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x * 1e30).exp().mean((2, 3)))

    torch.manual_seed(0)
    model = Overflow()
    x = torch.rand(1, 3, 4, 4) + 1
    with torch.no_grad():
        model.conv.weight.fill_(1e10)  # 3e40 at the layer: infinite in float32
    for method in ("gradcam", "eigencam", "scorecam"):
        with pytest.raises(camkit.LayerError, match="non-finite activations"):
            camkit.explain(model, x, method=method, layer="conv", target=0)
    with torch.no_grad():
        model.conv.weight.fill_(1.0)  # finite at the layer (3e30), exp overflows after it
    for method in ("gradcam", "eigencam"):
        with pytest.raises(camkit.CamkitError, match=r"non-finite|not finite"):
            camkit.explain(model, x, method=method, layer="conv", target=0)


def test_channels_last_memory_format_and_torch_compile() -> None:
    torch.manual_seed(0)
    model = Structured("tuple").eval()
    x = torch.randn(2, 3, 6, 6)
    ref = camkit.explain(model, x, layer="conv", target=[0, 1])
    cl = camkit.explain(
        model.to(memory_format=torch.channels_last),
        x.to(memory_format=torch.channels_last),
        layer="conv",
        target=[0, 1],
    )
    torch.testing.assert_close(cl.maps, ref.maps)
    compiled = torch.compile(model, backend="eager")
    res = camkit.explain(compiled, x, layer="conv", target=[0, 1])
    torch.testing.assert_close(res.maps, ref.maps)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "scorecam"])
def test_several_targets_per_sample_equal_one_call_per_target(method: str) -> None:
    torch.manual_seed(0)
    model = Structured("tuple").eval()
    x = torch.randn(2, 3, 6, 6)
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    res = camkit.explain(model, x, method=method, layer="conv", target=[[0, 2], [1, 0]])
    if method != "scorecam":
        assert calls["n"] == 1  # one forward, one batched backward
    assert res.maps.shape == (2, 2, 6, 6) and res.raw.shape == (2, 2, 6, 6)
    assert torch.equal(res.targets, torch.tensor([[0, 2], [1, 0]]))
    for k in range(2):
        one = camkit.explain(model, x, method=method, layer="conv", target=res.targets[:, k])
        torch.testing.assert_close(res.maps[:, k], one.maps, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.scores[:, k], one.scores)
    top = camkit.explain(model, x, layer="conv", target=camkit.targets.TopK(3))
    assert torch.equal(top.targets, model(x)[0].topk(3, dim=1).indices)
    with pytest.raises(camkit.TargetError, match=r"\(2, K\)"):
        camkit.explain(model, x, layer="conv", target=[[0, 1], [1, 2], [0, 0]])


def test_maps_go_back_through_a_detector_resize() -> None:
    from camkit.cam import through_resize

    # canvas 4x6 (padded right), the image filled 4x4 of it, the input was 8x8: the map's
    # left 4 columns stretch over the input
    maps = torch.zeros(1, 4, 6)
    maps[0, :, 2] = 1.0  # a bright column inside the image
    maps[0, :, 5] = 5.0  # the padding: cropped away
    out = through_resize(maps, ((4, 6), [(4, 4)]), 0, (8, 8), "nearest")
    expected = torch.zeros(8, 8)
    expected[:, 4:6] = 1.0
    assert torch.equal(out[0], expected)


def test_detection_model_end_to_end() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.detection.fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        box_score_thresh=0.0,
        min_size=64,
        max_size=96,
    ).eval()
    x = torch.rand(1, 3, 80, 100)
    with torch.no_grad():
        det = model(x)[0]
    target = BoxTarget(det["boxes"][:1], det["labels"][:1])
    res = camkit.explain(model, x, layer="backbone.body.layer4", target=target)
    assert res.maps.shape == (1, 80, 100) and bool(torch.isfinite(res.maps).all())
    assert float(res.scores[0]) == pytest.approx(float(det["scores"][0]), rel=1e-4)
