"""Spearman, SSIM and the sanity-check metrics (model randomisation, max-sensitivity)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit.similarity import gaussian_blur, ranks, spearman, ssim

#: random-init models give some samples a blank (constant) map, which camkit reports with a
#: BlankMapWarning; these tests are about other things and take such maps as they come
pytestmark = pytest.mark.filterwarnings("ignore::camkit.BlankMapWarning")


def test_ranks_average_ties() -> None:
    got = ranks(torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]]))
    assert got.tolist() == [[4.0, 1.0, 2.5, 2.5], [2.0, 2.0, 2.0, 4.0]]


def test_spearman_hand_values() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    got = spearman(a, b)
    # row 1: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert got[:2].tolist() == pytest.approx([-1.0, 3 / math.sqrt(10)], abs=1e-12)
    assert math.isnan(got[2].item())
    assert spearman(a[:2], a[:2]).tolist() == pytest.approx([1.0, 1.0])


def _ssim_reference(a: Tensor, b: Tensor) -> float:
    """Wang et al.'s SSIM with an 11 x 11 Gaussian window (sigma 1.5), float64, window by
    window, no padding."""
    c = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(c**2) / (2 * 1.5**2))
    win = torch.outer(g, g) / torch.outer(g, g).sum()
    x, y = a.double(), b.double()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (win * px).sum(), (win * py).sum()
            vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
            cov = (win * (px - mx) * (py - my)).sum()
            values.append(
                ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return float(torch.stack(values).mean())


def test_ssim_against_a_windowed_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 16, 14, generator=g)
    b = (a + 0.3 * torch.rand(2, 16, 14, generator=g)).clamp(0, 1)
    got = ssim(a, b)
    for i in range(2):
        assert got[i].item() == pytest.approx(_ssim_reference(a[i], b[i]), abs=1e-10)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    x = torch.full((1, 2, 7, 9), 0.25)
    assert torch.allclose(gaussian_blur(x), x)
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[0, 0, 15, 15] = 1.0
    assert gaussian_blur(impulse).sum().item() == pytest.approx(1.0, abs=1e-6)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def test_model_randomization_leaves_the_model_and_separates_methods() -> None:
    model = SmallNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    target = [0, 1, 2, 0]  # class 3's maps are all zero on this model
    grad = camkit.explain(model, x, method="gradcam", layer="features", target=target)
    rand = camkit.explain(model, x, method="random", layer="features", target=target)
    # the head alone randomised: random's maps do not depend on it, Grad-CAM's do
    r = camkit.evaluate(model, x, rand, "model-randomization", layers=1).values
    assert r.tolist() == [1.0] * 4
    g = camkit.evaluate(model, x, grad, "model-randomization", layers=1).values
    assert float(g.mean()) < 0.9
    s = camkit.evaluate(model, x, rand, "model-randomization", layers=1, measure="ssim").values
    assert s.tolist() == pytest.approx([1.0] * 4, abs=1e-12)
    # all layers: random's maps change too (the activations do)
    r_all = camkit.evaluate(model, x, rand, "model-randomization").values
    assert float(r_all.mean()) < 0.99
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # seeded
    g2 = camkit.evaluate(model, x, grad, "model-randomization", layers=1).values
    assert torch.equal(g, g2)


def test_max_sensitivity() -> None:
    model = SmallNet().eval()
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    res = camkit.explain(model, x, method="gradcam", layer="features", target=[0, 1, 2])
    zero = camkit.evaluate(model, x, res, "max-sensitivity", radius=0.0, n_samples=2).values
    assert zero.tolist() == [0.0] * 3
    few = camkit.evaluate(model, x, res, "max-sensitivity", radius=0.1, n_samples=2).values
    more = camkit.evaluate(model, x, res, "max-sensitivity", radius=0.1, n_samples=5).values
    # the first two draws are the same: the maximum over five is at least that over two
    assert bool((few > 0).all()) and bool((more >= few).all())
    big = camkit.evaluate(model, x, res, "max-sensitivity", radius=0.5, n_samples=5).values
    assert float(big.mean()) > float(more.mean())
