"""Detections as the presets' decoders produce them, and how two sets of them are compared."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deluceva.errors import DelucevaError

__all__ = ["Detections", "ModelOutputs", "iou", "nms", "match_f1", "outputs_by_name"]

ModelOutputs = Sequence[np.ndarray] | Mapping[str, np.ndarray]


@dataclass
class Detections:
    """Boxes (n, 4) as x1, y1, x2, y2 in model-input pixels, scores (n,), classes (n,) int."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) against boxes (n, 4), all x1, y1, x2, y2."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best score first. Per class if given."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    boxes = np.asarray(boxes, np.float64)
    if classes is not None:
        # Shift each class into its own region so that boxes of different classes never overlap.
        span = float(boxes.max() - boxes.min()) + 1.0
        boxes = boxes + (np.asarray(classes, np.float64) * span)[:, None]
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        rest = order[1:]
        order = rest[iou(boxes[i], boxes[rest]) <= threshold]
    return np.asarray(keep, np.int64)


def match_f1(found: Detections, reference: Detections, threshold: float = 0.5) -> float:
    """F1 of `found` against `reference`: greedy by score, a match needs IoU >= threshold and the
    same class; each reference box matches at most once. Both empty: 1."""
    if len(found) == 0 and len(reference) == 0:
        return 1.0
    if len(found) == 0 or len(reference) == 0:
        return 0.0
    used = np.zeros(len(reference), bool)
    hits = 0
    for i in np.argsort(-found.scores, kind="stable"):
        candidates = (~used) & (reference.classes == found.classes[i])
        if not candidates.any():
            continue
        overlaps = np.where(candidates, iou(found.boxes[i], reference.boxes), -1.0)
        j = int(np.argmax(overlaps))
        if overlaps[j] >= threshold:
            used[j] = True
            hits += 1
    return 2.0 * hits / (len(found) + len(reference))


def outputs_by_name(outputs: ModelOutputs, names: Sequence[str], label: str) -> dict[str, np.ndarray]:
    if isinstance(outputs, Mapping):
        missing = [n for n in names if n not in outputs]
        if missing:
            raise DelucevaError(f"{label} decoder needs outputs {', '.join(missing)}; got {', '.join(outputs)}")
        return dict(outputs)
    if len(outputs) != len(names):
        raise DelucevaError(f"{label} decoder expects {len(names)} outputs ({', '.join(names)}), got {len(outputs)}")
    return dict(zip(names, outputs))
