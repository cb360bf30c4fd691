"""Architecture adapters: the layer to explain for timm's model families.

Used when ``layer=None``. timm is not imported: a model is recognised by its class's module
(``timm.models.*``) and name. The choice per family, the last feature map the head reads:

- Vision transformers (``VisionTransformer``: ViT, DeiT, DINOv2 with or without registers,
  CLIP and SigLIP towers; ``VisionTransformerDistilled``: distilled DeiT; ``Eva``; ``Beit``):
  with class-token pooling (``global_pool="token"``) the head reads the class (and
  distillation) token after the final norm, which normalises each token on its own; the patch
  tokens reach those tokens only through the last block's attention, so the layer is the norm
  before it, ``blocks.<last>.norm1``. With average or attention pooling (``"avg"``, ``"map"``,
  BEiT's and EVA's default) the patch tokens after the final norm, ``norm``, reach the head.
  The leading class, distillation and register tokens are dropped when laid on the grid.
- Swin v1 and v2: ``norm``, the last stage after the final norm (channels last).
- ConvNeXt: ``stages``; ResNet, ResNeXt and friends: ``layer4``; EfficientNet: ``bn2`` (the
  head convolution, normalised and activated); MobileNetV3, whose head pools before its last
  convolution: ``blocks``; RegNet: ``final_conv``; MaxViT and CoAtNet (``MaxxVit``): ``norm``;
  LeViT (tokens without a class token, averaged by the head): ``stages``.

Other timm models get ``None``: camkit then searches them (see :mod:`camkit.layers`).
"""

from __future__ import annotations

from torch import nn

import camkit

#: the layer per class name, for families whose layer does not depend on the configuration
BY_CLASS = {
    "SwinTransformer": "norm",
    "SwinTransformerV2": "norm",
    "ConvNeXt": "stages",
    "ResNet": "layer4",
    "EfficientNet": "bn2",
    "MobileNetV3": "blocks",
    "RegNet": "final_conv",
    "MaxxVit": "norm",
    "Levit": "stages",
    "LevitDistilled": "stages",
}

#: vision transformers whose layer depends on the pooling
TRANSFORMERS = ("VisionTransformer", "VisionTransformerDistilled", "Eva", "Beit")


def timm_layer(model: nn.Module) -> str | None:
    """The layer for a timm model, or ``None`` for other models and unknown families."""
    cls = type(model)
    if not cls.__module__.startswith("timm.models"):
        return None
    name = cls.__name__
    if name in TRANSFORMERS:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
            return None
        if getattr(model, "global_pool", "token") in ("token", ""):
            last = len(blocks) - 1
            return f"blocks.{last}.norm1" if hasattr(blocks[last], "norm1") else None
        return "norm" if isinstance(getattr(model, "norm", None), nn.Module) else None
    layer = BY_CLASS.get(name)
    return (
        layer if layer is not None and isinstance(getattr(model, layer, None), nn.Module) else None
    )


@camkit.hookimpl
def default_layers(model: nn.Module) -> str | None:
    return timm_layer(model)
