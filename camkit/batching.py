"""``batch_size="auto"``: how many rows a method's re-runs of the model take at a time.

Methods that run the model on copies (Score-CAM's masked inputs, Ablation-CAM's replays,
smoothing's noisy copies) split them into chunks of ``batch_size`` rows, through
:func:`chunk_spans`. The maps depend on the chunk only at float rounding (each row is scored
alone); the time and the memory depend on it, and differently by device:

- **CPU**: the fastest chunk depends on the machine, the model and the work per row: on one
  Xeon ResNet-18 and ResNet-50 forwards of 224x224 images run 4 to 8% faster in chunks of 4
  than of 8, elsewhere 8 or 16 is best, and Ablation-CAM's replays after a ResNet ``layer3``
  are fastest in chunks of 64. So ``"auto"`` measures. The *rule* gives a start: the largest
  power of two whose rows hold at most :data:`CPU_CHUNK_BYTES` (eight 224x224 RGB images in
  float32), between 1 and :data:`CPU_MAX_ROWS` rows. The first time a model runs rows of a
  kind (their shapes, dtypes and device, the work they go through, and
  ``torch.get_num_threads()``) on enough copies, the first chunks *are* the probe: half the
  rule, the rule and twice the rule (up to :data:`PROBE_MAX_ROWS`), each run twice in the
  order ``a, b, c, c, b, a``, each timed from when it is handed out until the next one is
  asked for. A size scores the time per row of its faster run (the first run of a size pays
  one-off setup), and the rest of the copies run in chunks of the fastest. The probe is real
  work, no extra forward; it runs only where the copies number at least
  :data:`PROBE_WORK` times the probe's rows, and fewer copies run in chunks of the rule. The
  choice is remembered for the process, per model (weakly: it goes with the model) and kind of
  rows, and later calls use it without a probe. Consequence: the chunk decides the order of
  float operations inside each forward, and the probe reads the clock, so a map made with
  ``"auto"`` on a CPU may differ in the last bits between processes. Pass an int
  ``batch_size`` for bitwise reproducible maps.
- **CUDA**: larger chunks fill the device better. The rule: the largest power of two whose rows,
  each counted :data:`CUDA_ROW_FOOTPRINT` times its own size (the activations a forward keeps
  alive), fit in :data:`CUDA_MEMORY_SHARE` of the free device memory, between 1 and
  :data:`CUDA_MAX_ROWS` rows. No probe.

An int ``batch_size`` is used as given. A chunking inside a chunk of ``"auto"`` on the CPU for
the same model (``ctx.score`` called by Score-CAM on each of its chunks) keeps the enclosing
chunk's rows, so that it does not split the chunk the probe is timing.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "CPU_CHUNK_BYTES",
    "CPU_MAX_ROWS",
    "CUDA_MAX_ROWS",
    "CUDA_MEMORY_SHARE",
    "CUDA_ROW_FOOTPRINT",
    "PROBE_MAX_ROWS",
    "PROBE_WORK",
    "auto_batch_size",
    "chosen_rows",
    "chunk_spans",
    "clock",
    "resolve_batch_size",
]

#: Bytes of input rows per chunk on the CPU: eight ``(3, 224, 224)`` float32 images.
CPU_CHUNK_BYTES = 8 * 3 * 224 * 224 * 4
#: The most rows per chunk the rule gives on the CPU (small rows: fewer, larger calls).
CPU_MAX_ROWS = 64
#: Share of the free CUDA memory one chunk may take.
CUDA_MEMORY_SHARE = 0.25
#: Bytes a forward keeps alive per byte of its input row, counted for the CUDA budget.
CUDA_ROW_FOOTPRINT = 64
#: The most rows per chunk on CUDA.
CUDA_MAX_ROWS = 512
#: The most rows the CPU probe tries: twice the rule's cap, tried only where the rule gives the
#: cap (rows of at most 75 KB: small images, copies of a late layer's output), whose bytes alone
#: would allow more rows; 128 such rows hold at most 9.6 MB.
PROBE_MAX_ROWS = 2 * CPU_MAX_ROWS
#: The CPU probe runs only on at least this many times its own rows: it is then at most half
#: the work (a single image's Ablation-CAM at a ResNet-18 ``layer3``, 256 channels, probes).
PROBE_WORK = 2

#: The probe's clock, in seconds (a module attribute, so that tests can replace it).
clock: Callable[[], float] = time.perf_counter

# rows chosen by the probe: per model (weakly), per kind of rows (see _kind)
_CHOSEN: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, int]] = weakref.WeakKeyDictionary()
_CHOSEN_LOCK = threading.Lock()
# per thread, the "auto" CPU chunks handed out and not yet finished
_OPEN = threading.local()


def _power_of_two_at_most(value: float, cap: int) -> int:
    rows = 1
    while rows * 2 <= min(value, cap):
        rows *= 2
    return rows


def auto_batch_size(row: Tensor | Sequence[Tensor], device: torch.device | None = None) -> int:
    """Rows per chunk for re-runs of the model on rows like ``row``.

    Args:
        row: one row of what is chunked (for several inputs, one row of each), e.g. one masked
            input ``(1, 3, H, W)`` or one copy of the layer's output ``(1, C, H, W)``.
        device: where the chunks run; the row's device by default.

    Returns:
        A power of two: see the module docstring for the CPU and CUDA rules (on the CPU,
        :func:`chunk_spans` probes around it).
    """
    rows = (row,) if isinstance(row, Tensor) else tuple(row)
    nbytes = max(1, sum(t.numel() * t.element_size() for t in rows))
    device = device if device is not None else rows[0].device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = CUDA_MEMORY_SHARE * free / (CUDA_ROW_FOOTPRINT * nbytes)
        return _power_of_two_at_most(budget, CUDA_MAX_ROWS)
    return _power_of_two_at_most(CPU_CHUNK_BYTES / nbytes, CPU_MAX_ROWS)


def resolve_batch_size(value: int | str, row: Tensor | Sequence[Tensor]) -> int:
    """The ``batch_size`` option as rows: an int as given, ``"auto"`` by :func:`auto_batch_size`
    for rows like ``row`` (one row of each input, e.g. ``(1, 3, H, W)``): the rule, without the
    CPU probe of :func:`chunk_spans`."""
    if isinstance(value, str):
        return auto_batch_size(row)
    return value


class _Open:
    """An ``"auto"`` CPU chunk of ``model`` handed out to the caller: ``rows`` rows."""

    __slots__ = ("model", "rows")

    def __init__(self, model: nn.Module, rows: int) -> None:
        self.model, self.rows = model, rows


def _open_chunks() -> list[_Open]:
    stack: list[_Open] | None = getattr(_OPEN, "stack", None)
    if stack is None:
        stack = _OPEN.stack = []
    return stack


def _close(stack: list[_Open], entry: _Open) -> None:
    for j in range(len(stack) - 1, -1, -1):
        if stack[j] is entry:
            del stack[j]
            return


def _kind(rows: tuple[Tensor, ...], work: Hashable, reserve: int) -> Hashable:
    """What the remembered choice is keyed by, under the model."""
    shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in rows)
    return shapes, torch.get_num_threads(), work, reserve


def _rows_of(row: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (row,) if isinstance(row, Tensor) else tuple(row)


def chosen_rows(
    model: nn.Module,
    row: Tensor | Sequence[Tensor],
    *,
    work: Hashable = None,
    reserve: int = 0,
) -> int | None:
    """The rows ``"auto"`` chose on the CPU for ``model`` on rows like ``row`` (arguments as
    :func:`chunk_spans`), or ``None`` where no probe has finished in this process."""
    key = _kind(_rows_of(row), work, reserve)
    with _CHOSEN_LOCK:
        return _CHOSEN.get(model, {}).get(key)


def chunk_spans(
    batch_size: int | str,
    total: int,
    row: Tensor | Sequence[Tensor],
    model: nn.Module,
    *,
    work: Hashable = None,
    reserve: int = 0,
) -> Iterator[tuple[int, int]]:
    """Spans ``(start, stop)`` that cover ``range(total)`` in order, one per re-run of the model.

    Run the copies ``start:stop`` of each span before asking for the next: on the CPU,
    ``"auto"`` times that work to choose its chunk (see the module docstring).

    Args:
        batch_size: the ``batch_size`` option: a positive int, or ``"auto"``.
        total: the number of copies.
        row: one row of what is chunked (for several inputs, one row of each), e.g. one masked
            input ``(1, 3, H, W)`` or one copy of the layer's output ``(1, C, H, W)``.
        model: the model the copies run through; the probe's choice is remembered for it.
        work: a label of what each row goes through, for rows of one shape that go through
            different parts of the model (``"score"``: a no-gradient forward; a replay after
            a layer), so that each is probed on its own.
        reserve: rows each re-run adds to its span's copies (Ablation-CAM's unablated row):
            a span holds at most ``rows - reserve`` copies, at least one.

    Returns:
        An iterator of spans, to consume in a ``for`` statement (or close): a chunk handed out
        binds the chunkings of the same model inside it until the next is asked for. Abandoning
        it midway (an exception in the caller's loop) remembers nothing of an unfinished probe.
    """
    rows = _rows_of(row)
    if isinstance(batch_size, str):
        device = rows[0].device
        if device.type == "cpu":
            return _auto_cpu(total, rows, model, work, reserve)
        batch_size = auto_batch_size(rows, device)
    return _fixed(0, total, max(1, batch_size - reserve))


def _fixed(start: int, total: int, step: int) -> Iterator[tuple[int, int]]:
    for first in range(start, total, step):
        yield first, min(first + step, total)


def _candidates(rule: int, reserve: int) -> list[int]:
    """Half the rule, the rule, twice the rule, as copies per span (distinct, ascending)."""
    steps: list[int] = []
    for rows in (max(1, rule // 2), rule, min(2 * rule, PROBE_MAX_ROWS)):
        step = max(1, rows - reserve)
        if step not in steps:
            steps.append(step)
    return steps


def _auto_cpu(
    total: int, rows: tuple[Tensor, ...], model: nn.Module, work: Hashable, reserve: int
) -> Iterator[tuple[int, int]]:
    stack = _open_chunks()
    enclosing = next((e.rows for e in reversed(stack) if e.model is model), None)
    if enclosing is not None:  # inside a chunk of the same model: keep its rows
        yield from _fixed(0, total, max(1, enclosing - reserve))
        return
    key = _kind(rows, work, reserve)
    with _CHOSEN_LOCK:
        chosen = _CHOSEN.get(model, {}).get(key)
    rule = auto_batch_size(rows, torch.device("cpu"))
    start = 0
    if chosen is None:
        steps = _candidates(rule, reserve)
        if total >= PROBE_WORK * 2 * sum(steps):
            per_row = {step: float("inf") for step in steps}
            for step in [*steps, *reversed(steps)]:
                entry = _Open(model, step + reserve)
                stack.append(entry)
                try:
                    began = clock()
                    yield start, start + step
                    took = clock() - began
                finally:
                    _close(stack, entry)
                per_row[step] = min(per_row[step], took / step)
                start += step
            rule_step = max(1, rule - reserve)
            best = min(steps, key=lambda s: (per_row[s], s != rule_step))
            chosen = best + reserve
            with _CHOSEN_LOCK:
                _CHOSEN.setdefault(model, {})[key] = chosen
    step = max(1, (rule if chosen is None else chosen) - reserve)
    entry = _Open(model, step + reserve)
    for first in range(start, total, step):
        stack.append(entry)
        try:
            yield first, min(first + step, total)
        finally:
            _close(stack, entry)
