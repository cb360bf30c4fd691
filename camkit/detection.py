"""Detection outputs and the target that scores one box of them.

Three output kinds are recognised, per image ``n`` giving predicted boxes ``(B, 4)`` in
``(x1, y1, x2, y2)`` and class scores ``(B, K)``:

- torchvision's: a list with one dict of ``boxes`` (input pixels), ``labels`` and ``scores``
  per image: a box's class score is its ``scores`` entry, for its own label only;
- DETR-style: a mapping or object (Hugging Face's ``DetrObjectDetectionOutput``) with ``logits``
  ``(N, Q, K + 1)`` (the last class is "no object") and ``pred_boxes`` ``(N, Q, 4)``,
  normalised ``(cx, cy, w, h)`` in [0, 1]; boxes come back as normalised ``(x1, y1, x2, y2)``
  and class scores are the logits (without "no object");
- YOLO-style: a tensor ``(N, B, 4 + 1 + K)`` or a list of ``(B_n, 4 + 1 + K)`` tensors, one
  per image: box ``(cx, cy, w, h)`` in input pixels, objectness, ``K`` class probabilities; a
  box's class score is objectness x class probability (YOLO's confidence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import TargetError

__all__ = ["BoxTarget", "Detections", "box_iou", "cxcywh_to_xyxy", "detections"]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``(A, 4)`` and ``(B, 4)`` in ``(x1, y1, x2, y2)``: ``(A, B)``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-12)


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    """Boxes ``(..., 4)`` from ``(cx, cy, w, h)`` to ``(x1, y1, x2, y2)``."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@dataclass(frozen=True)
class Detections:
    """One image's predictions, in the graph of the model output.

    Attributes:
        boxes: ``(B, 4)`` ``(x1, y1, x2, y2)``, in the output's own coordinates.
        scores: ``(B, K)`` class scores; for torchvision's output ``(B, 1)``, the box's own
            label's score.
        labels: ``(B,)`` the box's own label (torchvision's output), or ``None``: any class.
        kind: ``"torchvision"``, ``"detr"`` or ``"yolo"``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor | None
    kind: str


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def _yolo(rows: Tensor) -> Detections:
    if rows.ndim != 2 or rows.shape[1] < 6:
        raise TargetError(
            "YOLO-style detections expect (boxes, 4 + 1 + classes) per image, with at least one "
            f"class; got {tuple(rows.shape)}."
        )
    return Detections(
        cxcywh_to_xyxy(rows[:, :4]), rows[:, 4:5] * rows[:, 5:], None, "yolo"
    )  # fmt: skip


def detections(output: Any) -> list[Detections]:
    """The per-image predictions of a detection output (see the module docstring).

    Raises:
        TargetError: for any other output, naming the kinds recognised.
    """
    if isinstance(output, (list, tuple)) and output and all(isinstance(o, Mapping) for o in output):
        return [
            Detections(d["boxes"], d["scores"][:, None], d["labels"], "torchvision") for d in output
        ]
    logits, boxes = _field(output, "logits"), _field(output, "pred_boxes")
    if isinstance(logits, Tensor) and isinstance(boxes, Tensor):
        if logits.ndim != 3 or boxes.shape != (*logits.shape[:2], 4):
            raise TargetError(
                "DETR-style outputs expect logits (N, Q, K + 1) and pred_boxes (N, Q, 4); got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}."
            )
        xyxy = cxcywh_to_xyxy(boxes)
        return [Detections(xyxy[n], logits[n, :, :-1], None, "detr") for n in range(len(logits))]
    if isinstance(output, Tensor) and output.ndim == 3:
        return [_yolo(output[n]) for n in range(output.shape[0])]
    if isinstance(output, (list, tuple)) and output and all(isinstance(o, Tensor) for o in output):
        return [_yolo(o) for o in output]
    raise TargetError(
        "BoxTarget expects a detection output: torchvision's (a list of dicts of boxes, labels "
        "and scores), DETR-style (logits (N, Q, K + 1) and pred_boxes (N, Q, 4)) or YOLO-style "
        f"(a tensor (N, B, 4 + 1 + K) or a list of (B_n, 4 + 1 + K)); got {type(output).__name__}."
        " Pass output=... to choose it from the model output, or a callable target."
    )


class BoxTarget:
    """Detection: the score of one predicted box per reference, chosen by index or by IoU.

    A box is chosen per sample either by its ``index`` among the predictions (DETR's query, a
    YOLO row) or, for each reference box, as the prediction of highest IoU with it (for
    torchvision's output, among those with the reference's label), when that IoU reaches
    ``iou_threshold`` (its score is 0 otherwise). The choice is made on the values, not
    differentiated. The chosen box's score is (``score``):

    - ``"class"``: its class score for the reference's label (or, without labels, for its own
      highest-scoring class);
    - ``"box"``: the sum of its four coordinates ``(x1, y1, x2, y2)`` (what moves the box);
    - ``"class+box"``: the sum of both.

    Several reference boxes of a sample add their scores.

    Args:
        boxes: ``(B, 4)`` shared or a sequence of ``(B_n, 4)`` per sample, ``(x1, y1, x2, y2)``
            in the output's coordinates (input pixels for torchvision and YOLO, normalised to
            [0, 1] for DETR); ``None`` with ``index``.
        labels: ``(B,)`` or a sequence of ``(B_n,)``; ``None``: each box's own best class
            (not for torchvision's output, whose boxes have one label each).
        iou_threshold: the least IoU of a match.
        index: the prediction to score in every sample (an int), instead of matching boxes.
        score: ``"class"``, ``"box"`` or ``"class+box"``.
    """

    def __init__(
        self,
        boxes: Tensor | Sequence[Tensor] | None = None,
        labels: Tensor | Sequence[Tensor] | Sequence[int] | None = None,
        iou_threshold: float = 0.5,
        *,
        index: int | None = None,
        score: str = "class",
    ) -> None:
        if (boxes is None) == (index is None):
            raise TargetError(
                "BoxTarget expects reference boxes or index=..., exactly one of them; got "
                f"{'neither' if boxes is None else 'both'}."
            )
        if score not in ("class", "box", "class+box"):
            raise TargetError(
                f"BoxTarget's score expects 'class', 'box' or 'class+box'; got {score!r}."
            )
        self.boxes, self.labels, self.iou_threshold = boxes, labels, iou_threshold
        self.index, self.score = index, score

    def _ref(self, n: int) -> tuple[Tensor, Tensor | None]:
        assert self.boxes is not None
        if isinstance(self.boxes, Tensor):
            boxes = self.boxes.reshape(-1, 4)
            labels = None if self.labels is None else torch.as_tensor(self.labels).reshape(-1)
            return boxes, labels
        labels = None if self.labels is None else torch.as_tensor(self.labels[n]).reshape(-1)
        return torch.as_tensor(self.boxes[n]).reshape(-1, 4), labels

    def _one(self, det: Detections, at: Tensor, label: Tensor | None) -> Tensor:
        """The score of prediction ``at`` (0-d long) for ``label`` (0-d or ``None``)."""
        total = det.boxes.new_zeros(())
        if "class" in self.score:
            row = det.scores[at]
            if det.kind == "torchvision":
                total = total + row[0]
            elif label is None:
                total = total + row.max()
            else:
                total = total + row[label.to(row.device)]
        if "box" in self.score:
            total = total + det.boxes[at].sum()
        return total

    def scores(self, output: Any, index: Tensor) -> Tensor:
        dets = detections(output)
        if len(dets) != len(index):
            raise TargetError(
                f"the detection output holds {len(dets)} images for {len(index)} rows scored."
            )
        rows = []
        for m, det in enumerate(dets):
            if self.index is not None:
                if not -len(det.boxes) <= self.index < len(det.boxes):
                    raise TargetError(
                        f"BoxTarget index {self.index} is out of range for {len(det.boxes)} "
                        "predicted boxes."
                    )
                at = torch.tensor(self.index % len(det.boxes))
                rows.append(self._one(det, at, None))
                continue
            ref_boxes, ref_labels = self._ref(int(index[m]))
            total = det.boxes.new_zeros(())
            if len(det.boxes) and len(ref_boxes):
                with torch.no_grad():
                    iou = box_iou(ref_boxes.to(det.boxes), det.boxes.detach())
                    if det.labels is not None and ref_labels is not None:
                        same = ref_labels.to(iou.device)[:, None] == det.labels[None, :]
                        iou = torch.where(same, iou, torch.zeros_like(iou))
                    best, where = iou.max(dim=1)
                for j in range(len(ref_boxes)):
                    if float(best[j]) >= self.iou_threshold:
                        label = None if ref_labels is None else ref_labels[j]
                        total = total + self._one(det, where[j], label)
            rows.append(total)
        return torch.stack(rows)
