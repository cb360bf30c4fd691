"""The ``camkit`` command: ``explain``, ``methods``, ``plugins`` and ``demo``.

Errors a user can cause print ``camkit: error: <message>`` on stderr, without a traceback, and
exit with status 2 for a wrong command line and 1 for anything else; ``explain`` writes its
files to a temporary folder and moves them into place only when every image succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import __version__
from .errors import CamkitError, InputError, UnknownMethodError, UsageError
from .explain import Explainer
from .io import (
    DEFAULT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    check_image,
    load_model,
    read_image,
    read_labels,
    resolve_device,
    staged_output,
    write_image,
)
from .method import Method
from .registry import default_registry
from .result import CamResult
from .targets import select_output
from .viz import overlay

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """``argparse`` with camkit's error line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"camkit: error: {message}\n")


# -- argument types --------------------------------------------------------------------------
def _split(text: str) -> list[str]:
    return [t.strip() for t in text.replace("x", ",").split(",") if t.strip()]


def _size(text: str) -> tuple[int, int]:
    try:
        values = [int(t) for t in _split(text)]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive ints); got {text!r}")
    return (values[0], values[-1])


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 numbers (a or a,b,c); got {text!r}")
    return values


def _stds(text: str) -> tuple[float, ...]:
    values = _floats(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers; got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected a class index or comma-separated indices; got {text!r}"
        )
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int; got {text!r}")
    return value


def parse_value(text: str) -> Any:
    """An ``--option`` value: int, float, ``true``/``false``, ``none``, a comma-separated tuple
    of those, or the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(parse_value(t.strip()) for t in text.split(",") if t.strip())
    return text


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value; got {text!r}")
    return key.strip().replace("-", "_"), parse_value(value)


# -- the parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``camkit`` argument parser."""
    parser = _Parser(
        prog="camkit",
        description="Class activation maps for PyTorch models.",
        epilog="Run 'camkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"camkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ex = sub.add_parser(
        "explain",
        help="explain images with a model: overlays (.png) and maps (.npy)",
        description="Explain images with a model and a CAM method; write an overlay (.png) "
        "and the map (.npy, float32 in [0, 1] at the model's input size) per image.",
    )
    ex.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    ex.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="torchvision:NAME, timm:NAME or module.path:factory",
    )
    ex.add_argument(
        "--weights",
        metavar="W",
        help="a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), 'pretrained' for timm, "
        "or a checkpoint file (a state_dict)",
    )
    ex.add_argument("--method", default="gradcam", help="CAM method (default: gradcam)")
    ex.add_argument("--layer", help="target layer(s), dotted names, comma-separated")
    ex.add_argument(
        "--target",
        type=_ints,
        metavar="T",
        help="class to explain: one for all images, or one per image (comma-separated); "
        "default: the predicted class",
    )
    ex.add_argument("--out", default="camkit-out", help="output folder (default: ./camkit-out)")
    ex.add_argument(
        "--size",
        type=_size,
        metavar="H[,W]",
        help="resize images to this size (default: the weights' preprocessing, else 224)",
    )
    ex.add_argument(
        "--mean", type=_floats, metavar="R,G,B", help="normalisation mean (default: ImageNet)"
    )
    ex.add_argument(
        "--std", type=_stds, metavar="R,G,B", help="normalisation std (default: ImageNet)"
    )
    ex.add_argument(
        "--num-classes",
        type=_positive,
        metavar="K",
        help="classes of the model's classifier (torchvision and timm specs)",
    )
    ex.add_argument("--labels", metavar="FILE", help="class names: one per line, or JSON")
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap weight (default: 0.5)")
    ex.add_argument("--colormap", default="jet", help="heatmap colours (default: jet)")
    ex.add_argument(
        "--batch-size",
        type=_positive,
        default=8,
        metavar="N",
        help="images per explain call (default: 8)",
    )
    ex.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (repeatable), e.g. --option relu=false",
    )
    _device_and_progress(ex)
    ex.add_argument("--json", action="store_true", help="print a JSON summary")
    ex.set_defaults(func=_explain)

    me = sub.add_parser(
        "methods",
        help="list the CAM methods",
        description="List the CAM methods: name, aliases, gradients, cost and paper.",
    )
    me.add_argument("pattern", nargs="?", default="*", help="fnmatch filter (default: *)")
    me.add_argument("--json", action="store_true", help="print JSON")
    me.set_defaults(func=_methods)

    pl = sub.add_parser(
        "plugins",
        help="list the loaded plugins as JSON",
        description="Print the loaded plugins as JSON: name, distribution, version, hooks "
        "and methods of each.",
    )
    pl.set_defaults(func=_plugins)

    de = sub.add_parser(
        "demo",
        help="train a small model on generated scenes and explain it with every method",
        description="Train a small model on generated scenes and explain it with the methods.",
    )
    de.add_argument("--out", default="camkit-demo", help="output folder (default: ./camkit-demo)")
    de.add_argument("--methods", help="comma-separated method names (default: all)")
    de.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _device_and_progress(de)
    de.add_argument("--json", action="store_true", help="print the table as JSON")
    de.set_defaults(func=_demo)
    return parser


def _device_and_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: on in a terminal for long work)",
    )


# -- main ------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``camkit`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit
    status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except UsageError as exc:
        print(f"camkit: error: {exc}", file=sys.stderr)
        return 2
    except CamkitError as exc:
        print(f"camkit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("camkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that stopped reading (head)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# -- explain ---------------------------------------------------------------------------------
def _get_method(name: str) -> Method:
    try:
        return default_registry().get(name)
    except UnknownMethodError as exc:
        text = str(exc).replace("List methods with camkit.list_methods().", "").strip()
        raise UnknownMethodError(f"{text} List them with 'camkit methods'.") from None


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


def _check_images(images: Sequence[Path], method: str) -> None:
    seen: dict[str, Path] = {}
    for p in images:
        check_image(p)
        name = f"{p.stem}_{method}"
        if name in seen:
            raise UsageError(
                f"images {seen[name]} and {p} would both write {name}.png; rename one or "
                "explain them in separate runs."
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


def _explain(args: argparse.Namespace) -> int:
    images = [Path(p) for p in args.images]
    targets = _targets(args.target, len(images))
    try:  # check the look of the overlays before any work
        overlay(np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1)), args.alpha, args.colormap)
    except InputError as exc:
        raise UsageError(
            str(exc).replace("overlay alpha", "--alpha").replace("overlay colormap", "--colormap")
        ) from exc
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder.")
    method = _get_method(args.method)
    _check_images(images, method.name)
    device = resolve_device(args.device)
    options = dict(args.option)
    options.setdefault("progress", args.progress)
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
                shown, xs = zip(*(prep(read_image(p)) for p in batch), strict=True)
                x = torch.stack(xs).to(device)
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


def _run(explainer: Explainer, model: nn.Module, x: Tensor, target: Any) -> tuple[CamResult, Any]:
    """Explain one batch; also return the output of the model's first forward on it."""
    outputs: list[Any] = []

    def keep(module: nn.Module, inputs: Any, output: Any) -> None:
        if not outputs:
            outputs.append(output)

    handle = model.register_forward_hook(keep)
    try:
        res = explainer(x, target=target)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CamkitError(
            f"the model failed on a batch of shape {tuple(x.shape)}: {first}. Check the input "
            "size (--size) and the model spec; on a GPU, a smaller --batch-size needs less memory."
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


# -- methods, plugins ------------------------------------------------------------------------
def _methods(args: argparse.Namespace) -> int:
    registry = default_registry()
    rows: list[dict[str, Any]] = []
    for name in registry.names(args.pattern):
        m = registry.get(name)
        rows.append(
            {
                "name": m.name,
                "aliases": list(m.aliases),
                "needs_gradients": m.needs_gradients,
                "class_discriminative": m.class_discriminative,
                "cost": m.cost,
                "paper": m.citation,
                "options": {k: v for k, v in m.options.items()},
                "plugin": registry.owner(name),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=repr))
        return 0
    if not rows:
        raise CamkitError(f"no method matches {args.pattern!r}; run 'camkit methods' for all.")
    table = [
        [
            r["name"],
            ", ".join(r["aliases"]) or "-",
            "yes" if r["needs_gradients"] else "no",
            r["cost"] or "-",
            r["paper"] or "-",
        ]
        for r in rows
    ]
    _print_table(["method", "aliases", "gradients", "cost", "paper"], table)
    return 0


def _plugins(args: argparse.Namespace) -> int:
    print(json.dumps(default_registry().plugins(), indent=2))
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r, widths, strict=True)]
        print("  ".join(cells).rstrip())


# -- demo ------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def _demo(args: argparse.Namespace) -> int:
    methods = None
    if args.methods:
        methods = [_get_method(m).name for m in args.methods.split(",") if m.strip()]
    device = resolve_device(args.device)
    try:
        demo = importlib.import_module("camkit.demo")
    except ImportError as exc:
        raise CamkitError(f"the demo cannot be imported: {exc}; reinstall camkit.") from exc
    run_demo = getattr(demo, "run_demo", None)
    if run_demo is None:
        raise CamkitError(
            "this installation of camkit has no demo (camkit.demo.run_demo is missing); "
            "reinstall camkit."
        )
    out = Path(args.out)
    rows = run_demo(
        out, methods=methods, device=str(device), progress=args.progress, seed=args.seed
    )
    rows = list(rows or [])
    if args.json:
        print(json.dumps({"out": str(out), "rows": rows}, indent=2, default=str))
        return 0
    if rows:
        header: list[str] = []
        for r in rows:
            header += [k for k in r if k not in header]
        _print_table(header, [[_cell(r.get(k)) for k in header] for r in rows])
        print()
    print(f"files in {out}")
    return 0
