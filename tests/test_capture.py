"""The capture leaves the model exactly as it was, isolates threads, and starts the graph late."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from helpers import ResidualNet, assert_unchanged, hook_count, snapshot
from torch import nn

import camkit
from camkit.capture import Capture
from camkit.layers import resolve_layers
from camkit.toy import TinyCNN


def test_model_state_unchanged_eval_and_train() -> None:
    x = torch.randn(2, 3, 8, 8)
    for train in (False, True):
        model = ResidualNet(seed=1)
        model.train(train)
        model.stem.weight.requires_grad_(False)  # a mix of flags must survive
        before = snapshot(model)
        for grad_mode in (True, False):
            with torch.set_grad_enabled(grad_mode):
                camkit.explain(model, x, layer="bn", target=1)
                assert torch.is_grad_enabled() is grad_mode
        assert_unchanged(before, model)
        assert hook_count(model) == 0
        assert all(p.grad is None for p in model.parameters())


def test_existing_grads_and_user_hooks_are_kept() -> None:
    model = ResidualNet().eval()
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    seen: list[int] = []
    model.conv.register_forward_hook(lambda m, a, o: seen.append(1))
    before = snapshot(model)
    camkit.explain(model, torch.randn(2, 3, 8, 8), layer="conv")
    assert_unchanged(before, model)
    assert seen == [1]  # the user's hook still ran, once


def test_no_grad_gives_the_same_maps() -> None:
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = camkit.explain(model, x, layer="bn", target=[0, 2])
    with torch.no_grad():
        res = camkit.explain(model, x, layer="bn", target=[0, 2])
        assert not torch.is_grad_enabled()
    assert torch.equal(res.maps, ref.maps)


def test_graph_starts_at_the_target_layer() -> None:
    model = ResidualNet().eval()
    seen: dict[str, bool] = {}
    for name in ("stem", "conv", "head"):
        getattr(model, name).register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__(name, o.requires_grad)
        )
    with torch.enable_grad():
        camkit.explain(model, torch.randn(1, 3, 8, 8), layer="conv")
    # before the layer: no graph even though the caller had grad mode on
    assert seen == {"stem": False, "conv": False, "head": True}


def test_forward_error_propagates_and_model_is_clean() -> None:
    class BoomError(RuntimeError):
        pass

    class Failing(ResidualNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn(self.conv(torch.relu(self.stem(x))))
            raise BoomError(f"failed after the layer, {tuple(out.shape)}")

    model = Failing().eval()
    before = snapshot(model)
    with pytest.raises(BoomError, match="failed after the layer"):
        camkit.explain(model, torch.randn(1, 3, 8, 8), layer="bn")
    assert_unchanged(before, model)
    assert hook_count(model) == 0


def test_inplace_after_layer_does_not_change_captured_activation() -> None:
    model = ResidualNet(inplace=True).eval()
    x = torch.randn(2, 3, 8, 8)
    with Capture(resolve_layers(model, "bn"), needs_gradients=False) as cap:
        model(x)
    ref = model.bn(model.conv(torch.relu(model.stem(x))))
    torch.testing.assert_close(cap.activations["bn"], ref.detach())
    assert hook_count(model) == 0


def test_two_threads_get_their_own_maps() -> None:
    model = TinyCNN(seed=3).eval()
    xs = [torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    targets = [[0, 1, 2, 3], [4, 3, 2, 1]]
    alone = [
        camkit.explain(model, x, layer="features.2", target=t)
        for x, t in zip(xs, targets, strict=True)
    ]
    barrier = threading.Barrier(2)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            ex = camkit.Explainer(model, layer="features.2")
            barrier.wait()
            for _ in range(25):
                results[i].append(ex(xs[i], target=targets[i]).maps)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in (0, 1):
        assert len(results[i]) == 25
        for maps in results[i]:
            torch.testing.assert_close(maps, alone[i].maps, rtol=1e-5, atol=1e-6)
    assert hook_count(model) == 0


def test_other_threads_forwards_are_untouched_during_a_capture() -> None:
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    inside = threading.Event()
    done = threading.Event()
    outputs: list[torch.Tensor] = []

    def other() -> None:
        inside.wait()
        with torch.enable_grad():
            outputs.append(model(x))
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with Capture(resolve_layers(model, "bn"), needs_gradients=True) as cap:
        inside.set()
        done.wait(timeout=30)
        assert cap.activations == {}  # the other thread's forward was not recorded
    t.join()
    torch.testing.assert_close(outputs[0], expected)
    assert outputs[0].requires_grad  # the other thread kept its own grad mode


def test_two_hundred_calls_leave_nothing_behind() -> None:
    model = ResidualNet().eval()
    ref = weakref.ref(model)
    x = torch.randn(2, 3, 8, 8)
    ex = camkit.Explainer(model, layer="bn")
    results = [ex(x) for _ in range(100)]
    results += [camkit.explain(model, x, layer="bn") for _ in range(100)]
    assert hook_count(model) == 0
    ex.close()
    del model, ex
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())
    assert len(results) == 200


def test_explainer_context_manager_drops_the_model() -> None:
    model = ResidualNet().eval()
    with camkit.Explainer(model, layer="bn") as ex:
        ex(torch.randn(1, 3, 8, 8))
    assert ex.model is None
    with pytest.raises(camkit.InputError, match="closed"):
        ex(torch.randn(1, 3, 8, 8))


def test_train_mode_batchnorm_buffers_restored() -> None:
    model = ResidualNet().train()
    before = [b.clone() for b in model.buffers()]
    camkit.explain(model, torch.randn(4, 3, 8, 8), layer="conv")
    for a, b in zip(model.buffers(), before, strict=True):
        assert torch.equal(a, b)
    assert model.training


def test_shared_module_is_an_error() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.conv(self.act(x))).mean((2, 3)))

    model = Shared().eval()
    before = snapshot(model)
    with pytest.raises(camkit.LayerError, match="more than once"):
        camkit.explain(model, torch.randn(1, 3, 8, 8), layer="act")
    assert_unchanged(before, model)
