"""Detectors beyond torchvision: DETR-style and YOLO-style outputs scored by BoxTarget, one box
explained with Grad-CAM and Eigen-CAM, each checked against a float64 reference."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit.detection import BoxTarget, cxcywh_to_xyxy, detections


class TinyYOLO(nn.Module):
    """A YOLO-style detector: a conv backbone, a 1x1 head predicting ``4 + 1 + K`` values per
    cell, decoded to ``(N, h * w, 4 + 1 + K)``: box ``(cx, cy, w, h)`` in input pixels,
    objectness and class probabilities (sigmoids)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(16, 5 + classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        p = self.head(self.backbone(x))  # (N, 5 + K, h, w)
        h, w = p.shape[2:]
        stride = x.shape[-1] / w
        p = p.flatten(2).transpose(1, 2)  # (N, h * w, 5 + K)
        gy, gx = torch.meshgrid(
            torch.arange(h, dtype=p.dtype), torch.arange(w, dtype=p.dtype), indexing="ij"
        )
        cx = (torch.sigmoid(p[..., 0]) + gx.flatten()) * stride
        cy = (torch.sigmoid(p[..., 1]) + gy.flatten()) * stride
        wh = torch.exp(p[..., 2:4].clamp(max=4)) * stride
        rest = torch.sigmoid(p[..., 4:])
        return torch.cat([cx[..., None], cy[..., None], wh, rest], dim=-1)


def _reference(model: nn.Module, x: Tensor, layer: str, target: Any, method: str) -> Tensor:
    """The CAM of ``method`` in float64, from the papers' equations, with ReLU: Grad-CAM
    ``relu(sum_c mean(dS/dA_c) A_c)``; Eigen-CAM the projection of the centred ``(P, C)``
    activations on their first right singular vector, oriented to correlate positively with the
    channel sum."""
    model = copy.deepcopy(model).double()
    kept: dict[str, Tensor] = {}

    def hook(m: nn.Module, args: Any, out: Tensor) -> Tensor:
        kept["a"] = out
        return out

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            xd = x.double().requires_grad_(True)
            out = model(xd)
            a = kept["a"]
            if method == "gradcam":
                score = target.scores(out, torch.arange(x.shape[0]))
                (g,) = torch.autograd.grad(score.sum(), a)
                cam = (g.mean((2, 3), keepdim=True) * a).sum(1)
                return cam.clamp_min(0).detach()
    finally:
        handle.remove()
    maps = []
    for sample in a.detach():
        mat = sample.flatten(1).T  # (P, C)
        centred = mat - mat.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        proj = centred @ vh[0]
        plain = mat.sum(1)
        if float(((proj - proj.mean()) * (plain - plain.mean())).sum()) < 0:
            proj = -proj
        maps.append(proj.reshape(sample.shape[1:]).clamp_min(0))
    return torch.stack(maps)


def _close(got: Tensor, want: Tensor) -> None:
    scale = float(want.abs().max())
    assert scale > 0, "the reference map is all zero: the check would be empty"
    torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-4)


# -- YOLO-style ---------------------------------------------------------------------------------


def test_yolo_style_output_is_parsed() -> None:
    out = TinyYOLO()(torch.randn(2, 3, 32, 32))
    dets = detections(out)
    assert len(dets) == 2 and dets[0].kind == "yolo"
    assert dets[0].boxes.shape == (64, 4) and dets[0].scores.shape == (64, 3)
    torch.testing.assert_close(dets[1].boxes, cxcywh_to_xyxy(out[1, :, :4]))
    torch.testing.assert_close(dets[1].scores, out[1, :, 4:5] * out[1, :, 5:])
    # a list per image reads the same
    listed = detections([out[0], out[1]])
    torch.testing.assert_close(listed[1].scores, dets[1].scores)


def test_yolo_box_by_index_and_by_iou() -> None:
    model = TinyYOLO().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    conf = out[:, 10, 4:5] * out[:, 10, 5:]  # (N, K): box 10's confidences
    by_index = BoxTarget(index=10).scores(out, torch.arange(2))
    torch.testing.assert_close(by_index, conf.max(1).values)
    ref = [cxcywh_to_xyxy(out[n, 10, :4])[None] for n in range(2)]
    by_iou = BoxTarget(ref, labels=[torch.tensor([2]), torch.tensor([0])]).scores(
        out, torch.arange(2)
    )
    torch.testing.assert_close(by_iou, torch.stack([conf[0, 2], conf[1, 0]]))
    both = BoxTarget(index=10, score="class+box").scores(out, torch.arange(2))
    box_sum = cxcywh_to_xyxy(out[:, 10, :4]).sum(1)
    torch.testing.assert_close(both, conf.max(1).values + box_sum)
    # no prediction overlaps the reference enough: 0
    far = BoxTarget(torch.tensor([[100.0, 100, 110, 110]]), torch.tensor([0]))
    assert far.scores(out, torch.arange(2)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_yolo_box_maps_match_the_float64_reference(method: str) -> None:
    model = TinyYOLO().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = BoxTarget(index=27)
    res = camkit.explain(model, x, method=method, layer="backbone", target=target)
    assert res.raw.shape == (2, 8, 8) and res.maps.shape == (2, 32, 32)
    _close(res.raw, _reference(model, x, "backbone", target, method))


def test_the_search_for_one_yolo_box_goes_where_the_box_sees_several_cells() -> None:
    # layer=None: through the 1x1 head, one box's score depends on one cell of the backbone's
    # output (and of the head's), so the search passes over them for the first ReLU, whose 3x3
    # neighbourhood of the box's cell reaches the score
    model = TinyYOLO().eval()
    res = camkit.explain(model, torch.randn(1, 3, 32, 32), target=BoxTarget(index=27))
    assert res.layer == "backbone.1"
    with pytest.raises(camkit.LayerError, match="depends on one of its positions only"):
        _only_one_position(model)


def _only_one_position(model: TinyYOLO) -> None:
    """A model whose only spatial layers reach one box's score at one position."""

    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = model.head

        def forward(self, f: Tensor) -> Tensor:
            return self.head(f).flatten(2).transpose(1, 2)[..., 5:]

    camkit.explain(HeadOnly(), torch.randn(1, 16, 8, 8), target=lambda o: o[:, 27, 0])


# -- DETR-style -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detr() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage4"],
    )
    config = transformers.DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=5,
        num_labels=3,
    )
    model: nn.Module = transformers.DetrForObjectDetection(config).eval()
    return model


DETR_LAYER = "model.backbone.model.encoder.stages.3"


def test_detr_output_is_parsed_and_scored(detr: nn.Module) -> None:
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = detr(x)
    dets = detections(out)
    assert len(dets) == 2 and dets[0].kind == "detr"
    assert dets[0].scores.shape == (5, 3)  # "no object" left out
    torch.testing.assert_close(dets[0].boxes, cxcywh_to_xyxy(out.pred_boxes[0]))
    by_index = BoxTarget(index=1).scores(out, torch.arange(2))
    torch.testing.assert_close(by_index, out.logits[:, 1, :3].max(1).values)
    ref = cxcywh_to_xyxy(out.pred_boxes[:, 3])  # query 3's box in each image, normalised xyxy
    by_iou = BoxTarget([ref[0:1], ref[1:2]], labels=[[2], [1]]).scores(out, torch.arange(2))
    torch.testing.assert_close(by_iou, torch.stack([out.logits[0, 3, 2], out.logits[1, 3, 1]]))


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_detr_box_maps_match_the_float64_reference(detr: nn.Module, method: str) -> None:
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    target = BoxTarget(index=1, labels=None)
    res = camkit.explain(detr, x, method=method, target=target)
    assert res.layer == DETR_LAYER  # the adapter's: the backbone's last stage
    assert res.raw.shape == (2, 4, 4) and res.maps.shape == (2, 128, 128)
    _close(res.raw, _reference(detr, x, DETR_LAYER, target, method))
