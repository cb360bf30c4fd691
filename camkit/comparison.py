""":class:`Comparison`: per-sample metric values of several methods, and the table made of them
(means, bootstrap 95 % intervals, time per image, peak memory growth) as Markdown, CSV, JSON
and a figure of maps.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .viz import grid, overlay, save_image

__all__ = ["Comparison", "bootstrap_interval"]


def bootstrap_interval(
    values: Tensor, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` ``(N,)`` (``NaN`` left out):
    ``n_bootstrap`` resamples with replacement drawn by a generator seeded with ``seed``, so the
    same values give the same interval. ``(nan, nan)`` when no value is defined."""
    v = values[~values.isnan()].double()
    if v.numel() == 0:
        return math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_bootstrap, v.numel()), generator=g)
    means = v[idx].mean(dim=1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(low), float(high)


def _display(image: Tensor) -> np.ndarray:
    """An input image ``(C, H, W)`` as ``(H, W, 3)`` float in [0, 1] (min-max over the image)."""
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-12)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    out: np.ndarray = img[:3].permute(1, 2, 0).numpy()
    return out


@dataclass
class Comparison:
    """Methods compared on metrics over a data set.

    Attributes:
        methods: canonical method names, in the order given.
        metrics: canonical metric names that were computed, in the order given.
        values: ``values[method][metric]`` ``(N,)`` float64, one value per sample in the data's
            order (``NaN`` where the metric is undefined for a sample).
        higher_is_better: each metric's direction.
        seconds: each method's explain time in seconds, summed over the data.
        images: the number of samples.
        memory: each method's peak memory growth in bytes during its explain calls (the
            device's allocator on CUDA, the process's peak resident memory on the CPU), or
            ``None`` where it could not be measured.
        skipped: metrics left out, with the reason.
        examples: ``(K, C, H, W)`` the first inputs, for :meth:`figure`.
        example_maps: ``example_maps[method]`` ``(K, H, W)`` their maps.
        n_bootstrap, seed, confidence: the bootstrap's settings.
        device: where the model ran.
    """

    methods: list[str]
    metrics: list[str]
    values: dict[str, dict[str, Tensor]]
    higher_is_better: dict[str, bool]
    seconds: dict[str, float]
    images: int
    memory: dict[str, int | None]
    skipped: dict[str, str] = field(default_factory=dict)
    examples: Tensor | None = None
    example_maps: dict[str, Tensor] = field(default_factory=dict)
    n_bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95
    device: str = "cpu"

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per method: ``"method"``; for each metric its mean (key: the metric's name),
        ``"<metric> low"`` and ``"<metric> high"`` (the bootstrap interval) and
        ``"<metric> n"`` (samples where it is defined); ``"time per image (ms)"``;
        ``"peak memory growth (MB)"`` (``None`` where not measured)."""
        out = []
        for method in self.methods:
            row: dict[str, Any] = {"method": method}
            for metric in self.metrics:
                v = self.values[method][metric]
                low, high = bootstrap_interval(v, self.n_bootstrap, self.seed, self.confidence)
                defined = int((~v.isnan()).sum())
                row[metric] = float(v.nanmean()) if defined else math.nan
                row[f"{metric} low"], row[f"{metric} high"] = low, high
                row[f"{metric} n"] = defined
            row["time per image (ms)"] = self.seconds[method] / max(self.images, 1) * 1000
            mem = self.memory.get(method)
            row["peak memory growth (MB)"] = None if mem is None else mem / 2**20
            out.append(row)
        return out

    def best(self, metric: str) -> str:
        """The method with the best mean on ``metric``."""
        rows = [r for r in self.rows if not math.isnan(r[metric])]
        if not rows:
            raise InputError(f"no method has a defined value of {metric!r}.")
        sign = 1 if self.higher_is_better[metric] else -1
        return str(max(rows, key=lambda r: sign * r[metric])["method"])

    def to_markdown(self, digits: int = 3) -> str:
        """The table: a row per method, each metric's mean and interval, time and memory; a line
        on directions, the interval and the skipped metrics below."""
        arrows = {m: "↑" if self.higher_is_better[m] else "↓" for m in self.metrics}
        head = ["method", *(f"{m} {arrows[m]}" for m in self.metrics)]
        head += ["time per image", "peak memory growth"]
        lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for r in self.rows:
            cells = [str(r["method"])]
            for m in self.metrics:
                if math.isnan(r[m]):
                    cells.append("n/a")
                else:
                    cells.append(
                        f"{r[m]:.{digits}f} [{r[f'{m} low']:.{digits}f}, "
                        f"{r[f'{m} high']:.{digits}f}]"
                    )
            cells.append(f"{r['time per image (ms)']:.1f} ms")
            mem = r["peak memory growth (MB)"]
            cells.append("n/a" if mem is None else f"{mem:.1f} MB")
            lines.append("| " + " | ".join(cells) + " |")
        pct = round(self.confidence * 100)
        lines += [
            "",
            f"{self.images} samples on {self.device}; mean [{pct} % bootstrap interval, "
            f"{self.n_bootstrap} resamples, seed {self.seed}]; ↑ higher is better, ↓ lower is "
            "better.",
        ]
        rows = self.rows
        for m in self.metrics:
            if any(r[f"{m} n"] != self.images for r in rows):
                counts = ", ".join(f"{r['method']} {r[f'{m} n']}" for r in rows)
                lines.append(f"Samples where {m} is defined (of {self.images}): {counts}.")
        for metric, reason in self.skipped.items():
            lines.append(f"Skipped {metric}: {reason}.")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write :attr:`rows` as CSV (one line per method); returns the path."""
        rows = self.rows
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def to_json(self, path: str | os.PathLike[str], per_sample: bool = True) -> Path:
        """Write the rows, the settings and (``per_sample``) every per-sample value as JSON
        (``NaN`` as ``null``); returns the path."""

        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and math.isnan(v) else v

        doc: dict[str, Any] = {
            "rows": [{k: clean(v) for k, v in r.items()} for r in self.rows],
            "higher_is_better": self.higher_is_better,
            "images": self.images,
            "device": self.device,
            "bootstrap": {"resamples": self.n_bootstrap, "seed": self.seed},
            "confidence": self.confidence,
            "skipped": self.skipped,
        }
        if per_sample:
            doc["values"] = {
                method: {m: [clean(float(v)) for v in t] for m, t in by.items()}
                for method, by in self.values.items()
            }
        path = Path(path)
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        return path

    def figure(self, path: str | os.PathLike[str], cell: int = 128) -> Path:
        """Write a PNG grid: a row per example input, the image then its map per method as a
        heatmap overlay; returns the path."""
        if self.examples is None or not self.example_maps:
            raise InputError("this comparison kept no examples to draw (figure_images=0).")
        import cv2

        rows = []
        for i in range(self.examples.shape[0]):
            image = cv2.resize(
                _display(self.examples[i]), (cell, cell), interpolation=cv2.INTER_NEAREST
            )
            row = [image]
            for method in self.methods:
                heat = self.example_maps[method][i].float().cpu().numpy()
                row.append(overlay(image, cv2.resize(heat, (cell, cell)), alpha=0.5))
            rows.append(row)
        picture = grid(
            rows,
            row_labels=[f"#{i}" for i in range(len(rows))],
            col_labels=["image", *self.methods],
            font_scale=0.5,
        )
        return save_image(path, picture)
