"""The ``explain`` command: overlays (.png) and maps (.npy) for image files, written to a
temporary folder and moved into place only when every image succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import CamkitError, UsageError
from ..explain import Explainer
from ..result import CamResult
from ..targets import BoxTarget, SegmentationTarget, select_output
from ..viz import COLORMAPS, overlay
from .images import check_image, path_text, read_image, write_image
from .models import load_model
from .output import staged_output
from .preprocess import DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .values import TargetForm, method_named, read_labels, resolve_device

__all__ = ["check_look", "explain_command"]


def check_look(alpha: float, colormap: str) -> None:
    """Check ``--alpha`` and ``--colormap`` before any work.

    Raises:
        UsageError: ``alpha`` is outside [0, 1] or ``colormap`` is not one of
            :data:`camkit.viz.COLORMAPS`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--alpha expects a value in [0, 1]; got {alpha}.")
    if colormap not in COLORMAPS:
        raise UsageError(f"--colormap expects one of {', '.join(COLORMAPS)}; got {colormap!r}.")


def _targets(targets: list[int] | None, n: int) -> list[int] | int | None:
    if targets is None:
        return None
    if len(targets) == 1:
        return targets[0]
    if len(targets) != n:
        raise UsageError(
            f"--target has {len(targets)} classes for {n} image(s); give one class for all "
            "images or one per image."
        )
    return targets


def _check_images(images: Sequence[Path], method: str, max_pixels: int) -> None:
    seen: dict[str, Path] = {}
    for p in images:
        check_image(p, max_pixels)
        name = f"{p.stem}_{method}"
        if name in seen:
            raise UsageError(
                f"images {path_text(seen[name])} and {path_text(p)} would both write "
                f"{name}.png; rename one or explain them in separate runs."
            )
        seen[name] = p


def _preprocess(base: Preprocess | None, args: argparse.Namespace) -> Preprocess:
    given = [f for f in ("size", "mean", "std") if getattr(args, f) is not None]
    if base is None:
        words = {"size": "224x224", "mean": "ImageNet mean", "std": "ImageNet std"}
        defaults = [words[f] for f in words if f not in given]
        parts = [f"--{', --'.join(given)}"] if given else []
        if defaults:
            parts.append(f"defaults: {', '.join(defaults)}")
        return Preprocess(
            size=args.size or DEFAULT_SIZE,
            mean=args.mean or IMAGENET_MEAN,
            std=args.std or IMAGENET_STD,
            source="; ".join(parts),
        )
    if not given:
        return base
    return Preprocess(
        size=args.size or base.size,
        mean=args.mean or base.mean,
        std=args.std or base.std,
        resize=None if args.size else base.resize,
        interpolation=base.interpolation,
        source=f"{base.source}, overridden by --{', --'.join(given)}",
    )


def _layer(text: str | None) -> str | list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names[0] if len(names) == 1 else names


def _label(categories: list[str] | None, index: int | None) -> str | None:
    if categories is None or index is None or not 0 <= index < len(categories):
        return None
    return categories[index]


def _class_text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    parts = [str(entry["class"]) if entry.get("class") is not None else "(custom target)"]
    if entry.get("label"):
        parts.append(str(entry["label"]))
    extra = []
    if entry.get("score") is not None:
        extra.append(f"score {entry['score']:.3f}")
    if entry.get("probability") is not None:
        extra.append(f"p={entry['probability']:.3g}")
    return " ".join(parts) + (f" ({', '.join(extra)})" if extra else "")


def explain_command(args: argparse.Namespace) -> int:
    """``camkit explain``: an overlay (.png) and a map (.npy) per image, in batches, then a
    summary (text or ``--json``); every check that needs no model runs first."""
    images = [Path(p) for p in [*args.images, *args.image_paths]]
    if not images:
        raise UsageError("explain expects at least one image: as an argument or --image-path.")
    form = args.target if isinstance(args.target, TargetForm) else None
    targets = None if form is not None else _targets(args.target, len(images))
    check_look(args.alpha, args.colormap)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder.")
    method = method_named(args.method)
    _check_images(images, method.name, args.max_pixels)
    device = resolve_device(args.device)
    options = dict(args.option)
    options.setdefault("progress", args.progress)
    for flag in ("aug_smooth", "eigen_smooth"):
        if getattr(args, flag):
            options[flag] = True
    loaded = load_model(args.model, weights=args.weights, num_classes=args.num_classes)
    if loaded.random_init:
        print(
            f"camkit: note: {args.model} has random weights (no --weights given), so its maps "
            "show nothing learned; pass --weights (DEFAULT for torchvision, pretrained for "
            "timm, or a checkpoint file).",
            file=sys.stderr,
        )
    categories = read_labels(args.labels) if args.labels else loaded.categories
    prep = _preprocess(loaded.preprocess, args)
    model = loaded.model.to(device)
    records: list[dict[str, Any]] = []
    layer: Any = None
    map_size: list[int] = []
    with (
        Explainer(model, layer=_layer(args.layer), method=method, **options) as explainer,
        staged_output(out) as stage,
    ):
        show = args.progress
        if show is None:
            show = sys.stderr.isatty() and len(images) > args.batch_size
        with tqdm(
            total=len(images),
            desc="camkit explain",
            unit="image",
            disable=not show,
            leave=False,
            file=sys.stderr,
        ) as bar:
            for start in range(0, len(images), args.batch_size):
                batch = images[start : start + args.batch_size]
                batch_targets = (
                    targets[start : start + len(batch)] if isinstance(targets, list) else targets
                )
                shown, xs = zip(*(prep(read_image(p, args.max_pixels)) for p in batch), strict=True)
                x = torch.stack(xs).to(device)
                if form is not None:
                    batch_targets = _form_target(form, model, x)
                res, output = _run(explainer, model, x, batch_targets)
                layer = res.layer
                logits = _logits(output, explainer.options["output"], len(batch))
                maps = res.maps.detach().float().cpu().numpy()
                map_size = list(maps.shape[1:])
                for i, p in enumerate(batch):
                    name = f"{p.stem}_{res.method}"
                    write_image(
                        stage / f"{name}.png",
                        overlay(shown[i], maps[i], alpha=args.alpha, colormap=args.colormap),
                    )
                    np.save(stage / f"{name}.npy", maps[i].astype(np.float32))
                    records.append(
                        _record(p, out, name, res, i, logits, categories, args.target is not None)
                    )
                bar.update(len(batch))
    summary = {
        "model": args.model,
        "weights": loaded.weights,
        "random_init": loaded.random_init,
        "method": method.name,
        "layer": layer,
        "device": str(device),
        "preprocess": prep.as_dict(),
        "map_size": map_size,
        "out": str(out),
        "images": records,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, prep)
    return 0


def _form_target(form: TargetForm, model: nn.Module, x: Tensor) -> Any:
    """The target of a ``--target`` form for the batch ``x``: a :class:`BoxTarget`, or a
    :class:`SegmentationTarget` over the class's mask predicted on ``x``."""
    if form.kind == "box":
        if form.box is None:
            return BoxTarget(index=form.index, labels=None)
        labels = None if form.label is None else [form.label]
        return BoxTarget(torch.tensor([form.box]), labels=labels)
    assert form.category is not None
    with torch.no_grad():
        logits = select_output(model(x), None)
    if not isinstance(logits, Tensor) or logits.ndim < 3:
        raise UsageError(
            f"--target mask:{form.category} expects a segmentation model, whose output holds "
            "per-pixel scores (N, K, H, W); this model's does not."
        )
    if not 0 <= form.category < logits.shape[1]:
        raise UsageError(f"--target mask:{form.category}: the model has {logits.shape[1]} classes.")
    return SegmentationTarget(form.category, (logits.argmax(1) == form.category).float())


def _run(explainer: Explainer, model: nn.Module, x: Tensor, target: Any) -> tuple[CamResult, Any]:
    """Explain one batch; also return the output of the model's first forward on it."""
    outputs: list[Any] = []

    def keep(module: nn.Module, inputs: Any, output: Any) -> None:
        if not outputs:
            outputs.append(output)

    handle = model.register_forward_hook(keep)
    try:
        res = explainer(x, target=target)
    except CamkitError:
        raise
    except Exception as exc:  # the model's own failure, whatever its type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CamkitError(
            f"the model failed on a batch of shape {tuple(x.shape)}: {type(exc).__name__}"
            f"{': ' + first if first else ''}. Check the input size (--size) and the model "
            "spec; on a GPU, a smaller --batch-size needs less memory."
        ) from exc
    finally:
        handle.remove()
    return res, outputs[0] if outputs else None


def _logits(output: Any, choice: Any, n: int) -> Tensor | None:
    """The ``(n, K)`` class scores of a model output, or ``None`` when it has none."""
    if output is None:
        return None
    try:
        logits = select_output(output, choice)
    except CamkitError:
        return None
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n:
        return None
    return logits.detach().float().cpu()


def _record(
    path: Path,
    out: Path,
    name: str,
    res: CamResult,
    i: int,
    logits: Tensor | None,
    categories: list[str] | None,
    explicit_target: bool,
) -> dict[str, Any]:
    cls = None if res.targets is None else int(res.targets[i])
    predicted = None
    prob = None
    if logits is not None:
        row = logits[i]
        probs = row.softmax(dim=0) if row.numel() > 1 else None
        top = int(row.argmax())
        predicted = {
            "class": top,
            "label": _label(categories, top),
            "probability": None if probs is None else float(probs[top]),
        }
        if probs is not None and cls is not None and 0 <= cls < row.numel():
            prob = float(probs[cls])
    return {
        "image": str(path),
        "predicted": predicted,
        "target": {
            "class": cls,
            "label": _label(categories, cls),
            "score": float(res.scores[i]),
            "probability": prob,
            "given": explicit_target,
        },
        "overlay": str(out / f"{name}.png"),
        "map": str(out / f"{name}.npy"),
    }


def _print_summary(summary: dict[str, Any], prep: Preprocess) -> None:
    model = summary["model"]
    if summary["weights"]:
        model += f" (weights {summary['weights']})"
    elif summary["random_init"]:
        model += " (random weights)"
    layer = summary["layer"]
    layer_text = ", ".join(layer) if isinstance(layer, list) else layer
    print(f"model    {model}")
    print(f"method   {summary['method']} at layer {layer_text}, device {summary['device']}")
    print(f"input    {prep.describe()}")
    for rec in summary["images"]:
        print()
        print(rec["image"])
        print(f"  predicted  {_class_text(rec['predicted'])}")
        print(f"  explained  {_class_text(rec['target'])}")
        print(f"  overlay    {rec['overlay']}")
        print(f"  map        {rec['map']}")
    n = len(summary["images"])
    size = "x".join(str(v) for v in summary["map_size"])
    print()
    print(f"wrote {n} overlay(s) and {n} map(s) ({size} float32 in [0, 1]) to {summary['out']}")
