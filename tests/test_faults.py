"""Fault injection: an exception at each stage of a call, for every built-in method.

Whatever fails, and wherever, the caller gets the very exception that was raised, and the model
is left exactly as it was: no hook on any module (nor a global one), no attribute patched onto a
module, parameters, buffers, ``requires_grad``, ``.grad``, ``training`` and grad mode unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

import camkit
import camkit.cam

tv = pytest.importorskip("torchvision.models")

#: every method; LeGrad, which explains vision transformers only (the attention maps of their
#: blocks), on FaultViT, the others on FaultNet (a CNN)
METHODS = camkit.list_methods()
VIT_METHODS = {"legrad"}
#: methods that differentiate: LeGrad takes its own gradients, per block
GRADIENT_METHODS = [
    m for m in METHODS if camkit.default_registry().get(m).needs_gradients or m in VIT_METHODS
]
#: methods that run the model again after the explained forward (masked, noisy or ablated
#: copies, LeGrad's recording forward); every method does under ``aug_smooth``
LOOP_METHODS = ["ablationcam", "iscam", "legrad", "scorecam", "smoothgradcampp", "sscam"]
OPTIONS: dict[str, dict[str, Any]] = {"sscam": {"n_samples": 2}, "iscam": {"n_samples": 2}}
OPTIONS["smoothgradcampp"] = {"n_samples": 2}
OPTIONS["occlusion"] = {"patch": 4, "stride": 4}  # the inputs are 8 x 8
#: the layer each method explains: FullGrad needs a module with a bias; LeGrad a block's tokens
LAYER = {"fullgrad": "layer.0", "legrad": "encoder.layers.encoder_layer_1"}
#: methods that take no callable target (they build their own from the class)
NO_CALLABLE_TARGET = {"finercam"}

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class InjectedError(Exception):
    """The fault: an exception type no code path of camkit can mistake for its own."""


class Fault(nn.Module):
    """Identity that raises :class:`InjectedError` from its ``fail_from``-th call on (1-based);
    its backward raises when ``in_backward`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_from = 0  # 0: never
        self.in_backward = False
        self.calls = 0
        self.raised: list[BaseException] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.fail_from and self.calls >= self.fail_from:
            self.raise_()
        if self.in_backward:
            out: Tensor = _FailingBackward.apply(x, self)
            return out
        return x

    def raise_(self) -> None:
        exc = InjectedError(f"injected fault, call {self.calls}")
        self.raised.append(exc)
        raise exc


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, fault: Fault) -> Tensor:
        ctx.fault = fault
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.fault.raise_()
        raise AssertionError("unreachable")


class FaultNet(nn.Module):
    """stem -> before (fault) -> layer (conv, batch norm, ReLU) -> after (fault) -> GAP -> fc."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.before = Fault()
        self.layer = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.after = Fault()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.layer[1].running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        # state a call must keep: a frozen parameter and an accumulated gradient
        self.stem.bias.requires_grad_(False)
        self.fc.weight.grad = torch.full_like(self.fc.weight, 0.25)

    def forward(self, x: Tensor) -> Tensor:
        a = self.after(self.layer(self.before(torch.relu(self.stem(x)))))
        out: Tensor = self.fc(self.pool(a).flatten(1))
        return out


class FaultViT(tv.VisionTransformer):  # type: ignore[misc]
    """torchvision's ViT (2 blocks, 8 x 8 inputs in 2 x 2 patches): ``before`` after the patch
    projection, ``after`` first in the head, the same faults as :class:`FaultNet`'s."""

    def __init__(self) -> None:
        super().__init__(
            image_size=8, patch_size=2, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
            num_classes=5,
        )  # fmt: skip
        self.conv_proj = nn.Sequential(self.conv_proj, Fault())
        self.heads = nn.Sequential(Fault(), nn.Linear(8, 5))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # torchvision's head starts at zero: every score would be 0
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        # state a call must keep: a frozen parameter and an accumulated gradient
        self.conv_proj[0].bias.requires_grad_(False)
        self.heads[1].weight.grad = torch.full_like(self.heads[1].weight, 0.25)

    @property
    def before(self) -> Fault:
        fault: Fault = self.conv_proj[1]
        return fault

    @property
    def after(self) -> Fault:
        fault: Fault = self.heads[0]
        return fault


def _global_hooks() -> tuple[int, ...]:
    return tuple(
        len(getattr(torch_module, name, {}))
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


def _explain(model: nn.Module, method: str, **options: Any) -> None:
    opts = {**OPTIONS.get(method, {}), "layer": LAYER.get(method, "layer"), **options}
    camkit.explain(model, X, method=method, **opts)


def _expect_fault(model: FaultNet, run: Any, raised: list[BaseException]) -> None:
    """``run()`` raises the injected exception itself; the model is as it was."""
    before = snapshot(model)
    hooks = _global_hooks()
    with pytest.raises(InjectedError) as info:
        run()
    assert raised, "the fault was never reached"
    assert info.value is raised[0], "the first injected exception was not the one re-raised"
    assert_unchanged(before, model)
    assert _global_hooks() == hooks
    for name, mod in model.named_modules():
        assert "forward" not in vars(mod), f"{name or 'the model'} keeps a patched forward"
    # and the model still works as before: the next call succeeds
    model.before.fail_from = model.after.fail_from = 0
    model.before.in_backward = model.after.in_backward = False


@pytest.fixture
def model(request: pytest.FixtureRequest) -> Iterator[FaultNet]:
    """FaultNet, or FaultViT for the methods that explain vision transformers only."""
    method = getattr(request.node, "callspec", None)
    vit = method is not None and method.params.get("method") in VIT_METHODS
    net = FaultViT().eval() if vit else FaultNet().eval()
    yield net


@pytest.mark.parametrize("method", METHODS)
def test_fault_in_layer_search(model: FaultNet, method: str) -> None:
    """The forward that looks for the default layer fails."""
    model.before.fail_from = 1
    _expect_fault(model, lambda: _explain(model, method, layer=None), model.before.raised)


@pytest.mark.parametrize("method", METHODS)
def test_fault_in_forward_before_the_layer(model: FaultNet, method: str) -> None:
    model.before.fail_from = 1
    _expect_fault(model, lambda: _explain(model, method), model.before.raised)


@pytest.mark.parametrize("method", METHODS)
def test_fault_in_forward_after_the_layer(model: FaultNet, method: str) -> None:
    model.after.fail_from = 1
    _expect_fault(model, lambda: _explain(model, method), model.after.raised)


@pytest.mark.parametrize("method", METHODS)
def test_fault_in_target(model: FaultNet, method: str) -> None:
    if method in NO_CALLABLE_TARGET:
        pytest.skip(f"{method} takes no callable target")
    raised: list[BaseException] = []

    def target(output: Tensor, index: Tensor | None = None) -> Tensor:
        exc = InjectedError("injected in the target")
        raised.append(exc)
        raise exc

    _expect_fault(model, lambda: _explain(model, method, target=target), raised)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_fault_in_gradient(model: FaultNet, method: str) -> None:
    model.after.in_backward = True
    _expect_fault(model, lambda: _explain(model, method), model.after.raised)


def _failing(method: str, stage: str, raised: list[BaseException]) -> camkit.Method:
    """The built-in ``method``, failing in its ``stage`` ("weights" or "combine")."""
    base = type(camkit.default_registry().get(method))

    def fail(self: Any, *args: Any) -> Any:
        exc = InjectedError(f"injected in {stage}")
        raised.append(exc)
        raise exc

    if stage == "weights":

        def weights(self: Any, ctx: camkit.Context) -> Any:
            base.weights(self, ctx)  # the method's own work (loops, replays) runs first
            fail(self)

        return type(f"Failing{base.__name__}", (base,), {"weights": weights})()  # type: ignore[no-any-return]
    return type(f"Failing{base.__name__}", (base,), {stage: fail})()  # type: ignore[no-any-return]


@pytest.mark.parametrize("stage", ["weights", "combine"])
@pytest.mark.parametrize("method", METHODS)
def test_fault_in_the_method(model: FaultNet, method: str, stage: str) -> None:
    raised: list[BaseException] = []
    failing = _failing(method, stage, raised)
    opts = {**OPTIONS.get(method, {})}
    _expect_fault(
        model,
        lambda: camkit.explain(model, X, method=failing, layer=LAYER.get(method, "layer"), **opts),
        raised,
    )


@pytest.mark.parametrize("stage", ["normalize", "upsample"])
@pytest.mark.parametrize("method", METHODS)
def test_fault_in_map_maths(
    model: FaultNet, method: str, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    raised: list[BaseException] = []

    def fail(*args: Any, **kwargs: Any) -> Any:
        exc = InjectedError(f"injected in {stage}")
        raised.append(exc)
        raise exc

    # the core calls the map helpers through camkit.cam (plugins hold their own references)
    monkeypatch.setattr(camkit.cam, stage, fail)
    _expect_fault(model, lambda: _explain(model, method), raised)


@pytest.mark.parametrize("method", LOOP_METHODS)
def test_fault_inside_the_perturbation_loop(model: FaultNet, method: str) -> None:
    """The model fails on a masked, noisy or ablated copy, after the explained forward."""
    model.after.fail_from = 2
    _expect_fault(model, lambda: _explain(model, method), model.after.raised)


@pytest.mark.parametrize("method", METHODS)
def test_fault_inside_aug_smooth(model: FaultNet, method: str) -> None:
    """The model fails on an augmented copy."""
    model.after.fail_from = 2
    _expect_fault(model, lambda: _explain(model, method, aug_smooth=True), model.after.raised)


@pytest.mark.parametrize("method", ["gradcam", "ablationcam", "scorecam"])
def test_fault_in_train_mode_keeps_batch_norm_statistics(model: FaultNet, method: str) -> None:
    model.train()
    model.after.fail_from = 1
    _expect_fault(model, lambda: _explain(model, method), model.after.raised)


@pytest.mark.parametrize("vit", [False, True], ids=["cnn", "vit"])
def test_no_fault_leaves_the_model_as_it_was(vit: bool) -> None:
    """The control: every method succeeds on its model, and leaves it as it was."""
    model = FaultViT().eval() if vit else FaultNet().eval()
    before = snapshot(model)
    for method in METHODS:
        if (method in VIT_METHODS) != vit:
            continue
        layer = LAYER.get(method, "layer")
        res = camkit.explain(model, X, method=method, layer=layer, **OPTIONS.get(method, {}))
        assert res.maps.shape == (2, 8, 8) and bool(torch.isfinite(res.maps).all())
        assert float(res.maps.amax()) > 0
    assert_unchanged(before, model)


def test_legrad_runs_the_head_once_per_block_after_recording() -> None:
    """What the next test injects into: the head runs for the explained forward, LeGrad's
    recording forward, then once per block (2 blocks)."""
    model = FaultViT().eval()
    camkit.explain(model, X, method="legrad", layer=LAYER["legrad"])
    assert model.after.calls == 1 + 1 + 2


@pytest.mark.parametrize("call", [2, 3, 4], ids=["recording", "block-0", "block-1"])
def test_fault_inside_legrad_per_block_runs(call: int) -> None:
    """The head fails on LeGrad's recording forward or while a block is run again, with
    LeGrad's own hooks on the blocks and the attention modules (the backward of a block run:
    ``test_fault_in_gradient[legrad]``)."""
    model = FaultViT().eval()
    model.after.fail_from = call
    _expect_fault(model, lambda: _explain(model, "legrad"), model.after.raised)
    assert model.after.calls == call
