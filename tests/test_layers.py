"""Layer resolution: names, indices, modules, lists, None, and the candidate listing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camkit
from camkit.layers import resolve_layers
from camkit.toy import TinyCNN


def _resnet18() -> nn.Module:
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(weights=None, num_classes=10).eval()


def test_names_indices_and_modules() -> None:
    model = TinyCNN()
    feats = model.features
    assert resolve_layers(model, "features.2") == [("features.2", feats[2])]
    assert resolve_layers(model, "features.-1") == [("features.3", feats[3])]
    assert resolve_layers(model, "features.-4") == [("features.0", feats[0])]
    assert resolve_layers(model, feats[1]) == [("features.1", feats[1])]
    assert resolve_layers(model, ["features.0", feats[2]]) == [
        ("features.0", feats[0]),
        ("features.2", feats[2]),
    ]


def test_unknown_name_lists_close_matches() -> None:
    model = _resnet18()
    with pytest.raises(camkit.UnknownLayerError) as info:
        resolve_layers(model, "layer4.1.conv3")
    msg = str(info.value)
    assert "'layer4.1.conv3'" in msg and "'layer4.1.conv2'" in msg and "camkit.layers" in msg
    with pytest.raises(camkit.UnknownLayerError, match=r"features\.9"):
        resolve_layers(TinyCNN(), "features.9")


def test_foreign_module_and_duplicates_rejected() -> None:
    model = TinyCNN()
    with pytest.raises(camkit.UnknownLayerError, match="not part of the model"):
        resolve_layers(model, nn.ReLU())
    with pytest.raises(camkit.LayerError, match="listed twice"):
        resolve_layers(model, ["features.1", "features.-3"])
    with pytest.raises(camkit.LayerError, match="at least one"):
        resolve_layers(model, [])
    with pytest.raises(camkit.LayerError, match="got int"):
        resolve_layers(model, 3)  # type: ignore[arg-type]


def test_none_picks_layer4_of_a_resnet() -> None:
    model = _resnet18()
    res = camkit.explain(model, torch.randn(1, 3, 64, 64))
    assert res.layer == "layer4"
    # the same map as naming the layer
    named = camkit.explain(model, torch.randn(1, 3, 64, 64).zero_() + 1, layer="layer4")
    auto = camkit.explain(model, torch.randn(1, 3, 64, 64).zero_() + 1)
    assert torch.equal(named.maps, auto.maps)


def test_none_picks_outermost_module_returning_last_map() -> None:
    assert camkit.explain(TinyCNN(), torch.randn(2, 3, 16, 16)).layer == "features"
    assert camkit.explain(TinyCNN(dims=1), torch.randn(2, 3, 16)).layer == "features"


def test_none_skips_layers_without_spatial_extent_and_shared_modules() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()  # runs twice
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)  # (N, 4, 1, 1): no spatial extent
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.act(self.conv2(self.act(self.conv(x))))).flatten(1))

    assert camkit.explain(Net(), torch.randn(1, 3, 8, 8)).layer == "conv2"


def test_layers_lists_candidates_with_shapes() -> None:
    model = _resnet18()
    infos = camkit.layers(model, torch.randn(1, 3, 64, 64))
    by_name = {i.name: i for i in infos}
    assert by_name["layer4"].shape == (1, 512, 2, 2) and by_name["layer4"].candidate
    assert by_name["layer4.1.relu"].calls == 2 and not by_name["layer4.1.relu"].candidate
    assert by_name["avgpool"].shape == (1, 512, 1, 1) and not by_name["avgpool"].candidate
    assert by_name["fc"].shape == (1, 10) and not by_name["fc"].candidate
    assert infos[-1].name == ""  # the model itself finishes last
    assert [i.name for i in infos if i.candidate][-1] == "layer4"


def test_the_auto_layer_is_remembered_per_model_and_shape() -> None:
    calls = {"n": 0}
    model = TinyCNN()
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    ex = camkit.Explainer(model)
    ex(torch.randn(1, 3, 16, 16))
    ex(torch.randn(1, 3, 16, 16))
    assert calls["n"] == 3  # one search forward, then one forward per call
    camkit.explain(model, torch.randn(1, 3, 16, 16))  # a new explainer: still remembered
    assert calls["n"] == 4
    ex(torch.randn(1, 3, 20, 20))
    assert calls["n"] == 6


def test_the_search_keeps_no_intermediate_tensor() -> None:
    from camkit.layers import probe

    model = TinyCNN()
    records = probe(model, lambda: model(torch.randn(2, 3, 8, 8)))
    assert all(not isinstance(v, torch.Tensor) for r in records for v in vars(r).values())
    assert [r.name for r in records][-1] == "" and records[-1].shape == (2, 5)


def test_several_layers_are_fused() -> None:
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    both = camkit.explain(model, x, layer=["features.1", "features.3"], target=[0, 1])
    a = camkit.explain(model, x, layer="features.1", target=[0, 1])
    b = camkit.explain(model, x, layer="features.3", target=[0, 1])
    assert both.layer == ["features.1", "features.3"]
    assert isinstance(both.raw, dict) and set(both.raw) == {"features.1", "features.3"}
    # raw and weights per layer are those of each layer alone
    torch.testing.assert_close(both.raw["features.1"], a.raw)
    torch.testing.assert_close(both.weights["features.3"], b.weights)
    mean = (a.maps + b.maps) / 2
    lo = mean.flatten(1).min(1).values[:, None, None]
    hi = mean.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(both.maps, (mean - lo) / (hi - lo))


def test_auto_layer_search_is_thread_safe() -> None:
    import threading

    model = TinyCNN().eval()
    errors: list[BaseException] = []
    found: list[str] = []
    barrier = threading.Barrier(2)

    def work() -> None:
        barrier.wait()
        try:
            for i in range(15):  # a new input size each time: a fresh search every call
                size = 16 + 2 * i + 40 * int(threading.current_thread().name[-1] == "1")
                found.append(camkit.explain(model, torch.randn(2, 3, size, size)).layer)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"searcher-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and found == ["features"] * 30
