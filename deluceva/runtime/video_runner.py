"""The run loop shared by `deluceva run`, `bench` and `demo`: frames in; outputs, times and errors out.

Each frame runs through a `Session` at the controller's filtering percentage. Every K frames, and
whenever the controller asks, the frame is a *reference*: its delta result is computed as usual,
then the same frame runs densely in onnxruntime (an executor keyframe, which also refreshes every
cache, when the plan changes or p fell since the last one); the error of the delta result
against the dense one feeds the controller, and the frame's output is the exact dense one. When p crosses into another compiled plan's range, the plan switches at the
next reference: its dense run fills the new plan's caches, and the next frame is a reference too,
so a new plan's error is measured on its first delta frame. A reference frame's whole cost counts
in the frame's time.

`FrameRecorder` writes outputs as the run goes (see its docstring for why a stopped run keeps
every finished frame).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import shutil
import statistics
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from deluceva.errors import DelucevaError

__all__ = [
    "FrameResult",
    "PlanSet",
    "VideoRunner",
    "FrameRecorder",
    "GrowingNpy",
    "frame_flops",
    "summarise",
    "change_statistics",
    "calibration_samples",
    "starting_percentage",
    "train_learned_controller",
    "LEARNING_FRAMES",
]

Metric = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]


@dataclass
class FrameResult:
    """What one frame produced and cost.

    Attributes:
        index: position in the run (0 for the first frame processed).
        outputs: the model's outputs, in its output order (exact on reference frames).
        seconds: wall time of the model work for the frame: the delta run, plus the dense run
            and the error measurement on a reference frame, plus the controller update.
        reference: whether the frame ran densely: the first frame, every K-th frame, and when
            the controller asks (plans switch only on these).
        error: the delta result's error against the dense one on reference frames; None
            otherwise, and on the first frame.
        percentage: the filtering percentage the frame ran at.
        density: FLOP-weighted share of the delta nodes' outputs recomputed (1.0 on the first
            frame, which has no delta run).
        flops: FLOPs actually computed for the frame (dense FLOPs on the first frame; delta run
            plus dense run on a reference frame).
        plan: index of the plan (in `PlanSet.percentages`) the frame's delta run used.
    """

    index: int
    outputs: list[np.ndarray]
    seconds: float
    reference: bool
    error: float | None
    percentage: float
    density: float
    flops: float
    plan: int = 0


# -- plans ----------------------------------------------------------------------------------


class _Costs:
    """Per-session FLOP bookkeeping: dense total, and each delta node's FLOPs and output tensor."""

    def __init__(self, session):
        graph = session.graph
        self.total = float(sum(data.get("flops", 0) for _, data in graph.nodes(data=True)))
        # A delta step's nodes are measured by the step's output: for a fused Conv and its
        # epilogue, that is the group's one exit tensor, not each node's own output.
        measured_by = {node: step.outputs[0] for step in session.plan.steps
                       if step.kind == "delta" and step.outputs for node in step.nodes}
        self.delta = [
            (float(data.get("flops", 0)), measured_by[name])
            for name, data in graph.nodes(data=True)
            if data.get("variant") == "delta" and name in measured_by
        ]
        self.delta_total = sum(f for f, _ in self.delta)
        self.dense_part = self.total - self.delta_total

    def delta_frame(self, densities: Mapping[str, float]) -> tuple[float, float]:
        """(computed FLOPs, FLOP-weighted density of the delta nodes) for one delta run."""
        computed = sum(f * densities.get(t, 1.0) for f, t in self.delta)
        density = computed / self.delta_total if self.delta_total else 1.0
        return self.dense_part + computed, density


def frame_flops(session, densities: Mapping[str, float]) -> float:
    """FLOPs a delta run computed: each delta node's FLOPs times its output's density, dense nodes whole."""
    return _Costs(session).delta_frame(densities)[0]


class PlanSet:
    """Sessions compiled for a sorted list of filtering percentages; p uses the plan for the
    largest compiled percentage not above it.

    Args:
        sessions: one `Session` per plan.
        percentages: the percentage each plan was compiled for (ascending; the first one is used
            for any p below it too).
        description: how the plans were made, for messages and the summary.
    """

    def __init__(self, sessions: Sequence, percentages: Sequence[float] = (0.0,), description: str = ""):
        if len(sessions) != len(percentages) or not sessions:
            raise ValueError("one session per compiled percentage")
        order = sorted(range(len(sessions)), key=lambda i: percentages[i])
        self.sessions = [sessions[i] for i in order]
        self.percentages = [float(percentages[i]) for i in order]
        self.description = description
        self.costs = [_Costs(s) for s in self.sessions]

    def index_for(self, percentage: float) -> int:
        return max(0, bisect.bisect_right(self.percentages, percentage) - 1)

    def variant_counts(self) -> list[dict[str, int]]:
        return [s.plan.counts() for s in self.sessions]


# -- the loop -------------------------------------------------------------------------------


def change_statistics(frame: np.ndarray, previous: np.ndarray | None, tile: int = 8) -> dict[str, float]:
    """Frame-level change of the model input: mean |change| and the share of tile x tile tiles
    whose largest change exceeds 1% of the input's range (scale-free, so presets do not matter).

    Read on every 4th row and column (about 0.1 ms at 416x416, against ~0.7 ms for every pixel):
    frame-level numbers for the controller, not the executor's exact change.
    """
    if previous is None:
        return {"mean_abs_change": 0.0, "changed_tiles": 1.0}
    stride = 4 if tile % 4 == 0 else 1
    now = frame.reshape(frame.shape[-3:])[:, ::stride, ::stride]
    diff = np.abs(now - previous.reshape(previous.shape[-3:])[:, ::stride, ::stride])
    largest = diff.max(axis=0)
    height, width = largest.shape
    step = tile // stride
    th, tw = -(-height // step), -(-width // step)
    if (th * step, tw * step) != (height, width):
        padded = np.zeros((th * step, tw * step), np.float32)
        padded[:height, :width] = largest
        largest = padded
    # Max over each step x step block as a few strided maxima: numpy's multi-axis max is 10x slower.
    per_tile = largest[::step, ::step].copy()
    for dy in range(step):
        for dx in range(step):
            if dy or dx:
                np.maximum(per_tile, largest[dy::step, dx::step], out=per_tile)
    span = float(now.max() - now.min()) or 1.0
    return {
        "mean_abs_change": float(diff.mean()),
        "changed_tiles": float((per_tile > 0.01 * span).mean()),
    }


class VideoRunner:
    """Runs frames through a `PlanSet` with a controller, reference frames and timing.

    Args:
        plans: the compiled plans (a `PlanSet`).
        controller: object with `update(observation) -> percentage` (see `deluceva.controller`);
            it may set `wants_reference = True` to ask for a reference on the next frame.
        metric: callable(outputs, reference_outputs) -> error.
        reference_every: K, a dense reference every K frames (counted from the last reference).
        percentage: the starting filtering percentage.
        observation: factory building the controller's observation from keyword fields
            (frame, error, percentage, statistics); defaults to `deluceva.controller.Observation`.
    """

    def __init__(
        self,
        plans: PlanSet,
        controller,
        metric: Metric,
        reference_every: int = 30,
        percentage: float = 0.0,
        observation: Callable | None = None,
    ):
        if reference_every < 1:
            raise DelucevaError(f"reference interval {reference_every} must be at least 1")
        self.plans = plans
        self.controller = controller
        self.metric = metric
        self.reference_every = reference_every
        self.percentage = float(percentage)
        self.observation = observation or _default_observation()
        self.current = plans.index_for(self.percentage)
        self.index = 0
        self.since_reference = 0
        self.probing = False  # measure the next frame: the plan just switched
        self.previous: np.ndarray | None = None
        self.held_at = 0.0  # the largest p since the last keyframe: the caches hold back up to it

    @property
    def session(self):
        return self.plans.sessions[self.current]

    def step(self, frame: np.ndarray) -> FrameResult:
        """Run one (preprocessed) frame."""
        start = time.perf_counter()  # the controller's statistics are deluceva's work too
        stats = {}
        if getattr(self.controller, "uses_statistics", False):
            stats = change_statistics(frame, self.previous)
            self.previous = frame
        wanted = self.plans.index_for(self.percentage)
        asked = bool(getattr(self.controller, "wants_reference", False))
        error = None
        percentage = self.percentage
        if self.index == 0:
            self.current = wanted
            outputs = self.session.run(frame, percentage, keyframe=True)
            self.held_at = percentage
            flops, density, reference = self.plans.costs[self.current].total, 1.0, True
            used = self.current
        else:
            used = self.current
            outputs = self.session.run(frame, percentage)
            self.held_at = max(self.held_at, percentage)
            flops, density = self.plans.costs[used].delta_frame(self.session.executor.densities)
            reference = asked or self.probing or self.since_reference + 1 >= self.reference_every
            self.probing = False
            if reference:
                # The plan switches only here: the reference's dense run fills the new plan's
                # caches, and the error of this frame is still measured on the plan that ran it.
                # (Switching on any frame p crosses a compiled percentage let a controller that
                # moves p every frame trigger a dense run every frame and never get a measurement.)
                # A new plan is probed: its first delta frame is measured at once, so a plan far
                # over budget costs one frame's error rather than K frames of drift (YuNet with
                # rel-l2: 0.3 after one frame at p = 0.8, 5.3 after ten).
                self.probing = wanted != self.current
                if wanted == used and not self.plans.costs[used].delta and percentage == 0:
                    # A plan without delta steps is exact at p = 0 (above, a frame whose change
                    # stays under the frame's threshold is skipped): nothing to measure.
                    error = 0.0
                else:
                    # The reference refreshes the caches (a keyframe, 3x a dense run: it loads
                    # every delta tensor) only where they need it: a new plan's are empty, and
                    # after p fell, what was held back below the old, higher thresholds would
                    # stay. Otherwise what they hold back is within the current thresholds
                    # and a plain dense run measures the error.
                    refresh = wanted != used or percentage < self.held_at
                    self.current = wanted
                    if refresh:
                        dense = self.session.run(frame, percentage, keyframe=True)
                        self.held_at = percentage
                    else:
                        dense = self.session.reference(frame)
                    error = float(self.metric(outputs, dense))
                    outputs = dense
                    flops += self.plans.costs[self.current].total
        self.since_reference = 0 if reference else self.since_reference + 1
        observation = self.observation(
            frame=self.index, error=error, percentage=percentage, statistics={**stats, "density": density}
        )
        self.percentage = float(self.controller.update(observation))
        seconds = time.perf_counter() - start
        result = FrameResult(self.index, outputs, seconds, reference, error, percentage, density, flops, used)
        self.index += 1
        return result


def _default_observation() -> Callable:
    from deluceva.controller import Observation

    def build(frame, error, percentage, statistics):
        return Observation(frame=frame, error=error, percentage=percentage, **statistics)

    return build


def starting_percentage(plans: PlanSet, metric: Metric, frames: Sequence[np.ndarray], target: float,
                        grid: Sequence[float] = (0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)) -> float:
    """The largest p on `grid` whose mean error on `frames` (the calibration frames, after a
    keyframe on the first) stays within `target`; 0 when none does.

    A PI controller starting from p = 0 climbs at most 0.3 in -log(1 - p) per reference frame:
    p = 0.8 after six references, 180 frames at one every 30. Started here, it only has to hold
    the budget. The sessions are calibrated already and reset afterwards.
    """
    if len(frames) < 2:
        return 0.0
    references = [plans.sessions[0].reference(frame) for frame in frames[1:]]
    chosen = 0.0
    for percentage in sorted(grid):
        session = plans.sessions[plans.index_for(percentage)]
        session.run(frames[0], keyframe=True)
        errors = [float(metric(session.run(frame, percentage), reference))
                  for frame, reference in zip(frames[1:], references)]
        if statistics.fmean(errors) > target:
            break  # error grows with p: past the first failure nothing qualifies
        chosen = percentage
    for session in plans.sessions:
        session.reset()
    return chosen


def calibration_samples(plans: PlanSet, metric: Metric, frames: Sequence[np.ndarray],
                        percentages: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95),
                        reference_every: int = 4) -> list:
    """Observations with measured errors, for fitting a learned controller: `frames` run once
    per fixed percentage, with a reference every `reference_every` frames.

    Sessions without filter thresholds are calibrated first on the first frames, as `deluceva
    run` calibrates them, so the errors learned are the ones a run will see.

    Example:
        >>> samples = calibration_samples(plans, metric, inputs)                # doctest: +SKIP
        >>> LearnedController(budget=0.05).fit(samples).to_json("learned.json")  # doctest: +SKIP
    """
    from deluceva.controller import FixedController
    from deluceva.runtime.thresholds import CALIBRATION_FRAMES
    from deluceva.session import calibrate_sessions

    if any(session.executor.thresholds is None for session in plans.sessions):
        calibrate_sessions(plans.sessions, list(frames[:CALIBRATION_FRAMES]))
    samples = []

    class Recording(FixedController):
        uses_statistics = True  # the samples are a learned controller's features

        def update(self, observation):
            samples.append(observation)
            return super().update(observation)

    for percentage in percentages:
        for session in plans.sessions:
            session.reset()
        runner = VideoRunner(plans, Recording(percentage), metric, reference_every, percentage)
        for frame in frames:
            runner.step(frame)
    return [s for s in samples if s.error is not None]


LEARNING_FRAMES = 30  # a video's first frames a learned controller is trained on, without a file


def train_learned_controller(plans: PlanSet, metric: Metric, frames: Sequence[np.ndarray], budget: float):
    """A learned controller fitted on `frames` run through `plans` (the run's own plans, already
    calibrated) at several fixed percentages: what `run --controller learned` does without a
    file, and `profile --controller-out` saves."""
    from deluceva.controller import LearnedController

    samples = calibration_samples(plans, metric, frames)
    for session in plans.sessions:
        session.reset()
    return LearnedController(budget=budget).fit(samples)


# -- summary ------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def summarise(results: Sequence[FrameResult], plans: PlanSet) -> dict:
    """The per-run figures `deluceva run --summary` writes (errors over measured references)."""
    ms = [r.seconds * 1000 for r in results]
    errors = [r.error for r in results if r.error is not None]
    dense = sum(c.total for c in plans.costs[:1]) or 1.0
    computed = sum(r.flops for r in results)
    counts = plans.variant_counts()
    used = statistics.mode(r.plan for r in results) if results else 0
    return {
        "frames": len(results),
        "ms_per_frame_median": statistics.median(ms) if ms else None,
        "ms_per_frame_mean": statistics.fmean(ms) if ms else None,
        "reference_frames": sum(r.reference for r in results),
        "measured_reference_frames": len(errors),
        "error_mean": statistics.fmean(errors) if errors else None,
        "error_p95": _percentile(errors, 0.95) if errors else None,
        "error_max": max(errors) if errors else None,
        "density_mean": statistics.fmean(r.density for r in results) if results else None,
        "flop_reduction_bound": dense * len(results) / computed if computed else None,
        "percentage_trace": [round(r.percentage, 6) for r in results],
        "density_trace": [round(r.density, 6) for r in results],
        "error_trace": [None if r.error is None else round(r.error, 6) for r in results],
        "ms_trace": [round(m, 4) for m in ms],
        # The plan most frames used; every compiled plan's counts follow when there are several.
        "plan_variants": dict(counts[used]),
        "plan_variants_per_plan": counts,
        "plan_percentages": plans.percentages,
    }


# -- outputs written as the run goes ----------------------------------------------------------

_HEADER_BYTES = 256  # fixed, so the frame count can be rewritten in place as frames arrive


class GrowingNpy:
    """A .npy file of shape (frames, *frame_shape) that grows one frame at a time.

    The header is written with room to spare and rewritten in place after each frame's data is
    flushed, so the file is a valid .npy holding every finished frame at any moment: a crash or a
    kill leaves at worst one frame of trailing bytes, which `np.load` ignores.
    """

    def __init__(self, path: Path, frame_shape: tuple[int, ...], dtype: np.dtype):
        self.path = Path(path)
        self.frame_shape = tuple(int(d) for d in frame_shape)
        self.dtype = np.dtype(dtype)
        self.frame_bytes = int(np.prod(self.frame_shape, dtype=np.int64)) * self.dtype.itemsize
        self.count = 0
        self.file = open(self.path, "w+b")
        self._write_header()

    def _header(self) -> bytes:
        text = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": (self.count, *self.frame_shape)})
        prefix = b"\x93NUMPY\x01\x00"
        room = _HEADER_BYTES - len(prefix) - 2
        body = text.encode("latin1").ljust(room - 1) + b"\n"
        if len(body) > room:
            raise DelucevaError(f"{self.path}: output shape {self.frame_shape} is too long for the header")
        return prefix + len(body).to_bytes(2, "little") + body

    def _write_header(self) -> None:
        self.file.seek(0)
        self.file.write(self._header())
        self.file.flush()

    def append(self, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, self.dtype)
        if value.shape != self.frame_shape:
            raise DelucevaError(f"{self.path.name}: frame {self.count} has shape {value.shape}, earlier frames {self.frame_shape}")
        self.file.seek(_HEADER_BYTES + self.count * self.frame_bytes)
        self.file.write(value.tobytes())
        self.file.flush()
        self.count += 1
        self._write_header()

    def read(self, index: int) -> np.ndarray:
        """Frame `index`, read with a plain file read (no memory map, so it adds nothing to RSS)."""
        self.file.seek(_HEADER_BYTES + index * self.frame_bytes)
        data = self.file.read(self.frame_bytes)
        return np.frombuffer(data, self.dtype).reshape(self.frame_shape)

    def copy_into(self, stream) -> None:
        """Write the valid part (header and finished frames) into a writable binary stream."""
        self.file.flush()
        self.file.seek(0)
        remaining = _HEADER_BYTES + self.count * self.frame_bytes
        while remaining:
            chunk = self.file.read(min(remaining, 1 << 24))
            if not chunk:
                break
            stream.write(chunk)
            remaining -= len(chunk)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


class FrameRecorder:
    """Writes named arrays frame by frame into OUT.npz, keyed by name, stacked over frames.

    While the run goes, each array grows in its own valid .npy under `OUT.npz.parts/`; `close()`
    (called at the end, and also on Ctrl-C or an error, from a `finally`) packs them into OUT.npz
    (uncompressed, written to a temporary name then renamed, so OUT.npz is never half-written) and
    removes the folder. A run killed without a chance to clean up (SIGKILL, power loss) still
    leaves `OUT.npz.parts/*.npy` (named in `names.json` there), each loadable with `np.load`,
    holding every finished frame.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.suffix != ".npz":
            raise DelucevaError(f"{self.path}: outputs file must end in .npz")
        if not self.path.parent.is_dir():
            raise DelucevaError(f"{self.path}: folder {self.path.parent} does not exist")
        self.parts = self.path.with_name(self.path.name + ".parts")
        if self.parts.exists():
            shutil.rmtree(self.parts)
        self.parts.mkdir()
        self.arrays: dict[str, GrowingNpy] = {}
        self.frames = 0

    def add(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            value = np.asarray(value)
            if name not in self.arrays:
                if self.frames:
                    raise DelucevaError(f"{self.path}: {name!r} first appears at frame {self.frames}")
                part = self.parts / f"{len(self.arrays):03d}.npy"
                self.arrays[name] = GrowingNpy(part, value.shape, value.dtype)
                # Names may hold ':' or '/', so files are numbered and names.json maps them.
                names = {p.path.name: key for key, p in self.arrays.items()}
                (self.parts / "names.json").write_text(json.dumps(names, indent=1))
            self.arrays[name].append(value)
        self.frames += 1

    def close(self) -> None:
        """Pack the parts into OUT.npz. Where that fails (the folder's permissions changed, the
        disk filled), OUT.npz goes to the temporary folder instead and the DelucevaError says
        where; the parts stay until it is written somewhere."""
        from deluceva.output_files import fallback_path

        if self.parts is None:
            return
        target = self.path
        try:
            self._pack(target)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            target = fallback_path(self.path)
            try:
                self._pack(target)
            except OSError:
                raise DelucevaError(f"{self.path}: cannot write it ({reason}); the frames are in {self.parts}") from None
            self._release()
            raise DelucevaError(f"{self.path}: cannot write it ({reason}); the outputs are in {target}") from None
        self._release()

    def _pack(self, target: Path) -> None:
        temporary = target.with_name(target.name + ".tmp")
        try:
            with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, part in self.arrays.items():
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as stream:
                        part.copy_into(stream)
            os.replace(temporary, target)
        except OSError:
            temporary.unlink(missing_ok=True) if temporary.parent.is_dir() else None
            raise

    def _release(self) -> None:
        for part in self.arrays.values():
            part.close()
        shutil.rmtree(self.parts, ignore_errors=True)
        self.parts = None

