"""The search for ``layer=None``: only layers the target score depends on, never pooled outputs
read as tokens, and an error that says why when no layer qualifies."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit.layers import probe_dependence


class ClassTokenViT(nn.Module):
    """patches -> tokens with a class token -> one attention block -> final norm -> head(cls).

    The final norm acts on each token alone, so its patch tokens do not reach the class score;
    the block's ``norm1`` output reaches it through the attention's keys and values.
    """

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(t)[:, 0])


def test_the_final_norm_feeding_only_the_class_token_is_passed_over() -> None:
    model = ClassTokenViT().eval()
    x = torch.randn(2, 3, 16, 16)
    res = camkit.explain(model, x)
    assert res.layer == "norm1"  # not "norm" (zero gradient at every patch), not "attn" (tuple)
    assert res.raw.shape == (2, 4, 4)
    assert bool(res.maps.flatten(1).std(1).gt(0).all())
    # the reason, measured: the score's gradient at the final norm's patch tokens is zero
    records = {
        r.name: r
        for r in probe_dependence(
            model, lambda: model(x), lambda out: out.max(1).values, (16, 16), 2
        )
    }
    assert records["norm"].reached == 0 and records["norm1"].reached == 16
    assert records["embed"].reached == 16
    # at the final norm Grad-CAM is all zero, as the search foresaw
    with pytest.warns(camkit.BlankMapWarning, match="gradient at the layer is exactly zero"):
        blank = camkit.explain(model, x, layer="norm")
    assert not bool(blank.maps.any())


class PooledTokens(nn.Module):
    """Swin-like: tokens (N, T, C) -> norm -> mean pool over tokens as (N, C, 1) -> head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.pooler = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))  # (N, 16, C)
        return self.head(self.pooler(t.transpose(1, 2)).flatten(1))  # pooler: (N, C, 1)


def test_a_pooled_output_is_never_read_as_tokens() -> None:
    model = PooledTokens().eval()
    x = torch.randn(2, 3, 16, 16)  # 16 = 4 x 4 tokens, and C = 16 would also make a 4 x 4 grid
    infos = {i.name: i for i in camkit.layers(model, x)}
    assert infos["pooler"].shape == (2, 16, 1) and not infos["pooler"].candidate
    res = camkit.explain(model, x)
    assert res.layer == "norm" and res.raw.shape == (2, 4, 4)


class TwoHeads(nn.Module):
    """A detector-like model: a trunk, a box head and a class head, both spatial.

    The output is ``(boxes, classes)``; the box head finishes last.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.cls_head = nn.Conv2d(8, 3, 3, padding=1)
        self.box_head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.trunk(x)
        classes = self.cls_head(f).flatten(2).amax(2)  # (N, 3)
        boxes = self.box_head(f).flatten(2).mean(2)  # (N, 4)
        return boxes, classes


def test_the_head_the_target_does_not_read_is_passed_over() -> None:
    model = TwoHeads().eval()
    x = torch.randn(2, 3, 16, 16)
    # a class target on the classes: the box head, last to finish, does not reach it
    res = camkit.explain(model, x, target=lambda out: out[1][:, 0], method="gradcam")
    assert res.layer == "trunk"
    # a box coordinate: the box head (8 x 8 positions) reaches it, and finished last
    res = camkit.explain(model, x, target=lambda out: out[0][:, 2])
    assert res.layer == "box_head"
    # the predicted class through the output option: the class head's max reaches one of its
    # positions only (the argmax), so the trunk is chosen
    res = camkit.explain(model, x, output=1)
    assert res.layer == "trunk"


def test_the_search_is_remembered_per_target_kind() -> None:
    model = TwoHeads().eval()
    ex = camkit.Explainer(model)
    x = torch.randn(2, 3, 16, 16)
    a = ex(x, target=lambda out: out[0][:, 1])
    b = ex(x, target=lambda out: out[1][:, 1])
    assert (a.layer, b.layer) == ("box_head", "trunk")


class Dead(nn.Module):
    """A spatial layer whose output the score never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.conv(x)
        return self.fc(x.mean((2, 3)))


def test_no_layer_found_says_why() -> None:
    with pytest.raises(camkit.LayerError) as info:
        camkit.explain(Dead(), torch.randn(2, 3, 8, 8))
    msg = str(info.value)
    assert (
        "'conv' (2, 4, 8, 8): the target score does not depend on it (zero gradient at every" in msg
    )
    assert "layer=" in msg


def test_the_search_leaves_no_gradient_on_parameters_and_restores_grad_mode() -> None:
    model = ClassTokenViT().eval()
    with torch.no_grad():
        res = camkit.explain(model, torch.randn(2, 3, 16, 16))
    assert res.layer == "norm1"
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_frozen_models_and_in_place_ops_are_searched_too() -> None:
    # no parameter requires grad and a ReLU works in place on the chosen layer's output
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    model.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    assert camkit.explain(model, x).layer == "2"
    records = {
        r.name: r for r in probe_dependence(model, lambda: model(x), lambda o: o[:, 0], (8, 8), 2)
    }
    # the batch norm's output reaches the score where the in-place ReLU after it lets it
    # through: the gradient is the one to its value before the ReLU changed it in place
    with torch.no_grad():
        passed = (model[1](model[0](x)) > 0).any(1).flatten(1).sum(1).max()
    assert 0 < int(passed) < 64
    assert records["1"].reached == records["0"].reached == int(passed)
