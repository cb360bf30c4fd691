"""timm and Hugging Face transformers models of each family, random configurations, layer=None.

Each case of ``scripts/sweep_models.py`` (a small random-config model per family, built
offline) is explained with Grad-CAM and the layer the adapters choose; the case checks the layer
against the documented one, the maps (input size, finite, within [0, 1], none constant) and that
the score depends on at least 90 % of the layer's positions, by gradient and by zeroing each
position through ``ctx.run_suffix``. The table of the last run is in docs/models.md.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import load_script

import camkit
from camkit.registry import Registry

sweep = load_script("sweep_models")


@pytest.mark.parametrize(
    "key",
    [pytest.param(c.key, marks=[pytest.mark.slow] if c.slow else []) for c in sweep.CASES],
)
def test_family_is_explained_at_the_documented_layer(key: str) -> None:
    case = sweep.BY_KEY[key]
    pytest.importorskip(case.library)
    row = sweep.run_case(case)
    # "ok": the documented layer, maps in [0, 1] at the input's size, none constant, no
    # camkit warning (a BlankMapWarning among them)
    assert row.result == "ok", row
    assert row.gradient >= 0.9 and row.ablation >= 0.9


def _token_spread(tokens: torch.Tensor) -> torch.Tensor:
    """Per sample: the largest difference between two positions' channel values, over the
    largest activation (tokens ``(N, T, C)``)."""
    spread = (tokens.amax(1) - tokens.amin(1)).amax(1)
    return spread / tokens.abs().flatten(1).amax(1)


@pytest.mark.parametrize(
    "key,layer",
    [
        pytest.param("hf-levit", "levit.encoder.stages.2"),
        pytest.param("timm-levit", "stages", marks=pytest.mark.slow),
    ],
)
def test_levit_with_zero_attention_biases_gives_the_same_tokens_and_warns_why(
    key: str, layer: str
) -> None:
    # LeViT's attention biases (its only positional term) are zero at initialisation; its
    # subsampling attention (no residual) then averages every token, and after it all tokens
    # agree to float rounding: the constant map is the model's, not a layout or layer error,
    # and the warning says so. With the biases drawn (the sweep's fix-up), the same layer's
    # tokens differ by tens of percent and the map is not constant.
    case = sweep.BY_KEY[key]
    pytest.importorskip(case.library)
    x = sweep.batch(case)
    for fix_ups in (False, True):
        model = sweep.build(case, fix_ups=fix_ups)
        seen: list[torch.Tensor] = []
        model.get_submodule(layer).register_forward_hook(
            lambda m, args, out, seen=seen: seen.append(out.detach())
        )
        if fix_ups:
            res = camkit.explain(model, x)
        else:
            with pytest.warns(camkit.BlankMapWarning, match="the same at every position"):
                res = camkit.explain(model, x)
        assert res.layer == layer
        spread = _token_spread(seen[0])  # the explained forward's
        flat = res.maps.flatten(1)
        if fix_ups:
            assert float(spread.min()) > 0.05
            assert bool((flat.amax(1) == 1).all() and (flat.amin(1) == 0).all())
        else:
            assert float(spread.max()) <= 64 * torch.finfo(torch.float32).eps
            assert not bool(flat.any())  # blank maps are zeros


@pytest.mark.parametrize(
    "key,final_norm",
    [("timm-vit", "norm"), ("timm-deit-distilled", "norm"), ("hf-vit", "vit.layernorm")],
)
def test_the_final_norm_of_class_token_models_gives_zero_maps(key: str, final_norm: str) -> None:
    # why the adapters (and the search) pass over the final norm: its patch tokens do not reach
    # the class score, and Grad-CAM there is all zero
    case = sweep.BY_KEY[key]
    pytest.importorskip(case.library)
    model = sweep.build(case)
    x = sweep.batch(case)
    with pytest.warns(camkit.BlankMapWarning, match="gradient at the layer is exactly zero"):
        blank = camkit.explain(model, x, layer=final_norm)
    assert not bool(blank.maps.any())
    gradient, ablation = sweep.influence(model, case, x, final_norm)
    assert gradient == 0.0 and ablation == 0.0


@pytest.mark.parametrize("key", ["timm-vit", "hf-vit", "hf-swin"])
def test_the_search_without_adapters_never_picks_a_dead_or_pooled_layer(key: str) -> None:
    # with every adapter out of the way, camkit's own search still avoids the final norm
    # (timm, HF ViT) and Swin's pooler, whose (N, C, 1) output is no token grid
    case = sweep.BY_KEY[key]
    pytest.importorskip(case.library)
    model = sweep.build(case)
    x = sweep.batch(case)
    registry = Registry(load_entrypoints=False)  # no adapters
    with camkit.Explainer(model, method=camkit.registry.default_registry().get("gradcam"),
                          registry=registry) as ex:  # fmt: skip
        assert registry.default_layers(model) is None
        res = ex(x)
    assert res.layer not in ("norm", "vit.layernorm", "swin.pooler")
    gradient, ablation = sweep.influence(model, case, x, str(res.layer))
    assert gradient >= 0.9 and ablation >= 0.9
    assert bool(res.maps.any()) and torch.isfinite(res.maps).all()


def test_adapters_do_not_import_timm_or_transformers() -> None:
    import subprocess

    code = (
        "import sys, camkit, torch; from camkit.toy import TinyCNN; camkit.list_methods(); "
        "camkit.explain(TinyCNN(), torch.randn(1, 3, 8, 8)); "
        "print('timm' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
