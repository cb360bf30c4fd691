"""Ablation-CAM on transformers' DINOv2 through ``ctx.run_suffix``: the replay, not full re-runs.

The layer a DINOv2 classifier is explained at, ``dinov2.layernorm``, reads the encoder's
``BaseModelOutput`` (a ``ModelOutput``: a dict whose fields are also attributes) by attribute.
The replay answers the encoder's call from its record in that same type, so the part after the
layer re-runs alone; the weights are Eq. 3 of Desai & Ramaswamy (2020), computed here in float64
by one full forward per zeroed channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import camkit

transformers = pytest.importorskip("transformers")

_SMALL = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "image_size": 32,
    "patch_size": 8,
}


def _classifier() -> nn.Module:
    return transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(**_SMALL, num_labels=3)
    )


def _registers() -> nn.Module:
    config = transformers.Dinov2WithRegistersConfig(**_SMALL, num_register_tokens=4, num_labels=3)
    return transformers.Dinov2WithRegistersForImageClassification(config)


def _base() -> nn.Module:
    return transformers.Dinov2Model(transformers.Dinov2Config(**_SMALL))


CASES: dict[str, tuple[Callable[[], nn.Module], str, int, dict[str, Any]]] = {
    # build, layer the adapter picks, leading tokens (class, registers), options
    "classifier": (_classifier, "dinov2.layernorm", 1, {}),
    "registers": (_registers, "dinov2_with_registers.layernorm", 5, {}),
    "base": (_base, "encoder.layer.1.norm1", 1, {"output": "pooler_output", "target": 0}),
}


def _score(out: Any, options: dict[str, Any], classes: Tensor) -> Tensor:
    if "output" in options:
        pooled: Tensor = out[options["output"]]
        return pooled[:, 0]
    logits: Tensor = out.logits
    return logits.gather(1, classes[:, None])[:, 0]


@pytest.mark.parametrize("key", list(CASES))
def test_ablationcam_on_dinov2_replays_the_suffix_and_matches_full_reruns(key: str) -> None:
    build, layer, extra, options = CASES[key]
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # the patch embedding's convolution computes only where the prefix computes (a replay
    # answers the embeddings' call from its record, without running their children)
    conv = next(m for n, m in model.named_modules() if n.endswith("patch_embeddings.projection"))
    rows: list[int] = []
    counter = conv.register_forward_pre_hook(lambda m, args: rows.append(int(args[0].shape[0])))
    try:
        # a fallback to full re-runs warns (an error in this suite)
        res = camkit.explain(model, x, method="ablationcam", **options)
    finally:
        counter.remove()
    assert res.layer == layer
    # the prefix computed twice: the explained forward of the batch and the one checked copy;
    # full re-runs would run it again for each sample's 16 ablated channels and itself
    assert rows == [2, 1]

    # Eq. 3 in float64: w_k = (y - y_k) / |y|, y_k with channel k of the patch tokens zeroed
    module = model.get_submodule(layer)
    captured: list[Tensor] = []
    hook = module.register_forward_hook(lambda m, args, out: captured.append(out))
    with torch.no_grad():
        out = model(x)
    hook.remove()
    tokens = captured[0]  # (N, T, C)
    classes = res.targets if res.targets is not None else torch.zeros(2, dtype=torch.long)
    y = _score(out, options, classes)
    c = tokens.shape[-1]
    drops = torch.zeros(2, c, dtype=torch.float64)
    for k in range(c):

        def zero(m: nn.Module, args: Any, o: Tensor, k: int = k) -> Tensor:
            o = o.clone()
            o[:, extra:, k] = 0
            return o

        hook = module.register_forward_hook(zero)
        with torch.no_grad():
            drops[:, k] = y - _score(model(x), options, classes)
        hook.remove()
    weights = drops / y.abs()[:, None]
    assert res.weights.dtype == torch.float64
    torch.testing.assert_close(res.weights, weights, rtol=1e-9, atol=1e-12)
    assert float(weights.abs().min()) > 0  # every channel moves the score
    patches = tokens[:, extra:].transpose(1, 2).reshape(2, c, 4, 4)
    raw = torch.relu(torch.einsum("nc,nchw->nhw", weights, patches))
    torch.testing.assert_close(res.raw, raw, rtol=1e-9, atol=1e-12)
    flat = raw.flatten(1)
    assert bool((flat.amax(1) > flat.amin(1)).all())  # not blank
