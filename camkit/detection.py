"""Detection targets: scores of torchvision's detection output (boxes, labels, scores)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import TargetError

__all__ = ["BoxTarget", "box_iou"]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``(A, 4)`` and ``(B, 4)`` in ``(x1, y1, x2, y2)``: ``(A, B)``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-12)


class BoxTarget:
    """Detection: the score of the predicted box matching each reference box.

    For torchvision's detection output (a list with one dict of ``boxes``, ``labels`` and
    ``scores`` per image), the score of a row is, summed over its reference boxes, the score of
    the predicted box with the same label and the highest IoU, when that IoU reaches
    ``iou_threshold`` (0 otherwise).

    Args:
        boxes: ``(B, 4)`` shared or a sequence of ``(B_n, 4)`` per sample, ``(x1, y1, x2, y2)``
            in input pixels.
        labels: ``(B,)`` or a sequence of ``(B_n,)``.
        iou_threshold: the least IoU of a match.
    """

    def __init__(
        self,
        boxes: Tensor | Sequence[Tensor],
        labels: Tensor | Sequence[Tensor],
        iou_threshold: float = 0.5,
    ) -> None:
        self.boxes, self.labels, self.iou_threshold = boxes, labels, iou_threshold

    def _ref(self, n: int) -> tuple[Tensor, Tensor]:
        if isinstance(self.boxes, Tensor):
            return self.boxes, torch.as_tensor(self.labels)
        return self.boxes[n], torch.as_tensor(self.labels[n])

    def scores(self, output: Any, index: Tensor) -> Tensor:
        if not (isinstance(output, (list, tuple)) and all(isinstance(o, Mapping) for o in output)):
            raise TargetError(
                "BoxTarget expects torchvision's detection output, a list with one dict of "
                f"boxes, labels and scores per image; got {type(output).__name__}."
            )
        rows = []
        for m, det in enumerate(output):
            ref_boxes, ref_labels = self._ref(int(index[m]))
            pred = det["boxes"]
            total = det["scores"].new_zeros(()) if len(det["scores"]) else pred.new_zeros(())
            if len(pred) and len(ref_boxes):
                iou = box_iou(ref_boxes.to(pred), pred)
                same = ref_labels.to(pred.device)[:, None] == det["labels"][None, :]
                iou = torch.where(same, iou, torch.zeros_like(iou))
                best, at = iou.max(dim=1)
                hit = best >= self.iou_threshold
                total = total + (det["scores"][at] * hit).sum()
            rows.append(total)
        return torch.stack(rows)
