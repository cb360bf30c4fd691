"""Deferred finiteness checks: one host read for a call's checks, the same errors in the same order.

On a GPU every ``bool(tensor)`` waits for the device; camkit queues its finiteness checks and
reads them together (:mod:`camkit.deferred`). The CPU checks at once; these tests switch the
deferred path on for the CPU (``DEFER_ON_CPU``) so that it runs here, and count the host reads
of a Grad-CAM call.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import camkit
import camkit.deferred as deferred

layers_module = importlib.import_module("camkit.layers")  # camkit.layers is also a function

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Poison(nn.Module):
    """ReLU whose output holds a NaN while ``bad`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.bad = False

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(x)
        if self.bad:
            a = a.clone()
            a[0, 0, 0, 0] = float("nan")
        return a


class Net(nn.Module):
    """conv -> ``layer`` (ReLU, NaN on demand) -> GAP -> fc (scores infinite on demand)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = Poison()
        self.fc = nn.Linear(4, 3)
        self.bad_score = False
        self.calls = 0

    @property
    def bad_activation(self) -> bool:
        return self.layer.bad

    @bad_activation.setter
    def bad_activation(self, value: bool) -> None:
        self.layer.bad = value

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        a = self.layer(self.conv(x))
        out: Tensor = self.fc(a.mean((2, 3)))
        if self.bad_score:
            out = out * float("inf")
        return out


@pytest.fixture(params=[False, True], ids=["immediate", "deferred"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    monkeypatch.setattr(deferred, "DEFER_ON_CPU", request.param)
    yield request.param
    assert deferred._PENDING.get() is None  # nothing left queued outside a call


def _host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count every read of a tensor's value by the host (``bool``, ``item``, ``tolist``)."""
    reads: list[str] = []
    for name in ("__bool__", "item", "tolist"):
        original = getattr(Tensor, name)

        def counted(self: Tensor, *a: object, _o: object = original, _n: str = name) -> object:
            reads.append(_n)
            return _o(self, *a)  # type: ignore[operator]

        monkeypatch.setattr(Tensor, name, counted)
    return reads


def test_a_gradcam_call_reads_the_device_three_times_when_deferred(
    mode: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Net().eval()
    # the predicted class: no class index to check against the logits on the host
    reference = camkit.explain(model, X, method="gradcam", layer="layer")
    reads = _host_reads(monkeypatch)
    res = camkit.explain(model, X, method="gradcam", layer="layer")
    monkeypatch.undo()
    assert torch.equal(res.maps, reference.maps)
    # deferred: the input check, one read of every queued check, the blank-map test; immediate:
    # the activations, scores, gradients, weights and combined map each read on their own too
    assert len(reads) == (3 if mode else 7), reads


def test_non_finite_activations_raise_the_layer_error(mode: bool) -> None:
    model = Net().eval()
    model.bad_activation = True
    with pytest.raises(camkit.LayerError, match="'layer' has non-finite activations"):
        camkit.explain(model, X, method="gradcam", layer="layer", target=1)


def test_non_finite_scores_raise_the_target_error(mode: bool) -> None:
    model = Net().eval()
    model.bad_score = True
    with pytest.raises(camkit.TargetError, match="target scores are not finite"):
        camkit.explain(model, X, method="gradcam", layer="layer", target=1)


class NanWeights(camkit.Method):
    name = "nan-weights"
    needs_gradients = False

    def weights(self, ctx: camkit.Context) -> Tensor:
        return ctx.activations.mean((2, 3)) * float("nan")


def test_non_finite_weights_raise_the_plugin_error(mode: bool) -> None:
    with pytest.raises(camkit.PluginError, match="'nan-weights' returned non-finite weights"):
        camkit.explain(Net().eval(), X, method=NanWeights(), layer="layer", target=1)


class Rescoring(camkit.Method):
    """Scores a copy of the input through ``ctx.score`` (which runs the model again)."""

    name = "rescoring"
    needs_gradients = False

    def weights(self, ctx: camkit.Context) -> Tensor:
        ctx.score(ctx.inputs[0], torch.arange(ctx.inputs[0].shape[0]))
        return ctx.activations.mean((2, 3))


def test_queued_checks_fail_before_the_model_runs_again(mode: bool) -> None:
    model = Net().eval()
    model.bad_activation = True
    with pytest.raises(camkit.LayerError, match="non-finite activations"):
        camkit.explain(model, X, method=Rescoring(), layer="layer", target=1)
    assert model.calls == 1  # the explained forward only: ctx.score resolved first


class Failing(camkit.Method):
    """Raises an error of its own, as a method may on the NaN it was handed."""

    name = "failing"
    needs_gradients = False

    def weights(self, ctx: camkit.Context) -> Tensor:
        raise ValueError("the method's own error")


def test_a_queued_failure_comes_before_a_later_error(mode: bool) -> None:
    model = Net().eval()
    model.bad_activation = True
    with pytest.raises(camkit.LayerError, match="non-finite activations") as info:
        camkit.explain(model, X, method=Failing(), layer="layer", target=1)
    if mode:  # the later error is kept as the cause
        assert isinstance(info.value.__cause__, ValueError)


def test_a_later_error_passes_unchanged_when_the_checks_pass(mode: bool) -> None:
    with pytest.raises(ValueError, match="the method's own error"):
        camkit.explain(Net().eval(), X, method=Failing(), layer="layer", target=1)


def test_resolve_reads_every_queued_check_in_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deferred, "DEFER_ON_CPU", True)
    with deferred.deferred_checks():
        for _ in range(5):
            deferred.require_finite(torch.ones(3), lambda: ValueError("never"))
        bad = torch.tensor([1.0, float("inf")])
        deferred.require_finite(bad, lambda: ValueError("the sixth"))
        deferred.require_finite(bad, lambda: ValueError("the seventh"))
        reads = _host_reads(monkeypatch)
        with pytest.raises(ValueError, match="the sixth"):
            deferred.resolve()
        monkeypatch.undo()
    # one read of the six sums, one confirming element-wise read of the failing check
    assert reads == ["tolist", "__bool__"]


def test_an_overflowing_sum_of_finite_values_is_no_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deferred, "DEFER_ON_CPU", True)
    big = torch.full((4,), 6.0e4, dtype=torch.float16)  # finite; the sum overflows float16
    with deferred.deferred_checks():
        deferred.require_finite(big, lambda: ValueError("wrongly failed"))
    assert not bool(torch.isfinite(big.sum()))


def test_an_int_target_adds_no_read(mode: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Net().eval()
    camkit.explain(model, X, method="gradcam", layer="layer", target=2)
    reads = _host_reads(monkeypatch)
    camkit.explain(model, X, method="gradcam", layer="layer", target=2)
    monkeypatch.undo()
    # the int is checked against the logits' width on the host, not on the device
    assert len(reads) == (3 if mode else 7), reads


@pytest.mark.parametrize("target", [[1, 3], torch.tensor([-1, 0])])
def test_an_out_of_range_class_tensor_raises_the_target_error(mode: bool, target: object) -> None:
    model = Net().eval()
    with pytest.raises(camkit.TargetError, match=r"must lie in \[0, 2\]"):
        camkit.explain(model, X, method=Rescoring(), layer="layer", target=target)
    assert model.calls == 1  # resolved before ctx.score ran the model again


def test_a_class_tensor_in_range_gives_the_int_targets_maps(mode: bool) -> None:
    model = Net().eval()
    a = camkit.explain(model, X, method="gradcam", layer="layer", target=torch.tensor([2, 2]))
    b = camkit.explain(model, X, method="gradcam", layer="layer", target=2)
    assert torch.equal(a.maps, b.maps)


def test_an_explainer_follows_a_replaced_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Net().eval()
    ex = camkit.Explainer(model, layer="layer", method="gradcam")
    walks = []
    walk = layers_module.module_names  # as layers.py imported it

    def counted(model: nn.Module) -> dict[nn.Module, str]:
        walks.append(1)
        return walk(model)

    monkeypatch.setattr(layers_module, "module_names", counted)
    first = ex(X, target=1)
    assert walks == []  # the layer resolved when the Explainer was made is reused
    model.layer = nn.Tanh()  # a new module under the same name: found again, and hooked
    second = ex(X, target=1)
    monkeypatch.undo()
    assert len(walks) == 1
    expected = camkit.explain(model, X, method="gradcam", layer="layer", target=1)
    assert torch.equal(second.maps, expected.maps) and not torch.equal(first.maps, second.maps)
