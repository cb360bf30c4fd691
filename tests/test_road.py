"""ROAD: the batched imputation against a float64 direct solve of the paper's system, and the
metric against a per-image float64 reference pipeline."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import Tensor, nn

import camkit

road = importlib.import_module("camkit_plugins.metrics_road")

#: Rong et al.'s neighbour weights, written out independently of the plugin.
NEIGHBOURS = [
    ((0, 1), 1 / 6),
    ((1, 0), 1 / 6),
    ((0, -1), 1 / 6),
    ((-1, 0), 1 / 6),
    ((1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((-1, 1), 1 / 12),
    ((-1, -1), 1 / 12),
]


def reference_impute(img: Tensor, removed: Tensor) -> Tensor:
    """The paper's linear imputation of one image ``(C, H, W)``, float64, by a dense solve:
    for each removed pixel ``i``, ``sum_j w_j (x_i - x_j) = 0`` over its neighbours inside the
    image, known neighbours moved to the right-hand side."""
    c, h, w = img.shape
    unknown = [(y, x) for y in range(h) for x in range(w) if removed[y, x]]
    index = {p: k for k, p in enumerate(unknown)}
    a = torch.zeros(len(unknown), len(unknown), dtype=torch.float64)
    b = torch.zeros(len(unknown), c, dtype=torch.float64)
    for k, (y, x) in enumerate(unknown):
        for (dy, dx), wt in NEIGHBOURS:
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w):
                continue
            a[k, k] += wt
            if removed[yy, xx]:
                a[k, index[(yy, xx)]] -= wt
            else:
                b[k] += wt * img[:, yy, xx].double()
    out = img.double().clone()
    if unknown:
        solution = torch.linalg.solve(a, b)
        for k, (y, x) in enumerate(unknown):
            out[:, y, x] = solution[k]
    return out


def test_batched_imputation_matches_a_float64_direct_solve() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 11, generator=g)
    removed = (
        torch.rand(6, 1, 9, 11, generator=g)
        < torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.97])[:, None, None, None]
    )
    removed[4, 0, :7, :] = True  # a large hole touching three borders
    got = road.impute(x, removed)
    assert torch.equal(got[~removed.expand_as(x)], x[~removed.expand_as(x)])
    for i in range(len(x)):
        ref = reference_impute(x[i], removed[i, 0])
        # tolerance: 1e-5 of the images' value range ([0, 1]) at the default tolerance 1e-6
        assert (got[i].double() - ref).abs().max().item() < 1e-5


def test_imputation_fills_a_linear_ramp_exactly_inside() -> None:
    # far from the borders a linear ramp is its own neighbours' weighted mean
    ramp = torch.arange(12.0).expand(1, 1, 12, 12).clone() / 11
    removed = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    removed[0, 0, 3:9, 3:9] = True
    got = road.impute(ramp, removed)
    assert (got - ramp).abs().max().item() < 1e-5


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_road_metric_matches_a_per_image_float64_reference() -> None:
    g = torch.Generator().manual_seed(2)
    model = TinyNet().eval()
    x = torch.rand(3, 3, 8, 8, generator=g)
    maps = torch.rand(3, 8, 8, generator=g)
    pct = (20, 50, 80)
    values = {
        name: camkit.evaluate(
            model, x, maps, name, target=[0, 1, 2], percentiles=pct, noise=0.0, batch_size=4
        ).values
        for name in ("road-morf", "road-lerf", "road")
    }
    expected: dict[str, list[float]] = {"road-morf": [], "road-lerf": []}
    for i in range(3):
        order = maps[i].flatten().argsort(descending=True, stable=True)
        for name, most in (("road-morf", True), ("road-lerf", False)):
            probs = []
            for p in pct:
                k = round(p / 100 * 64)
                chosen = order[:k] if most else order[64 - k :]
                removed = torch.zeros(64, dtype=torch.bool)
                removed[chosen] = True
                filled = reference_impute(x[i], removed.reshape(8, 8))
                with torch.no_grad():
                    logits = model.double()(filled[None]).float()
                    model.float()
                probs.append(torch.softmax(logits, 1)[0, i].item())
            expected[name].append(sum(probs) / len(probs))
    assert values["road-morf"].tolist() == pytest.approx(expected["road-morf"], abs=1e-5)
    assert values["road-lerf"].tolist() == pytest.approx(expected["road-lerf"], abs=1e-5)
    combined = [
        (a - b) / 2 for a, b in zip(expected["road-lerf"], expected["road-morf"], strict=True)
    ]
    assert values["road"].tolist() == pytest.approx(combined, abs=1e-5)


def test_road_noise_is_seeded_and_options_are_checked() -> None:
    model = TinyNet().eval()
    x = torch.rand(2, 3, 8, 8)
    maps = torch.rand(2, 8, 8)
    a = camkit.evaluate(model, x, maps, "road", seed=3).values
    b = camkit.evaluate(model, x, maps, "road", seed=3).values
    c = camkit.evaluate(model, x, maps, "road", seed=4).values
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(camkit.OptionError, match="percentiles"):
        camkit.evaluate(model, x, maps, "road", percentiles=[0, 50])
    with pytest.raises(camkit.OptionError, match="noise"):
        camkit.evaluate(model, x, maps, "road", noise=-1)
