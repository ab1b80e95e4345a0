"""One video through the run loop, its outputs written as it goes: what `deluceva run` does, and
what each stream of `deluceva streams` does in its worker.

Example:
    >>> setup = prepare(RunOptions("yolox.onnx", "street.mp4", preset="yolox"))  # doctest: +SKIP
    >>> job = run_video(setup, build_plans(setup), Outputs(summary="summary.json"))  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from deluceva.errors import DelucevaError

__all__ = ["Outputs", "Job", "LateFrames", "run_video"]


@dataclass
class Outputs:
    """Where a run writes, each optional.

    Attributes:
        outputs: OUT.npz, every output stacked over frames (`save_inputs`: the model input too).
        summary: SUMMARY.json, times, errors and traces.
        detections: OUT.jsonl, each frame's boxes in the video's pixels (a detection preset only).
        resume: carry on files a killed run left (its finished frames are kept and not run
            again); the video must already be opened at the first frame without output.
        first_frame: the index of the run's first frame in those files (frames already written).
        extra_summary: fields added to the summary (a stream's restarts, say).
        drop_late: skip a frame when the run is more than this many seconds behind the video's
            own clock (see `LateFrames`; for live sources); None: never.
    """

    outputs: str | None = None
    summary: str | None = None
    detections: str | None = None
    save_inputs: bool = False
    resume: bool = False
    first_frame: int = 0
    extra_summary: dict = field(default_factory=dict)
    drop_late: float | None = None


class LateFrames:
    """Which frames of a live source to skip when processing falls behind: a frame is late when
    the wall time since the first frame exceeds the frame's own timestamp since the first by
    more than `allowed` seconds. Skipping late frames lets a run catch up with the source
    instead of falling further behind; `dropped` counts them.

    Example:
        >>> clock = iter([0.0, 0.5, 2.0]).__next__
        >>> late = LateFrames(1.0, clock)
        >>> [late.late(t) for t in (0.0, 0.04, 0.08)]   # 2 s of work for 0.08 s of video
        [False, False, True]
    """

    def __init__(self, allowed: float, clock: Callable[[], float] = time.monotonic):
        if not allowed >= 0:
            raise DelucevaError(f"--drop-late {allowed} must be a number of seconds, at least 0")
        self.allowed, self.clock = float(allowed), clock
        self.origin: tuple[float, float] | None = None
        self.dropped = 0

    def late(self, frame_time: float | None) -> bool:
        now = self.clock()
        if frame_time is None:
            return False  # no timestamp: nothing to be late against
        if self.origin is None:
            self.origin = (now, frame_time)
            return False
        if (now - self.origin[0]) - (frame_time - self.origin[1]) > self.allowed:
            self.dropped += 1
            return True
        return False


@dataclass
class Job:
    """What a run produced: per-frame results (outputs dropped: they are on disk), the summary
    fields, and whether it was interrupted."""

    results: list
    summary: dict
    interrupted: bool = False


def run_video(setup, plans, files: Outputs, on_frame: Callable | None = None) -> Job:
    """Run every frame of `setup.video` through `plans`, writing `files` as the run goes.

    Whatever stops the run (the end, Ctrl-C, SIGTERM, an error), each file is written with every
    finished frame, each write tried whatever the others' fate; a write that fails raises one
    DelucevaError naming where the result went instead (after an interruption, it is printed and
    the KeyboardInterrupt goes on).

    Args:
        on_frame: called with each FrameResult (outputs still attached) after it is written.
    """
    from deluceva.presets import get_decoder
    from deluceva.playback.loop import VideoRunner, summarise
    from deluceva.playback.recorder import DetectionWriter, FrameRecorder
    from deluceva.playback.setup import run_info

    options = setup.options
    runner = VideoRunner(plans, setup.controller, setup.metric, options.reference_every,
                         percentage=options.percentage or setup.start_percentage, gate=setup.gate)
    recorder = FrameRecorder(files.outputs, resume=files.resume, frames=files.first_frame) if files.outputs else None
    detections = None
    if files.detections:
        decoder = get_decoder(options.preset, setup.input_shape, setup.model.output_names)
        detections = DetectionWriter(files.detections, decoder, setup.preprocess, (setup.video.height, setup.video.width),
                                     resume=files.resume, frames=files.first_frame)
    names = setup.model.output_names
    input_key = f"input:{setup.model.input_name}"
    results = []
    interrupted = False
    late = LateFrames(files.drop_late) if files.drop_late is not None else None
    first_output = None
    position = files.first_frame - 1  # the source frame's number: with dropped frames, not the result's index
    try:
        for rgb in setup.video:
            position += 1
            if late is not None and late.late(setup.video.time):
                continue
            tensor = setup.preprocess(rgb)
            result = runner.step(tensor)
            if not results:
                first_output = time.perf_counter() - setup.started
            results.append(result)
            if recorder is not None:
                arrays = dict(zip(names, result.outputs))
                if files.save_inputs:
                    arrays[input_key] = tensor
                recorder.add(arrays)
            if detections is not None:
                detections.add(position, result.outputs, setup.video.pts, setup.video.time)
            if on_frame is not None:
                on_frame(result)
            result.outputs = None  # outputs live on disk only; keep memory flat on long videos
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        failures = []
        if detections is not None:
            detections.close()
        if recorder is not None:
            try:
                recorder.close()
            except DelucevaError as error:
                failures.append(error)
        summary = {**run_info(setup, plans), **summarise(results, plans), **files.extra_summary,
                   "frames_written": files.first_frame + len(results), "interrupted": interrupted,
                   "seconds_to_first_output": first_output}
        if late is not None:
            summary["dropped_frames"] = late.dropped
        if files.summary and results:
            from deluceva.files import write_json

            try:
                write_json(files.summary, summary)
            except DelucevaError as error:
                failures.append(error)
        for error in failures[0 if interrupted else 1:]:
            print(f"deluceva: error: {error}", file=sys.stderr)
        if failures and not interrupted:  # (an interrupted run ends as interrupted)
            raise failures[0]
    return Job(results, summary, interrupted)
