"""How a run starts: the PI controller's first p, and a learned controller trained on the
video's first frames, both measured through the run's own (calibrated) sessions."""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np

from deluceva.runner.loop import Metric, SessionsByPercentage, VideoRunner

__all__ = ["starting_percentage", "calibration_samples", "train_learned_controller", "LEARNING_FRAMES"]


def starting_percentage(plans: SessionsByPercentage, metric: Metric, frames: Sequence[np.ndarray], target: float,
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
        session = plans.sessions[plans.index_below(percentage)]
        session.run(frames[0], keyframe=True)
        errors = [float(metric(session.run(frame, percentage), reference))
                  for frame, reference in zip(frames[1:], references)]
        if statistics.fmean(errors) > target:
            break  # error grows with p: past the first failure nothing qualifies
        chosen = percentage
    for session in plans.sessions:
        session.reset()
    return chosen


def calibration_samples(plans: SessionsByPercentage, metric: Metric, frames: Sequence[np.ndarray],
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


def train_learned_controller(plans: SessionsByPercentage, metric: Metric, frames: Sequence[np.ndarray], budget: float):
    """A learned controller fitted on `frames` run through `plans` (the run's own plans, already
    calibrated) at several fixed percentages: what `run --controller learned` does without a
    file, and `profile --controller-out` saves."""
    from deluceva.controller import LearnedController

    samples = calibration_samples(plans, metric, frames)
    for session in plans.sessions:
        session.reset()
    return LearnedController(budget=budget).fit(samples)
