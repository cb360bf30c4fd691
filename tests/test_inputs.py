"""Inputs as people have them: inside torch.inference_mode(), segmentation masks at the
input's size."""

from __future__ import annotations

import pytest
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


# -- SegmentationTarget: a mask at the input's size, logits at a quarter of it -----------------


def test_segmentation_mask_at_input_size_is_area_averaged_onto_the_output() -> None:
    from camkit.targets import SegmentationTarget

    logits = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    mask = torch.zeros(16, 16)
    mask[:4, :4] = 1  # exactly output cell (0, 0)
    mask[4:6, 4:8] = 1  # half of output cell (1, 1)
    target = SegmentationTarget(2, mask)
    scores = target.scores(logits, torch.arange(2))
    assert target.resized == ((16, 16), (4, 4))
    want = logits[:, 2, 0, 0] + 0.5 * logits[:, 2, 1, 1]
    torch.testing.assert_close(scores, want)
    same = SegmentationTarget(
        2, torch.zeros(4, 4).index_put_((torch.tensor([0]),) * 2, torch.tensor(1.0))
    )
    torch.testing.assert_close(same.scores(logits, torch.arange(2)), logits[:, 2, 0, 0])
    assert same.resized is None
    with pytest.raises(
        camkit.TargetError, match=r"mask \(16, 8\) does not fit the output's \(4, 4\)"
    ):
        SegmentationTarget(2, torch.ones(16, 8)).scores(logits, torch.arange(2))


def test_segformer_explained_for_a_mask_at_the_input_size() -> None:
    transformers = pytest.importorskip("transformers")
    from camkit.targets import SegmentationTarget

    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
        num_labels=3,
    )
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(pixel_values=x).logits  # (2, 3, 16, 16): a quarter of the input
    assert logits.shape == (2, 3, 16, 16)
    mask = torch.zeros(64, 64)
    mask[8:40, 16:48] = 1
    target = SegmentationTarget(1, mask)
    res = camkit.explain(model, x, target=target)
    assert target.resized == ((64, 64), (16, 16))
    assert res.layer == "decode_head.activation" and res.maps.shape == (2, 64, 64)
    torch.testing.assert_close(res.scores, logits[:, 1, 2:10, 4:12].sum((1, 2)))
