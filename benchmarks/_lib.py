"""What the benchmarks share: cases, models, the operations compared, interleaved timing.

Timings are ratios measured in one run: each round runs the subject and every reference once,
back to back (the order alternates between rounds), and a ratio is taken per round; the figure
is the median over rounds, with its spread (min, quartiles, max). A round is left out when other
processes used more than :data:`CONTENTION_LIMIT` of the machine's CPU during any of its calls
(read from ``/proc/stat``): on a small shared machine one such call can be several times slower
(OpenMP threads spin while one of them waits for a core), which no ratio survives. How many
rounds were left out is reported with every figure.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision  # type: ignore[import-untyped]
from torch import Tensor, nn

import camkit
from camkit.capture import Capture

THREADS = 2
"""CPU threads for every CPU figure (``torch.set_num_threads``)."""

CONTENTION_LIMIT = 0.10
"""A round is left out when other processes used more than this share of all CPUs."""

LAYER = "layer4"
"""The explained layer: the last block of a ResNet."""

Op = Callable[[], object]


@dataclass(frozen=True)
class Settings:
    """The suite's command-line settings (see ``benchmarks/conftest.py``)."""

    rounds: int
    warmup: int
    repeats: int
    quiet: float


# -- cases -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A model and batch size; ``required`` cases are the required figures and carry their gates."""

    model: str
    batch: int
    required: bool

    @property
    def id(self) -> str:
        return f"{self.model}-b{self.batch}"


def cases(batch: int, quick_batch: int) -> list[Any]:
    """The required resnet50 case at ``batch`` and a quick resnet18 one (marker ``quick``)."""
    required = Case("resnet50", batch, required=True)
    quick = Case("resnet18", quick_batch, required=False)
    return [
        pytest.param(required, id=required.id),
        pytest.param(quick, id=quick.id, marks=pytest.mark.quick),
    ]


def build_model(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """A random-init torchvision classifier in eval mode (no weights are downloaded)."""
    torch.manual_seed(0)
    model: nn.Module = getattr(torchvision.models, name)(weights=None)
    return model.eval().to(device)


def make_input(batch: int, device: str | torch.device = "cpu", size: int = 224) -> Tensor:
    """A fixed random batch ``(batch, 3, size, size)``."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


# -- the operations compared -------------------------------------------------------------------
def inference(model: nn.Module, x: Tensor) -> Tensor:
    """The baseline: plain no-grad inference."""
    with torch.no_grad():
        out: Tensor = model(x)
    return out


def camkit_gradcam(model: nn.Module, x: Tensor) -> Tensor:
    """Grad-CAM through the public API, maps upsampled to the input size."""
    return camkit.explain(model, x, method="gradcam", layer=LAYER).maps


def camkit_gradcam_default_layer(model: nn.Module, x: Tensor) -> Tensor:
    """Grad-CAM with ``layer=None``, the default: camkit finds the layer itself (``layer4``)."""
    return camkit.explain(model, x, method="gradcam").maps


def naive_gradcam(model: nn.Module, x: Tensor) -> Tensor:
    """The usual hand-written Grad-CAM: forward with the whole graph, ``autograd.grad``.

    Grad mode stays on for the whole forward (parameters require grad), so autograd records
    and keeps every saved tensor of the model; the gradient is then taken to the layer only.
    The map is finished exactly as camkit does (ReLU, min-max per sample, bilinear upsampling)
    so that the two differ only in how the graph is built.
    """
    stored: list[Tensor] = []
    handle = model.get_submodule(LAYER).register_forward_hook(
        lambda module, args, output: stored.append(output)
    )
    try:
        with torch.enable_grad():
            output: Tensor = model(x)
    finally:
        handle.remove()
    activations = stored[0]
    scores = output.gather(1, output.argmax(dim=1, keepdim=True)).sum()
    (gradients,) = torch.autograd.grad(scores, activations)
    weights = gradients.mean(dim=(2, 3))
    cam = torch.einsum("nc,nchw->nhw", weights, activations.detach()).clamp_min(0)
    flat = cam.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    flat = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    maps = F.interpolate(
        flat.reshape(cam.shape).unsqueeze(1), size=x.shape[2:], mode="bilinear", align_corners=False
    ).squeeze(1)
    return maps


def capture_forward(model: nn.Module, x: Tensor, layers: list[tuple[str, nn.Module]]) -> None:
    """A forward through camkit's capture hooks, recording activations, no gradients."""
    with Capture(layers, needs_gradients=False):
        model(x)


OPERATIONS: dict[str, Callable[[nn.Module, Tensor], object]] = {
    "inference": inference,
    "gradcam": camkit_gradcam,
    "naive": naive_gradcam,
    "gradcam_layer_none": camkit_gradcam_default_layer,
}


# -- interleaved timing ------------------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CPUS = os.cpu_count() or 1


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot, or ``None`` off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / _TICKS


@dataclass
class Sample:
    """One timed call.

    Attributes:
        seconds: wall time of the call.
        foreign: share of all CPUs other processes used during it (``None`` off Linux).
    """

    seconds: float
    foreign: float | None

    @property
    def contended(self) -> bool:
        """Other processes used more than :data:`CONTENTION_LIMIT` of the CPUs meanwhile."""
        return self.foreign is not None and self.foreign > CONTENTION_LIMIT


def timed(fn: Op, sync: Callable[[], None] | None = None) -> Sample:
    """Run ``fn`` once; ``sync`` (``torch.cuda.synchronize``) runs before and after it."""
    if sync is not None:
        sync()
    busy0, own0, t0 = _busy_seconds(), time.process_time(), time.perf_counter()
    fn()
    if sync is not None:
        sync()
    t1, own1, busy1 = time.perf_counter(), time.process_time(), _busy_seconds()
    wall = t1 - t0
    foreign = None
    if busy0 is not None and busy1 is not None and wall > 0:
        # /proc/stat counts each CPU in clock ticks (10 ms): allow one tick per CPU of error
        slack = _CPUS / _TICKS
        foreign = max(0.0, (busy1 - busy0) - (own1 - own0) - slack) / (wall * _CPUS)
    return Sample(wall, foreign)


def wait_for_quiet(limit: float = 30.0, window: float = 0.25) -> float:
    """Wait until other processes use at most :data:`CONTENTION_LIMIT` of the CPUs over a
    ``window``, for at most ``limit`` seconds; returns the seconds waited (0 off Linux)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        busy0, own0 = _busy_seconds(), time.process_time()
        if busy0 is None:
            return 0.0
        time.sleep(window)
        busy1, own1 = _busy_seconds(), time.process_time()
        assert busy1 is not None
        foreign = max(0.0, (busy1 - busy0) - (own1 - own0) - _CPUS / _TICKS)
        if foreign <= CONTENTION_LIMIT * window * _CPUS:
            break
    return time.perf_counter() - start


@dataclass(frozen=True)
class Spread:
    """Median and spread of per-round values."""

    median: float
    minimum: float
    q1: float
    q3: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if len(values) >= 2:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        else:
            q1 = q3 = values[0]
        return cls(statistics.median(values), min(values), q1, q3, max(values))

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {
            "median": round(self.median, digits),
            "min": round(self.minimum, digits),
            "q1": round(self.q1, digits),
            "q3": round(self.q3, digits),
            "max": round(self.maximum, digits),
        }

    def text(self) -> str:
        return (
            f"{self.median:.3f} (IQR {self.q1:.3f}-{self.q3:.3f}, "
            f"min {self.minimum:.3f}, max {self.maximum:.3f})"
        )


@dataclass
class Comparison:
    """Per-round samples of a subject and its references, timed in one interleaved run."""

    samples: dict[str, list[Sample]]
    rounds: int
    waited: float = 0.0
    """Seconds spent waiting for other processes to leave the CPUs alone."""
    used: list[int] = field(default_factory=list)
    """Indices of the rounds the figures use (see :data:`CONTENTION_LIMIT`)."""

    def __post_init__(self) -> None:
        clean = [
            i for i in range(self.rounds) if not any(s[i].contended for s in self.samples.values())
        ]
        # too few quiet rounds to stand on: use them all, and say so (``contended``)
        self.used = clean if len(clean) >= max(3, self.rounds // 3) else list(range(self.rounds))

    @property
    def contended(self) -> bool:
        """True when the figures had to use rounds disturbed by other processes."""
        return any(s[i].contended for i in self.used for s in self.samples.values())

    def seconds(self, name: str) -> Spread:
        return Spread.of([self.samples[name][i].seconds for i in self.used])

    def ratio(self, name: str, reference: str, rounds: Sequence[int] | None = None) -> Spread:
        """``name`` / ``reference`` per round, over the rounds used (or ``rounds``)."""
        a, b = self.samples[name], self.samples[reference]
        return Spread.of([a[i].seconds / b[i].seconds for i in (rounds or self.used)])

    def info(self, subject: str, reference: str) -> dict[str, Any]:
        """Figures for ``benchmark.extra_info``: times, ratios to ``reference``, rounds."""
        return {
            "rounds": self.rounds,
            "rounds_used": len(self.used),
            "rounds_left_out_for_contention": self.rounds - len(self.used),
            "contended": self.contended,
            "seconds_waited_for_quiet": round(self.waited, 1),
            "seconds": {name: self.seconds(name).as_dict() for name in self.samples},
            "ratio": {
                f"{name}/{reference}": self.ratio(name, reference).as_dict()
                for name in self.samples
                if name != reference
            },
            "ratio_all_rounds": {
                f"{subject}/{reference}": self.ratio(
                    subject, reference, range(self.rounds)
                ).as_dict()
            },
            "rounds_used_index": self.used,
            "per_round_seconds": {
                name: [round(x.seconds, 5) for x in s] for name, s in self.samples.items()
            },
            "per_round_foreign_cpu": {
                name: [None if x.foreign is None else round(x.foreign, 3) for x in s]
                for name, s in self.samples.items()
            },
        }


def interleave(
    benchmark: Any,
    subject: tuple[str, Op],
    references: Sequence[tuple[str, Op]],
    rounds: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
    quiet: float = 30.0,
) -> Comparison:
    """Time ``subject`` with pytest-benchmark, its references interleaved with it.

    Each round runs every operation once. The subject is the call ``benchmark.pedantic`` times;
    the references run in its ``setup`` on even rounds and in its ``teardown`` on odd ones, in
    an order that rotates, so no operation always runs first or right after another. Each call
    is also timed here (:func:`timed`), which gives the per-round ratios. Before each timed
    call it waits up to ``quiet`` seconds for other processes to leave the CPUs
    (:func:`wait_for_quiet`; ``0`` does not wait).
    """
    ops = [subject, *references]
    for _ in range(warmup):
        for _name, fn in ops:
            fn()
            if sync is not None:
                sync()
    samples: dict[str, list[Sample]] = {name: [] for name, _ in ops}
    state = {"round": 0}
    waited = [0.0]

    def quieten() -> None:
        if quiet > 0:
            waited[0] += wait_for_quiet(quiet)

    def run_references() -> None:
        r = state["round"]
        shift = (r // 2) % len(references)
        for name, fn in [*references[shift:], *references[:shift]]:
            quieten()
            samples[name].append(timed(fn, sync))

    def setup() -> None:
        if state["round"] % 2 == 0:
            run_references()
        quieten()

    def target() -> None:
        samples[subject[0]].append(timed(subject[1], sync))

    def teardown() -> None:
        if state["round"] % 2 == 1:
            run_references()
        state["round"] += 1

    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=0)
    # --benchmark-disable runs one round; --benchmark-cprofile adds calls after the rounds
    done = min(rounds, *(len(s) for s in samples.values()))
    return Comparison({name: s[:done] for name, s in samples.items()}, done, waited[0])


def _commit() -> str | None:
    """The checkout's commit, ``+`` when it has uncommitted changes; ``None`` without git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "camkit", "plugins"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def machine() -> str:
    """The CPU model, its logical CPUs and the OS, e.g. ``Intel Xeon ..., 2 CPUs, Linux 6.18``."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {_CPUS} CPUs, {platform.system()} {platform.release()}"


def environment(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "device": device,
        "camkit": camkit.__version__,
        "commit": _commit(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "cpus": _CPUS,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
