"""Filter thresholds calibrated on a few frames, in each tensor's own units.

For filtering percentage p, the filter on tensor t holds back a position while its largest absolute
change over the channels stays under threshold(t, p): the p-quantile of the magnitudes of t's
position changes between consecutive calibration frames, computed exactly (one onnxruntime run per frame that
exposes every tensor). So p is the share of a typical frame's changes that is held back, as
measured on the calibration frames, and the threshold stays fixed while the video plays.

Why not the quantile of each frame's own change, at each filter: deep in the network most of
what arrives is the tail of changes already held back upstream, and a per-frame quantile still
passes 1 - p of it, so the work hardly falls as p rises. A fixed threshold lets quiet frames
and quiet layers cost almost nothing.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.operators import Layout
from deluceva.memory import release_freed_memory
from deluceva.onnxruntime_session import inference_session
from deluceva.runtime.boundaries import change_magnitudes

__all__ = ["Thresholds", "QUANTILE_POINTS", "CALIBRATION_FRAMES", "tensor_values", "tensor_groups", "tensor_layouts"]

QUANTILE_POINTS = 201  # quantiles stored per tensor, at p = 0, 0.005, ..., 1
_POSITIONS = np.linspace(0.0, 1.0, QUANTILE_POINTS)
CALIBRATION_FRAMES = 10  # a video's first frames that `run` and `bench` calibrate on
# Positions sampled per tensor and frame pair (evenly spaced): enough for 201 quantiles, and it
# keeps calibration's memory small on large tensors (P-Net at 1280x720 has 900k positions).
SAMPLES_PER_FRAME = 1 << 16
# Tensors are measured in groups of at most this many values, each group in its own pass over
# the frames, so that calibration holds two frames of one group at a time (YOLOX-nano's filtered
# tensors are 12.7M values: 100 MB for two frames of all of them at once).
GROUP_VALUES = 1 << 22


def tensor_values(model, frames: Iterable[np.ndarray], tensors: Iterable[str]):
    """For each frame, {tensor: value} for `tensors` (and the model input), from one onnxruntime run."""
    wanted = [t for t in dict.fromkeys(tensors) if t != model.input_name]
    # In the run's shared arena: the whole model's intermediates take what the keyframes will
    # take again there (an arena of its own, or none, added them to the set-up's peak). The
    # values are copied out of it, so that none held pins a chunk there while the next runs.
    session = inference_session(model.exposing(wanted), 1, shared_arena=True, memory_pattern=False)
    for frame in frames:
        values = {t: np.array(v) for t, v in zip(wanted, session.run(wanted, {model.input_name: frame}))} if wanted else {}
        values[model.input_name] = frame
        yield values


def tensor_groups(model, tensors: list[str]) -> list[list[str]]:
    """`tensors` in order, cut into groups of at most GROUP_VALUES values (one tensor at least)."""
    groups, size = [[]], 0
    for tensor in tensors:
        values = int(np.prod(model.shapes.get(tensor) or (1,)))
        if groups[-1] and size + values > GROUP_VALUES:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += values
    return groups


def tensor_layouts(graph) -> dict[str, Layout]:
    """Every float 1xCxHxW tensor of the annotated DAG, with its layout."""
    layouts = {}
    for _, data in graph.nodes(data=True):
        spec = data["spec"]
        for tensor, layout in [*zip(data["inputs"], spec.input_layouts), *zip(data["outputs"], spec.output_layouts)]:
            if tensor and layout is not None:
                layouts[tensor] = layout
    return layouts


class Thresholds:
    """Per tensor, the quantiles of its position change magnitudes; `threshold(t, p)` reads them."""

    def __init__(self, quantiles: Mapping[str, np.ndarray], frames: int = 0):
        self.quantiles = {t: np.asarray(q, np.float64) for t, q in quantiles.items()}
        self.frames = frames

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.quantiles

    def threshold(self, tensor: str, percentage: float) -> float:
        """The threshold on `tensor` for filtering percentage p (0 at p = 0: exact)."""
        if percentage <= 0:
            return 0.0
        # Rounded to float32, the magnitudes' type, as the filter kernels compare.
        return float(np.float32(np.interp(percentage, _POSITIONS, self.quantiles[tensor])))

    @classmethod
    def calibrate(cls, model, frames: list[np.ndarray], tensors: Iterable[str]) -> "Thresholds":
        """Measure on consecutive `frames` (model inputs), for every tensor in `tensors`."""
        if len(frames) < 2:
            raise DelucevaError(f"calibrating thresholds needs at least 2 frames, got {len(frames)}")
        tensors = list(dict.fromkeys(tensors))
        if not tensors:
            return cls({}, frames=len(frames))
        samples: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
        for group in tensor_groups(model, tensors):
            previous = None
            for values in tensor_values(model, frames, group):
                if previous is not None:
                    for tensor in group:
                        magnitudes = change_magnitudes(values[tensor], previous[tensor])
                        step = max(1, len(magnitudes) // SAMPLES_PER_FRAME)
                        samples[tensor].append(magnitudes[::step].copy())  # not a view holding them all
                previous = values
        quantiles = {}
        for tensor, parts in samples.items():
            magnitudes = np.concatenate(parts).astype(np.float64)
            magnitudes = magnitudes[magnitudes > 0]
            quantiles[tensor] = np.quantile(magnitudes, _POSITIONS) if len(magnitudes) else np.zeros(QUANTILE_POINTS)
        release_freed_memory()  # every tensor's values, group by group, were allocated and freed
        return cls(quantiles, frames=len(frames))
