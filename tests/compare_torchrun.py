"""Run by tests/test_compare.py under ``torchrun --nproc-per-node 2``: a comparison on CPU with
the gloo backend; rank 0 writes the table and per-sample values as JSON to ``argv[1]``."""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import camkit

METHODS = ["gradcam", "random"]
METRICS = ["pointing-game", "deletion", "insertion", "road"]
OPTIONS: dict[str, dict[str, Any]] = {
    "pointing-game": {"tolerance": 1},
    "deletion": {"steps": 8},
    "insertion": {"steps": 8},
    "road": {"percentiles": [25, 75]},
}


def setup() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A small seeded CNN and 11 samples (an odd number: the sampler pads one rank)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.rand(11, 3, 12, 12, generator=g)
    y = torch.randint(0, 3, (11,), generator=g)
    masks = torch.zeros(11, 12, 12, dtype=torch.bool)
    for i in range(11):
        r, c = divmod(i, 3)
        masks[i, 2 * r : 2 * r + 5, 3 * c : 3 * c + 5] = True
    return model.eval(), (x, y, masks)


def run(**kw: Any) -> camkit.Comparison:
    model, data = setup()
    return camkit.compare(
        model, data, METHODS, METRICS, layer="2", batch_size=3, metric_options=OPTIONS, **kw
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = run()
    if dist.get_rank() == 0:
        result.to_json(sys.argv[1])
    dist.destroy_process_group()
