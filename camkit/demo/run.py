"""``run_demo``: explain held-out scenes with every method, score the maps, write the results.

Two metrics, both on held-out scenes (``split="test"`` of :func:`camkit.demo.data.generate`):

- **pointing game**: the share of single-object scenes, explained for their class, whose map
  has its maximum on the object. Chance level: the share of the image the object covers,
  averaged over the scenes (a map whose maximum falls anywhere at random).
- **class discrimination**: two-object scenes (two different classes) are explained for each of
  their two classes; among the maps whose maximum falls on either object, the share that falls
  on the object of the explained class. Chance level 0.5: a map that is the same for both
  classes (as for a method that is not class-discriminative) is right for one and wrong for the
  other.

Masks are dilated by :data:`DILATE` pixel(s) for both, and so are the areas of the chance level.
A constant map has no maximum and counts as a miss. Both are computed by camkit's public
metrics (``pointing-game`` and ``class-discrimination``, see :func:`camkit.evaluate`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..evaluate import evaluate
from ..explain import explain
from ..progress import bar
from ..registry import default_registry, list_methods
from ..viz import grid, overlay, save_image, to_rgb_uint8
from .data import CLASSES, Scenes, generate
from .model import load_demo_model

__all__ = [
    "CELL",
    "DILATE",
    "GRID_PAD",
    "LAYER",
    "METHOD_OPTIONS",
    "N_PAIRS",
    "N_SINGLE",
    "TABLE_COLUMNS",
    "run_demo",
]

#: Held-out single-object scenes (pointing game) and two-object scenes (class discrimination;
#: each is explained for both of its classes, so it gives two maps).
N_SINGLE = 40
N_PAIRS = 20
#: The layer explained: the model's last spatial feature map, (32, 16, 16); methods that define
#: their own layers (``Method.layers``, FullGrad) explain those instead.
LAYER = "features"
#: Pixels by which object masks are dilated before asking whether a maximum falls on them.
DILATE = 1
#: Options the demo passes to some methods, to keep the whole demo fast on a CPU.
METHOD_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "sscam": {"n_samples": 2},
    "iscam": {"n_samples": 2},
    "rise": {"n_masks": 300},
    "occlusion": {"patch": 8, "stride": 4},
    "sess": {"scales": [64, 96, 128], "step": 32},
}
#: Methods that do not apply to the demo's CNN, and why: skipped when ``methods`` is ``None``.
NOT_FOR_THE_DEMO: Mapping[str, str] = {
    "legrad": "it explains vision transformers (attention maps); the demo model is a CNN",
}
#: Side of a cell of the grid and of each overlay file, in pixels (images are 64 x 64).
CELL = 128
#: Pixels between the grid's cells, labels and border.
GRID_PAD = 6
#: The columns of ``table.md`` and the keys of each row ``run_demo`` returns.
TABLE_COLUMNS = ("method", "pointing game", "class discrimination", "time per image")


@dataclass
class _Explained:
    maps: np.ndarray  # (M, H, W) float32
    seconds: float


def _explain(
    model: nn.Module, x: Tensor, targets: Tensor, method: str, seed: int, device: torch.device
) -> _Explained:
    opts = dict(METHOD_OPTIONS.get(method, {}))
    # a method defined on layers of its own (FullGrad: every biased layer) chooses them
    layer = None if default_registry().get(method).layers(model) else LAYER
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    res = explain(
        model, x, method=method, layer=layer, target=targets, seed=seed, progress=False, **opts
    )
    maps = res.maps.cpu()
    seconds = time.perf_counter() - start
    return _Explained(maps=maps.numpy(), seconds=seconds)


def _dilated(masks: np.ndarray) -> np.ndarray:
    """``masks`` ``(..., H, W)`` bool, each grown by :data:`DILATE` pixels."""
    if DILATE == 0:
        return masks
    kernel = np.ones((2 * DILATE + 1, 2 * DILATE + 1), np.uint8)
    flat = masks.reshape(-1, *masks.shape[-2:]).astype(np.uint8)
    out = np.stack([cv2.dilate(m, kernel) for m in flat]).astype(bool)
    return out.reshape(masks.shape)


def _peaks(maps: np.ndarray) -> np.ndarray:
    """Flat index of each map's maximum, ``-1`` for a constant map (it has none)."""
    flat = maps.reshape(maps.shape[0], -1)
    idx = flat.argmax(axis=1)
    constant = flat.max(axis=1) <= flat.min(axis=1)
    return np.where(constant, -1, idx)


def _pointing_game(
    model: nn.Module, x: Tensor, y: Tensor, maps: np.ndarray, masks: np.ndarray
) -> float:
    """The ``pointing-game`` metric on the dilated masks ``(M, 1, H, W)`` (no tolerance)."""
    region = torch.from_numpy(masks[:, :1])
    res = evaluate(model, x, torch.from_numpy(maps), "pointing-game", y, region, tolerance=0)
    return res.mean()


def _class_discrimination(
    model: nn.Module, x: Tensor, y: Tensor, maps: np.ndarray, masks: np.ndarray
) -> tuple[float | None, int]:
    """Maps ``(2P, H, W)``: the ``P`` scenes explained for their first object, then for their
    second; masks ``(P, 2, H, W)``. Returns the ``class-discrimination`` metric's share and the
    number of maps counted (those whose maximum falls on an object); the share is ``None`` when
    there are none."""
    regions = torch.from_numpy(np.concatenate([masks, masks[:, ::-1]]))  # (own, other)
    with warnings.catch_warnings():  # the maps left out are counted in the table
        warnings.filterwarnings("ignore", "metric 'class-discrimination' is undefined")
        res = evaluate(
            model, x, torch.from_numpy(maps), "class-discrimination", y, regions, tolerance=0
        )
    counted = int((~res.values.isnan()).sum())
    return (res.mean() if counted else None), counted


@dataclass(frozen=True)
class _Row:
    """A row of the grid: a scene and the map shown for it."""

    name: str  # file name stem
    label: str
    pair: bool  # from the two-object scenes
    image: int  # index of the scene in its set
    map: int  # index of the map in its explain call


def _rows_shown(single: Scenes, pairs: Scenes) -> list[_Row]:
    """The grid's rows.

    The first single-object scene of each class, then the first two-object scene explained for
    each of its classes.
    """
    rows = []
    for c, name in enumerate(CLASSES):
        found = np.flatnonzero(single.labels[:, 0] == c)
        if len(found):
            i = int(found[0])
            rows.append(_Row(name, f"{name}\ntarget: {name}", False, i, i))
    if len(pairs):
        a, b = (CLASSES[int(c)] for c in pairs.labels[0])
        for k, t in enumerate((a, b)):
            name = f"pair-{a}-{b}-target-{t}"
            rows.append(_Row(name, f"{a} + {b}\ntarget: {t}", True, 0, k * len(pairs)))
    return rows


def _cell(image: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """An image (or its overlay with ``heat``) at :data:`CELL` pixels, the map's peak ringed."""
    big = cv2.resize(image, (CELL, CELL), interpolation=cv2.INTER_NEAREST)
    if heat is None:
        return to_rgb_uint8(np.clip(big, 0, 1))
    out = overlay(np.clip(big, 0, 1), heat, alpha=0.5, colormap="jet")
    peak = int(_peaks(heat[None])[0])
    if peak >= 0:
        scale = CELL / heat.shape[1]
        y, x = divmod(peak, heat.shape[1])
        center = (int((x + 0.5) * scale), int((y + 0.5) * scale))
        cv2.circle(out, center, 6, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.circle(out, center, 6, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _table(
    rows: list[dict[str, object]],
    chance: float,
    accuracy: float,
    n_single: int,
    n_pairs: int,
    counted: Mapping[str, int],
    device: torch.device,
    seed: int,
) -> str:
    lines = [
        "# camkit demo",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["time per image"]
        assert isinstance(ms, float)
        pg, cd = r["pointing game"], r["class discrimination"]
        assert isinstance(pg, float) and (cd is None or isinstance(cd, float))
        lines.append(f"| {r['method']} | {_fmt(pg)} | {_fmt(cd)} | {ms:.1f} ms |")
    opts = ", ".join(
        f"{m} " + ", ".join(f"{k}={v}" for k, v in o.items())
        for m, o in METHOD_OPTIONS.items()
        if any(r["method"] == m for r in rows)
    )
    lines += [
        "",
        f"Chance level: pointing game {chance:.2f} (the share of the image an object's dilated "
        "mask covers, averaged over the scenes: a maximum placed at random), class "
        "discrimination 0.50 (a map that is the same for both classes).",
        "",
        f"Pointing game: {n_single} held-out single-object scenes, each explained for "
        "its class; the share of maps whose maximum falls on the object. Class discrimination: "
        f"{n_pairs} held-out scenes holding two objects of different classes, each "
        "explained for both classes; among the maps whose maximum falls on either object, the "
        f"share on the object of the explained class. Object masks dilated by {DILATE} "
        f"pixel{'' if DILATE == 1 else 's'}; a constant map has no maximum and counts as a "
        "miss. Time per image: wall "
        f"time of the method's explain calls divided by the maps they gave ({device.type}).",
        "",
        f"Maps counted for class discrimination (maximum on either object, of {2 * n_pairs}): "
        + ", ".join(f"{m} {k}" for m, k in counted.items())
        + ".",
        "",
        f"Model: the demo CNN, accuracy {accuracy:.2f} on these single-object scenes; layer "
        f"`{LAYER}`; seed {seed}." + (f" Options: {opts}." if opts else ""),
        "",
    ]
    return "\n".join(lines)


def _publish(work: Path, out: Path) -> None:
    """Move the finished results from ``work`` into ``out``, each file whole."""
    if not out.exists():
        os.replace(work, out)
        return
    old = work.parent / "old-overlays"
    if (out / "overlays").exists():
        os.replace(out / "overlays", old)
    os.replace(work / "overlays", out / "overlays")
    os.replace(work / "grid.png", out / "grid.png")
    os.replace(work / "table.md", out / "table.md")


def run_demo(
    out_dir: str | os.PathLike[str],
    methods: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Explain held-out scenes of the demo model with each method; write and return the results.

    Writes into ``out_dir`` (created if needed; files of an earlier run are replaced):
    ``grid.png`` (rows: scenes, columns: the image, then one heatmap overlay per method, with
    the map's maximum ringed), ``overlays/<image-name>_<method>.png`` for each scene and method
    of the grid, and ``table.md``, the table of metrics with their chance levels. Everything is
    computed and written into a temporary folder next to ``out_dir`` first, then moved into
    place, so a failure leaves no half-written output.

    Args:
        out_dir: the output folder.
        methods: method names (aliases allowed); ``None`` for every registered method that
            applies to the demo's CNN (not those in :data:`NOT_FOR_THE_DEMO`).
        device: where the model runs.
        progress: a progress bar over methods; ``None`` shows it when stderr is a terminal.
        seed: selects the held-out scenes and seeds every method's random draws.

    Returns:
        One dict per method, in the order run, with the keys ``"method"`` (canonical name),
        ``"pointing game"`` and ``"class discrimination"`` (floats in [0, 1]; class
        discrimination is ``None`` when no map's maximum fell on an object) and
        ``"time per image"`` (milliseconds).
    """
    registry = default_registry()
    names = (
        [m for m in list_methods() if m not in NOT_FOR_THE_DEMO]
        if methods is None
        else [str(m) for m in methods]
    )
    canonical: list[str] = []
    for name in names:
        c = registry.get(name).name  # UnknownMethodError lists close matches
        if c in NOT_FOR_THE_DEMO:
            raise InputError(f"run_demo cannot run {c!r}: {NOT_FOR_THE_DEMO[c]}.")
        if c not in canonical:
            canonical.append(c)
    if not canonical:
        raise InputError("run_demo expects at least one method; got an empty list.")
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise InputError(f"run_demo writes into a folder; {str(out)!r} is a file.")
    dev = torch.device(device)
    model = load_demo_model(dev)

    single = generate(N_SINGLE, split="test", seed=seed, objects=1)
    pairs = generate(N_PAIRS, split="test", seed=seed, objects=2)
    x_single = single.tensor().to(dev)
    y_single = torch.from_numpy(single.labels[:, 0]).to(dev)
    x_pairs = torch.cat([pairs.tensor()] * 2).to(dev)
    y_pairs = torch.from_numpy(np.concatenate([pairs.labels[:, 0], pairs.labels[:, 1]])).to(dev)
    with torch.no_grad():
        accuracy = float((model(x_single).argmax(1) == y_single).float().mean())
    masks_single = _dilated(single.masks)
    masks_pairs = _dilated(pairs.masks)
    chance = float(masks_single[:, 0].mean())
    shown = _rows_shown(single, pairs)

    # warm-up, not timed, on the batches the methods are timed on: the first call on a batch
    # shape pays for thread pools, kernel choice and camkit's per-shape caches, which the
    # first method in the table would otherwise be charged for
    _explain(model, x_single, y_single, "gradcam", seed, dev)
    _explain(model, x_pairs, y_pairs, "gradcam", seed, dev)
    results: list[dict[str, object]] = []
    cells = [[_cell((pairs if r.pair else single).images[r.image], None)] for r in shown]
    overlays: dict[str, np.ndarray] = {}
    counted: dict[str, int] = {}
    flag = progress if progress is not None else sys.stderr.isatty()
    with bar(len(canonical), "camkit demo", flag) as pbar:
        for method in canonical:
            pbar.set_postfix_str(method)
            a = _explain(model, x_single, y_single, method, seed, dev)
            b = _explain(model, x_pairs, y_pairs, method, seed, dev)
            n_maps = len(a.maps) + len(b.maps)
            discrimination, counted[method] = _class_discrimination(
                model, x_pairs, y_pairs, b.maps, masks_pairs
            )
            results.append(
                {
                    "method": method,
                    "pointing game": _pointing_game(
                        model, x_single, y_single, a.maps, masks_single
                    ),
                    "class discrimination": discrimination,
                    "time per image": (a.seconds + b.seconds) / n_maps * 1000.0,
                }
            )
            for cell_row, r in zip(cells, shown, strict=True):
                image = (pairs if r.pair else single).images[r.image]
                cell_row.append(_cell(image, (b if r.pair else a).maps[r.map]))
                overlays[f"{r.name}_{method}"] = cell_row[-1]
            pbar.update(1)

    picture = grid(
        cells,
        row_labels=[r.label for r in shown],
        col_labels=["image", *canonical],
        pad=GRID_PAD,
        font_scale=0.5,
    )
    table = _table(results, chance, accuracy, len(single), len(pairs), counted, dev, seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        work = tmp / "out"
        (work / "overlays").mkdir(parents=True)
        for key, img in overlays.items():
            save_image(work / "overlays" / f"{key}.png", img)
        save_image(work / "grid.png", picture)
        (work / "table.md").write_text(table, encoding="utf-8")
        _publish(work, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
