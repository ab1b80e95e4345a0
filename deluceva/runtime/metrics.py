"""Error metrics of a delta result against the dense reference: relative L2, and detection 1 - F1.

`det` decodes both results into boxes (YOLOX, YuNet, MTCNN P-Net decoders below) and compares
the detections, because raw detection-head outputs are dominated by background anchors: a 6%
relative L2 can leave 99% of the detections identical.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deluceva.errors import DelucevaError

__all__ = [
    "check_preset",
    "DEFAULT_BUDGETS",
    "Detections",
    "YoloxDecoder",
    "YunetDecoder",
    "PnetDecoder",
    "DECODERS",
    "rel_l2",
    "iou",
    "nms",
    "match_f1",
    "detection_error",
    "get_decoder",
    "get_metric",
    "Metric",
]

DEFAULT_BUDGETS = {"rel-l2": 0.05, "det": 0.02}

Outputs = Sequence[np.ndarray] | Mapping[str, np.ndarray]


def rel_l2(outputs: Outputs, reference: Outputs) -> float:
    """Relative L2 error ||out - ref|| / ||ref|| per output; the maximum over outputs.

    A reference whose norm is (near) zero is compared against an RMS floor of 1e-6 instead, so
    that an all-zero output map gives a finite error, 0 when the result is zero too.

    Example:
        >>> rel_l2([np.array([1.0, 1.0])], [np.array([1.0, 0.0])])
        1.0
    """
    pairs = _pairs(outputs, reference)
    worst = 0.0
    for out, ref in pairs:
        out = np.asarray(out, np.float64)
        ref = np.asarray(ref, np.float64)
        if out.shape != ref.shape:
            raise DelucevaError(f"output shape {out.shape} differs from the reference's {ref.shape}")
        diff = float(np.linalg.norm(out - ref))
        norm = max(float(np.linalg.norm(ref)), 1e-6 * math.sqrt(max(ref.size, 1)))
        worst = max(worst, diff / norm)
    return worst


def _pairs(outputs: Outputs, reference: Outputs) -> list[tuple[np.ndarray, np.ndarray]]:
    if isinstance(reference, Mapping):
        if not isinstance(outputs, Mapping) or set(outputs) != set(reference):
            raise DelucevaError("outputs and reference name different tensors")
        return [(outputs[k], reference[k]) for k in reference]
    if isinstance(outputs, Mapping) or len(outputs) != len(reference):
        raise DelucevaError(f"{len(outputs)} outputs against {len(reference)} reference outputs")
    return list(zip(outputs, reference))


# -- detections -----------------------------------------------------------------------------


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


def detection_error(outputs: Outputs, reference_outputs: Outputs, decoder, iou_threshold: float = 0.5) -> float:
    """1 - F1 of the detections decoded from `outputs` against those from `reference_outputs`."""
    return 1.0 - match_f1(decoder(outputs), decoder(reference_outputs), iou_threshold)


def _by_name(outputs: Outputs, names: Sequence[str], label: str) -> dict[str, np.ndarray]:
    if isinstance(outputs, Mapping):
        missing = [n for n in names if n not in outputs]
        if missing:
            raise DelucevaError(f"{label} decoder needs outputs {', '.join(missing)}; got {', '.join(outputs)}")
        return dict(outputs)
    if len(outputs) != len(names):
        raise DelucevaError(f"{label} decoder expects {len(names)} outputs ({', '.join(names)}), got {len(outputs)}")
    return dict(zip(names, outputs))


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

    def __call__(self, outputs: Outputs) -> Detections:
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

    def __call__(self, outputs: Outputs) -> Detections:
        names = tuple(self.output_names) if self.output_names else YUNET_OUTPUTS
        if not isinstance(outputs, Mapping) and len(outputs) == 9 and not self.output_names:
            names = YUNET_OUTPUTS[:9]  # an export without landmarks
        named = _by_name(outputs, names, "yunet")
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


@dataclass
class PnetDecoder:
    """MTCNN P-Net at one scale: face probability map (1, 2, h, w) and box regression
    (1, 4, h, w). A cell at (x, y) is a 12x12 window at (2x, 2y); kept above `conf`,
    regressed by reg x 12, then NMS at `nms_threshold` (facenet-pytorch's first-stage values)."""

    conf: float = 0.6
    nms_threshold: float = 0.5

    def __call__(self, outputs: Outputs) -> Detections:
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


DECODERS = {"yolox": YoloxDecoder, "yunet": YunetDecoder, "mtcnn": PnetDecoder}


def check_preset(preset, model) -> None:
    """Refuse a preset whose detection decoder does not fit `model`'s outputs and input: the
    decoder runs once on outputs of the model's shapes (zeros, and ones so that every anchor is
    placed). Presets without a decoder fit any model their preprocessing fits."""
    name = getattr(preset, "name", preset)
    if name not in DECODERS:
        return
    decoder = get_decoder(name, model.input_shape, model.output_names)
    shapes = [model.shapes.get(o) for o in model.output_names]
    if any(shape is None for shape in shapes):
        return  # shapes not inferred: the first reference frame will tell
    try:
        for fill in (0.0, 1.0):
            decoder([np.full(shape, fill, np.float32) for shape in shapes])
    except DelucevaError as error:
        raise DelucevaError(f"{model.path}: preset {name} does not fit this model ({error})") from None


def get_decoder(preset, input_shape: Sequence[int] | None = None, output_names: Sequence[str] | None = None):
    """The detection decoder for a preset (name or Preprocessor), bound to the model's input shape
    (1, C, H, W) and output names where the decoder uses them; DelucevaError if it has none."""
    name = getattr(preset, "name", preset)
    if name not in DECODERS:
        known = ", ".join(sorted(DECODERS))
        raise DelucevaError(f"metric det needs a preset that decodes detections ({known}); got {name or 'no preset'}")
    hw = tuple(int(v) for v in input_shape[-2:]) if input_shape is not None else None
    if name == "yolox":
        return YoloxDecoder(input_hw=hw)
    if name == "yunet":
        return YunetDecoder(input_hw=hw, output_names=tuple(output_names) if output_names else None)
    return PnetDecoder()


@dataclass
class Metric:
    """A named error metric: `metric(outputs, reference) -> float`, with its default budget."""

    name: str
    budget: float
    decoder: object | None = None

    def __call__(self, outputs: Outputs, reference: Outputs) -> float:
        if self.decoder is None:
            return rel_l2(outputs, reference)
        return detection_error(outputs, reference, self.decoder)


def get_metric(name: str, preset=None, input_shape: Sequence[int] | None = None,
               output_names: Sequence[str] | None = None) -> Metric:
    """The metric called `name` ("rel-l2" or "det") for a preset (name, Preprocessor or None).

    Args:
        name: "rel-l2" (any model) or "det" (presets whose outputs decode into detections).
        preset: the preprocessing preset, which also says how to decode detections.
        input_shape: the model input's (1, C, H, W); YuNet needs it to place its anchors.
        output_names: the model's output names in order; YuNet uses them to find its heads.

    Example:
        >>> metric = get_metric("rel-l2")
        >>> metric.budget, metric([np.ones(3)], [np.ones(3)])
        (0.05, 0.0)
    """
    if name == "rel-l2":
        return Metric(name, DEFAULT_BUDGETS[name])
    if name == "det":
        return Metric(name, DEFAULT_BUDGETS[name], get_decoder(preset, input_shape, output_names))
    raise DelucevaError(f"unknown metric {name!r}; known metrics: {', '.join(DEFAULT_BUDGETS)}")
