"""How a run starts: the PI controller's first p, and a learned controller trained on the
video's first frames, both measured through the run's own (calibrated) sessions."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from deluceva.playback.loop import ErrorFunction, SessionsByPercentage, VideoRunner

__all__ = ["StartingRange", "starting_range", "CLIFF", "calibration_samples", "train_learned_controller", "LEARNING_FRAMES",
           "plan_speeds", "retire_slow_plans"]


# A grid p whose error on the calibration frames exceeds CLIFF x the budget bounds the PI (and
# the ungated learned) controller's range. Those are the profile's 9 frames after a keyframe, and
# a det error on them is coarse: on YOLOX-nano / intersection_cctv (two or three boxes a frame)
# the all-delta plan at p = 0.6 measured 0.065 there (3.2x a 0.02 budget) and 0.016 over the
# next 120 frames. At 2x that capped the controllers at the all-dense plan where p = 0.7 ran
# 1.2-1.3x within the budget; YuNet's cliff, which the ceiling is for, is 10x.
CLIFF = 4.0


@dataclass
class StartingRange:
    """Where a PI controller starts, and the largest p it may reach.

    Attributes:
        start: the largest grid p whose mean error on the calibration frames is within the target.
        ceiling: the largest grid p before the first one whose mean error exceeds CLIFF x the
            budget (`p_max` when none does).
        cliff: that first grid p, and its mean error (None when none exceeds it).
    """

    start: float
    ceiling: float
    cliff: tuple[float, float] | None = None


def starting_range(plans: SessionsByPercentage, metric: ErrorFunction, frames: Sequence[np.ndarray], target: float,
                   budget: float, p_max: float = 0.99,
                   grid: Sequence[float] = (0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)) -> StartingRange:
    """The PI controller's start and ceiling, from each grid p's mean error on `frames` (the
    calibration frames, after a keyframe on the first).

    Start: a PI controller starting from p = 0 climbs at most 0.3 in -log(1 - p) per reference
    frame: p = 0.8 after six references, 180 frames at one every 30. Started at the largest p
    within `target`, it only has to hold the budget.

    Ceiling: the compiled plans make the error a staircase in p, and its top step can be a
    cliff. On YuNet the plans were all dense up to 0.95 and 0.5 rel-l2 (ten budgets) at 0.95:
    a PI controller on zero errors climbed into that step every ten references, and one frame
    there carried the run's mean error over budget (0.062 against 0.05 over 150 frames). A p
    whose calibration error is over CLIFF x the budget is not worth a try: the controller stays
    below it. The sessions are calibrated already and reset afterwards.
    """
    if len(frames) < 2:
        return StartingRange(0.0, p_max)
    references = [plans.sessions[0].reference(frame) for frame in frames[1:]]
    start, ceiling, cliff = 0.0, p_max, None
    passed = True  # every grid p so far within the target
    previous = 0.0
    for percentage in sorted(grid):
        if percentage > p_max:
            break
        session = plans.sessions[plans.index_below(percentage)]
        session.run(frames[0], keyframe=True)
        error = statistics.fmean(float(metric(session.run(frame, percentage), reference))
                                 for frame, reference in zip(frames[1:], references))
        passed = passed and error <= target  # error grows with p: past the first failure nothing starts
        if passed:
            start = percentage
        if error > CLIFF * budget:
            ceiling, cliff = previous, (percentage, error)
            break
        previous = percentage
    for session in plans.sessions:
        session.reset()
    return StartingRange(start, ceiling, cliff)


def calibration_samples(plans: SessionsByPercentage, metric: ErrorFunction, frames: Sequence[np.ndarray],
                        percentages: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95),
                        reference_every: int = 4, gate=None) -> list:
    """Observations with measured errors, for fitting a learned controller: `frames` run once
    per fixed percentage, with a reference every `reference_every` frames.

    Sessions without filter thresholds are calibrated first on the first frames, as `deluceva
    run` calibrates them, so the errors learned are the ones a run will see. With `gate` (a
    `GateSchedule`), each percentage is a setting of its knob.

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
        runner = VideoRunner(plans, Recording(percentage), metric, reference_every, percentage, gate=gate)
        for frame in frames:
            runner.step(frame)
    return [s for s in samples if s.error is not None]


LEARNING_FRAMES = 30  # a video's first frames a learned controller is trained on, without a file


def train_learned_controller(plans: SessionsByPercentage, metric: ErrorFunction, frames: Sequence[np.ndarray], budget: float,
                             gate=None):
    """A learned controller fitted on `frames` run through `plans` (the run's own plans, already
    calibrated) at several fixed percentages: what `run --controller learned` does without a
    file, and `profile --controller-out` saves. With `gate`, it learns the gate's knob."""
    from deluceva.controller import RUN_SETPOINT, LearnedController

    samples = calibration_samples(plans, metric, frames, gate=gate)
    for session in plans.sessions:
        session.reset()
    # Aimed, as the PI controller is, at RUN_SETPOINT x the budget: aimed at the budget itself,
    # its runs' mean error sat on the budget and over it in half of them (0.0505 and 0.053
    # against 0.05 on P-Net, 0.021 against 0.02 on YOLOX-nano).
    return LearnedController(budget=budget, margin=1 - RUN_SETPOINT).fit(samples)


def plan_speeds(plans: SessionsByPercentage, frames: Sequence[np.ndarray]) -> list[float]:
    """Each plan's time per delta frame over a dense run's on the same frame, the median over
    `frames` (after a keyframe on the first), at the middle of the plan's range of p (the first
    plan: 1.0). The dense run is timed right after each delta run, so a busy machine slows both
    alike. The sessions are reset afterwards."""
    ratios = [1.0]
    ends = [*plans.percentages[1:], 0.99]
    for index in range(1, len(plans.sessions)):
        session = plans.sessions[index]
        percentage = (plans.percentages[index] + max(ends[index], plans.percentages[index])) / 2
        session.run(frames[0], percentage, keyframe=True)
        per_frame = []
        for frame in frames[1:]:
            start = time.perf_counter()
            session.run(frame, percentage)
            middle = time.perf_counter()
            session.reference(frame)
            per_frame.append((middle - start) / max(time.perf_counter() - middle, 1e-9))
        ratios.append(statistics.median(per_frame) if per_frame else 1.0)
    for session in plans.sessions:
        session.reset()
    return ratios


def retire_slow_plans(plans: SessionsByPercentage, frames: Sequence[np.ndarray]) -> list[float]:
    """Retire the plans measured slower than dense on `frames` (`plan_speeds`): their range of p
    runs the first plan at p = 0, exact, and as fast as dense. Only where the first plan is all
    dense. Returns the measured ratios.

    Why: on YOLOX-nano the compiled plans for p = 0.3-0.7 ran at 0.71-0.91x of dense on busy
    scenes (issue 15); a controller there paid for a mixed plan where dense was both exact and
    faster, and its reference frames measured an error worth nothing in speed.
    """
    if len(plans.sessions) < 2 or plans.flops[0].delta or len(frames) < 2:
        return [1.0] * len(plans.sessions)
    ratios = plan_speeds(plans, frames)
    plans.retire(i for i, ratio in enumerate(ratios) if ratio > 1.0)
    return ratios
