"""Detections from any detector whose outputs are already boxes and scores, without a preset.

Many exports end in decoded boxes (N x 4) and per-class scores (N x C), or in one YOLOv8-style
head (1 x (4 + C) x N); `DetectorOptions` says which outputs they are and how to read them
(`run --boxes B --scores S`, `--head yolov8`), and `GenericDecoder` turns them into
`Detections` in model-input pixels: best class per box above a score threshold, then NMS per
class, as the presets' decoders do.

Example:
    >>> options = DetectorOptions(boxes="boxes", scores="scores", score_threshold=0.5)
    >>> decode = GenericDecoder(options, input_hw=(100, 100))
    >>> found = decode({"boxes": np.array([[10, 10, 20, 20]], np.float32),
    ...                 "scores": np.array([[0.1, 0.9]], np.float32)})
    >>> found.boxes.tolist(), found.classes.tolist()
    ([[10.0, 10.0, 20.0, 20.0]], [1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.presets.detections import Detections, ModelOutputs, nms

__all__ = ["BOX_FORMATS", "HEADS", "DetectorOptions", "GenericDecoder", "generic_decoder"]

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
HEADS = ("yolov8",)


@dataclass(frozen=True)
class DetectorOptions:
    """How a detector's outputs hold its detections (the generic det options of `run`).

    Attributes:
        boxes, scores: output names: boxes (N, 4) or (1, N, 4), scores (N, C) or (1, N, C)
            (or (N,) / (1, N) for one class). With `head`, `boxes` names the head (default: the
            model's first output) and `scores` is unused.
        box_format: "xyxy", "xywh" (corner and size) or "cxcywh" (centre and size).
        normalized: boxes are in 0..1 of the model input's width and height.
        background_class: a scores column that is not a class (its boxes are never kept);
            classes keep their column numbers.
        score_threshold: a box is kept when its best class scores above this.
        nms_iou: boxes of one class overlapping a better one by more than this are dropped.
        head: "yolov8": one output (1, 4 + C, N), cxcywh in input pixels, then C class scores.
    """

    boxes: str | None = None
    scores: str | None = None
    box_format: str = "xyxy"
    normalized: bool = False
    background_class: int | None = None
    score_threshold: float = 0.5
    nms_iou: float = 0.45
    head: str | None = None

    def __post_init__(self):
        if self.box_format not in BOX_FORMATS:
            raise DelucevaError(f"--box-format {self.box_format!r} is not one of {', '.join(BOX_FORMATS)}")
        if self.head is not None and self.head not in HEADS:
            raise DelucevaError(f"--head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.head is None and (self.boxes is None or self.scores is None):
            raise DelucevaError("generic detections need both --boxes OUTPUT and --scores OUTPUT (or --head yolov8)")
        if not 0 <= self.nms_iou <= 1:
            raise DelucevaError(f"--nms-iou {self.nms_iou} must be between 0 and 1")
        if not np.isfinite(self.score_threshold):
            raise DelucevaError(f"--score-threshold {self.score_threshold} must be a number")
        if self.background_class is not None and self.background_class < 0:
            raise DelucevaError(f"--background-class {self.background_class} must not be negative")


@dataclass
class GenericDecoder:
    """Boxes and scores (or a YOLOv8 head) into `Detections` in model-input pixels.

    Args:
        options: which outputs, and how to read them.
        input_hw: the model input's (H, W), for `normalized` boxes.
        output_names: the model's outputs in order, to read a list of outputs by name.
    """

    options: DetectorOptions
    input_hw: tuple[int, int] | None = None
    output_names: tuple[str, ...] | None = None

    def _named(self, outputs: ModelOutputs) -> dict[str, np.ndarray]:
        if isinstance(outputs, Mapping):
            return dict(outputs)
        names = self.output_names or ()
        if len(names) != len(outputs):
            raise DelucevaError(f"generic detections: {len(outputs)} outputs, but {len(names)} output names known")
        return dict(zip(names, outputs))

    def _output(self, named: dict, name: str | None, flag: str) -> np.ndarray:
        if name is None:
            name = (self.output_names or tuple(named))[0]
        if name not in named:
            raise DelucevaError(f"{flag} {name}: the model has no such output (it has {', '.join(named)})")
        return np.asarray(named[name], np.float32)

    def boxes_and_scores(self, outputs: ModelOutputs) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (N, 4) xyxy in input pixels, scores (N, C)); DelucevaError naming an output
        whose shape does not fit the options."""
        o = self.options
        named = self._named(outputs)
        if o.head == "yolov8":
            name = o.boxes or (self.output_names or tuple(named))[0]
            head = self._output(named, name, "--head yolov8")
            if head.ndim != 3 or head.shape[0] != 1 or head.shape[1] < 5:
                raise DelucevaError(f"--head yolov8: output {name} has shape {tuple(head.shape)}, not 1 x (4 + classes) x N")
            head = head[0].T
            return _to_xyxy(head[:, :4], "cxcywh"), head[:, 4:]
        boxes = self._output(named, o.boxes, "--boxes")
        scores = self._output(named, o.scores, "--scores")
        b = boxes[0] if boxes.ndim == 3 and boxes.shape[0] == 1 else boxes
        if b.ndim != 2 or b.shape[1] != 4:
            raise DelucevaError(f"--boxes: output {o.boxes} has shape {tuple(boxes.shape)}, not N x 4 or 1 x N x 4")
        s = scores[0] if scores.ndim in (2, 3) and scores.shape[0] == 1 and (scores.ndim == 3 or len(b) != 1) else scores
        if s.ndim == 1:
            s = s[:, None]  # one class
        if s.ndim != 2 or len(s) != len(b):
            raise DelucevaError(f"--scores: output {o.scores} has shape {tuple(scores.shape)}, not N x C or 1 x N x C "
                                f"with the {len(b)} boxes of {o.boxes}")
        if o.background_class is not None and o.background_class >= s.shape[1]:
            raise DelucevaError(f"--background-class {o.background_class}: output {o.scores} has only "
                                f"{s.shape[1]} score columns (shape {tuple(scores.shape)})")
        b = _to_xyxy(b, o.box_format)
        if o.normalized:
            if self.input_hw is None:
                raise DelucevaError("--normalized boxes need the model input's size")
            h, w = self.input_hw
            b = b * np.array([w, h, w, h], np.float32)
        return b, s

    def __call__(self, outputs: ModelOutputs) -> Detections:
        boxes, scores = self.boxes_and_scores(outputs)
        if self.options.background_class is not None:
            scores = scores.copy()
            scores[:, self.options.background_class] = -np.inf  # never a box's class
        if scores.shape[1] == 0 or len(scores) == 0:
            return Detections.empty()
        cls = scores.argmax(1)
        best = scores[np.arange(len(scores)), cls]
        keep = np.flatnonzero(best > self.options.score_threshold)
        if len(keep) == 0:
            return Detections.empty()
        kept = nms(boxes[keep], best[keep], self.options.nms_iou, cls[keep])
        return Detections(boxes[keep][kept], best[keep][kept], cls[keep][kept].astype(np.int64))


def _to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    if box_format == "xyxy":
        return boxes
    if box_format == "xywh":
        return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
    half = boxes[:, 2:] / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], 1)


def generic_decoder(options: DetectorOptions, input_shape: Sequence[int] | None = None,
                    output_names: Sequence[str] | None = None) -> GenericDecoder:
    """The decoder for a model input of `input_shape` (1, C, H, W) and outputs `output_names`."""
    hw = None if input_shape is None else tuple(int(v) for v in input_shape[-2:])
    return GenericDecoder(options, hw, tuple(output_names) if output_names else None)
