"""The weighted sum, normalisation, upsampling and fusion, on known numbers."""

from __future__ import annotations

import warnings

import pytest
import torch

import camkit
from camkit import cam
from camkit.toy import TinyCNN


def test_weighted_sum_channel_and_element_weights() -> None:
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2): C=2, 1D with 2 positions
    assert torch.equal(
        cam.weighted_sum(torch.tensor([[2.0, -1.0]]), a), torch.tensor([[-1.0, 0.0]])
    )
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert torch.equal(cam.weighted_sum(w, a), torch.tensor([[1.0, 4.0]]))


def test_normalize_constant_map_is_zero_not_nan() -> None:
    maps = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0]])
    out = cam.normalize(maps)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_upsample_by_rank() -> None:
    one = cam.upsample(torch.tensor([[0.0, 1.0]]), (4,), "auto")
    assert torch.equal(one, torch.tensor([[0.0, 0.25, 0.75, 1.0]]))
    two = cam.upsample(torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]), (4, 4), "auto")
    assert two.shape == (1, 4, 4)
    assert torch.equal(two[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    # (1, 1) samples the source at (0.25, 0.25): 1 - 0.75 * 0.75 of the way to the ones
    assert float(two[0, 1, 1]) == pytest.approx(1 - 0.75 * 0.75)
    three = cam.upsample(
        torch.zeros(1, 2, 2, 2).index_fill_(1, torch.tensor([1]), 1.0), (4, 4, 4), "auto"
    )
    assert torch.equal(three[0, :, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    near = cam.upsample(torch.tensor([[0.0, 1.0]]), (4,), "nearest")
    assert torch.equal(near, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    same = torch.rand(1, 3)
    assert cam.upsample(same, (3,), "auto") is same
    assert cam.upsample(same, (6,), None) is same


def test_eigen_combine_is_the_first_component_with_a_fixed_sign() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    w = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    out = cam.eigen_combine(w, a)
    for n in range(2):
        m = (w[n, :, None] * a[n].flatten(1)).T  # (P, C)
        c = m - m.mean(0)
        _, _, vh = torch.linalg.svd(c, full_matrices=False)
        proj = c @ vh[0]
        plain = m.sum(1)
        if torch.dot(proj - proj.mean(), plain - plain.mean()) < 0:
            proj = -proj
        torch.testing.assert_close(out[n].flatten(), proj)


@pytest.mark.parametrize("shape", [(3, 16, 5, 4), (3, 6, 4, 5)])  # P <= C and C < P
@pytest.mark.parametrize("center", [True, False])
def test_principal_component_matches_a_float64_svd(shape: tuple[int, ...], center: bool) -> None:
    # both Gram routes (positions x positions, channels x channels) against the projection on
    # the first right singular vector, sign-matched to the channel sum
    values = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    got = cam.principal_component(values, center=center)
    for i in range(shape[0]):
        mat = values[i].flatten(1).T.double()  # (P, C)
        if center:
            mat = mat - mat.mean(0)
        _, _, vh = torch.linalg.svd(mat, full_matrices=False)
        proj = mat @ vh[0]
        plain = values[i].double().sum(0).flatten()
        if float(((proj - proj.mean()) * (plain - plain.mean())).sum()) < 0:
            proj = -proj
        torch.testing.assert_close(got[i].flatten().double(), proj, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "bilinear", "bicubic", "nearest"])
def test_upsampling_keeps_each_map_within_its_range(mode: str) -> None:
    # interpolating a constant map rounds: bilinear weights times 1.6332e-12 do not sum back to
    # 1.6332e-12 exactly (three distinct values at 224 x 224 unclamped), and normalising would
    # blow that rounding up to a [0, 1] map. Each sample stays within its own [min, max]: a
    # constant map stays exactly constant, and normalises to zeros
    maps = torch.stack(
        [
            torch.full((4, 4), 1.6332e-12),
            torch.rand(4, 4, generator=torch.Generator().manual_seed(0)),
        ]
    )
    up = cam.upsample(maps, (224, 224), mode)
    assert torch.equal(up[0], torch.full((224, 224), 1.6332e-12))
    assert float(up[1].min()) >= float(maps[1].min()) and float(up[1].max()) <= float(maps[1].max())
    assert float(up[1].max()) == pytest.approx(float(maps[1].max()), rel=0.3)
    assert not bool(cam.normalize(up)[0].any())


@pytest.mark.parametrize("dims,size", [(1, (20,)), (2, (10, 12)), (3, (6, 8, 4))])
def test_explain_1d_2d_3d(dims: int, size: tuple[int, ...]) -> None:
    model = TinyCNN(dims=dims).eval()
    x = torch.randn(2, 3, *size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", camkit.BlankMapWarning)
        res = camkit.explain(model, x, target=[0, 1])
    # a random network's map can be blank (all negative before the ReLU): never silently
    blank = bool((res.maps.flatten(1).amax(1) == 0).any())
    assert blank == any(issubclass(w.category, camkit.BlankMapWarning) for w in caught)
    assert res.maps.shape == (2, *size) and res.maps.dtype == torch.float32
    assert res.raw.shape == (2, *(-(-s // 2) for s in size))
    expected = cam.normalize(cam.upsample(res.raw, size, "auto"))
    torch.testing.assert_close(res.maps, expected)
    assert float(res.maps.amin()) == 0.0 and float(res.maps.amax()) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", camkit.BlankMapWarning)  # checked above, same maps
        low = camkit.explain(model, x, target=[0, 1], upsample=None)
    assert low.maps.shape == res.raw.shape


def test_relu_false_keeps_sign_and_normalize_false_keeps_scale() -> None:
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 12, 12)
    signed = camkit.explain(model, x, relu=False, normalize=False, upsample=None, target=[0, 1])
    relu = camkit.explain(model, x, normalize=False, upsample=None, target=[0, 1])
    assert float(signed.raw.min()) < 0
    assert torch.equal(relu.raw, signed.raw.clamp_min(0))
    assert torch.equal(relu.maps, relu.raw)


def test_bfloat16_model_gives_float32_maps() -> None:
    model = TinyCNN().eval().to(torch.bfloat16)
    res = camkit.explain(model, torch.randn(1, 3, 12, 12, dtype=torch.bfloat16), target=0)
    assert res.maps.dtype == torch.float32 and res.raw.dtype == torch.float32


def test_autocast_does_not_lower_the_precision_of_maps() -> None:
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 12, 12)
    ref = camkit.explain(model, x, target=[0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = camkit.explain(model, x, target=[0, 1])
        assert torch.is_autocast_enabled("cpu")  # the caller's autocast is left on
    assert res.raw.dtype == torch.float32 and res.weights.dtype == torch.float32
    assert res.maps.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([res.maps.flatten(), ref.maps.flatten()]))[0, 1]
    assert corr > 0.99  # the forward ran in bfloat16, the sums in float32
