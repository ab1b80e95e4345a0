"""A frame gate that composes with delta: a frame that barely changed since the last frame that
ran reuses the last outputs, and the filtering percentage p and the gate's share g move on one knob.

The gate: the share of 8x8 tiles of the model input whose largest change since the last frame
that *ran* (not the previous frame, so slow drift adds up and still triggers a run) exceeds a
pixel threshold calibrated on the video's first frames. Under g, the frame reuses the outputs the
user last received. Delta itself only skips a frame when no position changed beyond its
threshold, which real video almost never allows; the gate skips whole frames where only a few
tiles moved, which is what frame skipping wins with on still scenes.

One knob: a controller moves a single setting (its "percentage"); `GateSchedule` maps it to a
pair (p, g): the pairs measured on the calibration frames that are cheaper than every pair of
lower error, in order of error. The setting 0 is (0, 0): exact, and the gate is not even
evaluated, so it costs nothing there.

Example:
    >>> schedule = GateSchedule(0.05, [(0.0, 0.0, 0.0), (0.5, 0.3, 0.1)])
    >>> schedule.pair(0.0), schedule.pair(0.4), schedule.pair(0.6)
    ((0.0, 0.0), (0.0, 0.0), (0.3, 0.1))
"""

from __future__ import annotations

import bisect
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from deluceva.metrics import DET_FRAME_SHARE

__all__ = ["TILE", "subsample", "tile_changes", "FrameGate", "FrameChange", "GateSchedule", "calibrate_gate", "GATE_SHARES",
           "GATE_THRESHOLDS", "GATE_CLIFF"]

TILE = 8
# g values tried per p on the calibration frames, and pixel thresholds as fractions of the
# input's range (the frame-skipping baseline uses 1%). Fine at the low end: one car moving at
# 416 x 416 is under 1% of the tiles, and a gate above that holds the frames where it moves.
GATE_SHARES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
GATE_THRESHOLDS = (0.005, 0.01, 0.02, 0.04, 0.08)
# The knob stops below the first (p, g) pair whose error on the gate's 30 calibration frames
# exceeds GATE_CLIFF x the budget (the PI's own ceiling, on 9 frames, allows more: see
# `deluceva.playback.calibration.CLIFF`).
GATE_CLIFF = 2.0


def subsample(frame: np.ndarray, tile: int = TILE) -> tuple[np.ndarray, int]:
    """(every 4th row and column of the model input, as a (C, h, w) view; the stride).

    Every 4th row and column (0.1 ms at 416x416 against 0.7 for every pixel): the gate and the
    controller's statistics need frame-level shares, not the exact change.
    """
    stride = 4 if tile % 4 == 0 else 1
    return frame.reshape(frame.shape[-3:])[:, ::stride, ::stride], stride


def tile_maxima(largest: np.ndarray, step: int) -> np.ndarray:
    """The maximum of each step x step block of a (h, w) map (zero-padded to whole blocks), as a
    few strided maxima: numpy's multi-axis max is 10x slower."""
    height, width = largest.shape
    th, tw = -(-height // step), -(-width // step)
    if (th * step, tw * step) != (height, width):
        padded = np.zeros((th * step, tw * step), largest.dtype)
        padded[:height, :width] = largest
        largest = padded
    per_tile = largest[::step, ::step].copy()
    for dy in range(step):
        for dx in range(step):
            if dy or dx:
                np.maximum(per_tile, largest[dy::step, dx::step], out=per_tile)
    return per_tile


def tile_changes(frame: np.ndarray, base: np.ndarray, tile: int = TILE) -> np.ndarray:
    """Largest |frame - base| over channels in each tile x tile tile of the model input (read on
    `subsample`)."""
    now, stride = subsample(frame, tile)
    return _changes_per_tile(now, subsample(base, tile)[0], tile // stride)[1]


def _changes_per_tile(now: np.ndarray, base: np.ndarray, step: int, out: np.ndarray | None = None):
    """(|now - base|, written into `out` when given; its largest value over channels per
    step x step block) for two subsamples."""
    change = np.subtract(now, base, out=out)
    np.abs(change, out=change)
    return change, tile_maxima(change.max(axis=0), step)


def _buffer_like(buffer: np.ndarray | None, array: np.ndarray) -> np.ndarray:
    """`buffer` when it has `array`'s shape and type, else a new one that has."""
    if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
        return np.empty(array.shape, array.dtype)
    return buffer


class FrameGate:
    """The share of tiles changed beyond `threshold` (input units) since the last frame that ran.

    It keeps the subsample of the last frame that ran (`subsample`, 1/16 of the frame) rather
    than the frame: read every frame, that copy stays in cache, where the frame itself (2 MB at
    416x416, several frames old) came from memory each time: 0.3 ms a frame on YOLOX-nano's
    input, 3% of its dense run.

    Example:
        >>> gate = FrameGate(0.5)
        >>> still = np.zeros((1, 3, 16, 16), np.float32)
        >>> gate.share(still)          # nothing ran yet: everything counts as changed
        1.0
        >>> gate.ran(still)
        >>> moved = still.copy(); moved[..., :8, :8] = 1.0
        >>> gate.share(moved)          # one tile of four
        0.25
    """

    def __init__(self, threshold: float, tile: int = TILE):
        self.threshold = float(threshold)
        self.tile = tile
        self.base: np.ndarray | None = None  # the last frame that ran, subsampled
        self._change: np.ndarray | None = None

    def share(self, frame: np.ndarray) -> float:
        if self.base is None:
            return 1.0
        now, stride = subsample(frame, self.tile)
        self._change = _buffer_like(self._change, now)
        _, per_tile = _changes_per_tile(now, self.base, self.tile // stride, self._change)
        return float((per_tile > self.threshold).mean())

    def ran(self, frame: np.ndarray) -> None:
        """`frame` ran (or its exact outputs were delivered): later frames are compared with it."""
        now, _ = subsample(frame, self.tile)
        self.base = _buffer_like(self.base, now)
        np.copyto(self.base, now)


class FrameChange:
    """Frame-level change of the model input since a kept frame: mean |change| and the share of
    8x8 tiles whose largest change exceeds 1% of the frame's range (scale-free, so presets do
    not matter); read on `subsample`. A learned controller's features, and frame skipping's test.

    Like `FrameGate`, it keeps the kept frame's subsample, not the frame: on every frame, at
    1280x736, reading the old frame from memory cost 1.4 ms, 7% of YuNet's dense run.

    Example:
        >>> change = FrameChange()
        >>> still = np.zeros((1, 3, 16, 16), np.float32); still[..., 0, 0] = 1.0
        >>> change.measure(still)["changed_tiles"]   # nothing kept yet: everything counts
        1.0
        >>> change.keep(still)
        >>> moved = still.copy(); moved[..., 8:, 8:] = 0.5
        >>> change.measure(moved)["changed_tiles"]   # one tile of four
        0.25
    """

    def __init__(self, tile: int = TILE):
        self.tile = tile
        self.base: np.ndarray | None = None  # the kept frame, subsampled
        self._now: np.ndarray | None = None  # the last frame measured, subsampled
        self._measured: np.ndarray | None = None  # ... and which frame that was
        self._change: np.ndarray | None = None

    def measure(self, frame: np.ndarray) -> dict[str, float]:
        view, stride = subsample(frame, self.tile)
        now = self._now = _buffer_like(self._now, view)
        np.copyto(now, view)
        self._measured = frame
        if self.base is None or self.base.shape != now.shape:
            return {"mean_abs_change": 0.0, "changed_tiles": 1.0}
        self._change = _buffer_like(self._change, now)
        change, per_tile = _changes_per_tile(now, self.base, self.tile // stride, self._change)
        span = float(now.max() - now.min()) or 1.0
        return {"mean_abs_change": float(change.mean()), "changed_tiles": float((per_tile > 0.01 * span).mean())}

    def keep(self, frame: np.ndarray) -> None:
        """Later frames are measured against `frame` (the one just measured, usually: then its
        subsample becomes the base, and the old base's buffer takes the next measurement)."""
        if frame is self._measured:
            self.base, self._now = self._now, self.base
            self._measured = None
        else:
            self.base = np.array(subsample(frame, self.tile)[0])


@dataclass
class GateSchedule:
    """The knob: a controller's setting -> (p, g), and the gate's pixel threshold.

    Attributes:
        threshold: the pixel threshold, in the model input's units.
        points: (setting, p, g) sorted by setting; the first is (0, 0, 0). A setting between two
            points takes the lower one's pair.
        start: where a controller starts (the largest setting whose calibration error is within
            the target); ceiling: the largest setting it may reach.
        table: what calibration measured, per (p, g): error and cost (for the summary).
        fixed: one (p, g) whatever the setting (calibration's own runs).
    """

    threshold: float
    points: list
    start: float = 0.0
    ceiling: float = 0.99
    table: list = field(default_factory=list)
    fixed: tuple[float, float] | None = None

    def __post_init__(self):
        self.points = sorted((float(k), float(p), float(g)) for k, p, g in self.points)
        if not self.points or self.points[0] != (0.0, 0.0, 0.0):
            self.points.insert(0, (0.0, 0.0, 0.0))
        self._settings = [k for k, _, _ in self.points]

    def pair(self, setting: float) -> tuple[float, float]:
        if self.fixed is not None:
            return self.fixed
        _, p, g = self.points[max(0, bisect.bisect_right(self._settings, setting) - 1)]
        return p, g

    def describe(self) -> str:
        return ", ".join(f"{k:.2f}->(p {p:g}, g {g:g})" for k, p, g in self.points)


# The knob's points are spread evenly in u = -log(1 - setting) up to this setting: the PI
# controller acts on u, so each step along the front is one like-sized move for it.
TOP_SETTING = 0.95
START_MARGIN = 0.5  # a controller starts at the largest setting within this share of the target


def calibrate_gate(plans, metric: Callable, frames: Sequence[np.ndarray], target: float, limit: float,
                   percentages: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95),
                   shares: Sequence[float] = GATE_SHARES, thresholds: Sequence[float] = GATE_THRESHOLDS,
                   frame_limit: float | None = None) -> GateSchedule:
    """The knob, measured on `frames` (the video's first frames, model inputs) through `plans`.

    1. The pixel threshold: with dense outputs reused (p = 0), the threshold that lets the most
       frames be gated at a mean error within `target` (the first on a tie; 1% of the input's
       range where none gates any).
    2. Each (p, g) on `percentages` x `shares`: run through the plans at fixed p with that gate
       (no reference frames); its error is what the user receives, on every frame, against the
       dense outputs; its cost, the gate's statistic on every frame (where g > 0) plus the
       median ms of a delta frame at p on the frames that ran. A p whose plan is retired runs
       dense: the same as p = 0, not measured again.
    3. The cheapest pair at each error level: the pairs by error, each kept when cheaper than
       every one before it (from (0, 0), exact), up to the first over `limit`. With
       `frame_limit` (det's DET_FRAME_LIMIT), a pair with more than 1 - DET_FRAME_SHARE of its
       frames over it is left out, whatever its mean: on YuNet / overhead_pedestrians the gated
       pairs' means were within the budget on these frames while each gated frame lost faces
       (det 0.14-0.43), and a learned controller on that knob ran the video at det 0.027 with
       10% of its frames over 0.1. Settings are spread over the pairs evenly in u; a controller
       starts at the largest setting within START_MARGIN x `target` and never goes past the last.

    The sessions are reset afterwards.
    """
    from deluceva.controller import FixedController
    from deluceva.controller.pi import to_p, to_u
    from deluceva.playback.loop import VideoRunner

    dense = [plans.sessions[0].reference(frame) for frame in frames]
    span = float(max(f.max() for f in frames) - min(f.min() for f in frames)) or 1.0
    threshold, best = 0.01 * span, 0.0
    for fraction in thresholds:
        for g in sorted(shares):
            errors, gated = _reuse_dense(frames, dense, metric, FrameGate(fraction * span), g)
            if g and statistics.fmean(errors) <= target and gated > best:
                threshold, best = fraction * span, gated
    start = time.perf_counter()
    gate = FrameGate(threshold)
    for frame in frames:
        gate.share(frame)
        gate.ran(frame)
    statistic_ms = (time.perf_counter() - start) * 1000 / len(frames)

    measured = {}  # (p, g) -> (error, cost)
    for p in sorted({0.0, *percentages}):
        if p > 0 and plans.effective(p) == 0.0:
            continue  # a retired plan's range runs dense: p = 0's runs
        ms_at_p = None
        for g in sorted(shares):
            for session in plans.sessions:
                session.reset()
            runner = VideoRunner(plans, FixedController(p), metric, reference_every=len(frames) + 1, percentage=p,
                                 gate=GateSchedule(threshold, [], fixed=(p, g)))
            errors, ran_ms, ran = [], [], 0
            for index, frame in enumerate(frames):
                result = runner.step(frame)
                if index:
                    errors.append(float(metric(result.outputs, dense[index])))
                    if not result.gated:
                        ran += 1
                        ran_ms.append(result.seconds * 1000)
            if g == 0.0:
                ms_at_p = statistics.median(ran_ms) if ran_ms else 0.0
            share_ran = ran / max(1, len(frames) - 1)
            over = sum(e > frame_limit for e in errors) / max(1, len(errors)) if frame_limit is not None else 0.0
            measured[(p, g)] = (statistics.fmean(errors) if errors else 0.0,
                                share_ran * ms_at_p + (statistic_ms if g else 0.0), over)
    for session in plans.sessions:
        session.reset()

    front = [(0.0, 0.0, *measured[(0.0, 0.0)][:2])]
    for (p, g), (error, cost, over) in sorted(measured.items(), key=lambda item: (item[1][0], item[1][1])):
        if error > limit:
            break
        if cost < front[-1][3] and over <= 1 - DET_FRAME_SHARE:
            front.append((p, g, error, cost))
    top = to_u(TOP_SETTING)
    settings = [0.0] + [round(to_p(top * i / (len(front) - 1)), 6) for i in range(1, len(front))]
    points = [(k, p, g) for k, (p, g, _, _) in zip(settings, front)]
    # The start keeps a margin: the first frames are often the stillest (intersection_cctv's
    # barely move), and a gate within the target on them was at twice the budget later.
    start = max(k for k, (_, _, error, _) in zip(settings, front) if error <= START_MARGIN * target)
    table = [{"percentage": p, "gate": g, "error": e, "cost_ms": c, "frames_over_limit": o}
             for (p, g), (e, c, o) in sorted(measured.items())]
    return GateSchedule(threshold, points, start=start, ceiling=settings[-1] if len(front) > 1 else 0.0, table=table)


def _reuse_dense(frames, dense, metric, gate: FrameGate, g: float) -> tuple[list[float], float]:
    """Errors per frame (after the first) and the share gated, with dense outputs reused under g."""
    errors, gated, last = [], 0, 0
    gate.ran(frames[0])
    for index in range(1, len(frames)):
        if g and gate.share(frames[index]) < g:
            gated += 1
            errors.append(float(metric(dense[last], dense[index])))
        else:
            gate.ran(frames[index])
            last = index
            errors.append(0.0)
    return errors, gated / max(1, len(frames) - 1)
