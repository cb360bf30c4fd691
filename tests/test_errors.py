"""The bad-input catalogue: each mistake is a clear CamkitError and leaves the model clean."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_unchanged, hook_count, snapshot
from torch import nn

import camkit
from camkit.toy import TinyCNN


class AuxNet(TinyCNN):
    """TinyCNN with an auxiliary branch the logits do not use."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux(x)
        return super().forward(x)


def x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


CASES: list[tuple[str, type[Exception], str, Callable[[nn.Module], Any]]] = [
    (
        "unknown method",
        camkit.UnknownMethodError,
        "unknown method 'gradcamm'.*'gradcam'",
        lambda m: camkit.explain(m, x(), method="gradcamm"),
    ),
    (
        "unknown option",
        camkit.OptionError,
        "unknown option 'normalise'.*'normalize'.*Valid",
        lambda m: camkit.explain(m, x(), normalise=False),
    ),
    (
        "bad option value",
        camkit.OptionError,
        "'upsample' expects",
        lambda m: camkit.explain(m, x(), upsample="cubic"),
    ),
    (
        "unknown layer",
        camkit.UnknownLayerError,
        "no layer 'feature'.*'features'",
        lambda m: camkit.explain(m, x(), layer="feature"),
    ),
    (
        "layer without spatial output",
        camkit.LayerError,
        r"\(2, 16, 1, 1\).*no spatial extent",
        lambda m: camkit.explain(m, x(), layer="head.0"),
    ),
    (
        "flat layer",
        camkit.LayerError,
        r"\(2, 5\).*no spatial extent",
        lambda m: camkit.explain(m, x(), layer="head.2"),
    ),
    (
        "target length",
        camkit.TargetError,
        "3 entries for a batch of 2",
        lambda m: camkit.explain(m, x(), target=[0, 1, 2]),
    ),
    (
        "target out of range",
        camkit.TargetError,
        r"\[0, 4\].*\[7\]",
        lambda m: camkit.explain(m, x(), target=[1, 7]),
    ),
    (
        "non-tensor input",
        camkit.InputError,
        "expects a tensor.*got ndarray",
        lambda m: camkit.explain(m, np.zeros((2, 3, 8, 8), np.float32)),
    ),
    (
        "list input",
        camkit.InputError,
        "expects a tensor.*got list",
        lambda m: camkit.explain(m, [x()]),
    ),
    (
        "empty batch",
        camkit.InputError,
        "empty batch",
        lambda m: camkit.explain(m, torch.zeros(0, 3, 8, 8)),
    ),
    ("no batch dim", camkit.InputError, "unsqueeze", lambda m: camkit.explain(m, torch.zeros(8))),
    (
        "NaN input",
        camkit.InputError,
        "NaN or infinite",
        lambda m: camkit.explain(m, x().index_fill_(0, torch.tensor([1]), float("nan"))),
    ),
    (
        "infinite input",
        camkit.InputError,
        "NaN or infinite",
        lambda m: camkit.explain(m, x().index_fill_(2, torch.tensor([0]), float("inf"))),
    ),
    (
        "score independent of layer",
        camkit.LayerError,
        "does not depend on layer 'aux'",
        lambda m: camkit.explain(m, x(), layer="aux"),
    ),
    (
        "not a model",
        camkit.InputError,
        "expects a torch.nn.Module.*got OrderedDict",
        lambda m: camkit.explain(m.state_dict(), x()),
    ),  # type: ignore[arg-type]
    (
        "bad target type",
        camkit.TargetError,
        "got str",
        lambda m: camkit.explain(m, x(), target="cat"),
    ),
    (
        "bad output choice",
        camkit.OptionError,
        "output=5",
        lambda m: camkit.explain(m, x(), output=5),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: tuple[str, type[Exception], str, Callable[[nn.Module], Any]]) -> None:
    _, error, message, call = case
    model = AuxNet().eval()
    before = snapshot(model)
    with pytest.raises(error, match=message) as info:
        call(model)
    assert isinstance(info.value, camkit.CamkitError)
    assert_unchanged(before, model)
    assert hook_count(model) == 0


def test_score_independent_of_layer_without_trainable_parameters() -> None:
    model = AuxNet().eval().requires_grad_(False)
    with pytest.raises(camkit.LayerError, match="does not depend on layer"):
        camkit.explain(model, x(), layer="aux")


def test_layer_not_run() -> None:
    model = TinyCNN().eval()
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(camkit.LayerError, match="'unused' did not run"):
        camkit.explain(model, x(), layer="unused")
    assert hook_count(model) == 0


def test_method_returning_bad_weights_is_reported() -> None:
    class Bad(camkit.Method):
        name = "bad"
        needs_gradients = False

        def weights(self, ctx: camkit.Context) -> torch.Tensor:
            return ctx.activations.new_ones(3)

    with pytest.raises(camkit.PluginError, match=r"'bad' returned weights of shape \(3,\)"):
        camkit.explain(TinyCNN(), x(), method=Bad())


def test_inference_tensor_input_is_accepted_outside_inference_mode() -> None:
    with torch.inference_mode():
        t = torch.randn(1, 3, 8, 8)
    res = camkit.explain(TinyCNN().eval(), t, target=0)
    ref = camkit.explain(TinyCNN().eval(), t.clone(), target=0)
    assert torch.equal(res.maps, ref.maps)
