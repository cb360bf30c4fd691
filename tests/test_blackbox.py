"""RISE and Occlusion: float64 references of the papers' equations, captum, options."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from helpers import ResidualNet, assert_unchanged, snapshot
from torch import nn

import camkit
from camkit.testing import check_method

PLAIN = dict(relu=False, normalize=False)


def _rise_reference(
    model: nn.Module, x: torch.Tensor, target: list[int], n_masks: int, cells: int, p: float
) -> torch.Tensor:
    """Eq. 6 in float64, one mask at a time, masks built as section 3.2 says.

    The draws follow the plugin's documented order from the call's seed (0): the binary grids,
    then one crop offset per spatial dimension."""
    g = torch.Generator().manual_seed(0)
    h, w = x.shape[2:]
    grids = torch.rand((n_masks, cells, cells), generator=g) < p
    dy = torch.randint(math.ceil(h / cells), (n_masks,), generator=g)
    dx = torch.randint(math.ceil(w / cells), (n_masks,), generator=g)
    up = ((cells + 1) * math.ceil(h / cells), (cells + 1) * math.ceil(w / cells))
    m64 = model.double()
    out = torch.zeros(x.shape[0], h, w, dtype=torch.float64)
    with torch.no_grad():
        for i in range(n_masks):
            big = F.interpolate(grids[i][None, None].double(), size=up, mode="bilinear")[0, 0]
            mask = big[dy[i] : dy[i] + h, dx[i] : dx[i] + w]
            prob = torch.softmax(m64(x.double() * mask), dim=1)
            for n, c in enumerate(target):
                out[n] += prob[n, c] * mask
    model.float()
    return out / (n_masks * p)


def test_rise_equals_the_float64_reference() -> None:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    ref = _rise_reference(model, x, [0, 2], n_masks=24, cells=3, p=0.4)
    res = camkit.explain(
        model.double(), x.double(), method="rise", layer="bn", target=[0, 2], n_masks=24,
        cells=3, p=0.4, batch_size=10, **PLAIN,
    )  # fmt: skip
    model.float()
    torch.testing.assert_close(res.raw, ref, rtol=1e-10, atol=1e-12)
    assert res.raw.shape == (2, 8, 8)
    assert torch.equal(res.weights, torch.zeros(2, 8, dtype=torch.float64))
    assert_unchanged(before, model)
    # float32 too: within float32 rounding of the reference
    res32 = camkit.explain(
        model, x, method="rise", layer="bn", target=[0, 2], n_masks=24, cells=3, p=0.4, **PLAIN
    )
    torch.testing.assert_close(res32.raw.double(), ref, rtol=1e-5, atol=1e-6)


def test_rise_masks_have_mean_p_and_soft_edges() -> None:
    from camkit_plugins.rise import rise_masks

    g = torch.Generator().manual_seed(3)
    grids = (torch.rand((2000, 4, 4), generator=g) < 0.3).float()
    shifts = torch.randint(4, (2000, 2), generator=g)
    masks = rise_masks(grids, shifts, (13, 16))
    assert masks.shape == (2000, 13, 16)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.3) < 0.01  # E[M] = p
    # soft: bilinear edges give values strictly between 0 and 1
    assert float(((masks > 0) & (masks < 1)).float().mean()) > 0.3
    # one mask by hand: a single cell on, cell size 4, upsampled to 20, cropped at (1, 2)
    grid = torch.zeros(1, 4, 4)
    grid[0, 1, 2] = 1
    mask = rise_masks(grid, torch.tensor([[1, 2]]), (13, 16))[0]
    big = F.interpolate(grid[None], size=(20, 20), mode="bilinear")[0, 0]
    torch.testing.assert_close(mask, big[1:14, 2:18], rtol=0, atol=0)


def test_rise_score_option() -> None:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(1, 3, 8, 8)
    kw = dict(method="rise", layer="bn", target=1, n_masks=32, cells=2, **PLAIN)
    auto = camkit.explain(model, x, **kw)
    prob = camkit.explain(model, x, score="probability", **kw)
    logit = camkit.explain(model, x, score="target", **kw)
    assert torch.equal(auto.raw, prob.raw)
    # the logit version is another map: softmax is not affine
    assert not torch.allclose(logit.raw, prob.raw)
    # a regression target: "auto" masks its own score; "probability" refuses
    reg = camkit.explain(model, x, **{**kw, "target": lambda out, index: out[:, 1]})
    torch.testing.assert_close(reg.raw, logit.raw)
    with pytest.raises(camkit.TargetError, match="score='probability' needs class targets"):
        camkit.explain(
            model, x, **{**kw, "target": lambda out, index: out[:, 1]}, score="probability"
        )


def test_rise_does_not_depend_on_batch_size_or_batch() -> None:
    torch.manual_seed(0)
    model = ResidualNet().eval().double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    kw = dict(method="rise", layer="bn", n_masks=20, cells=4, **PLAIN)
    a = camkit.explain(model, x, target=[0, 1, 2], batch_size=7, **kw).raw
    b = camkit.explain(model, x, target=[0, 1, 2], batch_size=64, **kw).raw
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    alone = camkit.explain(model, x[1:2], target=1, batch_size=7, **kw).raw
    torch.testing.assert_close(alone[0], a[1], rtol=1e-12, atol=1e-14)
    other = camkit.explain(model, x, target=[0, 1, 2], batch_size=7, seed=1, **kw).raw
    assert not torch.allclose(other, a)


def _occlusion_reference(
    model: nn.Module,
    x: torch.Tensor,
    target: list[int],
    patch: tuple[int, int],
    stride: tuple[int, int],
    baseline: float,
) -> torch.Tensor:
    """Mean score drop over the patches covering each position, float64, one patch at a time."""
    m64 = model.double()
    n, _, h, w = x.shape
    xs = x.double()
    total = torch.zeros(n, h, w, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    with torch.no_grad():
        y = m64(xs)[torch.arange(n), target]
        top = 0
        while True:
            left = 0
            while True:
                occluded = xs.clone()
                occluded[:, :, top : top + patch[0], left : left + patch[1]] = baseline
                yw = m64(occluded)[torch.arange(n), target]
                total[:, top : top + patch[0], left : left + patch[1]] += (y - yw)[:, None, None]
                count[top : top + patch[0], left : left + patch[1]] += 1
                if left + patch[1] >= w:
                    break
                left += stride[1]
            if top + patch[0] >= h:
                break
            top += stride[0]
    model.float()
    return total / count


@pytest.mark.parametrize(
    "patch,stride,baseline", [(3, 2, 0.0), ((2, 4), (1, 3), -0.5), (8, 8, 0.25), (1, 1, 0.0)]
)
def test_occlusion_equals_the_float64_reference(
    patch: int | tuple[int, int], stride: int | tuple[int, int], baseline: float
) -> None:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    pt = patch if isinstance(patch, tuple) else (patch, patch)
    st = stride if isinstance(stride, tuple) else (stride, stride)
    ref = _occlusion_reference(model, x, [0, 2], pt, st, baseline)
    # one patch covering the whole 8 x 8 input: one drop per sample, a constant map, which
    # camkit reports as blank
    one_patch = pt == (8, 8)
    blank = pytest.warns(camkit.BlankMapWarning, match="constant") if one_patch else nullcontext()
    with blank:
        res = camkit.explain(
            model.double(), x.double(), method="occlusion", layer="bn", target=[0, 2],
            patch=patch, stride=stride, baseline=baseline, batch_size=5, **PLAIN,
        )  # fmt: skip
    model.float()
    torch.testing.assert_close(res.raw, ref, rtol=1e-10, atol=1e-12)
    if not one_patch:
        assert bool((ref < 0).any()) and bool((ref > 0).any())  # signed drops: relu=False


def test_occlusion_by_hand_on_a_linear_model() -> None:
    # score = sum of the input's first channel times a known weight w; with patch 2 and
    # stride 1 on a 1 x 3 signal the patches are [0, 2) and [1, 3): drops w0 x0 + w1 x1 and
    # w1 x1 + w2 x2; position 1 is covered twice and gets their mean
    class Linear1d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = torch.tensor([1.0, -2.0, 4.0], dtype=x.dtype)
            s = (self.features(x)[:, 0] * w).sum(dim=1)
            return torch.stack([s, -s], dim=1)

    x = torch.tensor([[[1.0, 1.0, 1.0]]])
    res = camkit.explain(
        Linear1d(), x, method="occlusion", layer="features", target=0, patch=2, stride=1, **PLAIN
    )
    d0, d1 = 1.0 - 2.0, -2.0 + 4.0
    torch.testing.assert_close(res.raw, torch.tensor([[d0, (d0 + d1) / 2, d1]]))


def test_occlusion_matches_captum() -> None:
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = ResidualNet().eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for patch, stride in ((3, 2), (4, 4), (2, 1)):
        ours = camkit.explain(
            model, x, method="occlusion", layer="bn", target=[1, 2], patch=patch, stride=stride,
            **PLAIN,
        ).raw  # fmt: skip
        theirs = captum_attr.Occlusion(model).attribute(
            x,
            sliding_window_shapes=(3, patch, patch),
            strides=(3, stride, stride),
            baselines=0.0,
            target=[1, 2],
        )
        # captum attributes every input channel; a patch spans all channels, so they are equal
        torch.testing.assert_close(theirs[:, 0], theirs[:, 2])
        # captum 0.9.0 returns (and accumulates) float32 attributions for a float64 input
        assert theirs.dtype == torch.float32
        torch.testing.assert_close(ours.float(), theirs[:, 0], rtol=1e-5, atol=1e-6)


def test_occlusion_covers_1d_and_3d_inputs() -> None:
    check_method("occlusion", patch=2, stride=1)
    check_method("rise", n_masks=16, cells=2)


def test_several_targets_per_sample() -> None:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    for method, opts in (("rise", {"n_masks": 16}), ("occlusion", {"patch": 4, "stride": 2})):
        both = camkit.explain(
            model, x, method=method, layer="bn", target=camkit.targets.TopK(2), **opts, **PLAIN
        )
        assert both.raw.shape == (2, 2, 8, 8)
        for k in range(2):
            one = camkit.explain(
                model, x, method=method, layer="bn", target=both.targets[:, k], **opts, **PLAIN
            )
            torch.testing.assert_close(both.raw[:, k], one.raw, rtol=1e-5, atol=1e-6)


def test_option_errors() -> None:
    model = ResidualNet().eval()
    x = torch.randn(1, 3, 8, 8)

    def run(method: str, **opts: object) -> None:
        camkit.explain(model, x, method=method, layer="bn", **opts)

    for opts, match in [
        ({"n_masks": 0}, "'n_masks' expects an int >= 1"),
        ({"cells": 1.5}, "'cells' expects an int"),
        ({"p": 0}, "'p' expects a finite number > 0"),
        ({"p": 1.5}, r"'p' expects a probability in \(0, 1\]"),
        ({"score": "logit"}, "'score' expects one of 'auto', 'probability', 'target'"),
        ({"eigen_smooth": True}, "eigen_smooth=True does not apply"),
    ]:
        with pytest.raises(camkit.OptionError, match=match):
            run("rise", **opts)
    for opts, match in [
        ({"patch": 0}, "'patch' expects a positive int"),
        ({"patch": (2, True)}, "'patch' expects a positive int"),
        ({"stride": "2"}, "'stride' expects a positive int"),
        ({"patch": 2, "stride": 3}, "'stride' .* must not exceed 'patch'"),
        ({"patch": (4, 2), "stride": (2, 3)}, "'stride' .* must not exceed 'patch'"),
        ({"baseline": float("nan")}, "'baseline' expects a finite number"),
        ({"patch": (2, 2, 2), "stride": 1}, "'patch' has 3 values but the input has 2 spatial"),
        ({"eigen_smooth": True}, "eigen_smooth=True does not apply"),
    ]:
        with pytest.raises(camkit.OptionError, match=match):
            run("occlusion", **opts)
    with pytest.raises(camkit.InputError, match=r"patch \(16, 16\) is larger than the input"):
        run("occlusion")  # the default patch of 16 on an 8 x 8 input


def test_a_probability_target_is_scored_as_its_classes() -> None:
    # score='auto' masks the softmax probability of the class for a class target; a
    # ProbabilityTarget names that same score, so RISE's maps must be the same
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    kwargs = {"method": "rise", "layer": "bn", "n_masks": 16}
    plain = camkit.explain(model, x, target=[0, 2], **kwargs)
    prob = camkit.explain(model, x, target=camkit.plugin.ProbabilityTarget([0, 2]), **kwargs)
    torch.testing.assert_close(prob.maps, plain.maps, rtol=0, atol=0)


def test_sess_takes_a_probability_target() -> None:
    # its base method differentiates the probability instead of the logit, so the maps differ
    # from a class target's; the patches are scored by the same probability
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    target = camkit.plugin.ProbabilityTarget([0, 2])
    res = camkit.explain(model, x, method="sess", layer="bn", target=target)
    assert res.maps.shape == (2, 8, 8) and bool(torch.isfinite(res.maps).all())
    assert float(res.maps.min()) == 0.0 and float(res.maps.max()) == 1.0


def test_probability_target_keeps_a_float64_model_s_precision() -> None:
    logits = torch.randn(3, 5, dtype=torch.float64)
    p = camkit.plugin.ProbabilityTarget([0, 1, 4]).scores(logits, torch.arange(3))
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, torch.softmax(logits, 1)[[0, 1, 2], [0, 1, 4]], rtol=0, atol=0)
