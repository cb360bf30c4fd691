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
    flat = removed.flatten()
    unknown = flat.nonzero().flatten()
    n = len(unknown)
    index = torch.full((h * w,), -1, dtype=torch.long)
    index[unknown] = torch.arange(n)
    a = torch.zeros(n, n, dtype=torch.float64)
    b = torch.zeros(n, c, dtype=torch.float64)
    values = img.double().reshape(c, -1)
    for (dy, dx), wt in NEIGHBOURS:
        y, x = unknown // w + dy, unknown % w + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        k, j = inside.nonzero().flatten(), (y * w + x)[inside]
        a[k, k] += wt
        also_removed = flat[j]
        a[k[also_removed], index[j[also_removed]]] -= wt
        b[k[~also_removed]] += wt * values[:, j[~also_removed]].T
    out = img.double().clone().reshape(c, -1)
    if n:
        out[:, unknown] = torch.linalg.solve(a, b).T
    return out.reshape(c, h, w)


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


def _masks(h: int, w: int) -> Tensor:
    """Removed pixels of five kinds on an ``h x w`` grid: scattered at 10 % and 90 %, a large
    blob touching three borders, a one-pixel line, and all but one pixel."""
    g = torch.Generator().manual_seed(3)
    removed = torch.zeros(5, 1, h, w, dtype=torch.bool)
    removed[0, 0] = torch.rand(h, w, generator=g) < 0.1
    removed[1, 0] = torch.rand(h, w, generator=g) < 0.9
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    removed[2, 0] = ((yy - h) ** 2 + (xx - w / 2) ** 2 < (0.8 * h) ** 2) | (yy < 3)
    removed[3, 0, h // 2, 2:-2] = True
    removed[4, 0] = True
    removed[4, 0, h - 1, 0] = False
    return removed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multigrid_solve_is_within_its_tolerance_of_a_float64_direct_solve(
    dtype: torch.dtype,
) -> None:
    # 40 x 44: two coarse grids below the image (22 x 20, then 11 x 10, solved directly)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 3, 40, 44, generator=g).to(dtype)
    removed = _masks(40, 44)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-9
    got = road.impute(x, removed, tolerance=tolerance)
    assert torch.equal(got[~removed.expand_as(x)], x[~removed.expand_as(x)])
    for i in range(len(x)):
        err = (got[i].double() - reference_impute(x[i], removed[i, 0])).abs().max().item()
        # the documented bound: within the tolerance of the direct solve (the last change of
        # an iteration is about 3 times the error left, the multigrid's rate)
        assert err < tolerance, (i, err)


@pytest.mark.parametrize("percent", [20, 50, 80])
def test_imputation_is_within_its_tolerance_of_scipy(percent: int) -> None:
    # the benchmark's reference (one scipy direct sparse solve per image, float64) on
    # normalised-looking images (standard deviation 1) and smooth maps' most relevant pixels
    pytest.importorskip("scipy")
    from benchmarks.metrics_loops import impute_sparse

    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 96, 96, generator=g)
    maps = torch.rand(4, 1, 6, 6, generator=g)
    maps = torch.nn.functional.interpolate(maps, size=(96, 96), mode="bilinear")
    k = round(percent / 100 * 96 * 96)
    rank = maps.flatten(1).argsort(dim=1, descending=True).argsort(dim=1)
    removed = (rank < k).reshape(4, 1, 96, 96)
    got = road.impute(x, removed)  # the default tolerance, 1e-3
    for i in range(4):
        ref = impute_sparse(x[i].double().numpy(), removed[i, 0].numpy())
        assert (got[i].double() - torch.from_numpy(ref)).abs().max().item() < 1e-3


def test_an_image_fills_alike_alone_and_in_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # the solver's domain is the batch's bounding box, aligned to the coarsest grid's cells:
    # an image's grids are blocks of its own, whatever else the batch holds
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, 72, 72, generator=g)
    removed = torch.zeros(3, 1, 72, 72, dtype=torch.bool)
    removed[0, 0, 30:40, 20:50] = True  # small, inside
    removed[1, 0, :, 60:] = True  # along a border
    removed[2, 0] = torch.rand(72, 72, generator=g) < 0.5
    together = road.impute(x, removed)
    for i in range(3):
        alone = road.impute(x[i : i + 1], removed[i : i + 1])
        assert (alone[0] - together[i]).abs().max().item() < 1e-5
    monkeypatch.setattr(road, "CPU_CHUNK", 1)  # one image per chunk
    assert (road.impute(x, removed) - together).abs().max().item() < 1e-5


def test_imputation_fills_a_linear_ramp_exactly_inside() -> None:
    # far from the borders a linear ramp is its own neighbours' weighted mean
    ramp = torch.arange(12.0).expand(1, 1, 12, 12).clone() / 11
    removed = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    removed[0, 0, 3:9, 3:9] = True
    got = road.impute(ramp, removed)
    assert (got - ramp).abs().max().item() < 1e-5


class TinyNet(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _reference_road(
    model: nn.Module, x: Tensor, maps: Tensor, pct: tuple[int, ...]
) -> dict[str, list[float]]:
    """ROAD per image with the float64 direct imputation, no noise."""
    pixels = maps[0].numel()
    expected: dict[str, list[float]] = {"road-morf": [], "road-lerf": []}
    for i in range(len(x)):
        order = maps[i].flatten().argsort(descending=True, stable=True)
        for name, most in (("road-morf", True), ("road-lerf", False)):
            probs = []
            for p in pct:
                k = round(p / 100 * pixels)
                chosen = order[:k] if most else order[pixels - k :]
                removed = torch.zeros(pixels, dtype=torch.bool)
                removed[chosen] = True
                filled = reference_impute(x[i], removed.reshape(maps.shape[1:]))
                with torch.no_grad():
                    logits = model.double()(filled[None]).float()
                    model.float()
                probs.append(torch.softmax(logits, 1)[0, i].item())
            expected[name].append(sum(probs) / len(probs))
    expected["road"] = [
        (a - b) / 2 for a, b in zip(expected["road-lerf"], expected["road-morf"], strict=True)
    ]
    return expected


@pytest.mark.parametrize("size", [8, 40])
def test_road_metric_matches_a_per_image_float64_reference(size: int) -> None:
    # 8 x 8: solved directly; 40 x 40: by the multigrid solver at its default tolerance (1e-3),
    # where the probabilities moved by under 1e-6 (by 4e-5 at a tolerance of 1e-2)
    g = torch.Generator().manual_seed(2)
    model = TinyNet(scale=0.3).eval()  # probabilities 0.2 to 0.4: not saturated
    x = torch.rand(3, 3, size, size, generator=g)
    maps = torch.rand(3, size // 4, size // 4, generator=g)
    maps = torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear")[:, 0]
    pct = (20, 50, 80)
    expected = _reference_road(model, x, maps, pct)
    for name in ("road-morf", "road-lerf", "road"):
        values = camkit.evaluate(
            model, x, maps, name, target=[0, 1, 2], percentiles=pct, noise=0.0, batch_size=4
        ).values
        assert values.tolist() == pytest.approx(expected[name], abs=1e-5), name


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
