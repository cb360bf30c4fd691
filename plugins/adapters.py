"""Architecture adapters: the layer to explain for torchvision's classifier families.

Used when ``layer=None``. Each family's choice is the usual one for CAMs: the last feature map
the classifier pools, at the highest resolution that still sees the whole network's features.

- ResNet, ResNeXt, Wide ResNet: ``layer4``; VGG: the last ReLU of ``features`` (before the last
  max-pool, twice the resolution of ``features``' output); DenseNet, MobileNet v2/v3,
  EfficientNet v1/v2, ConvNeXt, SqueezeNet, AlexNet: ``features``; RegNet: ``trunk_output``;
  MNASNet: ``layers``; ShuffleNet v2: ``conv5``; GoogLeNet: ``inception5b``; Inception v3:
  ``Mixed_7c``.
- Vision transformers (ViT): the class score reads the class token after the last block, and
  the patch tokens reach it only through the last block's attention, so the layer is the norm
  before that attention (``encoder.layers.<last>.ln_1``); its tokens are laid on the patch
  grid. Swin (v1, v2), which averages its tokens: the last stage's output (``features``, channels
  last).

- Segmentation (FCN, DeepLabV3) with a ResNet backbone: ``backbone.layer4``; detection (Faster,
  Mask and Keypoint R-CNN, RetinaNet, FCOS) with a ResNet body: ``backbone.body.layer4``.

Other models get ``None``: camkit then searches them (see ``camkit.layers``).
"""

from __future__ import annotations

from torch import nn

import camkit

_BY_CLASS = {
    "ResNet": "layer4",
    "DenseNet": "features",
    "MobileNetV2": "features",
    "MobileNetV3": "features",
    "EfficientNet": "features",
    "ConvNeXt": "features",
    "SqueezeNet": "features",
    "AlexNet": "features",
    "RegNet": "trunk_output",
    "MNASNet": "layers",
    "ShuffleNetV2": "conv5",
    "GoogLeNet": "inception5b",
    "Inception3": "Mixed_7c",
    "SwinTransformer": "features",
}


def _last_relu(features: nn.Module) -> str | None:
    names = [n for n, m in features.named_children() if isinstance(m, nn.ReLU)]
    return f"features.{names[-1]}" if names else None


def _segmentation_layer(model: nn.Module) -> str | None:
    backbone = getattr(model, "backbone", None)
    return "backbone.layer4" if backbone is not None and hasattr(backbone, "layer4") else None


def torchvision_layer(model: nn.Module) -> str | None:
    """The layer for a torchvision classifier, or ``None`` for other models."""
    cls = type(model)
    if not cls.__module__.startswith("torchvision.models"):
        return None
    name = cls.__name__
    if name == "VGG":
        return _last_relu(model.features)  # type: ignore[arg-type]
    if name in ("FCN", "DeepLabV3"):
        return _segmentation_layer(model)
    if name in ("FasterRCNN", "MaskRCNN", "KeypointRCNN", "RetinaNet", "FCOS"):
        body = getattr(getattr(model, "backbone", None), "body", None)
        return "backbone.body.layer4" if body is not None and hasattr(body, "layer4") else None
    if name == "VisionTransformer":
        blocks = list(model.encoder.layers.named_children())  # type: ignore[union-attr]
        return f"encoder.layers.{blocks[-1][0]}.ln_1" if blocks else None
    return _BY_CLASS.get(name)


@camkit.hookimpl
def default_layers(model: nn.Module) -> str | None:
    return torchvision_layer(model)
