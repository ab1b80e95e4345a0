"""One video through the run loop, its outputs written as it goes: what `deluceva run` does, and
what each stream of `deluceva streams` does in its worker.

Example:
    >>> setup = prepare(RunOptions("yolox.onnx", "street.mp4", preset="yolox"))  # doctest: +SKIP
    >>> job = run_video(setup, build_plans(setup), RunFiles(summary="summary.json"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deluceva.errors import DelucevaError

__all__ = ["RunFiles", "Job", "Interrupted", "LateFrames", "HeldSignals", "run_video", "read_frame_log"]


@dataclass
class RunFiles:
    """Where a run writes, each optional.

    Attributes:
        outputs: OUT.npz, every output stacked over frames (`save_inputs`: the model input too).
        summary: SUMMARY.json, times, errors and traces.
        detections: OUT.jsonl, each frame's boxes in the video's pixels (a detection preset, or
            generic det options).
        annotate: OUT.mp4, the video with each frame's detections drawn (as `detections`).
        resume: carry on files a killed run left (its finished frames are kept and not run
            again); the video must already be opened at the first frame without output.
        first_frame: the index of the run's first frame in those files (frames already written).
        extra_summary: fields added to the summary (a stream's restarts, say).
        drop_late: skip a frame when the run is more than this many seconds behind the video's
            own clock (see `LateFrames`; for live sources); None: never.
        frame_log: FRAMES.jsonl, each frame's figures (time, error, p, density), one line each,
            written with the frame's outputs; a resumed run's summary covers the frames before
            it from there (`deluceva streams` writes one per stream).
    """

    outputs: str | None = None
    summary: str | None = None
    detections: str | None = None
    annotate: str | None = None
    save_inputs: bool = False
    resume: bool = False
    first_frame: int = 0
    extra_summary: dict = field(default_factory=dict)
    drop_late: float | None = None
    frame_log: str | None = None


class HeldSignals:
    """Holds back the signals that stop a run (SIGINT, SIGTERM) while a frame's files are written,
    so that every file ends at the same frame: a stop between a frame's outputs and its detection
    line would otherwise leave one file a frame ahead of the other.

    `install()` wraps the Python handlers in place (only in the main thread, where they run;
    handlers that are not Python functions, as SIG_IGN, are left alone); inside `with held:` a
    signal is recorded and its handler called on leaving. `restore()` puts the handlers back.

    Example:
        >>> held = HeldSignals().install()
        >>> with held:
        ...     pass  # a frame's writes; Ctrl-C here raises KeyboardInterrupt after them
        >>> held.restore()
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.previous: dict[int, Callable] = {}
        self.holding = False
        self.pending: list[tuple[Callable, int, object]] = []

    def install(self) -> HeldSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for number in self.SIGNALS:
            handler = signal.getsignal(number)
            if callable(handler):
                self.previous[number] = handler
                signal.signal(number, self._handle)
        return self

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, number, frame) -> None:
        handler = self.previous[number]
        if self.holding:
            self.pending.append((handler, number, frame))
        else:
            handler(number, frame)

    def __enter__(self) -> HeldSignals:
        self.holding = True
        return self

    def __exit__(self, *exc) -> None:
        self.holding = False
        pending, self.pending = self.pending, []
        for handler, number, frame in pending[:1]:  # one stop is enough; a second would cut the cleanup short
            handler(number, frame)


class Interrupted(KeyboardInterrupt):
    """The KeyboardInterrupt `run_video` raises after writing what it finished; `job` holds the
    results and summary of the frames written."""

    def __init__(self, job: Job):
        super().__init__()
        self.job = job


def read_frame_log(path: str | Path, frames: int) -> list:
    """The first `frames` FrameResults of a frame log (outputs None), for a resumed summary.

    Raises:
        DelucevaError: the log holds fewer frames, or a line is not a frame's record.
    """
    from deluceva.playback.loop import FrameResult

    results = []
    from deluceva.playback.recorder import whole_lines

    for line in whole_lines(Path(path))[:frames]:
        try:
            record = json.loads(line)
            results.append(FrameResult(index=len(results), outputs=None, seconds=record["seconds"],
                                       reference=record["reference"], error=record["error"],
                                       percentage=record["percentage"], density=record["density"],
                                       flops=record["flops"], plan=record["plan"]))
        except (ValueError, KeyError, TypeError):
            raise DelucevaError(f"{path}: line {len(results) + 1} is not a frame's record") from None
    if len(results) < frames:
        raise DelucevaError(f"{path}: holds {len(results)} frames, fewer than the {frames} to resume after")
    return results


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


def run_video(setup, plans, files: RunFiles, on_frame: Callable | None = None) -> Job:
    """Run every frame of `setup.video` through `plans`, writing `files` as the run goes.

    A frame's writes (outputs, detection line, frame log) are one step: SIGINT and SIGTERM are
    held while they are made (`HeldSignals`), a frame counts as written only once all are, and
    every file is cut to the frames that all of them hold. Whatever stops the run (the end,
    Ctrl-C, SIGTERM, an error), each file is written with every finished frame, each write tried
    whatever the others' fate; a write that fails raises one DelucevaError naming where the
    result went instead (after an interruption, it is printed and the interruption goes on, as
    `Interrupted`, which carries the job).

    Args:
        on_frame: called with each FrameResult (outputs still attached) after it is written.
    """
    from deluceva.playback.annotate import AnnotationWriter
    from deluceva.presets import class_names, get_decoder
    from deluceva.playback.loop import VideoRunner, summarise
    from deluceva.playback.recorder import DetectionWriter, FrameRecorder, JsonLines
    from deluceva.playback.setup import run_info

    options = setup.options
    runner = VideoRunner(plans, setup.controller, setup.metric, options.reference_every,
                         percentage=options.percentage or setup.start_percentage, gate=setup.gate)
    # Set-up is over: its first frames are not kept through the run (10 model inputs, 108 MiB
    # at 1280x736; YuNet's `run --plan delta` peaked at 872 MiB with them, 840 without).
    setup.calibration_frames = []
    earlier = read_frame_log(files.frame_log, files.first_frame) if files.frame_log and files.resume else []
    recorder = FrameRecorder(files.outputs, resume=files.resume, frames=files.first_frame) if files.outputs else None
    detections = None
    if files.detections:
        decoder = get_decoder(options.preset, setup.input_shape, setup.model.output_names, options.detector)
        detections = DetectionWriter(files.detections, decoder, setup.preprocess, (setup.video.height, setup.video.width),
                                     resume=files.resume, frames=files.first_frame)
    frame_log = JsonLines(files.frame_log, resume=files.resume, frames=files.first_frame) if files.frame_log else None
    annotator = None
    if files.annotate:
        annotator = AnnotationWriter(files.annotate, get_decoder(options.preset, setup.input_shape, setup.model.output_names,
                                                                 options.detector),
                                     setup.preprocess, (setup.video.height, setup.video.width), setup.video.fps,
                                     class_names(options.preset, options.detector), resume=files.resume,
                                     frames=files.first_frame)
    names = setup.model.output_names
    input_key = f"input:{setup.model.input_name}"
    results = []
    interrupted = False
    late = LateFrames(files.drop_late) if files.drop_late is not None else None
    first_output = None
    position = files.first_frame - 1  # the source frame's number: with dropped frames, not the result's index
    held = HeldSignals().install()
    try:
        for rgb in setup.video:
            position += 1
            if late is not None and late.late(setup.video.time):
                continue
            tensor = setup.preprocess(rgb)
            result = runner.step(tensor)
            if first_output is None:
                first_output = time.perf_counter() - setup.started
            with held:  # the frame's writes are one step
                if recorder is not None:
                    arrays = dict(zip(names, result.outputs))
                    if files.save_inputs:
                        arrays[input_key] = tensor
                    recorder.add(arrays)
                if detections is not None:
                    detections.add(position, result.outputs, setup.video.pts, setup.video.time)
                if frame_log is not None:
                    frame_log.add(_frame_record(position, result))
                if annotator is not None:
                    annotator.add(rgb, result.outputs)
                results.append(result)
            if on_frame is not None:
                on_frame(result)
            result.outputs = None  # outputs live on disk only; keep memory flat on long videos
    except KeyboardInterrupt:
        interrupted = True
    finally:
        held.holding = True  # a second Ctrl-C must not cut the files' packing short
        written = files.first_frame + len(results)
        failures = []
        if annotator is not None:
            try:
                annotator.close()
            except Exception as error:  # an encoder failure must not hide the run's own outcome
                failures.append(DelucevaError(f"{files.annotate}: cannot finish it ({error})"))
        for writer in (detections, frame_log, recorder):
            if writer is None:
                continue
            writer.keep(written)  # a frame whose writes an error cut short is not kept
            try:
                writer.close()
            except DelucevaError as error:
                failures.append(error)
        every = earlier + results
        summary = {**run_info(setup, plans), **summarise(every, plans), **files.extra_summary,
                   "frames_written": written, "interrupted": interrupted,
                   "seconds_to_first_output": first_output}
        if late is not None:
            summary["dropped_frames"] = late.dropped
        if files.summary and every:
            from deluceva.files import write_json

            try:
                write_json(files.summary, summary)
            except DelucevaError as error:
                failures.append(error)
        for error in failures[0 if interrupted else 1:]:
            print(f"deluceva: error: {error}", file=sys.stderr)
        held.pending = held.pending if not interrupted else []
        held.restore()
        held.__exit__()  # a signal that came during the packing stops the run now
        if failures and not interrupted:  # (an interrupted run ends as interrupted)
            raise failures[0]
    job = Job(results, summary, interrupted)
    if interrupted:
        raise Interrupted(job)
    return job


def _frame_record(position: int, result) -> dict:
    """One line of the frame log: what `summarise` needs of a frame."""
    return {"frame": position, "seconds": round(result.seconds, 7), "reference": bool(result.reference),
            "error": result.error, "percentage": round(float(result.percentage), 6),
            "density": round(float(result.density), 6), "flops": float(result.flops), "plan": int(result.plan)}
