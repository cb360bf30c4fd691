"""torchvision's classifiers: Grad-CAM with the layer the adapters choose, on random weights.

CI explains one or two builders per family at the smallest input each accepts (batch 2, eval,
fixed seed) and checks the layer chosen, the maps' shape, finiteness, range and that they are
not constant. ViT and Swin get their own checks: the layer chosen is one whose tokens reach the
class score (through gradients and through ``ctx.run_suffix``), where ViT's final norm is not.
The full sweep over every builder (``scripts/sweep_torchvision.py``, one fresh process per
builder) is marked slow: ``pytest tests/test_torchvision.py -m slow``.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import load_script
from torch import Tensor, nn

import camkit

tv = pytest.importorskip("torchvision")

sweep = load_script("sweep_torchvision")

#: builder -> (the layer the adapters document, the smallest input size the sweep finds)
CI_CASES = {
    "resnet18": ("layer4", 48),
    "vgg11": ("features.19", 32),
    "densenet121": ("features", 64),
    "mobilenet_v2": ("features", 48),
    "mobilenet_v3_small": ("features", 48),
    "efficientnet_b0": ("features", 48),
    "efficientnet_v2_s": ("features", 48),
    "convnext_tiny": ("features", 64),
    "regnet_x_400mf": ("trunk_output", 48),
    "regnet_y_400mf": ("trunk_output", 48),
    "squeezenet1_0": ("features", 48),
    "shufflenet_v2_x0_5": ("conv5", 48),
    "mnasnet0_5": ("layers", 48),
    "googlenet": ("inception5b", 48),
    "inception_v3": ("Mixed_7c", 112),
    "alexnet": ("features", 96),
    "vit_b_16": ("encoder.layers.encoder_layer_11.ln_1", 32),
    "swin_t": ("features", 48),
    "swin_v2_t": ("features", 48),
    "maxvit_t": ("blocks.3", 224),  # no adapter: camkit's own search
}


def _free() -> None:
    gc.collect()


def _check_maps(res: Any, size: int) -> None:
    maps = res.maps
    assert maps.shape == (2, size, size) and maps.dtype == torch.float32
    assert bool(torch.isfinite(maps).all())
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    spread = maps.flatten(1).amax(1) - maps.flatten(1).amin(1)
    assert bool((spread > 0).any()), "every map is constant"


def _batch(size: int) -> Tensor:
    torch.manual_seed(sweep.SEED)
    return torch.randn(2, 3, size, size)


#: builders whose model a module fixture below already holds, built by sweep.build too
_SHARED = {"swin_t": "swin"}


@pytest.mark.parametrize("name", list(CI_CASES))
def test_builder_gives_finite_gradcam_maps_at_its_smallest_input(
    name: str, request: pytest.FixtureRequest
) -> None:
    layer, size = CI_CASES[name]
    shared = name in _SHARED
    model = request.getfixturevalue(_SHARED[name]) if shared else sweep.build(name)
    try:
        assert sweep.documented_layer(model) == layer
        assert sweep.smallest_size(model) == size
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", camkit.BlankMapWarning)
            res = camkit.explain(model, _batch(size))  # layer=None: the adapters choose
        assert res.layer == layer
        _check_maps(res, size)
        # random weights can give blank maps (all negative before the ReLU): never silently
        blank = bool((res.maps.flatten(1).amax(1) == 0).any())
        assert blank == any(issubclass(w.category, camkit.BlankMapWarning) for w in caught)
        assert sweep.check(res, layer, size).startswith("ok")
    finally:
        del model
        if not shared:
            _free()


# -- ViT and Swin: the chosen layer's tokens reach the class score --------------------------

VIT_SIZE = 64  # ViT-B/16: a 4x4 grid of patch tokens
SWIN_SIZE = 128  # Swin-T: a 4x4 grid at its last stage (stride 32)


@pytest.fixture(scope="module")
def vit() -> Iterator[nn.Module]:
    model = sweep.build("vit_b_16", image_size=VIT_SIZE)
    yield model
    del model
    _free()


@pytest.fixture(scope="module")
def swin() -> Iterator[nn.Module]:
    model = sweep.build("swin_t")
    yield model
    del model
    _free()


def test_vit_head_is_zero_initialised_and_build_fixes_it(vit: nn.Module) -> None:
    # why sweep.build re-initialises heads.head: with torchvision's zero head every logit is 0,
    # no gradient reaches the tokens and every map is zero
    torch.manual_seed(0)
    raw = tv.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8
    ).eval()
    assert not bool(raw.heads.head.weight.any())
    with pytest.warns(camkit.BlankMapWarning, match="gradient at the layer is exactly zero"):
        res = camkit.explain(raw, _batch(32))
    assert res.layer == "encoder.layers.encoder_layer_0.ln_1"
    assert not bool(res.maps.any())
    assert bool(vit.heads.head.weight.any())  # built by sweep.build


def _layer_gradients(model: nn.Module, layer: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's output and d(predicted class score)/d(output), with plain autograd."""
    kept: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        out = out.detach().requires_grad_(True)
        kept["out"] = out
        return out

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(score, kept["out"])
    return kept["out"].detach(), grad


class PositionAblation(camkit.Method):
    """Records the score change when each position of the layer is zeroed, via run_suffix.

    A test probe, stateful unlike camkit's methods: ``deltas`` gets ``(N, P)`` per call. Its
    weights are ones (the map itself is not the point).
    """

    name = "position-ablation-probe"
    needs_gradients = False

    def __init__(self) -> None:
        self.deltas: list[Tensor] = []

    def weights(self, ctx: camkit.Context) -> Tensor:
        a = ctx.activations  # (N, C, h, w): patch tokens laid on their grid
        n, c = a.shape[:2]
        p = a[0, 0].numel()
        copies = a.repeat_interleave(p, 0).flatten(2)  # (N * P, C, P)
        rows = torch.arange(n * p)
        copies[rows, :, rows % p] = 0.0  # copy k of sample i: position k zeroed
        index = torch.arange(n).repeat_interleave(p)
        scores = ctx.run_suffix(copies.reshape(n * p, c, *a.shape[2:]), index)
        self.deltas.append((scores - ctx.scores[index]).reshape(n, p))
        return a.new_ones(n, c)


def _ablation_deltas(
    model: nn.Module, x: Tensor, layer: str | None = None
) -> tuple[str, Tensor, float]:
    """The layer, the score changes ``(N, P)`` and the float noise of re-scoring: the copies
    run in other batch sizes than the original, which moves scores by ~1e-7 relative."""
    probe = PositionAblation()
    res = camkit.explain(model, x, method=probe, layer=layer)
    return str(res.layer), probe.deltas[0], 1e-5 * float(res.scores.abs().max())


def test_vit_default_layer_maps_are_not_constant(vit: nn.Module) -> None:
    res = camkit.explain(vit, _batch(VIT_SIZE))
    assert res.layer == "encoder.layers.encoder_layer_11.ln_1"
    assert res.raw.shape == (2, 4, 4)  # the patch tokens on their grid, class token dropped
    _check_maps(res, VIT_SIZE)
    assert bool((res.maps.flatten(1).std(1) > 0).all())


def test_vit_chosen_layer_tokens_reach_the_class_score(vit: nn.Module) -> None:
    x = _batch(VIT_SIZE)
    chosen = camkit.explain(vit, x).layer
    _, grad = _layer_gradients(vit, chosen, x)
    per_token = grad[:, 1:, :].norm(dim=2)  # (N, 16) patch tokens; the class token first
    assert bool((per_token > 1e-6 * per_token.max()).float().mean() >= 0.9)
    layer, deltas, noise = _ablation_deltas(vit, x)
    assert layer == chosen and deltas.shape == (2, 16)
    assert bool((deltas.abs() > 10 * noise).float().mean() >= 0.9)


def test_vit_final_norm_patch_tokens_do_not_reach_the_class_score(vit: nn.Module) -> None:
    # the class score reads the class token after encoder.ln, a per-token norm: the patch
    # tokens there are dead ends, which is why the adapters pick the last block's ln_1
    x = _batch(VIT_SIZE)
    _, grad = _layer_gradients(vit, "encoder.ln", x)
    assert bool(grad[:, 0, :].any())
    assert not bool(grad[:, 1:, :].any())
    _, deltas, noise = _ablation_deltas(vit, x, layer="encoder.ln")
    assert bool((deltas.abs() <= noise).all())
    with pytest.warns(camkit.BlankMapWarning, match="'encoder.ln'.*gradient.*exactly zero"):
        res = camkit.explain(vit, x, layer="encoder.ln")
    assert not bool(res.maps.any())  # Grad-CAM there: zero maps


def test_swin_default_layer_maps_are_not_constant(swin: nn.Module) -> None:
    res = camkit.explain(swin, _batch(SWIN_SIZE))
    assert res.layer == "features"
    assert res.raw.shape == (2, 4, 4)  # channels last (N, 4, 4, 768) read as (N, 768, 4, 4)
    _check_maps(res, SWIN_SIZE)
    assert bool((res.maps.flatten(1).std(1) > 0).all())


def test_swin_chosen_layer_tokens_reach_the_class_score(swin: nn.Module) -> None:
    x = _batch(SWIN_SIZE)
    chosen = camkit.explain(swin, x).layer
    out, grad = _layer_gradients(swin, chosen, x)
    assert out.shape == (2, 4, 4, 768)
    per_position = grad.norm(dim=3).flatten(1)  # (N, 16)
    assert bool((per_position > 1e-6 * per_position.max()).all())
    layer, deltas, noise = _ablation_deltas(swin, x)
    assert layer == chosen and deltas.shape == (2, 16)
    assert bool((deltas.abs() > 10 * noise).all())


# -- the full sweep, by hand ------------------------------------------------------------------


@pytest.mark.slow
def test_every_classification_builder_gives_maps() -> None:
    rows = sweep.sweep(sweep.builders())  # progress on stderr (-s shows it)
    failed = [f"{r.name}: {r.result}" for r in rows if not (r.ok or r.not_run)]
    assert not failed, "\n".join(failed)
    assert sum(r.ok for r in rows) > len(rows) // 2
