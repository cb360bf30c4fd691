"""Explain every torchvision classification builder with Grad-CAM and tabulate the results.

    python scripts/sweep_torchvision.py                       # every builder, table in docs/
    python scripts/sweep_torchvision.py resnet18 vit_b_16     # a subset, table printed
    python scripts/sweep_torchvision.py --one swin_t          # one case in this process (JSON)

Each builder (``torchvision.models.list_models(module=torchvision.models)``) is built with
random weights (``weights=None``, nothing is downloaded), in eval mode, with a fixed seed, and
explained by ``camkit.explain(model, x)`` with ``layer=None``, so that camkit's architecture
adapters (``plugins/adapters.py``) choose the layer. ``x`` is a batch of 2 random images at the
smallest square size the builder accepts: the first size of :data:`SIZES` at which the forward
runs and the layer camkit should choose has more than one position (a 1x1 layer gives a constant
map by construction). Vision transformers fix their input size when built: they get
``image_size`` = twice their patch size, a 2x2 grid of patches.

A case is ``ok`` when the layer chosen is the one the adapters document for the family, and the
maps are ``(2, H, W)``, finite, within [0, 1] and not constant for at least one sample. Every
case runs in a fresh process (peak memory is its own, a crash or a hang is contained); a builder
whose weights alone would not fit in the memory available is listed as not run, with the reason,
and so is a case that outlives ``--timeout``.

Random-init fix-ups (see :func:`build`): torchvision's ViT initialises its classification head
(``heads.head``) to zeros, which makes every class score 0 and every gradient, hence every map,
zero; the sweep re-initialises that weight with small random values. No other builder
zero-initialises a layer on the path from the explained layer to the class score with default
arguments (ResNet's ``zero_init_residual`` is off by default; ConvNeXt's layer scale starts at
1e-6, small but not zero).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = ROOT / "docs" / "torchvision.md"
START, END = "<!-- sweep:start -->", "<!-- sweep:end -->"

#: Square input sizes tried, smallest first (inputs of the whole family that accept any size).
SIZES = tuple(range(32, 513, 16))
BATCH = 2
SEED = 0
THREADS = 2
#: Seconds one case may take (build, size search and explain) before it is stopped.
TIMEOUT_S = 1200
#: Bytes per parameter a case needs at most: the float32 weights, the random-init temporaries
#: (some initialisers draw a full-size tensor before copying it in) and slack for activations.
BYTES_PER_PARAM = 4 * 3

# The layer the adapters document for each family (plugins/adapters.py), written out here so
# that the sweep checks the adapters against their documentation, not against themselves.
DOCUMENTED = {
    "ResNet": "layer4",
    "DenseNet": "features",
    "MobileNetV2": "features",
    "MobileNetV3": "features",
    "EfficientNet": "features",
    "ConvNeXt": "features",
    "SqueezeNet": "features",
    "AlexNet": "features",
    "RegNet": "trunk_output",
    "MNASNet": "layers",
    "ShuffleNetV2": "conv5",
    "GoogLeNet": "inception5b",
    "Inception3": "Mixed_7c",
    "SwinTransformer": "features",
}


def builders() -> list[str]:
    """Every classification builder torchvision registers, sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def documented_layer(model: nn.Module) -> str:
    """The layer ``layer=None`` should resolve to for ``model``, per the adapters' docstring.

    VGG: the last ReLU of ``features``; ViT: ``ln_1`` of the last encoder block; MaxViT, which
    no adapter covers: camkit's own search, the last block (``blocks.<last>``).
    """
    family = type(model).__name__
    if family == "VGG":
        relus = [n for n, m in model.features.named_children() if isinstance(m, nn.ReLU)]
        return f"features.{relus[-1]}"
    if family == "VisionTransformer":
        last = list(model.encoder.layers.named_children())[-1][0]
        return f"encoder.layers.{last}.ln_1"
    if family == "MaxVit":
        return f"blocks.{len(model.blocks) - 1}"
    return DOCUMENTED[family]


def builder_kwargs(name: str) -> dict[str, Any]:
    """Extra builder arguments: ViTs fix their input size, the smallest is a 2x2 patch grid."""
    if name.startswith("vit_"):
        patch = int(re.fullmatch(r"vit_[a-z]+_(\d+)", name).group(1))  # type: ignore[union-attr]
        return {"image_size": 2 * patch}
    return {}


def count_params(name: str) -> int:
    """Parameters of the builder's model, counted on the meta device (nothing allocated).

    Builders that compute their widths with tensors (RegNet) cannot run there: their count is
    the one torchvision's weights document (0 when there is none).
    """
    try:
        with torch.device("meta"), _quiet():
            model = torchvision.models.get_model(name, weights=None, **builder_kwargs(name))
        return sum(p.numel() for p in model.parameters())
    except Exception:  # not buildable on the meta device
        weights = list(torchvision.models.get_model_weights(name))
        return int(weights[0].meta.get("num_params", 0)) if weights else 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torchvision's notice that GoogLeNet's and Inception's default init will change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The default weight initialization", FutureWarning)
        yield


def build(name: str, seed: int = SEED, **kwargs: Any) -> nn.Module:
    """The builder's model with random weights, in eval mode, ready to be explained.

    ``kwargs`` go to the builder, over :func:`builder_kwargs`. torchvision's ViT
    zero-initialises ``heads.head`` (weight and bias): every logit is then 0 and no gradient
    reaches any layer. The weight gets small random values instead.
    """
    torch.manual_seed(seed)
    with _quiet():
        model = torchvision.models.get_model(
            name, weights=None, **{**builder_kwargs(name), **kwargs}
        )
    head = getattr(getattr(model, "heads", None), "head", None)
    if type(model).__name__ == "VisionTransformer" and isinstance(head, nn.Linear):
        with torch.no_grad():
            nn.init.normal_(head.weight, std=0.02)
    return model.eval()


def positions(model: nn.Module, layer: str, size: int) -> int | None:
    """Spatial positions of ``layer``'s output for a ``size`` x ``size`` input (no gradients);
    ``None`` when the forward fails at that size."""
    shapes: list[tuple[int, ...]] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, a, out: shapes.append(tuple(out.shape))
    )
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception:  # the model does not accept this size
        return None
    finally:
        handle.remove()
    shape = shapes[-1]
    if type(model).__name__ == "VisionTransformer":
        return shape[1] - 1  # tokens (N, 1 + h * w, C): the class token first
    if type(model).__name__ == "SwinTransformer":
        return math.prod(shape[1:3])  # channels last (N, H, W, C)
    return math.prod(shape[2:])


def smallest_size(model: nn.Module, sizes: Iterable[int] = SIZES) -> int:
    """The smallest square input the model accepts with more than one position at its layer."""
    fixed = getattr(model, "image_size", None)  # ViT: built for one size
    candidates = [fixed] if isinstance(fixed, int) else list(sizes)
    layer = documented_layer(model)
    for size in candidates:
        n = positions(model, layer, size)
        if n is not None and n > 1:
            return size
    raise RuntimeError(f"no input size in {candidates[0]}..{candidates[-1]} gives a map")


@dataclass
class Row:
    """One line of the table."""

    name: str
    family: str = ""
    params_m: float = 0.0
    size: int = 0
    layer: str = ""
    result: str = ""
    seconds: float = 0.0
    peak_gib: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result.startswith("ok")

    @property
    def not_run(self) -> bool:
        return self.result.startswith("not run")


def check(res: Any, expected_layer: str, size: int) -> str:
    """``"ok"``, or what is wrong with a Grad-CAM result on a batch of ``BATCH``."""
    maps: Tensor = res.maps
    problems = []
    if res.layer != expected_layer:
        problems.append(f"layer {res.layer!r}, documented {expected_layer!r}")
    if tuple(maps.shape) != (BATCH, size, size):
        problems.append(f"maps of shape {tuple(maps.shape)}, expected {(BATCH, size, size)}")
    if not bool(torch.isfinite(maps).all()):
        problems.append("maps not finite")
    elif float(maps.min()) < 0 or float(maps.max()) > 1:
        problems.append(f"maps outside [0, 1]: {float(maps.min())}..{float(maps.max())}")
    else:
        flat = maps.flatten(1)
        constant = int((flat.amax(1) == flat.amin(1)).sum())
        if constant == maps.shape[0]:
            problems.append("every map is constant")
        elif constant:
            return f"ok ({constant} of {maps.shape[0]} maps constant)"
    return "ok" if not problems else "FAIL: " + "; ".join(problems)


def run_case(name: str) -> Row:
    """Build, size and explain one builder in this process."""
    import camkit

    torch.set_num_threads(THREADS)
    row = Row(name)
    start = time.perf_counter()
    try:
        model = build(name)
        row.family = type(model).__name__
        row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        expected = documented_layer(model)
        row.size = smallest_size(model)
        torch.manual_seed(SEED)
        x = torch.randn(BATCH, 3, row.size, row.size)
        res = camkit.explain(model, x)
        row.layer = str(res.layer)
        row.result = check(res, expected, row.size)
    except Exception as exc:
        row.result = f"error: {type(exc).__name__}: {_one_line(str(exc))}"
    row.seconds = time.perf_counter() - start
    row.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return row


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def available_bytes() -> int:
    """Memory available to a new process (``MemAvailable``), or total physical memory."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_isolated(name: str, timeout: float = TIMEOUT_S) -> Row:
    """:func:`run_case` in a fresh process; too large or too slow gives a ``not run`` row."""
    params = count_params(name)
    need, have = params * BYTES_PER_PARAM, available_bytes()
    if need > 0.8 * have:
        return Row(
            name,
            params_m=params / 1e6,
            result=f"not run: memory, about {need / 2**30:.0f} GiB needed for "
            f"{params / 1e6:.0f} M parameters, {have / 2**30:.0f} GiB available",
        )
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--one", name],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Row(
            name,
            params_m=params / 1e6,
            result=f"not run: time, stopped after {timeout:.0f} s",
            seconds=time.perf_counter() - start,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return Row(**json.loads(lines[-1]))
    why = "killed by the system (out of memory?)" if done.returncode == -9 else "crashed"
    tail = _one_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")
    return Row(
        name,
        params_m=params / 1e6,
        result=f"error: process {why}, exit {done.returncode}: {tail}",
        seconds=time.perf_counter() - start,
    )


def sweep(names: Sequence[str], timeout: float = TIMEOUT_S, log: Any = sys.stderr) -> list[Row]:
    """Every builder of ``names``, one fresh process each, logging one line per case."""
    rows = []
    for i, name in enumerate(names, 1):
        row = run_isolated(name, timeout)
        rows.append(row)
        if log is not None:
            print(
                f"[{i}/{len(names)}] {name}: {row.result} ({row.size} px, {row.layer or '-'}, "
                f"{row.seconds:.1f} s, {row.peak_gib:.2f} GiB)",
                file=log,
                flush=True,
            )
        gc.collect()
    return rows


def table(rows: Sequence[Row]) -> str:
    """The Markdown table of ``rows``."""
    lines = [
        "| builder | family | parameters (M) | input | layer chosen | result | time (s) "
        "| peak memory (GiB) |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        size = f"{r.size}x{r.size}" if r.size else "-"
        layer = f"`{r.layer}`" if r.layer else "-"
        result = r.result.replace("|", "\\|")
        peak = f"{r.peak_gib:.2f}" if r.peak_gib else "-"
        secs = f"{r.seconds:.1f}" if r.seconds else "-"
        lines.append(
            f"| `{r.name}` | {r.family or '-'} | {r.params_m:.1f} | {size} | {layer} | {result} "
            f"| {secs} | {peak} |"
        )
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    ok = sum(r.ok for r in rows)
    not_run = sum(r.not_run for r in rows)
    return f"{len(rows)} builders: {ok} ok, {len(rows) - ok - not_run} failed, {not_run} not run."


def section(rows: Sequence[Row], date: str, total_s: float) -> str:
    """The generated part of the docs page: the run's context, the summary and the table."""
    context = (
        f"Run on {date}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()} CPU, {THREADS} threads, "
        f"{available_bytes() / 2**30:.0f} GiB available; {total_s / 60:.0f} minutes in all."
    )
    return "\n\n".join([context, summary(rows), table(rows)])


def write_page(path: Path, generated: str) -> None:
    """Replace the text between the sweep markers of ``path`` (the page must have them)."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(
            f"{path} lacks the markers {START} and {END}; add them where the table goes"
        )
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{generated}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="builders to run (default: every one)")
    parser.add_argument("--one", metavar="NAME", help="run one case here and print it as JSON")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per case")
    parser.add_argument(
        "--write",
        type=Path,
        nargs="?",
        const=DOCS_PAGE,
        default=None,
        help=f"write the table into this page (default {DOCS_PAGE.relative_to(ROOT)}); "
        "implied when no names are given",
    )
    parser.add_argument("--date", default=dt.date.today().isoformat(), help="date on the page")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(asdict(run_case(args.one))))
        return 0
    known = builders()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown builder(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    names = args.names or known
    start = time.perf_counter()
    rows = sweep(names, args.timeout)
    generated = section(rows, args.date, time.perf_counter() - start)
    target = args.write if args.write is not None else (None if args.names else DOCS_PAGE)
    if target is not None:
        write_page(target, generated)
        print(f"wrote {target}", file=sys.stderr)
    print(generated)
    return 0 if all(r.ok or r.not_run for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
