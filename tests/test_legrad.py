"""LeGrad on small torchvision vision transformers: a float64 reference that recomputes each
attention map explicitly, options and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import camkit

tv = pytest.importorskip("torchvision.models")


def _vit(layers: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = tv.VisionTransformer(
        image_size=16, patch_size=4, num_layers=layers, num_heads=2, hidden_dim=8, mlp_dim=16,
        num_classes=5,
    )  # fmt: skip
    with torch.no_grad():  # torchvision initialises the head to zero: every score would be 0
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return model.eval()


def _reference(
    model: nn.Module, x: torch.Tensor, target: list[int], start: int = 0
) -> torch.Tensor:
    """Float64: each block recomputed by hand with its softmax attention map A as a leaf."""
    m = model.double()
    x = x.double()
    n = x.shape[0]
    tokens = m._process_input(x)
    tokens = torch.cat([m.class_token.expand(n, -1, -1), tokens], dim=1)
    tokens = tokens + m.encoder.pos_embedding
    maps = []
    rows = torch.arange(n)
    for i, block in enumerate(m.encoder.layers):
        attn = block.self_attention
        d, heads = tokens.shape[2], attn.num_heads
        h = block.ln_1(tokens)
        q, k, v = nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=2)
        q, k, v = (t.reshape(n, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d // heads), dim=3)
        leaf = a.detach().requires_grad_(True)
        o = (leaf @ v).transpose(1, 2).reshape(n, -1, d)
        y = attn.out_proj(o) + tokens
        z = y + block.mlp(block.ln_2(y))
        s = m.heads(m.encoder.ln(z)[:, 0])[rows, target]
        if i >= start:
            (g,) = torch.autograd.grad(s.sum(), leaf)
            maps.append(g.clamp_min(0).mean(dim=(1, 2))[:, 1:])
        tokens = z.detach()
    model.float()
    return torch.stack(maps).mean(dim=0).reshape(n, 4, 4).detach()


def test_legrad_equals_the_float64_reference() -> None:
    model = _vit()
    x = torch.randn(2, 3, 16, 16)
    ref = _reference(model, x, [0, 3])
    res = camkit.explain(
        model.double(), x.double(), method="legrad", layer="encoder.layers.encoder_layer_2",
        target=[0, 3], relu=False, normalize=False, batch_size=1,
    )  # fmt: skip
    model.float()
    assert res.raw.shape == (2, 4, 4) and res.maps.shape == (2, 16, 16)
    assert bool((ref > 0).any())
    torch.testing.assert_close(res.raw, ref, rtol=1e-10, atol=1e-14)
    # float32: correlation with the reference above 0.9999
    res32 = camkit.explain(model, x, method="legrad", layer="encoder", target=[0, 3], relu=False,
                           normalize=False)  # fmt: skip
    for i in range(2):
        corr = torch.corrcoef(torch.stack([res32.raw[i].flatten().double(), ref[i].flatten()]))
        assert corr[0, 1] > 0.9999


def test_reference_last_block_score_is_the_model_output() -> None:
    # the check that the reference's manual forward is the model's
    model = _vit(layers=2).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    m = model
    t = (
        torch.cat([m.class_token.expand(1, -1, -1), m._process_input(x)], 1)
        + m.encoder.pos_embedding
    )
    for block in m.encoder.layers:
        t = block(t)
    torch.testing.assert_close(m.heads(m.encoder.ln(t)[:, 0]), model(x))


def test_start_option_and_class_discrimination() -> None:
    model = _vit()
    x = torch.randn(1, 3, 16, 16)
    kw = dict(method="legrad", layer="encoder", relu=False, normalize=False)
    last = camkit.explain(model.double(), x.double(), target=[1], start=-1, **kw)
    model.float()
    torch.testing.assert_close(last.raw, _reference(model, x, [1], start=2), rtol=1e-10, atol=1e-14)
    a = camkit.explain(model, x, target=0, **kw).raw
    b = camkit.explain(model, x, target=4, **kw).raw
    assert not torch.allclose(a, b)


def test_option_errors() -> None:
    model = _vit(layers=2)
    x = torch.randn(1, 3, 16, 16)

    def run(**opts: object) -> None:
        camkit.explain(model, x, method="legrad", layer="encoder", **opts)

    for opts, error, match in [
        ({"blocks": 3}, camkit.OptionError, "'blocks' expects the dotted name"),
        ({"token": -1}, camkit.OptionError, "'token' expects an int >= 0"),
        ({"start": 2}, camkit.OptionError, "'start' .* must name one of the 2 blocks"),
        ({"eigen_smooth": True}, camkit.OptionError, "eigen_smooth=True does not apply"),
        ({"norm": "encoder.norm"}, camkit.LayerError, "looks for the module 'encoder.norm'"),
        ({"blocks": "encoder"}, camkit.LayerError, "one attention module in each block"),
    ]:
        with pytest.raises(error, match=match):
            run(**opts)
