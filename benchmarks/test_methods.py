"""Every method's time over inference, beside Grad-CAM's, measured in one interleaved run.

Gradient and activation methods (the required figure): resnet50 (random init, eval), batch 8,
224x224, ``layer4``. Methods that need one forward and one partial backward stay within
:data:`GRADIENT_TARGET` of Grad-CAM's time. Smooth Grad-CAM++ costs ``1 + n_samples`` forwards
and backwards by design, Shapley-CAM two backwards from the layer, KPCA-CAM a kernel
eigendecomposition per sample: reported, not gated.

Perturbation methods: resnet18, batch 1, 224x224, ``layer4`` (512 channels). Ablation-CAM takes
at most :data:`ABLATION_TARGET` times no-grad inference (the prefix runs once, in the explained
forward, which also records it and checks the replay; about 1x is the floor); at ``layer3`` its
cost is reported. Score-CAM takes at most :data:`SCORECAM_TARGET` times no-grad inference
on ``C`` images (its ``C`` masked forwards) in the fastest chunk size of the run. SS-CAM and
IS-CAM cost ``n_samples`` times Score-CAM: reported with small ``n_samples``. RISE and Occlusion
(black-box, at the input's resolution) are reported against inference on as many images as they
mask, and against Grad-CAM. SESS (two scales, 5 patches) is reported against Grad-CAM on its
patches, LeGrad on a vit_b_16 against Grad-CAM at the last block and inference. On the demo's
trained CNN, the constant channels Score-CAM scores once and the time that saves are reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from camkit_plugins.scorecam import ScoreCAM
from pytest_benchmark.fixture import BenchmarkFixture

import camkit
import camkit.batching
from benchmarks._lib import (
    LAYER,
    Settings,
    build_model,
    environment,
    inference,
    interleave,
    make_input,
)
from camkit.demo import load_demo_model
from camkit.demo.data import generate

GRADIENT_TARGET = 1.1
ABLATION_TARGET = 2.5
SCORECAM_TARGET = 1.05
FLOOR_CHUNKS = (8, 16, 32, 64)
"""Chunk sizes of the Score-CAM floor: inference on ``C`` images in the fastest of them."""

ONE_PASS = [
    "gradcampp",
    "xgradcam",
    "hirescam",
    "gradcam-elementwise",
    "layercam",
    "eigengradcam",
    "eigencam",
    "cam",
    "random",
    "fem",
    "segeigencam",
    "finercam",
    "refinecam",  # at one layer: its base, Grad-CAM++
]
#: Reported, not gated: Shapley-CAM runs a second backward from the layer by design, and
#: KPCA-CAM an eigendecomposition of a (P, P) kernel matrix per sample, DFF n_iter NMF updates
#: and K copies through the suffix.
REPORTED = ["shapleycam", "kpcacam", "dff"]
#: FullGrad differentiates the whole model, to the input and every biased layer: reported on
#: its own line, at its own layers (its cost is that of a training step's backward).


@contextmanager
def _auto_choices() -> Iterator[Counter[int]]:
    """Count the rows the rule of each ``batch_size="auto"`` resolution gave while the block
    runs (on the CPU the probe then chooses around it: :func:`camkit.batching.chosen_rows`)."""
    chosen: Counter[int] = Counter()
    rule = camkit.batching.auto_batch_size

    def counted(*args: Any, **kwargs: Any) -> int:
        rows = rule(*args, **kwargs)
        chosen[rows] += 1
        return rows

    camkit.batching.auto_batch_size = counted
    try:
        yield chosen
    finally:
        camkit.batching.auto_batch_size = rule


def _explain(model: torch.nn.Module, x: torch.Tensor, method: str, **options: Any) -> object:
    return camkit.explain(model, x, method=method, layer=LAYER, target=1, **options).maps


def test_gradient_family_over_gradcam(
    benchmark: BenchmarkFixture,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    model = build_model("resnet50")
    x = make_input(8)
    benchmark.group = "methods resnet50-b8"
    references: list[tuple[str, Callable[[], object]]] = [
        ("inference", lambda: inference(model, x)),
        *[(m, lambda m=m: _explain(model, x, m)) for m in ONE_PASS + REPORTED],
        ("smoothgradcampp-n4", lambda: _explain(model, x, "smoothgradcampp", n_samples=4)),
        ("fullgrad", lambda: camkit.explain(model, x, method="fullgrad", target=1).maps),
    ]
    comparison = interleave(
        benchmark,
        ("gradcam", lambda: _explain(model, x, "gradcam")),
        references,
        rounds=max(5, settings.rounds // 3),
        warmup=1,
        quiet=settings.quiet,
    )
    benchmark.extra_info.update(**environment(), **comparison.info("gradcam", "inference"))
    gradcam = comparison.ratio("gradcam", "inference")
    report(f"gradcam/inference {gradcam.text()}")
    record_ratio("gradcam/inference", gradcam, comparison)
    slow = []
    for name, _ in references[1:]:
        over_gradcam = comparison.ratio(name, "gradcam")
        over_inference = comparison.ratio(name, "inference")
        benchmark.extra_info[f"{name}/gradcam"] = over_gradcam.as_dict()
        report(f"{name}/gradcam {over_gradcam.text()}; /inference {over_inference.median:.3f}")
        record_ratio(f"{name}/gradcam", over_gradcam, comparison)
        if name in ONE_PASS and over_gradcam.median > GRADIENT_TARGET:
            slow.append(f"{name} {over_gradcam.median:.3f}x")
    if not benchmark.disabled:
        assert not slow, f"over {GRADIENT_TARGET}x Grad-CAM: {', '.join(slow)}"


def test_ablationcam_over_inference(
    benchmark: BenchmarkFixture,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    model = build_model("resnet18")
    x = make_input(1)
    benchmark.group = "ablation resnet18-b1"
    comparison = interleave(
        benchmark,
        ("ablationcam", lambda: _explain(model, x, "ablationcam")),
        [
            ("inference", lambda: inference(model, x)),
            ("gradcam", lambda: _explain(model, x, "gradcam")),
        ],
        rounds=settings.rounds,
        warmup=settings.warmup,
        quiet=settings.quiet,
    )
    benchmark.extra_info.update(**environment(), **comparison.info("ablationcam", "inference"))
    ablation = comparison.ratio("ablationcam", "inference")
    report(f"ablationcam/inference {ablation.text()}  target <= {ABLATION_TARGET}")
    record_ratio("ablationcam/inference", ablation, comparison)
    report(f"gradcam/inference {comparison.ratio('gradcam', 'inference').text()}")
    if not benchmark.disabled:
        assert ablation.median <= ABLATION_TARGET


def test_ablationcam_at_an_earlier_layer(
    benchmark: BenchmarkFixture,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    """At ``layer3`` the suffix (``layer4``, pooling, ``fc``) is about a quarter of the model,
    run for each of its 256 channels: reported, not gated."""
    model = build_model("resnet18")
    x = make_input(1)
    benchmark.group = "ablation resnet18-b1 layer3"
    comparison = interleave(
        benchmark,
        (
            "ablationcam-layer3",
            lambda: camkit.explain(model, x, method="ablationcam", layer="layer3", target=1),
        ),
        [("inference", lambda: inference(model, x))],
        rounds=max(3, settings.rounds // 7),
        warmup=1,
        quiet=settings.quiet,
    )
    ratio = comparison.ratio("ablationcam-layer3", "inference")
    benchmark.extra_info["ablationcam-layer3/inference"] = ratio.as_dict()
    report(f"ablationcam at layer3 (256 channels)/inference {ratio.text()}")
    record_ratio("ablationcam-layer3/inference", ratio, comparison)


def _constant_channels(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """``(N, C)``: the channels whose activation map at ``layer`` is constant on ``x``."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    flat = seen[0].flatten(2)
    return flat.amax(dim=2) == flat.amin(dim=2)


def test_scorecam_over_inference_on_c_images(
    benchmark: BenchmarkFixture,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    """The floor is no-grad inference on ``C`` images in the chunk size that is fastest in
    this run (each of :data:`FLOOR_CHUNKS` is measured in every round)."""
    model = build_model("resnet18")
    x = make_input(1)
    channels = 512
    x_many = make_input(64).repeat(channels // 64, 1, 1, 1)

    def inference_on_c_images(chunk: int) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return [model(x_many[i : i + chunk]) for i in range(0, channels, chunk)]

        return run

    floors = [(f"inference_C_chunk{c}", inference_on_c_images(c)) for c in FLOOR_CHUNKS]
    benchmark.group = "score-cam resnet18-b1"
    with _auto_choices() as chosen:
        comparison = interleave(
            benchmark,
            ("scorecam", lambda: _explain(model, x, "scorecam")),
            [
                *floors,
                ("sscam-n2", lambda: _explain(model, x, "sscam", n_samples=2)),
                ("iscam-n2", lambda: _explain(model, x, "iscam", n_samples=2)),
            ],
            rounds=max(3, settings.rounds // 7),
            warmup=1,
            quiet=settings.quiet,
        )
    floor = min((name for name, _ in floors), key=lambda n: comparison.seconds(n).median)
    auto_rows = {str(rows): calls for rows, calls in sorted(chosen.items())}
    probed = camkit.batching.chosen_rows(model, x[:1], work="score")
    benchmark.extra_info.update(
        **environment(),
        **comparison.info("scorecam", floor),
        floor=floor,
        auto_rows=auto_rows,
        auto_probed=probed,
    )
    constant = int(_constant_channels(model, LAYER, x).sum())
    scorecam = comparison.ratio("scorecam", floor)
    report(
        "inference on C images, median s by chunk: "
        + ", ".join(
            f"{n.rsplit('chunk', 1)[1]}: {comparison.seconds(n).median:.3f}" for n, _ in floors
        )
    )
    report(
        f"scorecam/{floor} {scorecam.text()}  target <= {SCORECAM_TARGET}; "
        f"{constant} of {channels} channels constant (scored once); batch_size='auto': the "
        + "rule gave "
        + ", ".join(f"{rows} rows in {calls} calls" for rows, calls in auto_rows.items())
        + f", the probe chose {probed} rows"
    )
    record_ratio("scorecam/inference_on_C_images_best_chunk", scorecam, comparison)
    for name in ("sscam-n2", "iscam-n2"):
        ratio = comparison.ratio(name, floor)
        report(f"{name}/{floor} {ratio.text()}  (n_samples x Score-CAM: 2)")
        record_ratio(f"{name}/inference_on_C_images_best_chunk", ratio, comparison)
    if not benchmark.disabled:
        assert scorecam.median <= SCORECAM_TARGET


RISE_MASKS = 256
OCCLUSION = {"patch": 32, "stride": 32}  # 7 x 7 positions on 224 x 224


def test_black_box_over_inference_on_their_forwards(
    benchmark: BenchmarkFixture, settings: Settings, report: Callable[[str], None]
) -> None:
    """RISE with ``n_masks`` masks and Occlusion with ``P`` patch positions run that many
    masked forwards per image: their floor is inference on that many images, in chunks of the
    same ``batch_size`` (64). Reported beside Grad-CAM, not gated."""
    model = build_model("resnet18")
    x = make_input(1)
    positions = 7 * 7
    x_masks = make_input(64).repeat(RISE_MASKS // 64, 1, 1, 1)
    x_patches = make_input(positions)

    def inference_on(batch: torch.Tensor) -> object:
        with torch.no_grad():
            return [model(batch[i : i + 64]) for i in range(0, len(batch), 64)]

    benchmark.group = "black-box resnet18-b1"
    comparison = interleave(
        benchmark,
        ("rise", lambda: _explain(model, x, "rise", n_masks=RISE_MASKS)),
        [
            ("inference_on_masks", lambda: inference_on(x_masks)),
            ("occlusion", lambda: _explain(model, x, "occlusion", **OCCLUSION)),
            ("inference_on_patches", lambda: inference_on(x_patches)),
            ("gradcam", lambda: _explain(model, x, "gradcam")),
        ],
        rounds=max(3, settings.rounds // 7),
        warmup=1,
        quiet=settings.quiet,
    )
    benchmark.extra_info.update(**environment(), **comparison.info("rise", "inference_on_masks"))
    for name, floor in (("rise", "inference_on_masks"), ("occlusion", "inference_on_patches")):
        over_floor = comparison.ratio(name, floor)
        over_gradcam = comparison.ratio(name, "gradcam")
        benchmark.extra_info[f"{name}/{floor}"] = over_floor.as_dict()
        benchmark.extra_info[f"{name}/gradcam"] = over_gradcam.as_dict()
        report(f"{name}/{floor} {over_floor.text()}; /gradcam {over_gradcam.median:.1f}")


SESS_SCALES = [224, 288]  # 1 + 4 patches of 224 x 224


def test_meta_and_transformer_methods_over_gradcam(
    benchmark: BenchmarkFixture, settings: Settings, report: Callable[[str], None]
) -> None:
    """SESS over Grad-CAM with two scales (5 patches) on resnet18, against Grad-CAM on those 5
    patches as a batch, its floor; LeGrad on a vit_b_16 (random init, batch 1) against Grad-CAM
    at the last block and against inference. Reported, not gated."""
    resnet = build_model("resnet18")
    x = make_input(1)
    patches = make_input(5)
    vit = build_model("vit_b_16")
    with torch.no_grad():  # torchvision initialises the head to zero
        vit.heads.head.weight.normal_(0, 0.02)

    benchmark.group = "meta and transformer methods"
    comparison = interleave(
        benchmark,
        ("sess", lambda: _explain(resnet, x, "sess", scales=SESS_SCALES, smooth=False)),
        [
            ("gradcam_on_5_patches", lambda: _explain(resnet, patches, "gradcam")),
            ("gradcam", lambda: _explain(resnet, x, "gradcam")),
            ("legrad", lambda: _explain_vit(vit, x, "legrad")),
            ("vit_gradcam", lambda: _explain_vit(vit, x, "gradcam")),
            ("vit_inference", lambda: inference(vit, x)),
        ],
        rounds=max(3, settings.rounds // 7),
        warmup=1,
        quiet=settings.quiet,
    )
    benchmark.extra_info.update(**environment(), **comparison.info("sess", "gradcam"))
    for name, reference in (
        ("sess", "gradcam_on_5_patches"),
        ("sess", "gradcam"),
        ("legrad", "vit_gradcam"),
        ("legrad", "vit_inference"),
    ):
        ratio = comparison.ratio(name, reference)
        benchmark.extra_info[f"{name}/{reference}"] = ratio.as_dict()
        report(f"{name}/{reference} {ratio.text()}")


def _explain_vit(model: torch.nn.Module, x: torch.Tensor, method: str) -> object:
    layer = "encoder.layers.encoder_layer_11"
    return camkit.explain(model, x, method=method, layer=layer, target=1).maps


def test_differentiable_maps_over_gradcam(
    benchmark: BenchmarkFixture, settings: Settings, report: Callable[[str], None]
) -> None:
    """``differentiable=True`` on resnet18, batch 4, ``layer4``: the call alone, and the call
    with the backward of a loss on its maps, against plain Grad-CAM and against a training step
    of the model (forward with graph, backward of the summed logits). Reported, not gated."""
    model = build_model("resnet18")
    x = make_input(4)

    def differentiable(backward: bool) -> object:
        maps = camkit.explain(model, x, layer=LAYER, target=1, differentiable=True).maps
        if backward:
            maps.square().mean().backward()
        return maps

    def training_step() -> object:
        out = model(x)
        out.sum().backward()
        return out

    benchmark.group = "differentiable resnet18-b4"
    comparison = interleave(
        benchmark,
        ("differentiable", lambda: differentiable(False)),
        [
            ("gradcam", lambda: _explain(model, x, "gradcam")),
            ("differentiable+backward", lambda: differentiable(True)),
            ("training_step", training_step),
        ],
        rounds=max(5, settings.rounds // 3),
        warmup=1,
        quiet=settings.quiet,
    )
    model.zero_grad(set_to_none=True)
    benchmark.extra_info.update(**environment(), **comparison.info("differentiable", "gradcam"))
    for name, reference in (
        ("differentiable", "gradcam"),
        ("differentiable+backward", "gradcam"),
        ("differentiable+backward", "training_step"),
    ):
        ratio = comparison.ratio(name, reference)
        benchmark.extra_info[f"{name}/{reference}"] = ratio.as_dict()
        report(f"{name}/{reference} {ratio.text()}")


class _EveryChannel(ScoreCAM):
    """Score-CAM scoring every channel, constant ones too: the reference for the saving."""

    name = "scorecam-every-channel"
    skip_constant = False


def test_scorecam_skipping_on_the_trained_demo_model(
    benchmark: BenchmarkFixture,
    settings: Settings,
    report: Callable[[str], None],
    record_ratio: Callable[..., None],
) -> None:
    """On the demo's trained CNN (layer ``features``, 32 channels of 16x16): how many channels
    are constant and skipped, and the time that saves; the maps are the same."""
    model = load_demo_model()
    x = generate(16, split="test", seed=3).tensor()
    constant = _constant_channels(model, "features", x)

    def run(method: str | camkit.Method) -> torch.Tensor:
        return camkit.explain(model, x, method=method, layer="features", normalize=False).raw

    every = _EveryChannel()
    benchmark.group = "score-cam skipping, demo model"
    comparison = interleave(
        benchmark,
        ("scorecam", lambda: run("scorecam")),
        [("scorecam-every-channel", lambda: run(every))],
        rounds=max(5, settings.rounds // 3),
        warmup=1,
        quiet=settings.quiet,
    )
    torch.testing.assert_close(run("scorecam"), run(every), rtol=1e-5, atol=1e-7)
    ratio = comparison.ratio("scorecam", "scorecam-every-channel")
    skipped, total = int(constant.sum()), constant.numel()
    benchmark.extra_info["constant_channels"] = [skipped, total]
    benchmark.extra_info["scorecam/every-channel"] = ratio.as_dict()
    record_ratio("scorecam/every-channel", ratio, comparison)
    report(
        f"{skipped} of {total} channel maps constant ({100 * skipped / total:.1f}%) on 16 "
        f"test scenes; scorecam/every channel {ratio.text()} "
        f"(time saved {100 * (1 - ratio.median):.1f}%)"
    )


@pytest.mark.quick
def test_methods_quick(
    benchmark: BenchmarkFixture, report: Callable[[str], None], record_ratio: Callable[..., None]
) -> None:
    model = build_model("resnet18")
    x = make_input(2, size=112)
    comparison = interleave(
        benchmark,
        ("gradcam", lambda: _explain(model, x, "gradcam")),
        [
            ("inference", lambda: inference(model, x)),
            ("gradcampp", lambda: _explain(model, x, "gradcampp")),
        ],
        rounds=5,
        warmup=1,
        quiet=0,
    )
    report(f"quick gradcampp/gradcam {comparison.ratio('gradcampp', 'gradcam').text()}")
    record_ratio("gradcampp/gradcam", comparison.ratio("gradcampp", "gradcam"), comparison)
    record_ratio("gradcam/inference", comparison.ratio("gradcam", "inference"), comparison)
