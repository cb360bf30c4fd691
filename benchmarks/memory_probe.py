"""Peak resident-memory growth of one operation, measured in this fresh process (Linux).

Run from the repository root, one process per measurement::

    python -m benchmarks.memory_probe --model resnet50 --batch 32 --op gradcam

It builds the model and the batch, runs the operation once to warm up (thread pools, kernel
caches, first-call allocations), gives freed heap memory back to the system
(``malloc_trim``), resets the process's peak RSS (writing ``5`` to ``/proc/self/clear_refs``
sets ``VmHWM`` back to the current ``VmRSS``), reads ``VmRSS``, runs the operation again and
reads ``VmHWM``. The growth is ``VmHWM - VmRSS`` before: the memory the operation needs on top
of what the process already held. It prints one JSON object, sizes in KiB. The exit status is
2, with ``error`` in the JSON, when the peak cannot be reset on this system.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import re
import sys
from typing import Any

import torch

from benchmarks._lib import OPERATIONS, THREADS, build_model, make_input
from benchmarks.peers import PEERS, memory_operation


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _trim_heap() -> bool:
    """Return freed heap memory to the system, so that reusing it counts as growth (glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; ``False`` when the kernel does not support it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    # the reset sets the peak to the RSS of that moment; allow for pages touched since
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024


def measure(model_name: str, batch: int, op_name: str, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model = build_model(model_name)
    x = make_input(batch)
    op = OPERATIONS.get(op_name) or memory_operation(op_name)
    op(model, x)  # warm-up
    gc.collect()
    trimmed = _trim_heap()
    rss_before = _status_kib("VmRSS")
    result: dict[str, Any] = {
        "model": model_name,
        "batch": batch,
        "op": op_name,
        "threads": threads,
        "heap_trimmed": trimmed,
    }
    if not _reset_peak():
        result["error"] = (
            "cannot reset the peak RSS: writing 5 to /proc/self/clear_refs is not supported "
            "here (Linux >= 4.0 needed), so the peak of one operation cannot be isolated"
        )
        return result
    out = op(model, x)
    peak = _status_kib("VmHWM")
    rss_after = _status_kib("VmRSS")
    del out
    result.update(
        rss_before_kib=rss_before,
        peak_kib=peak,
        rss_after_kib=rss_after,
        growth_kib=peak - rss_before,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    peers = [f"peer-{name}" for name in PEERS]
    parser.add_argument("--op", choices=sorted(OPERATIONS) + peers, required=True)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    result = measure(args.model, args.batch, args.op, args.threads)
    print(json.dumps(result))
    return 2 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
