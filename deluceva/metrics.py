"""Error metrics of a delta result against the dense reference: relative L2, norm-relative L2,
and detection 1 - F1.

`rel-l2` divides each frame's error by that frame's reference norm; `norm-l2` divides it by the
output's typical norm on the calibration frames (`Metric.calibrate`), so that a frame where a
map is nearly empty (a text detector on a scene without text) does not make any error huge.

`det` decodes both results into boxes (with the preset's decoder, see `deluceva.presets`) and
compares the detections, because raw detection-head outputs are dominated by background
anchors: a 6% relative L2 can leave 99% of the detections identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.presets import get_decoder
from deluceva.presets.detections import ModelOutputs, match_f1

__all__ = ["DEFAULT_BUDGETS", "DET_FRAME_LIMIT", "DET_FRAME_SHARE", "rel_l2", "norm_l2", "typical_norms", "score_outputs",
           "detection_error", "get_metric", "Metric"]

DEFAULT_BUDGETS = {"rel-l2": 0.05, "norm-l2": 0.05, "det": 0.02}


def rel_l2(outputs: ModelOutputs, reference: ModelOutputs) -> float:
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


def _floor(size: int) -> float:
    return 1e-6 * math.sqrt(max(size, 1))


def typical_norms(references: Sequence[ModelOutputs]) -> list[float]:
    """Each output's typical L2 norm over frames' dense outputs: sqrt(mean of its squared norms),
    at least the RMS floor of 1e-6 that `rel_l2` uses.

    Example:
        >>> typical_norms([[np.array([3.0, 4.0])], [np.zeros(2)]])  # norms 5 and 0
        [3.5355339059327378]
    """
    frames = [list(r.values()) if isinstance(r, Mapping) else list(r) for r in references]
    if not frames:
        raise DelucevaError("norm-l2 needs at least one calibration frame")
    norms = []
    for k in range(len(frames[0])):
        squares = [float(np.linalg.norm(np.asarray(f[k], np.float64))) ** 2 for f in frames]
        norms.append(max(math.sqrt(sum(squares) / len(squares)), _floor(np.asarray(frames[0][k]).size)))
    return norms


def norm_l2(outputs: ModelOutputs, reference: ModelOutputs, norms: Sequence[float]) -> float:
    """||out - ref|| / typical norm per output (`typical_norms`, in the outputs' order); the maximum.

    Example:
        >>> norm_l2([np.array([1.0, 0.1])], [np.array([1.0, 0.0])], [2.0])
        0.05
    """
    pairs = _pairs(outputs, reference)
    if len(pairs) != len(norms):
        raise DelucevaError(f"norm-l2 calibrated on {len(norms)} outputs, given {len(pairs)}")
    worst = 0.0
    for (out, ref), norm in zip(pairs, norms):
        out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
        if out.shape != ref.shape:
            raise DelucevaError(f"output shape {out.shape} differs from the reference's {ref.shape}")
        worst = max(worst, float(np.linalg.norm(out - ref)) / norm)
    return worst


# Ops that move or select values without changing what they mean: a score map stays one through them.
_PASS_THROUGH = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Concat", "Slice",
                 "Gather", "Split", "Cast"}


def score_outputs(model) -> list[str]:
    """The outputs of `model` (a `deluceva.planner.Model`) that are softmax or sigmoid scores:
    made by a Softmax or Sigmoid node, through reshapes, transposes, concats and slices."""
    producer = {o: node for node in model.onnx.graph.node for o in node.output}
    found = []
    for name in model.output_names:
        todo, seen = [name], set()
        while todo:
            node = producer.get(todo.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in ("Softmax", "Sigmoid", "HardSigmoid"):
                found.append(name)
                break
            if node.op_type in _PASS_THROUGH:
                todo.extend(node.input[:1] if node.op_type != "Concat" else node.input)
    return found


def _pairs(outputs: ModelOutputs, reference: ModelOutputs) -> list[tuple[np.ndarray, np.ndarray]]:
    if isinstance(reference, Mapping):
        if not isinstance(outputs, Mapping) or set(outputs) != set(reference):
            raise DelucevaError("outputs and reference name different tensors")
        return [(outputs[k], reference[k]) for k in reference]
    if isinstance(outputs, Mapping) or len(outputs) != len(reference):
        raise DelucevaError(f"{len(outputs)} outputs against {len(reference)} reference outputs")
    return list(zip(outputs, reference))


# With the det metric, a run (or a fixed p, or a gate's setting) counts as within the budget only
# when this share of its frames is at det <= DET_FRAME_LIMIT too: a mean within 0.02 can hide a
# few frames that lost most of their boxes.
DET_FRAME_LIMIT = 0.1
DET_FRAME_SHARE = 0.95


def detection_error(outputs: ModelOutputs, reference_outputs: ModelOutputs, decoder, iou_threshold: float = 0.5) -> float:
    """1 - F1 of the detections decoded from `outputs` against those from `reference_outputs`."""
    return 1.0 - match_f1(decoder(outputs), decoder(reference_outputs), iou_threshold)


@dataclass
class Metric:
    """A named error metric: `metric(outputs, reference) -> float`, with its default budget."""

    name: str
    budget: float
    decoder: object | None = None
    norms: list[float] | None = None  # norm-l2: each output's typical norm, set by `calibrate`

    @property
    def needs_calibration(self) -> bool:
        return self.name == "norm-l2"

    def calibrate(self, references: Sequence[ModelOutputs]) -> None:
        """norm-l2: take each output's typical norm from the calibration frames' dense outputs."""
        if self.needs_calibration:
            self.norms = typical_norms(references)

    def __call__(self, outputs: ModelOutputs, reference: ModelOutputs) -> float:
        if self.decoder is not None:
            return detection_error(outputs, reference, self.decoder)
        if self.name == "norm-l2":
            if self.norms is None:
                raise DelucevaError("norm-l2 is relative to each output's typical norm: calibrate it first "
                                    "(Metric.calibrate on the calibration frames' dense outputs)")
            return norm_l2(outputs, reference, self.norms)
        return rel_l2(outputs, reference)


def get_metric(name: str, preset=None, input_shape: Sequence[int] | None = None,
               output_names: Sequence[str] | None = None, detector=None) -> Metric:
    """The metric called `name` ("rel-l2", "norm-l2" or "det") for a preset (name, Preprocessor or None).

    Args:
        name: "rel-l2" or "norm-l2" (any model; norm-l2 needs `Metric.calibrate`), or "det"
            (presets whose outputs decode into detections, or generic det options).
        preset: the preprocessing preset, which also says how to decode detections.
        input_shape: the model input's (1, C, H, W); YuNet needs it to place its anchors.
        output_names: the model's output names in order; YuNet uses them to find its heads.
        detector: generic det options (`deluceva.presets.DetectorOptions`) for a model whose
            outputs are boxes and scores; they override the preset's decoder.

    Example:
        >>> metric = get_metric("rel-l2")
        >>> metric.budget, metric([np.ones(3)], [np.ones(3)])
        (0.05, 0.0)
    """
    if name in ("rel-l2", "norm-l2"):
        return Metric(name, DEFAULT_BUDGETS[name])
    if name == "det":
        return Metric(name, DEFAULT_BUDGETS[name], get_decoder(preset, input_shape, output_names, detector))
    raise DelucevaError(f"unknown metric {name!r}; known metrics: {', '.join(DEFAULT_BUDGETS)}")
