"""The ctx capabilities methods build on: score, run_suffix, recapture."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from helpers import ResidualNet, assert_unchanged, hook_count, snapshot

import camkit


class Probe(camkit.Method):
    """Records what the capabilities return, and weighs every channel 1."""

    name = "probe"
    citation = "test"
    cost = "test"
    seen: ClassVar[dict[str, Any]] = {}

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        n = ctx.activations.shape[0]
        rows = torch.arange(n)
        twice = rows.repeat_interleave(2)
        seen = type(self).seen
        seen["ctx"] = ctx
        seen["score"] = ctx.score(ctx.inputs[0], rows)
        seen["score_copies"] = ctx.score(ctx.inputs[0][twice], twice)
        seen["suffix_same"] = ctx.run_suffix(ctx.activations, rows)
        seen["suffix_zero"] = ctx.run_suffix(torch.zeros_like(ctx.activations[twice]), twice)
        seen["recapture"] = ctx.recapture(ctx.inputs[0][twice], twice)
        return ctx.activations.new_ones(ctx.activations.shape[:2])


@pytest.mark.parametrize("batch_size", [64, 1])
def test_capabilities(batch_size: int) -> None:
    model = ResidualNet().eval()
    x = torch.randn(3, 3, 8, 8)
    before = snapshot(model)
    res = camkit.explain(
        model, x, method=Probe(), layer="bn", target=[0, 1, 2], batch_size=batch_size
    )
    seen = Probe.seen
    ctx = seen["ctx"]
    assert ctx.options["batch_size"] == batch_size and ctx.layer == "bn"
    torch.testing.assert_close(seen["score"], res.scores)
    torch.testing.assert_close(seen["score_copies"], res.scores.repeat_interleave(2))
    torch.testing.assert_close(seen["suffix_same"], res.scores)

    # zeroing the layer's output: the residual shortcut still carries the sample's prefix
    class Zeroed(ResidualNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = torch.relu(self.stem(x))
            out = torch.relu(torch.zeros_like(s) + s)
            out = torch.nn.functional.max_pool2d(torch.relu(self.head(out)), 2)
            return self.fc(out.flatten(1))

    zeroed = Zeroed().eval()
    with torch.no_grad():
        expected = zeroed(x)[torch.arange(3), torch.tensor([0, 1, 2])]
    torch.testing.assert_close(seen["suffix_zero"], expected.repeat_interleave(2))

    acts, grads = seen["recapture"]
    torch.testing.assert_close(acts, ctx.activations.repeat_interleave(2, dim=0))
    torch.testing.assert_close(grads, ctx.gradients.repeat_interleave(2, dim=0))
    assert_unchanged(before, model)
    assert hook_count(model) == 0


def test_index_shape_mismatch_is_reported() -> None:
    class Wrong(Probe):
        name = "wrong"

        def weights(self, ctx: camkit.Context) -> torch.Tensor:
            ctx.score(ctx.inputs[0], torch.arange(5))
            raise AssertionError("unreachable")

    with pytest.raises(camkit.PluginError, match=r"ctx.score got 2 input rows.*\(5,\)"):
        camkit.explain(ResidualNet().eval(), torch.randn(2, 3, 8, 8), method=Wrong(), layer="bn")


def test_run_suffix_refuses_reshaped_activations() -> None:
    class Suffix(Probe):
        name = "suffix"

        def weights(self, ctx: camkit.Context) -> torch.Tensor:
            ctx.run_suffix(ctx.activations, torch.arange(ctx.activations.shape[0]))
            raise AssertionError("unreachable")

    with pytest.raises(camkit.OptionError, match=r"run_suffix.*reshape"):
        camkit.explain(
            ResidualNet().eval(),
            torch.randn(1, 3, 8, 8),
            method=Suffix(),
            layer="bn",
            reshape=lambda t: t,
        )
