"""The peer libraries' CAMs through their public APIs, for side-by-side figures.

pytorch-grad-cam (``pip install grad-cam``), torchcam and captum are optional (the ``peers``
extra); :func:`missing` names those that are not installed. Each factory returns operations
``name -> () -> object`` that explain the fixed class 1 of the batch, as the camkit operation
beside them does. The peers' extractor objects are built once, outside the timed calls (as a
user would reuse them); camkit's runs as ``camkit.explain`` per call, set-up included.

What each call returns differs slightly: pytorch-grad-cam upsamples and normalises its maps
(NumPy), as camkit does; torchcam returns normalised maps at the layer's resolution; captum's
``LayerGradCam`` returns the raw map, upsampled here with ``LayerAttribution.interpolate``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import camkit

Op = Callable[[], object]
PEERS = {"pytorch-grad-cam": "pytorch_grad_cam", "torchcam": "torchcam", "captum": "captum"}
CLASS = 1


def missing() -> list[str]:
    """The peer libraries that are not installed."""
    return [name for name, module in PEERS.items() if importlib.util.find_spec(module) is None]


def _pgc_targets(n: int) -> list[Any]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(CLASS)] * n


def gradcam_ops(model: nn.Module, x: Tensor, layer: str) -> dict[str, Op]:
    """Grad-CAM of a CNN at ``layer`` (``(N, C, H, W)`` output): camkit and the three peers."""
    from captum.attr import LayerAttribution, LayerGradCam
    from pytorch_grad_cam import GradCAM as PgcGradCAM
    from torchcam.methods import GradCAM as TcGradCAM

    module = model.get_submodule(layer)
    pgc = PgcGradCAM(model=model, target_layers=[module])
    targets = _pgc_targets(x.shape[0])
    tc = TcGradCAM(model, target_layer=layer, input_shape=tuple(x.shape[1:]))
    tc.disable_hooks()  # on only during its own calls: its hooks would slow the others
    captum = LayerGradCam(model, module)

    def torchcam() -> object:
        tc.enable_hooks()
        try:
            with torch.enable_grad():
                out = model(x)
            return tc(class_idx=CLASS, scores=out)
        finally:
            tc.disable_hooks()
            tc.reset_hooks()

    def captum_gradcam() -> object:
        raw = captum.attribute(x, target=CLASS)
        return LayerAttribution.interpolate(raw, tuple(x.shape[2:]), interpolate_mode="bilinear")

    return {
        "camkit": lambda: camkit.explain(model, x, method="gradcam", layer=layer, target=CLASS),
        "pytorch-grad-cam": lambda: pgc(input_tensor=x, targets=targets),
        "torchcam": torchcam,
        "captum": captum_gradcam,
    }


def scorecam_ops(model: nn.Module, x: Tensor, layer: str) -> dict[str, Op]:
    """Score-CAM at ``layer`` with each library's default chunk size: camkit (``"auto"``),
    pytorch-grad-cam (16) and torchcam (32); captum has none."""
    from pytorch_grad_cam import ScoreCAM as PgcScoreCAM
    from torchcam.methods import ScoreCAM as TcScoreCAM

    pgc = PgcScoreCAM(model=model, target_layers=[model.get_submodule(layer)])
    targets = _pgc_targets(x.shape[0])
    tc = TcScoreCAM(model, target_layer=layer, input_shape=tuple(x.shape[1:]))
    tc.disable_hooks()

    def torchcam() -> object:
        tc.enable_hooks()
        try:
            with torch.no_grad():
                out = model(x)
            return tc(class_idx=CLASS, scores=out)
        finally:
            tc.disable_hooks()
            tc.reset_hooks()

    return {
        "camkit": lambda: camkit.explain(model, x, method="scorecam", layer=layer, target=CLASS),
        "pytorch-grad-cam": lambda: pgc(input_tensor=x, targets=targets),
        "torchcam": torchcam,
    }


def ablationcam_ops(model: nn.Module, x: Tensor, layer: str) -> dict[str, Op]:
    """Ablation-CAM at ``layer``: camkit and pytorch-grad-cam (torchcam and captum have none)."""
    from pytorch_grad_cam import AblationCAM as PgcAblationCAM

    pgc = PgcAblationCAM(model=model, target_layers=[model.get_submodule(layer)])
    targets = _pgc_targets(x.shape[0])
    return {
        "camkit": lambda: camkit.explain(model, x, method="ablationcam", layer=layer, target=CLASS),
        "pytorch-grad-cam": lambda: pgc(input_tensor=x, targets=targets),
    }


def vit_gradcam_ops(model: nn.Module, x: Tensor) -> dict[str, Op]:
    """Grad-CAM of a torchvision ViT at the last block's ``ln_1``, tokens on the patch grid:
    camkit (its adapter finds the layer and the layout) and pytorch-grad-cam (with the
    ``reshape_transform`` its documentation shows for ViTs). torchcam and captum's Grad-CAM
    expect ``(N, C, H, W)`` layers."""
    from pytorch_grad_cam import GradCAM as PgcGradCAM

    side = x.shape[-1] // 16

    def tokens_to_grid(t: Tensor) -> Tensor:
        grid = t[:, 1:, :].reshape(t.shape[0], side, side, t.shape[2])
        return grid.permute(0, 3, 1, 2)

    blocks = model.encoder.layers  # type: ignore[union-attr]
    module = list(blocks.children())[-1].ln_1
    pgc = PgcGradCAM(model=model, target_layers=[module], reshape_transform=tokens_to_grid)
    targets = _pgc_targets(x.shape[0])
    return {
        "camkit": lambda: camkit.explain(model, x, method="gradcam", target=CLASS),
        "pytorch-grad-cam": lambda: pgc(input_tensor=x, targets=targets),
    }


def memory_operation(name: str) -> Callable[[nn.Module, Tensor], object]:
    """``peer-<library>`` as a memory-probe operation: that library's Grad-CAM at ``layer4``,
    its extractor built on the first call and reused."""
    library = name.removeprefix("peer-")
    built: dict[str, Op] = {}

    def run(model: nn.Module, x: Tensor) -> object:
        if not built:
            built.update(gradcam_ops(model, x, "layer4"))
        return built[library]()

    return run
