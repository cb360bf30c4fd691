"""Inputs as people have them: inside torch.inference_mode()."""

from __future__ import annotations

import torch

import camkit
from camkit.toy import TinyCNN


def test_inference_mode_is_left_for_the_call_and_restored() -> None:
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    outside = camkit.explain(model, x, target=[1, 3])
    with torch.inference_mode():
        t = x.clone()  # an inference tensor, as Lightning's predict loop hands over
        assert t.is_inference()
        inside = camkit.explain(model, t, target=[1, 3])
        assert torch.is_inference_mode_enabled()  # the caller's mode is back
        gb = camkit.guided_backprop(model, t, target=[1, 3])
    torch.testing.assert_close(inside.maps, outside.maps, rtol=0, atol=0)
    torch.testing.assert_close(inside.scores, outside.scores, rtol=0, atol=0)
    torch.testing.assert_close(gb, camkit.guided_backprop(model, x, target=[1, 3]))
    assert all(p.grad is None for p in model.parameters())


def test_inference_mode_with_layer_none_and_inference_kwargs() -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyCNN().eval()

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x) * scale
            return out

    model = Scaled()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        scale = torch.tensor([[2.0], [3.0]])
        res = camkit.explain(model, x, model_kwargs={"scale": scale}, method="hirescam")
    assert res.layer == "net.features"
    ref = camkit.explain(model, x, model_kwargs={"scale": scale.clone()}, method="hirescam")
    torch.testing.assert_close(res.maps, ref.maps, rtol=0, atol=0)
