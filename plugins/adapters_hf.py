"""Architecture adapters: the layer to explain for Hugging Face transformers' vision families.

Used when ``layer=None``. transformers is not imported: a model is recognised by its class's
module (``transformers.models.*``) and its ``config.model_type``; layers are found by name
pattern, so that renamed containers across transformers versions (``encoder.layer`` or
``layers``) do not matter. The choice per family, the last feature map the output reads:

- ViT, DeiT (with or without teacher), CLIP (``CLIPModel``, ``CLIPVisionModel``, with
  projection): the output reads the class (and distillation) token after the final norm, which
  normalises each token on its own; the patch tokens reach it only through the last block's
  attention, so the layer is the norm before that attention (``layernorm_before``,
  ``layer_norm1``) of the last block (of the vision tower, for CLIP). BEiT without mean
  pooling, DINOv2 base models (whose pooled output is the class token) too.
- BEiT with mean pooling (the default), DINOv2 classifiers (class token and mean of the patch
  tokens, registers dropped): the final ``layernorm``, whose patch tokens reach the head.
- Swin v1 and v2: the final ``layernorm`` over the last stage's tokens (no class token), never
  the pooler, whose ``(N, C, 1)`` output is no token grid.
- ConvNeXt (v1, v2), ResNet, RegNet, LeViT: the last ``encoder.stages`` entry; EfficientNet:
  ``encoder.top_activation``; MobileNet v2: ``conv_1x1``; MobileNet v1: the last ``layer``.
- Segformer for semantic segmentation: ``decode_head.activation``, the fused map of all four
  stages at a quarter of the input's size that the classifier reads.
- DETR: the backbone's last stage, the map the transformer encoder reads.

Other models get ``None``: camkit then searches them (see :mod:`camkit.layers`).
"""

from __future__ import annotations

import re

from torch import nn

import camkit

#: the norm before a transformer block's attention, by family
PRE_ATTENTION_NORM = r"(layernorm_before|layer_norm1|norm1)"


def _last(names: list[str], pattern: str, under: str = "") -> str | None:
    """The last name (in registration order) under ``under`` that matches ``pattern`` fully."""
    found = None
    for name in names:
        if name.startswith(under) and re.fullmatch(pattern, name):
            found = name
    return found


def _block_norm(names: list[str], under: str = "") -> str | None:
    return _last(names, rf".*\.\d+\.{PRE_ATTENTION_NORM}", under)


def hf_layer(model: nn.Module) -> str | None:
    """The layer for a transformers model, or ``None`` for other models and unknown families."""
    cls = type(model)
    if not cls.__module__.startswith("transformers.models"):
        return None
    config = getattr(model, "config", None)
    kind = str(getattr(config, "model_type", ""))
    classifier = cls.__name__.endswith("ForImageClassification")
    names = [n for n, _ in model.named_modules()]
    if kind in ("vit", "deit"):
        return _block_norm(names)
    if kind in ("clip", "clip_vision_model"):
        return _block_norm(names, "vision_model.")
    if kind in ("beit", "data2vec-vision"):
        if getattr(config, "use_mean_pooling", False):
            return _last(names, r"[^.]+\.layernorm")
        return _block_norm(names)
    if kind in ("dinov2", "dinov2_with_registers"):
        return _last(names, r"[^.]+\.layernorm") if classifier else _block_norm(names)
    if kind in ("swin", "swinv2"):
        return _last(names, r"[^.]+\.layernorm")
    if kind in ("convnext", "convnextv2", "resnet", "regnet", "levit"):
        return _last(names, r"[^.]+\.encoder\.stages\.\d+")
    if kind == "efficientnet":
        return _last(names, r"[^.]+\.encoder\.top_activation")
    if kind == "mobilenet_v2":
        return _last(names, r"[^.]+\.conv_1x1")
    if kind == "mobilenet_v1":
        return _last(names, r"[^.]+\.layer\.\d+")
    if kind == "segformer" and cls.__name__ == "SegformerForSemanticSegmentation":
        return _last(names, r"decode_head\.activation")
    if kind == "detr":
        return _last(names, r"(.*\.)?backbone\..*(stages\.\d+|layer\d)")
    return None


@camkit.hookimpl
def default_layers(model: nn.Module) -> str | None:
    return hf_layer(model)
