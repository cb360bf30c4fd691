"""``batch_size="auto"``: how many rows a method's re-runs of the model take at a time.

Methods that run the model on copies (Score-CAM's masked inputs, Ablation-CAM's replays,
smoothing's noisy copies) split them into chunks of ``batch_size`` rows. The maps depend on the
chunk only at float rounding (each row is scored alone); the time and the memory depend on it,
and differently by device:

- **CPU**: on CPUs the process has to itself, inference per image is fastest in small chunks,
  whose activations stay in the caches: on 2 threads, ResNet-18 on 512 images of 224x224 takes
  6.9 s in chunks of 8 and 10.2 s in chunks of 64. The rule: the largest power of two whose
  rows hold at most :data:`CPU_CHUNK_BYTES` (eight 224x224 RGB images in float32), between 1
  and :data:`CPU_MAX_ROWS` rows. The rule reads only the rows and the device, never the
  machine's load: the chunk decides the order of float operations inside each forward, so a
  chunk chosen by load would make the last bits of a map depend on what else runs. (On CPUs
  oversubscribed by other processes, larger chunks are faster, ResNet-18 at a load of 14 on
  2 CPUs took 2.2 times as long in chunks of 8 as in 64; pass ``batch_size=64`` there.)
- **CUDA**: larger chunks fill the device better. The rule: the largest power of two whose rows,
  each counted :data:`CUDA_ROW_FOOTPRINT` times its own size (the activations a forward keeps
  alive), fit in :data:`CUDA_MEMORY_SHARE` of the free device memory, between 1 and
  :data:`CUDA_MAX_ROWS` rows.

An int ``batch_size`` is used as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "CPU_CHUNK_BYTES",
    "CPU_MAX_ROWS",
    "CUDA_MAX_ROWS",
    "CUDA_MEMORY_SHARE",
    "CUDA_ROW_FOOTPRINT",
    "auto_batch_size",
    "resolve_batch_size",
]

#: Bytes of input rows per chunk on the CPU: eight ``(3, 224, 224)`` float32 images.
CPU_CHUNK_BYTES = 8 * 3 * 224 * 224 * 4
#: The most rows per chunk on the CPU (small rows: fewer, larger calls).
CPU_MAX_ROWS = 64
#: Share of the free CUDA memory one chunk may take.
CUDA_MEMORY_SHARE = 0.25
#: Bytes a forward keeps alive per byte of its input row, counted for the CUDA budget.
CUDA_ROW_FOOTPRINT = 64
#: The most rows per chunk on CUDA.
CUDA_MAX_ROWS = 512


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
        A power of two: see the module docstring for the CPU and CUDA rules.
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
    for rows like ``row`` (one row of each input, e.g. ``(1, 3, H, W)``)."""
    if isinstance(value, str):
        return auto_batch_size(row)
    return value
