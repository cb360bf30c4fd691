"""LeGrad on timm and Hugging Face vision transformers (random configurations): a float64
reference that materialises every attention map explicitly, and the models' attention settings
(timm's ``fused_attn``, transformers' ``attn_implementation``) left as they were, after success
and after a failure."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import camkit

timm_vit = pytest.importorskip("timm.models.vision_transformer")
hf_vit = pytest.importorskip("transformers.models.vit.modeling_vit")
ViTConfig = pytest.importorskip("transformers").ViTConfig

TIMM = {"blocks": "blocks", "norm": "norm", "head": "head"}
HF = {"blocks": "vit.layers", "norm": "vit.layernorm", "head": "classifier"}


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Parameters drawn at scale 0.5: small default initialisations give near-zero maps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _timm(reg_tokens: int = 0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm_vit.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=8, depth=3, num_heads=2, mlp_ratio=2.0,
        num_classes=5, qkv_bias=True, reg_tokens=reg_tokens,
    )  # fmt: skip
    return _randomise(model, seed)


def _hf(implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=16, num_labels=5,
        attn_implementation=implementation,
    )  # fmt: skip
    torch.manual_seed(seed)
    return _randomise(hf_vit.ViTForImageClassification(config), seed)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``A = softmax(q k^T scale)``, ``(N, H, T, T)``, as a leaf to differentiate against."""
    return torch.softmax(q @ k.transpose(2, 3) * scale, dim=3).detach().requires_grad_(True)


def _timm_blocks(m: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """Tokens entering the first block, and per block a function ``t -> (A leaf, z)``."""
    tokens = m.norm_pre(m._pos_embed(m.patch_embed(x)))

    def step(block: Any) -> Any:
        def run(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            at = block.attn
            n, length = t.shape[:2]
            qkv = nn.functional.linear(block.norm1(t), at.qkv.weight, at.qkv.bias)
            q, k, v = qkv.reshape(n, length, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
            a = _softmax_attention(q, k, at.head_dim**-0.5)
            o = (a @ v).transpose(1, 2).reshape(n, length, -1)
            y = t + block.ls1(at.proj(o))
            return a, y + block.ls2(block.mlp(block.norm2(y)))

        return run

    return tokens, [step(b) for b in m.blocks]


def _hf_blocks(m: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    tokens = m.vit.embeddings(x)

    def step(block: Any) -> Any:
        def run(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            at = block.attention
            n, length = t.shape[:2]
            h = block.layernorm_before(t)
            q, k, v = (
                p(h).reshape(n, length, at.num_attention_heads, -1).transpose(1, 2)
                for p in (at.q_proj, at.k_proj, at.v_proj)
            )
            a = _softmax_attention(q, k, at.scaling)
            y = t + at.o_proj((a @ v).transpose(1, 2).reshape(n, length, -1))
            return a, y + block.mlp(block.layernorm_after(y))

        return run

    return tokens, [step(b) for b in m.vit.layers]


def _reference(
    kind: str, model: nn.Module, x: torch.Tensor, target: list[int], prefix: int = 1
) -> torch.Tensor:
    """Float64 LeGrad: per block, d s^l / d A^l with A^l materialised, ReLU, mean over heads
    and queries, mean over blocks; the patch columns as a grid."""
    m: Any = model.double()
    norm, head = (m.norm, m.head) if kind == "timm" else (m.vit.layernorm, m.classifier)
    tokens, steps = (_timm_blocks if kind == "timm" else _hf_blocks)(m, x.double())
    rows = torch.arange(x.shape[0])
    maps = []
    for run in steps:
        a, z = run(tokens)
        s = head(norm(z)[:, 0])[rows, target]
        (g,) = torch.autograd.grad(s.sum(), a)
        maps.append(g.clamp_min(0).mean(dim=(1, 2))[:, prefix:])
        tokens = z.detach()
    model.float()
    return torch.stack(maps).mean(dim=0).reshape(x.shape[0], 4, 4).detach()


def _legrad(kind: str, model: nn.Module, x: torch.Tensor, **kw: Any) -> camkit.CamResult:
    names = TIMM if kind == "timm" else HF
    layer = "norm" if kind == "timm" else "vit.layernorm"
    return camkit.explain(
        model, x, method="legrad", layer=layer, relu=False, normalize=False, **names, **kw
    )


@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_reference_forward_is_the_model_forward(kind: str) -> None:
    model = (_timm() if kind == "timm" else _hf()).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    m: Any = model
    tokens, steps = (_timm_blocks if kind == "timm" else _hf_blocks)(m, x)
    for run in steps:
        tokens = run(tokens)[1]
    norm, head = (m.norm, m.head) if kind == "timm" else (m.vit.layernorm, m.classifier)
    out = model(x)
    torch.testing.assert_close(head(norm(tokens)[:, 0]), out if kind == "timm" else out.logits)


@pytest.mark.parametrize(
    ("kind", "setting"),
    [("timm", True), ("timm", False), ("hf", "sdpa"), ("hf", "eager")],
)
def test_legrad_equals_the_float64_reference(kind: str, setting: Any) -> None:
    model = _timm() if kind == "timm" else _hf(setting)
    if kind == "timm":
        for block in model.blocks:  # type: ignore[union-attr]
            block.attn.fused_attn = setting
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = _reference(kind, model, x, [0, 3])
    assert bool((ref > 0).any())
    res = _legrad(kind, model.double(), x.double(), target=[0, 3], batch_size=1)
    model.float()
    assert res.raw.shape == (2, 4, 4) and res.maps.shape == (2, 16, 16)
    # transformers' eager attention takes its softmax in float32 even for a float64 model,
    # which reaches the later blocks' inputs
    tol = 1e-6 if setting == "eager" else 1e-10
    torch.testing.assert_close(res.raw, ref, rtol=tol, atol=tol * 1e-3)
    res32 = _legrad(kind, model, x, target=[0, 3])  # float32: correlation above 0.9999
    for i in range(2):
        corr = torch.corrcoef(torch.stack([res32.raw[i].flatten().double(), ref[i].flatten()]))
        assert corr[0, 1] > 0.9999


def test_timm_register_tokens_and_start() -> None:
    model = _timm(reg_tokens=2)
    x = torch.randn(1, 3, 16, 16)
    ref = _reference("timm", model, x, [2], prefix=3)
    res = _legrad("timm", model.double(), x.double(), target=[2], prefix=3)
    model.float()
    torch.testing.assert_close(res.raw, ref, rtol=1e-10, atol=1e-13)
    a = _legrad("timm", model, x, target=0, prefix=3, start=-2).raw
    b = _legrad("timm", model, x, target=4, prefix=3, start=-2).raw
    assert not torch.allclose(a, b)  # class-discriminative


def _settings(kind: str, model: Any) -> Any:
    if kind == "timm":
        return [b.attn.fused_attn for b in model.blocks]
    return (model.config._attn_implementation, [b.attention.training for b in model.vit.layers])


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(
    ("kind", "setting"),
    [("timm", True), ("timm", False), ("hf", "sdpa"), ("hf", "eager")],
)
def test_attention_settings_and_hooks_restored_after_success_and_failure(
    kind: str, setting: Any
) -> None:
    model: Any = _timm() if kind == "timm" else _hf(setting)
    if kind == "timm":
        model.blocks[1].attn.fused_attn = setting  # a mix of both
    x = torch.randn(2, 3, 16, 16)
    before, hooks = _settings(kind, model), _hooks(model)
    first = _legrad(kind, model, x, target=[1, 2]).raw
    assert _settings(kind, model) == before and _hooks(model) == hooks

    calls = []

    def fail_on_third(m: nn.Module, args: Any, out: Any) -> None:
        calls.append(1)  # the explained forward, the recording forward, then a block re-run
        if len(calls) == 3:
            raise RuntimeError("injected")

    head = model.head if kind == "timm" else model.classifier
    handle = head.register_forward_hook(fail_on_third)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            _legrad(kind, model, x, target=[1, 2])
    finally:
        handle.remove()
    assert len(calls) == 3
    assert _settings(kind, model) == before and _hooks(model) == hooks
    torch.testing.assert_close(_legrad(kind, model, x, target=[1, 2]).raw, first)


def test_unsupported_attention_is_named() -> None:
    class Opaque(nn.Module):  # attention computed by a functional call: nothing to hook
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.proj = nn.Linear(8, 8)
            self.num_heads = 2

        def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            q, k, v = nn.functional.linear(x, self.qkv.weight).chunk(3, dim=2)
            return nn.functional.linear(
                nn.functional.scaled_dot_product_attention(q, k, v), self.proj.weight
            )

    model: Any = _timm()
    x = torch.randn(1, 3, 16, 16)
    model.blocks[2].attn = Opaque()
    with pytest.raises(camkit.LayerError, match="read 0 value projection"):
        _legrad("timm", model, x, target=0)

    class Plain(nn.Module):  # no attention module at all
        def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return x

    model.blocks[2].attn = Plain()
    with pytest.raises(camkit.LayerError, match=r"block 'blocks\.2' has 0"):
        _legrad("timm", model, x, target=0)


class _SelfAttention4(nn.Module):
    """transformers 4's ``ViTSelfAttention`` layout: ``query``/``key``/``value``, returning the
    heads' ``A V`` first; the output projection lives outside (``output.dense``)."""

    def __init__(self, at: Any) -> None:
        super().__init__()
        self.query, self.key, self.value = at.q_proj, at.k_proj, at.v_proj
        self.num_attention_heads = at.num_attention_heads

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        n, t = h.shape[:2]
        q, k, v = (
            p(h).reshape(n, t, self.num_attention_heads, -1).transpose(1, 2)
            for p in (self.query, self.key, self.value)
        )
        o = nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(n, t, -1), None


class _Layer4(nn.Module):
    """A transformers 5 ``ViTLayer``'s weights in transformers 4's module layout."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.attention = _SelfAttention4(layer.attention)
        self.attention.output = nn.Module()
        self.attention.output.dense = layer.attention.o_proj
        self.layernorm_before, self.layernorm_after = layer.layernorm_before, layer.layernorm_after
        self.mlp = layer.mlp

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        at: Any = self.attention
        h = self.layernorm_before(hidden_states)
        y = hidden_states + at.output.dense(at.attention(h)[0])
        return y + self.mlp(self.layernorm_after(y))


def test_transformers_4_self_attention_layout() -> None:
    model: Any = _hf().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ours = _legrad("hf", model, x, target=[0, 4]).raw
    model.vit.layers = nn.ModuleList([_Layer4(b) for b in model.vit.layers])
    torch.testing.assert_close(_legrad("hf", model, x, target=[0, 4]).raw, ours)
