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
        # 12 channels on the 16 x 16 fused map: 16 would fit both layouts, and the bare
        # activation there does not tell which
        decoder_hidden_size=12,
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


# -- mapping inputs: x as the model's keyword arguments ----------------------------------------


class Masked(torch.nn.Module):
    """``forward(images, mask, scale)``: a mask ``(N, H, W)`` follows the image's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN().eval()

    def forward(self, images: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        out: torch.Tensor = self.net(images * mask[:, None]) * scale
        return out


def test_a_mapping_input_equals_the_positional_call() -> None:
    model = Masked()
    x = torch.randn(3, 3, 16, 16)
    mask = (torch.rand(3, 16, 16) > 0.3).float()
    for method in ("gradcam", "scorecam"):  # scorecam re-scores masked copies of the rows
        ref = camkit.explain(model, (x, mask), method=method, model_kwargs={"scale": 2.0})
        got = camkit.explain(model, {"images": x, "mask": mask, "scale": 2.0}, method=method)
        assert got.layer == ref.layer == "net.features"
        torch.testing.assert_close(got.maps, ref.maps, rtol=0, atol=0)
        torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=0)


def test_image_key_names_the_image_and_errors_say_what_to_do() -> None:
    model = Masked()
    x, mask = torch.randn(2, 3, 16, 16), torch.ones(2, 16, 16)
    res = camkit.explain(model, {"images": x, "mask": mask}, image_key="images")
    assert res.maps.shape == (2, 16, 16)
    with pytest.raises(camkit.InputError, match=r"none of which is an image key .*image_key="):
        camkit.explain(model, {"img": x, "mask": mask})
    with pytest.raises(camkit.InputError, match="image_key='pixels' is not a key of x"):
        camkit.explain(model, {"images": x, "mask": mask}, image_key="pixels")
    with pytest.raises(camkit.OptionError, match="image_key"):
        camkit.explain(model, {"images": x, "mask": mask}, image_key=3)


def test_hugging_face_processor_output_is_explained_as_is() -> None:
    transformers = pytest.importorskip("transformers")
    import numpy as np

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        num_labels=5,
    )
    model = transformers.ViTForImageClassification(config).eval()
    processor = transformers.ViTImageProcessor(size={"height": 64, "width": 64})
    images = [
        np.random.default_rng(i).integers(0, 255, (80, 96, 3), dtype=np.uint8) for i in range(2)
    ]
    batch = processor(images=images, return_tensors="pt")  # a BatchFeature: pixel_values
    res = camkit.explain(model, batch)
    ref = camkit.explain(model, batch["pixel_values"])
    assert res.layer == "vit.layers.1.layernorm_before"
    torch.testing.assert_close(res.maps, ref.maps, rtol=0, atol=0)


def test_clip_model_with_a_similarity_target() -> None:
    transformers = pytest.importorskip("transformers")
    from camkit.targets import SimilarityTarget

    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8
    )
    model = transformers.CLIPModel(config).eval()
    ids = torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0], [1, 3, 4, 2]])  # three texts
    x = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids}
    with torch.no_grad():
        out = model(**x)
    reference = out.text_embeds[1]  # the second text's embedding
    target = SimilarityTarget(reference)
    res = camkit.explain(model, x, target=target, output="image_embeds")
    assert res.layer == "vision_model.encoder.layers.1.layer_norm1"
    assert res.maps.shape == (2, 32, 32) and bool(res.maps.any())
    want = torch.nn.functional.cosine_similarity(out.image_embeds, reference[None], dim=1)
    torch.testing.assert_close(res.scores, want)
    # a method scoring masked copies: the texts stay as they are, the images get the copies
    scored = camkit.explain(model, x, method="scorecam", target=target, output="image_embeds")
    assert scored.maps.shape == (2, 32, 32) and torch.isfinite(scored.maps).all()


# -- inputs without a channel axis: (N, L) signals, spatial_dims ------------------------------


class PitchNet(torch.nn.Module):
    """A pitch-estimation-style CNN on raw signals ``(N, L)``: unsqueezed to ``(N, 1, L, 1)``,
    2D convolutions with ``(k, 1)`` kernels, a classifier over the flattened features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(1, 4, (8, 1), stride=(4, 1), padding=(2, 0))
        self.conv2 = torch.nn.Conv2d(4, 6, (4, 1), stride=(2, 1), padding=(1, 0))
        self.fc = torch.nn.Linear(6 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x[:, None, :, None]))  # (N, 4, 16, 1)
        h = torch.relu(self.conv2(h))  # (N, 6, 8, 1)
        out: torch.Tensor = self.fc(h.flatten(1))
        return out


def test_signals_without_a_channel_axis_get_maps_at_the_input_size() -> None:
    model = PitchNet().eval()
    x = torch.randn(3, 64)
    res = camkit.explain(model, x, target=[0, 1, 2])
    assert res.layer == "conv2"  # (N, 6, 8, 1): the last layer the scores depend on
    assert res.raw.shape == (3, 8, 1) and res.maps.shape == (3, 64)
    # the map is the layer's (8,) map upsampled linearly to the signal's 64 samples
    flat = res.raw[:, :, 0]
    want = torch.nn.functional.interpolate(flat[:, None], size=64, mode="linear")[:, 0]
    lo, hi = want.amin(1, keepdim=True), want.amax(1, keepdim=True)
    torch.testing.assert_close(res.maps, (want - lo) / (hi - lo))


def test_spatial_dims_names_the_spatial_axes_and_a_mismatch_warns() -> None:
    from camkit.inputs import input_spatial

    assert input_spatial(torch.zeros(2, 64)) == (64,)
    assert input_spatial(torch.zeros(2, 3, 8, 8)) == (8, 8)
    assert input_spatial(torch.zeros(2, 16, 16), spatial_dims=2) == (16, 16)

    class Gray(torch.nn.Module):  # (N, H, W) grayscale, no channel axis
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyCNN(in_channels=1).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x[:, None])
            return out

    x = torch.randn(2, 16, 16)
    res = camkit.explain(Gray(), x, layer="net.features", spatial_dims=2)
    assert res.maps.shape == (2, 16, 16) and res.raw.shape == (2, 8, 8)
    # read by the default rule, (N, 16, 16) is 16 channels over 16 samples: the (8, 8) map of
    # the layer cannot be brought to it, and the call says so
    with pytest.warns(camkit.CamkitWarning, match=r"stays at the layer's size.*spatial_dims"):
        res = camkit.explain(Gray(), x, layer="net.features")
    assert res.maps.shape == (2, 8, 8)
    with pytest.raises(camkit.InputError, match="spatial_dims=3 for an input of shape"):
        camkit.explain(Gray(), x, layer="net.features", spatial_dims=3)
    with pytest.raises(camkit.OptionError, match="spatial_dims"):
        camkit.explain(Gray(), x, spatial_dims=0)


def test_layers_lists_the_modules_of_a_mapping_input() -> None:
    model = Masked()
    x = {"images": torch.randn(2, 3, 16, 16), "mask": torch.ones(2, 16, 16)}
    infos = {i.name: i for i in camkit.layers(model, x)}
    assert infos["net.features"].shape == (2, 16, 8, 8) and infos["net.features"].candidate
