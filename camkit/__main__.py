"""``python -m camkit``: explain a small model defined in the package, end to end."""

from __future__ import annotations

import sys

import torch

from .explain import explain
from .registry import list_methods
from .toy import SquareDetector, square_image

_SHADES = " .:-=+*#%@"


def _ascii(m: torch.Tensor) -> str:
    idx = (m.clamp(0, 1) * (len(_SHADES) - 1)).round().long()
    return "\n".join("".join(_SHADES[int(v)] * 2 for v in row) for row in idx)


def main() -> int:
    model = SquareDetector().eval()
    x = square_image()
    res = explain(model, x, method="gradcam", target=0)
    print(f"camkit: explained SquareDetector with {res.method!r} at layer {res.layer!r}")
    print(f"methods available: {', '.join(list_methods())}")
    print(f"target class 0 ({model.classes[0]}), score {float(res.scores[0]):.3f}")
    print("input (bright square on a dark image):")
    print(_ascii(x[0, 0]))
    print(f"Grad-CAM map {tuple(res.maps.shape)} in [0, 1]:")
    print(_ascii(res.maps[0]))
    peak = divmod(int(res.maps[0].argmax()), res.maps.shape[-1])
    inside = bool(x[0, 0][peak] > 0)
    where = "inside" if inside else "OUTSIDE"
    print(f"map peak at row {peak[0]}, column {peak[1]}: {where} the square")
    return 0 if inside else 1


if __name__ == "__main__":
    sys.exit(main())
