"""The generator-free module walks give what ``nn.Module.named_modules`` gives."""

from __future__ import annotations

import pytest
from torch import nn

from camkit.walk import any_training, module_names

tv = pytest.importorskip("torchvision.models")


def _reference(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(mod, name)
    return names


class Shared(nn.Module):
    """A module registered twice (under ``a`` and ``c.1``), a ``None`` child, nesting."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = None
        self.c = nn.Sequential(nn.ReLU(), self.a, nn.Sequential(nn.Tanh()))


@pytest.mark.parametrize(
    "build", [Shared, tv.resnet18, tv.vit_b_16, tv.mobilenet_v3_small], ids=lambda f: f.__name__
)
def test_module_names_are_the_first_names_of_named_modules(build: type[nn.Module]) -> None:
    model = build()
    got = module_names(model)
    assert got == _reference(model)
    assert list(got.values()) == list(_reference(model).values())  # in the same order


def test_a_shared_module_keeps_its_first_name() -> None:
    model = Shared()
    assert module_names(model)[model.a] == "a"
    assert module_names(model)[model.c[2][0]] == "c.2.0"


def test_any_training_finds_a_nested_module_in_training_mode() -> None:
    model = tv.resnet18().eval()
    assert not any_training(model)
    model.layer3[1].bn2.train()
    assert any_training(model)
    model.eval()
    model.train()
    assert any_training(model)
