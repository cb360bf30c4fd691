"""Built-in metrics against hand-computed values on synthetic cases, and ``camkit.evaluate``.

The model scores the sum of a known region ``R`` of the image: logits ``(sum_R x, 0)``, so the
explained class 0 has the probability ``sigmoid(sum_R x)``. Maps lie fully inside ``R``, half
inside or outside it.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit.metric import masks_from_boxes, peaks

H = W = 6
#: The region the model sums: the top-left 2 x 2 pixels, flat indices 0, 1, 6, 7.
REGION = torch.zeros(H, W, dtype=torch.bool)
REGION[:2, :2] = True


class RegionSum(nn.Module):
    """Logits ``(sum over REGION of x, 0)`` for ``x`` ``(N, 1, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        s = (x[:, 0] * REGION).sum((1, 2)) * self.scale
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _map(values: dict[int, float]) -> Tensor:
    m = torch.zeros(H * W)
    for i, v in values.items():
        m[i] = v
    return m.reshape(H, W)


INSIDE = REGION.float()
OUTSIDE = (~REGION).float()
#: Half inside: two region pixels (0 and 1) and two outside (20, 21), interleaved in value.
HALF = _map({0: 1.0, 20: 0.95, 1: 0.9, 21: 0.85})


def _auc(curve: list[float]) -> float:
    """Trapezoid rule over the removed fraction, one pixel per step."""
    p = len(curve) - 1
    return sum((a + b) / 2 for a, b in itertools.pairwise(curve)) / p


def _remaining(order: list[int]) -> list[int]:
    """Region pixels left after removing the first k pixels of ``order``, k = 0..36."""
    region = {0, 1, 6, 7}
    return [len(region - set(order[:k])) for k in range(len(order) + 1)]


# removal orders, most relevant first; ties (equal map values) go by flat index
ORDER_INSIDE = [0, 1, 6, 7, *[i for i in range(36) if i not in (0, 1, 6, 7)]]
ORDER_OUTSIDE = [*[i for i in range(36) if i not in (0, 1, 6, 7)], 0, 1, 6, 7]
ORDER_HALF = [0, 20, 1, 21, *[i for i in range(36) if i not in (0, 1, 20, 21)]]


def _evaluate(maps: list[Tensor], metric: str, **kw: object) -> Tensor:
    x = torch.ones(len(maps), 1, H, W)
    return camkit.evaluate(RegionSum(), x, torch.stack(maps), metric, target=0, **kw).values


@pytest.mark.parametrize(
    "map_, order", [(INSIDE, ORDER_INSIDE), (HALF, ORDER_HALF), (OUTSIDE, ORDER_OUTSIDE)]
)
def test_deletion_and_insertion_pixel_by_pixel(map_: Tensor, order: list[int]) -> None:
    left = _remaining(order)
    deletion = _auc([_sig(r) for r in left])
    insertion = _auc([_sig(4 - r) for r in left])
    got = _evaluate([map_], "deletion", pixels_per_step=1)
    assert got.item() == pytest.approx(deletion, abs=1e-6)
    got = _evaluate([map_], "insertion", pixels_per_step=1, baseline="zeros")
    assert got.item() == pytest.approx(insertion, abs=1e-6)


def test_deletion_steps_and_order_of_methods() -> None:
    # 4 steps of 9 pixels: inside removes the whole region in step 1
    got = _evaluate([INSIDE, OUTSIDE], "deletion", steps=4)
    inside = (_sig(4) + _sig(0)) / 8 + 3 * _sig(0) / 4
    outside = 3 * _sig(4) / 4 + (_sig(4) + _sig(0)) / 8
    assert got.tolist() == pytest.approx([inside, outside], abs=1e-6)
    res = camkit.evaluate(RegionSum(), torch.ones(1, 1, H, W), INSIDE[None], "deletion")
    assert res.higher_is_better is False and res.metric == "deletion"


def test_baselines() -> None:
    x = torch.ones(1, 1, H, W)
    # mean baseline of a constant image is the image: deleting changes nothing
    got = camkit.evaluate(RegionSum(), x, INSIDE[None], "deletion", target=0, baseline="mean")
    assert got.values.item() == pytest.approx(_sig(4), abs=1e-6)
    # the blur of a constant image is the same constant
    got = camkit.evaluate(RegionSum(), x, INSIDE[None], "insertion", target=0, baseline="blur")
    assert got.values.item() == pytest.approx(_sig(4), abs=1e-6)


def test_average_drop_and_increase_in_confidence() -> None:
    y = _sig(4)
    got = _evaluate([INSIDE, HALF, OUTSIDE], "average-drop")
    # x * map keeps the region's sum 4 (inside), 1 + 0.9 (half), 0 (outside)
    expected = [0.0, (y - _sig(1.9)) / y, (y - _sig(0)) / y]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert _evaluate([INSIDE, HALF], "increase-in-confidence").tolist() == [0.0, 0.0]
    # negative pixels in the region: a map that drops them raises the score
    x = torch.ones(2, 1, H, W)
    x[:, 0, 1, :2] = -1.0  # region sum 0
    maps = torch.stack([_map({0: 1.0, 1: 1.0}), INSIDE])
    res = camkit.evaluate(RegionSum(), x, maps, "increase-in-confidence", target=0)
    assert res.values.tolist() == [1.0, 0.0]
    res = camkit.evaluate(RegionSum(), x, maps, "average-drop", target=0)
    assert res.values.tolist() == [0.0, 0.0]


def _masks() -> Tensor:
    return REGION[None].expand(3, H, W)


def test_pointing_game() -> None:
    far = _map({35: 1.0})  # (5, 5): 4 * sqrt(2) from the region's corner (1, 1)
    near = _map({3: 1.0})  # (0, 3): 2 pixels right of the region
    maps = torch.stack([HALF, near, far])
    x = torch.ones(3, 1, H, W)
    res = camkit.evaluate(RegionSum(), x, maps, "pointing-game", 0, _masks(), tolerance=0)
    assert res.values.tolist() == [1.0, 0.0, 0.0]
    res = camkit.evaluate(RegionSum(), x, maps, "pointing-game", 0, _masks(), tolerance=2)
    assert res.values.tolist() == [1.0, 1.0, 0.0]
    res = camkit.evaluate(RegionSum(), x, maps, "pointing-game", 0, _masks(), tolerance=5)
    assert res.values.tolist() == [1.0, 1.0, 0.0]  # 4 * sqrt(2) = 5.66 > 5
    res = camkit.evaluate(RegionSum(), x, maps, "pointing-game", 0, _masks(), tolerance=6)
    assert res.values.tolist() == [1.0, 1.0, 1.0]
    constant = torch.full((1, H, W), 0.5)
    res = camkit.evaluate(RegionSum(), x[:1], constant, "pointing-game", 0, REGION[None])
    assert res.values.tolist() == [0.0]  # a constant map has no maximum


def test_energy_pointing_game() -> None:
    x = torch.ones(4, 1, H, W)
    maps = torch.stack([INSIDE, HALF, OUTSIDE, torch.zeros(H, W)])
    masks = REGION[None].expand(4, H, W)
    with pytest.warns(camkit.CamkitWarning, match="undefined for 1 of 4"):
        res = camkit.evaluate(RegionSum(), x, maps, "energy-pointing-game", 0, masks)
    expected = [1.0, 1.9 / 3.7, 0.0]
    assert res.values[:3].tolist() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(res.values[3].item()) and res.mean() == pytest.approx(sum(expected) / 3)


def test_class_discrimination() -> None:
    other = torch.zeros(H, W, dtype=torch.bool)
    other[4:, 4:] = True
    masks = torch.stack([torch.stack([REGION, other])] * 3)
    maps = torch.stack([INSIDE, _map({35: 1.0}), _map({3: 1.0})])
    x = torch.ones(3, 1, H, W)
    with pytest.warns(camkit.CamkitWarning, match="undefined for 1 of 3"):
        res = camkit.evaluate(RegionSum(), x, maps, "class-discrimination", 0, masks)
    assert res.values[:2].tolist() == [1.0, 0.0] and math.isnan(res.values[2].item())
    with pytest.raises(camkit.InputError, match="K >= 2"):
        camkit.evaluate(RegionSum(), x, maps, "class-discrimination", 0, masks[:, :1])


def test_masks_from_boxes_and_peaks() -> None:
    boxes = torch.tensor([[0, 0, 2, 2]])
    assert torch.equal(masks_from_boxes(boxes, (H, W))[0, 0], REGION)
    assert peaks(torch.stack([HALF, torch.ones(H, W)])).tolist() == [0, -1]


def test_evaluate_accepts_a_result_and_checks_its_arguments() -> None:
    model = RegionSum()
    x = torch.rand(2, 1, H, W)
    res = camkit.explain(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(72, 3)), x)
    assert camkit.evaluate(model, x, INSIDE.expand(2, H, W), "deletion").values.shape == (2,)
    with pytest.raises(camkit.InputError, match="maps expects shape"):
        camkit.evaluate(model, x, torch.zeros(2, 3, 3), "deletion")
    with pytest.raises(camkit.InputError, match="needs ground-truth masks"):
        camkit.evaluate(model, x, res, "pointing-game")
    with pytest.raises(camkit.OptionError, match="Did you mean 'steps'"):
        camkit.evaluate(model, x, res, "deletion", step=3)
    with pytest.raises(camkit.OptionError, match="'baseline'"):
        camkit.evaluate(model, x, res, "deletion", baseline="black")
    with pytest.raises(camkit.UnknownMetricError, match="Did you mean 'deletion'"):
        camkit.evaluate(model, x, res, "deletoin")
    with pytest.raises(camkit.InputError, match="explains again"):
        camkit.evaluate(model, x, res.maps, "max-sensitivity")
    with pytest.raises(camkit.InputError, match="masks have the spatial size"):
        camkit.evaluate(model, x, res, "pointing-game", masks=torch.ones(2, 3, 3, dtype=bool))


def test_training_mode_model_keeps_its_buffers() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        camkit.evaluate(model, x, torch.rand(2, H, W), "deletion", steps=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_list_metrics_and_directions() -> None:
    names = camkit.list_metrics()
    assert names == sorted(names)
    expected = {
        "average-drop": False,
        "increase-in-confidence": True,
        "deletion": False,
        "insertion": True,
        "road": True,
        "road-morf": False,
        "road-lerf": True,
        "pointing-game": True,
        "energy-pointing-game": True,
        "class-discrimination": True,
        "model-randomization": False,
        "max-sensitivity": False,
    }
    assert set(expected) <= set(names)
    reg = camkit.default_registry()
    for name, direction in expected.items():
        metric = reg.get_metric(name)
        assert metric.higher_is_better is direction and metric.citation and metric.cost
    assert camkit.list_metrics("road*") == ["road", "road-lerf", "road-morf"]


class _Ones(camkit.Metric):
    name = "ones"
    citation = "test"
    cost = "no forward"

    def compute(self, ctx: camkit.MetricContext) -> Tensor:
        return torch.ones(ctx.maps.shape[0])


class _MetricPlugin:
    def __init__(self, *metrics: object) -> None:
        self.metrics = metrics

    @camkit.hookimpl
    def register_metrics(self, register: camkit.plugin.RegisterMetric) -> None:
        for m in self.metrics:
            register(m)  # type: ignore[arg-type]


def test_third_party_metric_plugins_register_and_are_checked() -> None:
    reg = camkit.Registry(load_entrypoints=False)
    reg.register_plugin(_MetricPlugin(_Ones()), name="mine")
    assert reg.metric_names() == ["ones"]
    assert {p["name"]: p for p in reg.plugins()}["mine"]["metrics"] == ["ones"]
    x = torch.ones(2, 1, H, W)
    res = camkit.evaluate(RegionSum(), x, torch.rand(2, H, W), "ones", registry=reg)
    assert res.values.tolist() == [1.0, 1.0] and res.higher_is_better
    with pytest.raises(camkit.PluginError, match="'mine' already registered"):
        reg.register_plugin(_MetricPlugin(_Ones()), name="other")
    assert "other" not in {p["name"] for p in reg.plugins()}
    with pytest.raises(camkit.PluginError, match="register\\(_Ones\\(\\)\\)"):
        reg.register_plugin(_MetricPlugin(_Ones), name="cls")
    bad = type("Bad", (_Ones,), {"name": "Bad Name"})
    with pytest.raises(camkit.PluginError, match="lowercase words"):
        reg.register_plugin(_MetricPlugin(bad()), name="bad")
    no_compute = type("NoCompute", (camkit.Metric,), {"name": "nothing"})
    with pytest.raises(camkit.PluginError, match="does not implement compute"):
        reg.register_plugin(_MetricPlugin(no_compute()), name="nothing")
    needs = type("Needs", (_Ones,), {"name": "needs", "needs": ("labels",)})
    with pytest.raises(camkit.PluginError, match="needs"):
        reg.register_plugin(_MetricPlugin(needs()), name="needs")
    wrong = type("Wrong", (_Ones,), {"name": "wrong", "compute": lambda self, ctx: torch.ones(3)})
    reg.register_plugin(_MetricPlugin(wrong()), name="wrong")
    with pytest.raises(camkit.PluginError, match="returned \\(3,\\); expected"):
        camkit.evaluate(RegionSum(), x, torch.rand(2, H, W), "wrong", registry=reg)


def test_metrics_chunk_by_the_auto_rule_and_the_values_do_not_depend_on_it() -> None:
    # batch_size defaults to "auto": 224x224 float32 images go 8 rows per forward on a CPU
    # (the rule of camkit.batching), not 64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()  # fmt: skip
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(2))
    rows: list[int] = []
    handle = model.register_forward_hook(lambda m, i, o: rows.append(int(i[0].shape[0])))
    try:
        auto = camkit.evaluate(model, x, maps, "deletion", target=0, steps=10)
        assert rows == [3, 8, 8, 8, 8, 1]  # the unmodified batch, then 3 x 11 steps
        rows.clear()
        given = camkit.evaluate(model, x, maps, "deletion", target=0, steps=10, batch_size=64)
        assert rows == [3, 33]
    finally:
        handle.remove()
    torch.testing.assert_close(auto.values, given.values, rtol=1e-5, atol=1e-6)
    assert float(auto.values.std()) > 1e-3  # three different curves: the comparison can fail
    with pytest.raises(camkit.OptionError, match="'auto' or an int"):
        camkit.evaluate(model, x, maps, "deletion", target=0, batch_size="big")
