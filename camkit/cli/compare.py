"""The ``compare`` command: methods against metrics over image files with a model spec, or over
the demo's generated scenes (``--demo``, offline); the table as Markdown, CSV and JSON and a
figure of maps in ``--out``.

Partial results are kept in ``--out`` after every batch, so a run that is interrupted resumes
where it stopped when started again with the same arguments. Under ``torchrun`` each process
explains its shard of the data and process 0 writes the files.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..compare import compare
from ..comparison import Comparison
from ..errors import UsageError
from ..registry import default_registry
from .images import check_image, read_image
from .models import load_model
from .preprocess import DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .values import class_indices, floats, key_value, method_named, positive_int, resolve_device
from .values import size as size_type
from .values import stds as stds_type

__all__ = ["DEMO_METRICS", "DEMO_OPTIONS", "IMAGE_METRICS", "add_compare_parser", "compare_command"]

#: Metrics of ``camkit compare --demo`` by default.
DEMO_METRICS = (
    "pointing-game",
    "class-discrimination",
    "deletion",
    "insertion",
    "model-randomization",
)
#: Metric options of ``--demo``: objects of 15 to 24 pixels in 64, so a tolerance of 1 pixel;
#: deletion to a blurred copy (black is far from the scenes); the head alone randomised.
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "pointing-game": {"tolerance": 1},
    "class-discrimination": {"tolerance": 1},
    "deletion": {"baseline": "blur"},
    "model-randomization": {"layers": 1},
}
#: Metrics over image files by default (they need no masks).
IMAGE_METRICS = ("deletion", "insertion", "average-drop")
#: Two-object demo scenes, each explained for both of its classes.
DEMO_SCENES = 40
PARTIAL = ".camkit-compare-partial.pt"
#: Files a folder argument stands for.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def add_compare_parser(sub: Any) -> None:
    """Add ``compare`` to the subcommands ``sub`` of the ``camkit`` parser."""
    co = sub.add_parser(
        "compare",
        help="compare methods on explanation-quality metrics (table and figure)",
        description="Explain images (or the demo's scenes, --demo) with several methods, "
        "score every map with metrics, and write the table (table.md, table.csv, table.json: "
        "means with 95%% bootstrap intervals, time per image, memory) and figure.png. An "
        "interrupted run resumes when started again; under torchrun each process takes a shard.",
    )
    co.add_argument(
        "images", nargs="*", metavar="IMAGE", help="image files or folders (not with --demo)"
    )
    co.add_argument("--demo", action="store_true", help="the demo's model and scenes, offline")
    co.add_argument("--model", metavar="SPEC", help="torchvision:NAME, timm:NAME or module:fn")
    co.add_argument("--weights", metavar="W", help="weights name or checkpoint file")
    co.add_argument("--num-classes", type=positive_int, metavar="K")
    co.add_argument("--size", type=size_type, metavar="H[,W]", help="input size")
    co.add_argument("--mean", type=floats, metavar="R,G,B", help="normalisation mean")
    co.add_argument("--std", type=stds_type, metavar="R,G,B", help="normalisation std")
    co.add_argument(
        "--methods", default="gradcam,random", help="comma-separated (default: gradcam,random)"
    )
    co.add_argument(
        "--metrics",
        help=f"comma-separated (default: {','.join(IMAGE_METRICS)}; with --demo: "
        f"{','.join(DEMO_METRICS)})",
    )
    co.add_argument("--layer", help="target layer (default: found per model)")
    co.add_argument(
        "--target", type=class_indices, metavar="T", help="class(es) to explain (default: label "
        "with --demo, else the predicted class)",
    )  # fmt: skip
    co.add_argument(
        "--metric-option",
        type=key_value,
        action="append",
        default=[],
        metavar="METRIC.KEY=VALUE",
        help="a metric option (repeatable), e.g. --metric-option deletion.steps=100",
    )
    co.add_argument("--batch-size", type=positive_int, default=16, metavar="N")
    co.add_argument("--bootstrap", type=positive_int, default=1000, metavar="B")
    co.add_argument("--figure-images", type=int, default=4, metavar="K")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--out", default="camkit-compare", help="output folder")
    co.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N"
    )
    co.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar"
    )
    co.set_defaults(func=compare_command)


class _Images(Dataset[tuple[Tensor, Tensor] | Tensor]):
    """Image files read and preprocessed one at a time, with their class when given."""

    def __init__(self, paths: Sequence[Path], prep: Preprocess, labels: list[int] | None):
        self.paths, self.prep, self.labels = list(paths), prep, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor] | Tensor:
        x = self.prep(read_image(self.paths[i]))[1]
        if self.labels is None:
            return x
        return x, torch.tensor(self.labels[i])


def _demo_data(seed: int) -> tuple[nn.Module, tuple[Tensor, Tensor, Tensor], str]:
    from ..demo.data import generate
    from ..demo.model import load_demo_model

    scenes = generate(DEMO_SCENES, split="test", seed=seed, objects=2)
    labels = torch.from_numpy(scenes.labels)
    masks = torch.from_numpy(scenes.masks)
    x = torch.cat([scenes.tensor()] * 2)
    y = torch.cat([labels[:, 0], labels[:, 1]])
    # region 0: the explained object, region 1: the other one
    return load_demo_model(), (x, y, torch.cat([masks, masks.flip(1)])), "features"


def _image_data(args: argparse.Namespace) -> tuple[nn.Module, Any, str | None]:
    if not args.images:
        raise UsageError("compare expects image files, or --demo for the demo's scenes.")
    if not args.model:
        raise UsageError("compare expects --model SPEC with image files (or --demo).")
    paths: list[Path] = []
    for given in map(Path, args.images):  # a folder stands for its image files, sorted
        if given.is_dir():
            paths += [f for f in sorted(given.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        else:
            paths.append(given)
    if not paths:
        raise UsageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {args.images}.")
    for p in paths:
        check_image(p)
    labels = args.target
    if labels is not None and len(labels) == 1:
        labels = labels * len(paths)
    if labels is not None and len(labels) != len(paths):
        raise UsageError(
            f"--target has {len(labels)} classes for {len(paths)} images; give one for all or "
            "one per image."
        )
    loaded = load_model(args.model, weights=args.weights, num_classes=args.num_classes)
    base = loaded.preprocess or Preprocess(source="defaults")
    prep = Preprocess(
        size=args.size or (base.size if loaded.preprocess else DEFAULT_SIZE),
        mean=args.mean or (base.mean if loaded.preprocess else IMAGENET_MEAN),
        std=args.std or (base.std if loaded.preprocess else IMAGENET_STD),
        resize=None if args.size else base.resize,
        interpolation=base.interpolation,
        source=base.source,
    )
    return loaded.model.eval(), _Images(paths, prep, labels), args.layer


def _metric_options(pairs: list[tuple[str, Any]], demo: bool) -> dict[str, dict[str, Any]]:
    opts: dict[str, dict[str, Any]] = {k: dict(v) for k, v in DEMO_OPTIONS.items()} if demo else {}
    for key, value in pairs:
        metric, dot, option = key.partition(".")
        if not dot or not option:
            raise UsageError(f"--metric-option expects METRIC.KEY=VALUE; got {key}={value!r}.")
        name = default_registry().get_metric(metric).name
        opts.setdefault(name, {})[option] = value
    return opts


def _distributed_start(device: torch.device) -> tuple[int, torch.device]:
    """Join the process group when started by ``torchrun``; the rank and this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return (dist.get_rank() if dist.is_initialized() else 0), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), device


def compare_command(args: argparse.Namespace) -> int:
    """``camkit compare``: the table and figure of methods against metrics."""
    if args.demo and args.images:
        raise UsageError("compare takes image files or --demo, not both.")
    methods = [method_named(m).name for m in args.methods.split(",") if m.strip()]
    default = DEMO_METRICS if args.demo else IMAGE_METRICS
    wanted = args.metrics.split(",") if args.metrics else list(default)
    metrics = [default_registry().get_metric(m.strip()).name for m in wanted if m.strip()]
    metric_options = _metric_options(args.metric_option, args.demo)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder.")
    rank, device = _distributed_start(resolve_device(args.device))
    try:
        model, data, layer = _demo_data(args.seed) if args.demo else _image_data(args)
        out.mkdir(parents=True, exist_ok=True)
        result = compare(
            model.to(device), data, methods, metrics, layer=layer,
            batch_size=args.batch_size, metric_options=metric_options,
            n_bootstrap=args.bootstrap, seed=args.seed, figure_images=args.figure_images,
            progress=args.progress if rank == 0 else False, checkpoint=out / PARTIAL,
        )  # fmt: skip
        if rank == 0:
            _write(result, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _write(result: Comparison, out: Path) -> None:
    (out / "table.md").write_text(result.to_markdown(), encoding="utf-8")
    result.to_csv(out / "table.csv")
    result.to_json(out / "table.json")
    if result.examples is not None:
        result.figure(out / "figure.png")
    for partial in out.glob(PARTIAL + "*"):
        partial.unlink()
    sys.stdout.write(result.to_markdown())
    print(f"\nfiles in {out}: table.md, table.csv, table.json, figure.png")
