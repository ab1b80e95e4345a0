"""The Python API: load a model, choose a plan, run frames."""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.planner import Model, build_dag, build_plan, load_model
from deluceva.runtime.executor import Executor
from deluceva.runtime.thresholds import Thresholds

__all__ = ["Session", "calibrate_sessions"]


class Session:
    """A model ready to run on a video, frame after frame.

    Args:
        model: an .onnx path, a ModelProto, or a loaded `Model`.
        plan: "dense", "delta" (every node that has a delta variant), or a mapping from node
            name to "dense"/"delta".
        input_shape: (1, C, H, W), needed when the model's input size is dynamic.
        threads: onnxruntime intra-op threads (and the delta kernels' BLAS threads).
        profile: record per-step times in `session.executor.step_times`.
        thresholds: filter thresholds calibrated on frames (`calibrate`), shareable between
            sessions of one model; a session runs at p > 0 only once it has them.
        buffers: working buffers and tensors' state (`deluceva.operators._buffers.Buffers`),
            shareable between sessions that never run at the same time (one run's plans).
        dense_forms: "auto" (a delta step computes every position with onnxruntime on frames
            where much of its input changed), "never" or "always" (to measure or test one form).

    Example:
        >>> session = Session("model.onnx", plan="delta", input_shape=(1, 3, 224, 224))  # doctest: +SKIP
        >>> session.calibrate(first_frames)                   # thresholds for p, in each tensor's units
        >>> outputs = session.run(frame, percentage=0.9)      # list of arrays, like onnxruntime
        >>> session.reset()                                    # next frame is an exact keyframe
    """

    def __init__(
        self,
        model: str | os.PathLike | Model,
        plan: str | Mapping[str, str] = "delta",
        input_shape: tuple[int, ...] | None = None,
        threads: int = 1,
        profile: bool = False,
        thresholds: Thresholds | None = None,
        buffers=None,
        dense_forms: str = "auto",
    ):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise DelucevaError(f"threads must be a positive whole number, got {threads!r}")
        self.model = model if isinstance(model, Model) else load_model(model, input_shape)
        self.graph = build_dag(self.model)
        self.plan = build_plan(self.graph, plan)
        self.executor = Executor(self.model, self.graph, self.plan, threads=threads, profile=profile, buffers=buffers,
                                 dense_forms=dense_forms)
        if thresholds is not None:
            self.executor.use_thresholds(thresholds)

    def calibrate(self, frames: list[np.ndarray], tensors: Iterable[str] | None = None) -> Thresholds:
        """Calibrate filter thresholds on consecutive `frames` (model inputs); the next frame is a
        keyframe.

        Args:
            tensors: the tensors to calibrate (default: those this session's plan filters;
                `calibrate_sessions` calibrates several plans' tensors at once).
        """
        tensors = self.filtered_tensors() if tensors is None else set(tensors)
        thresholds = Thresholds.calibrate(self.model, [self.executor._check_frame(f) for f in frames], sorted(tensors))
        self.use_thresholds(thresholds)
        return thresholds

    def filtered_tensors(self) -> set[str]:
        """The tensors this session's plan filters (delta outputs and delta entries)."""
        return set(self.executor.filtered)

    def use_thresholds(self, thresholds: Thresholds | None) -> None:
        """Filter with `thresholds` (from `calibrate`, maybe another session's); next frame is a keyframe."""
        self.executor.use_thresholds(thresholds)
        self.executor.reset()

    def run(self, frame: np.ndarray, percentage: float = 0.0, keyframe: bool = False) -> list[np.ndarray]:
        """Outputs for `frame` (shape `model.input_shape`), in the model's output order."""
        return self.executor.run(frame, percentage, keyframe)

    def reset(self) -> None:
        """Make the next frame an exact keyframe that refreshes every cache."""
        self.executor.reset()

    def reference(self, frame: np.ndarray, copy: bool = True) -> list[np.ndarray]:
        """Exact outputs for `frame` from plain onnxruntime, leaving every cache as it is (copy:
        see `Executor.reference`)."""
        return self.executor.reference(frame, copy)

    def explain(self) -> str:
        return self.plan.explain()


def calibrate_sessions(sessions: list[Session], frames: list[np.ndarray]) -> Thresholds:
    """Calibrate filter thresholds on `frames` once (sessions of one model) and give them to all.

    Only the tensors some session filters are measured: when every plan is all dense (the usual
    case within a tight error budget), that is none, and calibration costs nothing.
    """
    tensors = sorted(set().union(*(session.filtered_tensors() for session in sessions)))
    thresholds = sessions[0].calibrate(frames, tensors)
    for session in sessions[1:]:
        session.use_thresholds(thresholds)
    return thresholds
