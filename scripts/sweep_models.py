"""Explain random-config timm and Hugging Face transformers models of each family and tabulate.

    python scripts/sweep_models.py                     # every case, table in docs/
    python scripts/sweep_models.py timm-vit hf-swin    # some cases, table printed

Each case builds one model of a family with a small random configuration (nothing is
downloaded: ``timm.create_model(..., pretrained=False)``, transformers ``XConfig(...)`` with tiny
sizes), in eval mode, after ``torch.manual_seed(0)``, and explains a batch of 2 random images
with Grad-CAM and ``layer=None``, so that camkit's adapters (``plugins/adapters_timm.py``,
``plugins/adapters_hf.py``) choose the layer. A case is ``ok`` when

1. the layer chosen is the one documented for the family (:attr:`Case.layer`);
2. the maps are ``(2, H, W)`` at the input's size, finite, within [0, 1], and none is constant
   (blank), and explaining raised no camkit warning (``BlankMapWarning`` and the like);
3. the score depends on the layer's positions: the gradient of the score is not zero at 90 % of
   them at least, and zeroing each position alone (through ``ctx.run_suffix``, the rest of the
   model re-run on the changed layer) changes the score by more than float noise at 90 % of them
   at least (float noise: the change when nothing is zeroed). A layer whose patch tokens do not
   reach the score (a final norm read only through the class token) fails both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import camkit

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = ROOT / "docs" / "models.md"
START, END = "<!-- sweep:start -->", "<!-- sweep:end -->"
SEED = 0
BATCH = 2
#: the least share of the layer's positions the score must depend on
REACHED = 0.9


@dataclass(frozen=True)
class Case:
    """One family of one library: how to build a small model and what camkit should choose."""

    key: str
    library: str
    family: str
    build: Builder
    size: int
    layer: str
    options: dict[str, Any] = field(default_factory=dict)
    target: Any = None
    #: over 10 s on 2 shared cores: left out of the default test run (``-m slow`` runs it)
    slow: bool = False


@dataclass(frozen=True)
class Builder:
    """Builds a case's model; ``name``: what it is built from (a timm model name, a
    transformers configuration class), shown in the table."""

    name: str
    fn: Callable[[], nn.Module]

    def __call__(self) -> nn.Module:
        return self.fn()


def _timm(name: str, **kwargs: Any) -> Builder:
    def build() -> nn.Module:
        import timm

        model: nn.Module = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
        return model

    return Builder(name, build)


def _hf(model_cls: str, config_cls: str, **kwargs: Any) -> Builder:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(**kwargs)
        model: nn.Module = getattr(transformers, model_cls)(config)
        return model

    return Builder(config_cls, build)


_VIT_TIMM = {"embed_dim": 32, "depth": 2, "num_heads": 2}
_VIT_HF = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 64,
    "patch_size": 16,
}
_STAGES_HF = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}


def _segformer_target(output: Any, index: Tensor) -> Tensor:
    """Segformer: class 1's logits summed over the (quarter-size) output."""
    logits: Tensor = output.logits
    return logits[:, 1].flatten(1).sum(1)


def _detr_target(output: Any, index: Tensor) -> Tensor:
    """DETR: the class-0 logit of query 0."""
    logits: Tensor = output.logits
    return logits[:, 0, 0]


CASES: list[Case] = [
    # -- timm ------------------------------------------------------------------------------
    Case("timm-vit", "timm", "ViT", _timm("vit_tiny_patch16_224", img_size=64, **_VIT_TIMM),
         64, "blocks.1.norm1"),
    Case("timm-deit-distilled", "timm", "DeiT (distilled)",
         _timm("deit_tiny_distilled_patch16_224", img_size=64, **_VIT_TIMM), 64, "blocks.1.norm1"),
    Case("timm-beit", "timm", "BEiT", _timm("beit_base_patch16_224", img_size=64, **_VIT_TIMM),
         64, "norm"),
    Case("timm-dinov2-registers", "timm", "DINOv2 (4 registers)",
         _timm("vit_small_patch14_reg4_dinov2", img_size=56, **_VIT_TIMM), 56, "blocks.1.norm1"),
    Case("timm-eva02", "timm", "EVA-02", _timm("eva02_tiny_patch14_224", img_size=56, **_VIT_TIMM),
         56, "norm"),
    Case("timm-clip", "timm", "CLIP vision tower",
         _timm("vit_base_patch16_clip_224", img_size=64, **_VIT_TIMM), 64, "blocks.1.norm1"),
    Case("timm-swin", "timm", "Swin",
         _timm("swin_tiny_patch4_window7_224", img_size=128, embed_dim=16, depths=(1, 1, 1, 1),
               num_heads=(1, 1, 1, 1), window_size=4), 128, "norm"),
    Case("timm-swinv2", "timm", "Swin v2",
         _timm("swinv2_tiny_window8_256", img_size=128, embed_dim=16, depths=(1, 1, 1, 1),
               num_heads=(1, 1, 1, 1), window_size=4), 128, "norm"),
    Case("timm-convnext", "timm", "ConvNeXt",
         _timm("convnext_atto", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)), 128, "stages"),
    Case("timm-resnet", "timm", "ResNet", _timm("resnet18"), 128, "layer4"),
    Case("timm-efficientnet", "timm", "EfficientNet", _timm("efficientnet_b0"), 128, "bn2",
         slow=True),
    Case("timm-mobilenetv3", "timm", "MobileNet v3", _timm("mobilenetv3_small_050"), 128,
         "blocks"),
    Case("timm-regnet", "timm", "RegNet", _timm("regnetx_002"), 128, "final_conv"),
    Case("timm-maxvit", "timm", "MaxViT", _timm("maxvit_pico_rw_256", img_size=128), 128, "norm"),
    Case("timm-coatnet", "timm", "CoAtNet", _timm("coatnet_pico_rw_224", img_size=128), 128,
         "norm", slow=True),
    Case("timm-levit", "timm", "LeViT", _timm("levit_128s", img_size=224), 224, "stages",
         slow=True),
    # -- Hugging Face transformers ---------------------------------------------------------
    Case("hf-vit", "transformers", "ViT",
         _hf("ViTForImageClassification", "ViTConfig", **_VIT_HF, num_labels=5), 64,
         "vit.layers.1.layernorm_before"),
    Case("hf-deit-distilled", "transformers", "DeiT (distilled)",
         _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **_VIT_HF, num_labels=5),
         64, "deit.layers.1.layernorm_before"),
    Case("hf-beit", "transformers", "BEiT",
         _hf("BeitForImageClassification", "BeitConfig", **_VIT_HF, num_labels=5), 64,
         "beit.layernorm"),
    Case("hf-dinov2", "transformers", "DINOv2",
         _hf("Dinov2ForImageClassification", "Dinov2Config", **_VIT_HF, num_labels=5), 64,
         "dinov2.layernorm"),
    Case("hf-dinov2-registers", "transformers", "DINOv2 (4 registers)",
         _hf("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
             **_VIT_HF, num_register_tokens=4, num_labels=5), 64,
         "dinov2_with_registers.layernorm"),
    Case("hf-clip-vision", "transformers", "CLIP vision tower",
         _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", **_VIT_HF, projection_dim=8),
         64, "vision_model.encoder.layers.1.layer_norm1",
         options={"output": "image_embeds"}, target=0),
    Case("hf-swin", "transformers", "Swin",
         _hf("SwinForImageClassification", "SwinConfig", image_size=64, patch_size=4,
             embed_dim=16, depths=[1, 1, 1], num_heads=[1, 1, 1], window_size=4, num_labels=5),
         64, "swin.layernorm"),
    Case("hf-convnext", "transformers", "ConvNeXt",
         _hf("ConvNextForImageClassification", "ConvNextConfig", **_STAGES_HF, num_labels=5),
         128, "convnext.encoder.stages.3"),
    Case("hf-resnet", "transformers", "ResNet",
         _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=8, **_STAGES_HF,
             layer_type="basic", num_labels=5), 128, "resnet.encoder.stages.3"),
    Case("hf-efficientnet", "transformers", "EfficientNet",
         _hf("EfficientNetForImageClassification", "EfficientNetConfig", image_size=128,
             width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=5),
         128, "efficientnet.encoder.top_activation"),
    Case("hf-mobilenetv2", "transformers", "MobileNet v2",
         _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=128,
             depth_multiplier=0.35, num_labels=5), 128, "mobilenet_v2.conv_1x1"),
    Case("hf-regnet", "transformers", "RegNet",
         _hf("RegNetForImageClassification", "RegNetConfig", embedding_size=8, **_STAGES_HF,
             groups_width=8, num_labels=5), 128, "regnet.encoder.stages.3"),
    Case("hf-levit", "transformers", "LeViT",
         _hf("LevitForImageClassificationWithTeacher", "LevitConfig", image_size=224,
             hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
             key_dim=[8, 8, 8], num_labels=5), 224, "levit.encoder.stages.2"),
    Case("hf-segformer", "transformers", "Segformer",
         _hf("SegformerForSemanticSegmentation", "SegformerConfig",
             hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
             num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=12, num_labels=5), 64,
         "decode_head.activation", target=_segformer_target),
    Case("hf-detr", "transformers", "DETR (backbone)",
         Builder("DetrConfig", lambda: _detr()), 128, "model.backbone.model.encoder.stages.3",
         target=_detr_target),
]  # fmt: skip


def _detr() -> nn.Module:
    import transformers

    backbone = transformers.ResNetConfig(
        embedding_size=8, **_STAGES_HF, layer_type="basic", out_features=["stage4"]
    )
    config = transformers.DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=5,
        num_labels=3,
    )
    model: nn.Module = transformers.DetrForObjectDetection(config)
    return model


BY_KEY = {c.key: c for c in CASES}


def build(case: Case, fix_ups: bool = True) -> nn.Module:
    """The case's model with random weights after ``torch.manual_seed(SEED)``, in eval mode.

    Two fix-ups (``fix_ups=False`` leaves them out) keep a random model from being degenerate:

    - transformers initialises batch-norm scales from N(0, 0.02) in some families
      (EfficientNet, LeViT): with dozens of them in a row the activations shrink by ~1e-9 a
      block and vanish to exactly 0 (every score and map 0). Those scales get PyTorch's
      default, 1.
    - LeViT's only positional term, the attention bias of each relative offset, is zero at
      initialisation in both libraries. Its subsampling attention has no residual, and with
      small random activations its logits are close to 0: every query then averages every
      token, and from the first stage on all tokens are the same (a constant map at any later
      layer, which camkit reports as blank). Trained LeViTs have learned biases; the sweep
      draws them from N(0, 1).
    """
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = case.build()
    if not fix_ups:
        return model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):  # LeViT, timm and transformers
                p.normal_()
        if case.library == "transformers":
            for mod in model.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
                    mod.weight.fill_(1.0)
    return model.eval()


def batch(case: Case) -> Tensor:
    """A batch of 2 random images at the case's size."""
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(BATCH, 3, case.size, case.size, generator=gen)


class PositionAblation(camkit.Method):
    """Weights of ones; records, per call, the score change when each position of the layer
    alone is zeroed (through ``ctx.run_suffix``), the float noise of that re-scoring (the
    largest change when nothing is zeroed, copies re-scored alongside) and the gradient's norm
    per position."""

    name = "position-ablation-probe"
    needs_gradients = True

    def __init__(self) -> None:
        self.deltas: list[Tensor] = []
        self.noise: list[float] = []
        self.grad_norms: list[Tensor] = []

    def weights(self, ctx: camkit.Context) -> Tensor:
        a = ctx.activations  # (N, C, *S)
        assert ctx.gradients is not None
        n, c = a.shape[:2]
        p = math.prod(a.shape[2:])
        copies = a.repeat_interleave(p, 0).flatten(2)  # (N * P, C, P)
        rows = torch.arange(n * p)
        copies[rows, :, rows % p] = 0.0
        index = torch.arange(n).repeat_interleave(p)
        both = torch.cat([copies.reshape(n * p, c, *a.shape[2:]), a.repeat_interleave(p, 0)])
        scores = ctx.run_suffix(both, torch.cat([index, index]))
        changed, same = scores[: n * p], scores[n * p :]
        self.deltas.append((changed - same).reshape(n, p).detach())
        self.noise.append(float((same - ctx.scores[index]).abs().max()))
        self.grad_norms.append(ctx.gradients.flatten(2).norm(dim=1).detach())
        return a.new_ones(n, c)


def influence(model: nn.Module, case: Case, x: Tensor, layer: str) -> tuple[float, float]:
    """Shares of the layer's positions where the score's gradient is not zero, and where
    zeroing the position changes the score by more than 10 times float noise (the noise
    measured, at least 1e-7 of the largest score)."""
    probe = PositionAblation()
    with warnings.catch_warnings():
        # where the replay cannot re-run the suffix alone, camkit re-runs the whole model with
        # the layer's output replaced, and says so: the same scores, slower
        warnings.filterwarnings("ignore", "run_suffix", camkit.CamkitWarning)
        # the probe's own map (weights of ones) is not the case's, blank or not
        warnings.simplefilter("ignore", camkit.BlankMapWarning)
        res = camkit.explain(
            model, x, method=probe, layer=layer, target=case.target, **case.options
        )
    noise = max(probe.noise[0], 1e-7 * float(res.scores.abs().max()))
    grads, deltas = probe.grad_norms[0], probe.deltas[0]
    return (
        float((grads > 1e-6 * grads.max()).float().mean()),
        float((deltas.abs() > 10 * noise).float().mean()),
    )


@dataclass
class Row:
    """One line of the table."""

    key: str
    library: str
    family: str
    model: str = ""
    built_from: str = ""
    size: int = 0
    layer: str = ""
    grid: str = ""
    gradient: float = 0.0
    ablation: float = 0.0
    result: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result == "ok"


def run_case(case: Case) -> Row:
    """Build, explain and check one case (see the module docstring)."""
    row = Row(case.key, case.library, case.family, built_from=case.build.name, size=case.size)
    start = time.perf_counter()
    try:
        model = build(case)
        row.model = type(model).__name__
        x = batch(case)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", camkit.CamkitWarning)
            res = camkit.explain(model, x, target=case.target, **case.options)
        row.layer = str(res.layer)
        row.grid = "x".join(map(str, res.raw.shape[1:]))
        row.gradient, row.ablation = influence(model, case, x, row.layer)
        row.result = check(res, case, row)
        said = [w for w in caught if issubclass(w.category, camkit.CamkitWarning)]
        if row.result == "ok" and said:
            text = " ".join(str(said[0].message).split())[:240]
            row.result = f"warned: {said[0].category.__name__}: {text}"
    except Exception as exc:
        row.result = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
    row.seconds = time.perf_counter() - start
    return row


def check(res: Any, case: Case, row: Row) -> str:
    """``"ok"``, or what failed."""
    maps = res.maps
    if res.layer != case.layer:
        return f"layer {res.layer!r}, documented {case.layer!r}"
    if tuple(maps.shape) != (BATCH, case.size, case.size):
        return f"maps of shape {tuple(maps.shape)}"
    if not bool(torch.isfinite(maps).all()) or float(maps.min()) < 0 or float(maps.max()) > 1:
        return "maps not finite or outside [0, 1]"
    blank = [i for i in range(maps.shape[0]) if float(maps[i].amax()) == float(maps[i].amin())]
    if blank:
        return f"the maps of samples {blank} are constant (blank)"
    if row.gradient < REACHED or row.ablation < REACHED:
        return f"the score depends on too few positions ({row.gradient:.2f}, {row.ablation:.2f})"
    return "ok"


def table(rows: Sequence[Row]) -> str:
    """The Markdown table of ``rows``."""
    lines = [
        "| case | library | family | built from | model class | input | layer chosen | grid | "
        "positions reached (gradient / ablation) | result | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.key}` | {r.library} | {r.family} | `{r.built_from}` | `{r.model}` | {r.size} "
            f"| `{r.layer}` | "
            f"{r.grid} | {r.gradient:.0%} / {r.ablation:.0%} | {r.result} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def section(rows: Sequence[Row], total_s: float) -> str:
    import timm
    import transformers

    ok = sum(r.ok for r in rows)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return (
        f"Run on {date}: camkit {camkit.__version__}, torch {torch.__version__}, timm "
        f"{timm.__version__}, transformers {transformers.__version__}, Python "
        f"{platform.python_version()}, CPU, {torch.get_num_threads()} threads; {total_s:.0f} s "
        f"in all. **{ok} of {len(rows)} cases ok.**\n\n" + table(rows)
    )


def write_page(path: Path, text: str) -> None:
    page = path.read_text()
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help=f"case keys (default: all): {', '.join(BY_KEY)}")
    args = parser.parse_args(argv)
    unknown = [k for k in args.cases if k not in BY_KEY]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(BY_KEY)}")
    torch.set_num_threads(2)
    chosen = [BY_KEY[k] for k in args.cases] if args.cases else CASES
    start = time.perf_counter()
    rows = []
    for i, case in enumerate(chosen, 1):
        row = run_case(case)
        rows.append(row)
        print(f"[{i}/{len(chosen)}] {case.key}: {row.result} ({row.layer or '-'}, "
              f"{row.seconds:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    text = section(rows, time.perf_counter() - start)
    if args.cases:
        print(text)
    else:
        write_page(DOCS_PAGE, text)
        print(f"table written to {DOCS_PAGE}", file=sys.stderr)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
