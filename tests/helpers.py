"""Tiny models with known weights and a snapshot of model state, shared by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

torch.set_num_threads(2)


class Fixed(nn.Module):
    """Ignores its input's values and returns a fixed activation batch (known A), channels
    first ``(N, C, *S)``: it ends in an adaptive average pool to its own spatial size (each
    output the mean of one value: A exactly), which tells camkit the layout where the shape
    fits both channels first and last (``(N, 2, 2, 2)`` for a 2 x 2 input)."""

    def __init__(self, activations: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", activations)
        pools = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
        rank = activations.ndim - 2
        self.keep = pools[rank](tuple(activations.shape[2:])) if rank in pools else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.keep(self.a[: x.shape[0]]) + 0 * x.sum()
        return out


class FlattenHead(nn.Module):
    """layer -> flatten -> linear: the gradient at each position is the linear weight there."""

    def __init__(self, activations: Tensor, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.layer = Fixed(activations)
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layer(x).flatten(1))


class MaxPoolHead(nn.Module):
    """layer -> global max-pool -> linear: the gradient sits at each channel's argmax."""

    def __init__(self, activations: Tensor, weight: Tensor) -> None:
        super().__init__()
        self.layer = Fixed(activations)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layer(x)).flatten(1))


class ResidualNet(nn.Module):
    """conv -> bn -> (+= shortcut, in place) -> ReLU(inplace) -> pool -> fc; BN has statistics.

    ``width`` channels (8 x 8 inputs): with 8, the bare ReLU's output ``(N, 8, 8, 8)`` fits both
    channels first and last and is refused; explain ``relu`` with another width."""

    def __init__(self, inplace: bool = True, seed: int = 0, width: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inplace = inplace
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=inplace)
        self.head = nn.Conv2d(width, 4, 1)
        self.fc = nn.Linear(4 * 16, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.bn.running_mean.copy_(torch.randn(width, generator=g) * 0.1)
            self.bn.running_var.copy_(torch.rand(width, generator=g) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.stem(x))
        out = self.bn(self.conv(s))
        if self.inplace:
            out += s
        else:
            out = out + s
        out = self.relu(out)
        out = nn.functional.max_pool2d(torch.relu(self.head(out)), 2)
        return self.fc(out.flatten(1))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an explain call must leave as it found it."""
    return {
        "hooks": [
            (
                name,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for name, m in model.named_modules()
        ],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for a, b in zip(after["grads"], before["grads"], strict=True):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    for a, b in zip(after["params"], before["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(after["buffers"], before["buffers"], strict=True):
        assert torch.equal(a, b)
    assert after["grad_mode"] == before["grad_mode"]


def hook_count(model: nn.Module) -> int:
    """Hooks of every kind on every module of ``model``."""
    return sum(sum(counts) for _, *counts in snapshot(model)["hooks"])


class GapHead(nn.Module):
    """layer -> global average pool -> linear, the head CAM needs; ``decoy`` is a second
    ``nn.Linear`` with the same input size, registered first, that is not the classifier."""

    def __init__(self, activations: Tensor, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.layer = Fixed(activations)
        self.decoy = nn.Linear(weight.shape[1], weight.shape[0])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.decoy.weight.copy_(weight + 1)
            self.decoy.bias.copy_(bias)
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layer(x)).flatten(1))


class SquareHead(nn.Module):
    """layer (the input itself) -> square -> flatten -> linear.

    The score is ``sum W[c] * A**2``, so the gradient ``2 W[c] * A`` follows the input: noisy
    copies of a sample get different gradients (Smooth Grad-CAM++), and every row is computed on
    its own, so batches of copies give bit-identical gradients. The layer is a 1 x 1 average
    pool, the identity on ``(N, C, H, W)`` that tells camkit the layout is channels first
    (inputs ``(N, 2, 2, 2)`` fit both).
    """

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.layer = nn.AvgPool2d(1)
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: Tensor) -> Tensor:
        a = self.layer(x)
        return self.fc((a * a).flatten(1))


class Scale(nn.Module):
    """Multiplies its input by a constant."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


class TwoLayerHead(nn.Module):
    """shallow (known A) -> deep (2 A) -> flatten -> linear: two layers on one path with known
    activations and gradients (``W[c]`` at ``deep``, ``2 W[c]`` at ``shallow``)."""

    def __init__(self, activations: Tensor, weight: Tensor) -> None:
        super().__init__()
        self.shallow = Fixed(activations)
        self.deep = Scale(2.0)
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.deep(self.shallow(x)).flatten(1))


def capture64(model: nn.Module, layer: str, x: Tensor, targets: list[int]) -> tuple[Tensor, Tensor]:
    """Float64 activations and gradients ``(N, C, *S)`` of ``y[n, targets[n]]`` at ``layer``,
    through a float64 copy of ``model`` with the full graph (``retain_grad`` and ``backward``):
    the reference path, independent of camkit's capture."""
    import copy

    model64 = copy.deepcopy(model).double()
    module = dict(model64.named_modules())[layer]
    store: dict[str, Tensor] = {}

    def keep(mod: nn.Module, args: object, out: Tensor) -> None:
        out.retain_grad()
        store["a"] = out

    handle = module.register_forward_hook(keep)
    try:
        y = model64(x.double())
        y[torch.arange(len(targets)), torch.tensor(targets)].sum().backward()
    finally:
        handle.remove()
    grad = store["a"].grad
    assert grad is not None
    return store["a"].detach(), grad


class SmallNet(nn.Module):
    """A small random-init CNN: ``block1`` (32 x 8 x 8 for 16 x 16 inputs), ``block2`` (the
    same size, two convolutions later) and ``block3`` (32 x 4 x 4) end in ReLUs; global average
    pooling and a 10-class linear head follow. Gradients at ``block1`` and ``block2`` vary in
    space and take both signs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.block1 = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU()
        )
        self.block2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            for p in self.parameters():  # He-scaled weights: logits of order 1, softmax not flat
                scale = (2 / p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1
                p.copy_(torch.randn(p.shape, generator=g) * scale)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.pool(self.block3(self.block2(self.block1(x)))).flatten(1))
        return out


def small_net(seed: int = 0) -> tuple[nn.Module, Tensor]:
    """:class:`SmallNet` in eval mode and a ``(2, 3, 16, 16)`` batch."""
    g = torch.Generator().manual_seed(seed)
    return SmallNet(seed).eval(), torch.randn(2, 3, 16, 16, generator=g)


def correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two maps, flattened, in float64."""
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` as a module named ``name`` (loaded once), e.g. a model sweep."""
    if name in sys.modules:
        return sys.modules[name]
    script = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
