"""Error metrics of a delta result against the dense reference: relative L2, and detection 1 - F1.

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
from deluceva.presets.detections import Outputs, match_f1

__all__ = ["DEFAULT_BUDGETS", "rel_l2", "detection_error", "get_metric", "Metric"]

DEFAULT_BUDGETS = {"rel-l2": 0.05, "det": 0.02}


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


def detection_error(outputs: Outputs, reference_outputs: Outputs, decoder, iou_threshold: float = 0.5) -> float:
    """1 - F1 of the detections decoded from `outputs` against those from `reference_outputs`."""
    return 1.0 - match_f1(decoder(outputs), decoder(reference_outputs), iou_threshold)


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
               output_names: Sequence[str] | None = None, detector=None) -> Metric:
    """The metric called `name` ("rel-l2" or "det") for a preset (name, Preprocessor or None).

    Args:
        name: "rel-l2" (any model) or "det" (presets whose outputs decode into detections).
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
    if name == "rel-l2":
        return Metric(name, DEFAULT_BUDGETS[name])
    if name == "det":
        return Metric(name, DEFAULT_BUDGETS[name], get_decoder(preset, input_shape, output_names, detector))
    raise DelucevaError(f"unknown metric {name!r}; known metrics: {', '.join(DEFAULT_BUDGETS)}")
