"""MTCNN P-Net (one scale of the pyramid): RGB, (x - 127.5) / 128 at any size; a face
probability map and a box regression map decoded as facenet-pytorch's first stage does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.media.preprocess import Preprocessor
from deluceva.presets.detections import Detections, ModelOutputs, nms

__all__ = ["PREPROCESSING", "CLASS_NAMES", "PnetDecoder", "decoder"]

CLASS_NAMES = ("face",)

PREPROCESSING = Preprocessor(mode="none", channels="RGB", mean=(127.5,), std=(128.0,), name="mtcnn")


@dataclass
class PnetDecoder:
    """MTCNN P-Net at one scale: face probability map (1, 2, h, w) and box regression
    (1, 4, h, w). A cell at (x, y) is a 12x12 window at (2x, 2y); kept above `conf`,
    regressed by reg x 12, then NMS at `nms_threshold` (facenet-pytorch's first-stage values)."""

    conf: float = 0.6
    nms_threshold: float = 0.5

    def __call__(self, outputs: ModelOutputs) -> Detections:
        arrays = list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs)
        prob = next((a for a in arrays if np.ndim(a) == 4 and np.shape(a)[1] == 2), None)
        reg = next((a for a in arrays if np.ndim(a) == 4 and np.shape(a)[1] == 4), None)
        if prob is None or reg is None:
            raise DelucevaError(f"mtcnn decoder expects a 2-channel probability map and a 4-channel box map, "
                                f"got shapes {[np.shape(a) for a in arrays]}")
        face = np.asarray(prob, np.float32)[0, 1]
        ys, xs = np.nonzero(face > self.conf)
        if len(ys) == 0:
            return Detections.empty()
        r = np.asarray(reg, np.float32)[0][:, ys, xs].T  # (n, 4)
        window = np.stack([2 * xs, 2 * ys, 2 * xs + 12, 2 * ys + 12], 1).astype(np.float32)
        boxes = window + r * 12
        scores = face[ys, xs]
        kept = nms(boxes, scores, self.nms_threshold)
        return Detections(boxes[kept], scores[kept], np.zeros(len(kept), np.int64))


def decoder(input_shape=None, output_names=None) -> PnetDecoder:
    """The decoder (P-Net's windows do not depend on the input size)."""
    return PnetDecoder()
