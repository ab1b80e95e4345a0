"""YuNet: BGR 0..255 at any size, zero-padded right and bottom to a multiple of 32; heads
cls/obj/bbox(/kps)_{8,16,32} decoded into faces as OpenCV's FaceDetectorYN does."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.media.preprocess import Preprocessor
from deluceva.presets.detections import Detections, ModelOutputs, nms, outputs_by_name

__all__ = ["PREPROCESSING", "CLASS_NAMES", "YUNET_OUTPUTS", "YunetDecoder", "decoder"]

CLASS_NAMES = ("face",)

PREPROCESSING = Preprocessor(mode="pad", multiple=32, pad_value=0.0, channels="BGR", name="yunet")

YUNET_OUTPUTS = tuple(f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32))


@dataclass
class YunetDecoder:
    """YuNet outputs cls/obj/bbox(/kps)_{8,16,32} as OpenCV's FaceDetectorYN decodes them:
    score = sqrt(clamp(cls) x clamp(obj)); centre = (cell + bbox[:2]) x stride, size =
    exp(bbox[2:]) x stride; kept above `conf`, then NMS at `nms_threshold`, one class.

    OpenCV's default threshold is 0.9; 0.6 here keeps the less certain faces too, so that the
    det metric also watches them (these are the boxes a delta result is likeliest to lose).
    `input_hw` (the padded input's H, W) places each anchor on its grid; without it the grid is
    guessed from the anchor count (16:9-ish), which still decodes both sides of a comparison alike.
    """

    conf: float = 0.6
    nms_threshold: float = 0.3
    strides: tuple[int, ...] = (8, 16, 32)
    input_hw: tuple[int, int] | None = None
    output_names: tuple[str, ...] | None = None
    top_k: int = 5000

    def _grid(self, anchors_coarsest: int) -> tuple[int, int]:
        if self.input_hw is not None:
            return tuple(int(v) for v in self.input_hw)
        s = self.strides[-1]
        pairs = [(r, anchors_coarsest // r) for r in range(1, anchors_coarsest + 1) if anchors_coarsest % r == 0]
        r, c = min(pairs, key=lambda rc: abs(math.log(rc[1] / rc[0] / (16 / 9))))
        warnings.warn("yunet decoder: no input size given; guessing the anchor grid", RuntimeWarning, stacklevel=3)
        return r * s, c * s

    def __call__(self, outputs: ModelOutputs) -> Detections:
        names = tuple(self.output_names) if self.output_names else YUNET_OUTPUTS
        if not isinstance(outputs, Mapping) and len(outputs) == 9 and not self.output_names:
            names = YUNET_OUTPUTS[:9]  # an export without landmarks
        named = outputs_by_name(outputs, names, "yunet")
        missing = [f"{k}_{s}" for k in ("cls", "obj", "bbox") for s in self.strides if f"{k}_{s}" not in named]
        if missing:
            raise DelucevaError(f"yunet decoder needs outputs {', '.join(missing)}; the model has {', '.join(named)}")
        h, w = self._grid(int(np.asarray(named[f"cls_{self.strides[-1]}"]).size))
        boxes, scores = [], []
        for s in self.strides:
            cls = np.clip(np.asarray(named[f"cls_{s}"], np.float32).ravel(), 0, 1)
            obj = np.clip(np.asarray(named[f"obj_{s}"], np.float32).ravel(), 0, 1)
            bbox = np.asarray(named[f"bbox_{s}"], np.float32).reshape(-1, 4)
            cols = w // s
            if cols * (h // s) != len(cls):
                raise DelucevaError(f"yunet decoder: {len(cls)} anchors at stride {s} do not match input {w}x{h}")
            score = np.sqrt(cls * obj)
            keep = np.flatnonzero(score > self.conf)
            cell = np.stack([keep % cols, keep // cols], 1).astype(np.float32)
            centre = (cell + bbox[keep, :2]) * s
            size = np.exp(np.minimum(bbox[keep, 2:], 20)) * s
            boxes.append(np.concatenate([centre - size / 2, centre + size / 2], 1))
            scores.append(score[keep])
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        if len(scores) > self.top_k:
            top = np.argsort(-scores, kind="stable")[: self.top_k]
            boxes, scores = boxes[top], scores[top]
        kept = nms(boxes, scores, self.nms_threshold)
        return Detections(boxes[kept], scores[kept], np.zeros(len(kept), np.int64))


def decoder(input_shape=None, output_names=None) -> YunetDecoder:
    """The decoder for a model input of `input_shape` (1, C, H, W), heads found by `output_names`."""
    return YunetDecoder(input_hw=None if input_shape is None else tuple(int(v) for v in input_shape[-2:]),
                        output_names=tuple(output_names) if output_names else None)
