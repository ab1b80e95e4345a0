"""YOLOX: BGR 0..255, letterboxed to 416x416 at the top-left with grey 114, no normalisation;
one raw head [1, anchors, 5 + classes] decoded into boxes as YOLOX's own demo does."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.media.preprocess import Preprocessor
from deluceva.presets.detections import Detections, ModelOutputs, nms

__all__ = ["PREPROCESSING", "CLASS_NAMES", "YoloxDecoder", "decoder"]

# COCO's 80 classes in YOLOX's order (the labels `run --annotate` draws).
CLASS_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
    "toothbrush").split()

PREPROCESSING = Preprocessor(mode="letterbox", size=(416, 416), pad_value=114.0, channels="BGR", name="yolox")


@dataclass
class YoloxDecoder:
    """YOLOX raw head [1, N, 5 + classes]: cx, cy (grid offsets), log w, log h, objectness,
    class scores (sigmoids already applied in the export). Score = objectness x best class
    score, kept above `conf`, then NMS per class at `nms_threshold` (YOLOX's own demo values).
    `input_hw` defaults to the square size the anchor count implies (416 for 3549 anchors)."""

    conf: float = 0.3
    nms_threshold: float = 0.45
    strides: tuple[int, ...] = (8, 16, 32)
    input_hw: tuple[int, int] | None = None

    def grids(self, anchors: int) -> tuple[np.ndarray, np.ndarray]:
        """Grid cell (x, y) and stride per anchor, in the head's order (stride 8 first)."""
        if self.input_hw is not None:
            h, w = self.input_hw
        else:
            side = math.sqrt(anchors / sum(1.0 / s**2 for s in self.strides))
            h = w = int(round(side))
        cells, strides = [], []
        for s in self.strides:
            gy, gx = np.mgrid[0 : h // s, 0 : w // s]
            cells.append(np.stack([gx.ravel(), gy.ravel()], 1))
            strides.append(np.full(gx.size, s))
        cells, strides = np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)
        if len(cells) != anchors:
            raise DelucevaError(f"yolox decoder: {anchors} anchors do not match input {w}x{h} with strides {self.strides}")
        return cells, strides

    def __call__(self, outputs: ModelOutputs) -> Detections:
        raw = next(iter(outputs.values())) if isinstance(outputs, Mapping) else outputs[0]
        raw = np.asarray(raw, np.float32)
        if raw.ndim != 3 or raw.shape[2] < 6:
            raise DelucevaError(f"yolox decoder expects a [1, anchors, 5 + classes] output, got {raw.shape}")
        raw = raw[0]
        cls = raw[:, 5:].argmax(1)
        score = raw[:, 4] * raw[np.arange(len(raw)), 5 + cls]
        keep = np.flatnonzero(score > self.conf)
        if len(keep) == 0:
            return Detections.empty()
        cells, strides = self.grids(len(raw))
        s = strides[keep, None]
        centre = (raw[keep, :2] + cells[keep]) * s
        size = np.exp(np.minimum(raw[keep, 2:4], 20)) * s  # min(): no overflow on garbage input
        boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
        kept = nms(boxes, score[keep], self.nms_threshold, cls[keep])
        return Detections(boxes[kept], score[keep][kept], cls[keep][kept])


def decoder(input_shape=None, output_names=None) -> YoloxDecoder:
    """The decoder for a model input of `input_shape` (1, C, H, W)."""
    return YoloxDecoder(input_hw=None if input_shape is None else tuple(int(v) for v in input_shape[-2:]))
