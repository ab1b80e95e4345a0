"""Many videos at once: `deluceva streams`. Each stream runs as `deluceva run` does (its own
plans' state, controller, reference frames and calibration on its own first frames) in a pool of
worker processes, one stream per worker at a time; more streams than workers wait their turn.

Streams are independent, so a fault stays in its stream:
- a source that cannot be opened, or fails mid-way, is tried again after 1, 2, 4 ... seconds,
  `retries` times, then reported as failed; the others go on;
- a worker that dies (killed, out of memory) is replaced, and its stream resumes with a keyframe
  at the first frame without written output (`written_frames`), so every frame's outputs and
  detections are written exactly once. A death is not the source's fault, so it does not spend
  the source's retries, unless the stream wrote nothing since it last started (a stream that
  kills its worker at once every time must end). A live source (a URL) resumes at its current
  frame; the frame numbers go on from the last written one, and the frames that went by while it
  was down (estimated from its frame rate) are counted as frames_missed;
- Ctrl-C or SIGTERM stops every worker; each writes what it finished, and the run's summary says
  it was interrupted.

Per stream, DIR/NAME/ holds summary.json, frames.jsonl (each frame's time, error, p and density:
a resumed stream's summary covers every frame from it), detections.jsonl (a detection preset),
annotated.mp4 (with --annotate) and outputs.npz (when asked); DIR/summary.json holds every
stream's figures and the aggregate throughput. A DIR that already holds a run is refused unless
`existing` says to resume each stream where its files end or to overwrite them.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from deluceva.errors import DelucevaError

__all__ = ["Stream", "StreamFiles", "read_sources", "run_streams", "Ledger", "StreamsReport", "StreamsInterrupted",
           "prepare_out", "wait_together", "STREAM_FILES"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_STOPS = {signal.SIGINT, signal.SIGTERM}
BACKOFF = 1.0  # seconds before a failed stream's first retry; doubled for each next one
RUN_FILES = ("summary.json",)  # what DIR itself holds besides the streams' folders: no stream may be named so
STREAM_FILES = ("summary.json", "frames.jsonl", "detections.jsonl", "outputs.npz", "outputs.npz.parts",
                "outputs.npz.tmp")  # what a stream writes into DIR/NAME/


@dataclass(frozen=True)
class Stream:
    """One source: a video file or stream URL, and the name its folder gets."""

    name: str
    source: str

    @property
    def live(self) -> bool:
        """A URL other than file:// is a live source: it cannot be sought on resume."""
        return "://" in self.source and not self.source.startswith("file://")


@dataclass(frozen=True)
class StreamFiles:
    """What each stream writes into DIR/NAME/ besides summary.json."""

    outputs: bool = False  # outputs.npz, every output stacked over frames
    save_inputs: bool = False  # outputs.npz also holds each model input, keyed input:<name>
    detections: bool = False  # detections.jsonl, with a detection preset
    drop_late: float | None = None  # live sources: skip frames while this many seconds behind
    annotate: bool = False  # annotated.mp4, the video with its detections drawn


def read_sources(items: Sequence[str]) -> list[Stream]:
    """Streams from command-line items: a .txt file lists sources, one a line (`name=source` or
    just the source; blank lines and lines starting with # skipped); anything else is a source.
    Names default to the file name without its suffix (or the URL's last part), made unique.

    Raises:
        DelucevaError: an unreadable list, a bad or repeated name, no source at all.
    """
    entries: list[tuple[str | None, str, str]] = []  # (name, source, where it came from)
    for item in items:
        if item.endswith(".txt") and "://" not in item:
            try:
                lines = Path(item).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise DelucevaError(f"{item}: cannot read the list of sources ({getattr(error, 'strerror', None) or type(error).__name__})") from None
            for number, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                head, equals, tail = line.partition("=")
                if equals and _NAME.match(head.strip()):  # name=source (a URL's own '=' never follows a valid name)
                    entries.append((head.strip(), tail.strip(), f"{item}:{number}"))
                else:
                    entries.append((None, line, f"{item}:{number}"))
        else:
            entries.append((None, item, item))
    if not entries:
        raise DelucevaError("no sources given: name video files, stream URLs, or a .txt file listing them")
    streams, taken = [], set()
    for name, source, where in entries:
        if not source:
            raise DelucevaError(f"{where}: no source after the name")
        if name is not None:
            if name in taken:
                raise DelucevaError(f"{where}: stream name {name!r} is used twice")
            if name in RUN_FILES:
                raise DelucevaError(f"{where}: stream name {name!r} is the run's own {name}; choose another")
        else:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/").split("?")[0]).stem).strip("._-") or "stream"
            name, n = stem[:60], 2
            while name in taken or name in RUN_FILES:
                name, n = f"{stem[:56]}_{n}", n + 1
        taken.add(name)
        streams.append(Stream(name, source))
    return streams


@dataclass
class StreamState:
    """What the parent knows of one stream."""

    stream: Stream
    status: str = "queued"  # queued, running, done, failed, interrupted
    attempts: int = 0  # starts, the first one included
    restarts: int = 0  # starts after a failure or a dead worker
    frames: int = 0  # frames written (resumed runs included)
    frames_at_start: int = 0  # frames written when it last started
    expected: int | None = None
    worker: int | None = None  # the pid of the worker running it
    missed: int = 0  # frames of a live source that passed while it was down (estimated from its frame rate)
    failed_at: float | None = None  # wall time (time.time()) of the last failure
    error: float | None = None  # last measured error on a reference frame
    problems: list[str] = field(default_factory=list)
    summary: dict | None = None
    started: float | None = None
    finished: float | None = None
    resumed_from: int = 0  # frames an earlier run (--resume) had written when this one began

    def row(self) -> dict:
        """The stream's line of the report. frames_per_second is the model's pace (the mean time
        of its frames, set-up not counted); frames_per_second_with_setup divides this run's frames
        by the wall time since the stream first started, set-up and restarts included."""
        seconds = (self.finished or time.perf_counter()) - self.started if self.started else None
        ms = (self.summary or {}).get("ms_per_frame_mean")
        return {
            "name": self.stream.name, "source": self.stream.source, "status": self.status,
            "frames": self.frames, "seconds": seconds,
            "frames_per_second": 1000.0 / ms if ms else None,
            "frames_per_second_with_setup": (self.frames - self.resumed_from) / seconds
            if seconds and self.frames > self.resumed_from else None,
            "error_mean": (self.summary or {}).get("error_mean"), "attempts": self.attempts,
            "restarts": self.restarts, "problems": self.problems,
            **({"frames_missed": self.missed} if self.stream.live else {}),
        }


@dataclass
class StreamsReport:
    """The run's outcome: per-stream rows and the aggregate (what DIR/summary.json holds)."""

    streams: list[dict]
    frames: int
    seconds: float
    workers: int
    interrupted: bool = False

    @property
    def failed(self) -> list[str]:
        """Streams given up (an interrupted or unstarted stream is not failed: it can be resumed)."""
        return [s["name"] for s in self.streams if s["status"] == "failed"]

    @property
    def unfinished(self) -> list[str]:
        """Streams an interruption stopped, or that never started."""
        return [s["name"] for s in self.streams if s["status"] in ("interrupted", "not started")]

    def to_dict(self) -> dict:
        return {"streams": self.streams, "frames": self.frames, "seconds": self.seconds,
                "frames_per_second": self.frames / self.seconds if self.seconds else None,
                "workers": self.workers, "failed": self.failed, "unfinished": self.unfinished,
                "interrupted": self.interrupted}


class StreamsInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after every stream wrote what it finished; `report`
    holds the figures (also in DIR/summary.json)."""

    def __init__(self, report: StreamsReport):
        super().__init__()
        self.report = report


def prepare_out(out: str | os.PathLike, streams: Sequence[Stream], existing: str = "refuse") -> bool:
    """Make DIR and a folder per stream; True when the streams are to resume.

    `existing` says what to do when DIR already holds a run (its summary.json, or a stream's
    files): "refuse" (a DelucevaError naming --resume and --overwrite), "resume" (each stream
    continues where its files end), or "overwrite" (the streams' files and the summary are
    removed first).

    Raises:
        DelucevaError: DIR or a stream's folder cannot be made (one line, naming it), or DIR
            holds a run and `existing` is "refuse".
    """
    import shutil

    out = Path(out)
    if existing not in ("refuse", "resume", "overwrite"):
        raise ValueError(f"existing must be refuse, resume or overwrite, not {existing!r}")
    _make_folder(out, f"{out}: cannot make the --out folder")
    held = [out / "summary.json"] if (out / "summary.json").exists() else []
    held += [out / s.name / f for s in streams for f in STREAM_FILES if (out / s.name / f).exists()]
    if held and existing == "refuse":
        raise DelucevaError(f"{out}: holds an earlier run ({held[0].relative_to(out)}); add --resume to continue "
                            "each stream where its files end, or --overwrite to start again")
    if existing == "overwrite":
        for path in held:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for stream in streams:
        _make_folder(out / stream.name, f"{out / stream.name}: cannot make stream {stream.name}'s folder")
    return existing == "resume"


def _make_folder(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DelucevaError(f"{what} (a file is in the way)") from None
    except OSError as error:
        raise DelucevaError(f"{what} ({error.strerror or type(error).__name__})") from None


class Ledger:
    """The parent's account of every stream: status, attempts, retries with backoff, and the
    report. Both the process pool and Ray (`deluceva.streams.on_ray`) keep theirs here.

    `on_event(kind, state)` is called as things happen: kind is "start", "expected", "frame",
    "done", "failed", "interrupted" or "retry". `existing`: see `prepare_out`.
    """

    def __init__(self, streams: Sequence[Stream], out: str | os.PathLike, retries: int = 2,
                 on_event: Callable[[str, StreamState], None] | None = None, existing: str = "refuse"):
        self.streams = list(streams)
        self.out = Path(out)
        resume = prepare_out(self.out, self.streams, existing)
        self.states = {s.name: StreamState(s) for s in self.streams}
        self.waiting: list[tuple[float, str, bool]] = [(0.0, s.name, resume) for s in self.streams]  # (not before, name, resume)
        self.retries = retries
        self.notify = on_event or (lambda kind, state: None)
        self.started = time.perf_counter()

    def active(self) -> bool:
        return any(s.status in ("queued", "running") for s in self.states.values())

    def due(self) -> list[tuple[str, bool]]:
        """(name, resume) of the streams whose turn has come, in order; taken off the waiting list
        only by `take`."""
        now = time.perf_counter()
        return [(name, resume) for when, name, resume in sorted(self.waiting) if when <= now]

    def take(self, name: str, resume: bool) -> tuple[Stream, bool, int, float | None]:
        """The task for `name`: (stream, resume, restarts so far, when it last failed)."""
        self.waiting = [w for w in self.waiting if w[1] != name]
        state = self.states[name]
        return state.stream, resume, state.restarts, state.failed_at

    def handle(self, message: tuple, worker: int | None = None) -> None:
        """One message from a worker: ("start", name, frames written), ("expected", name, n),
        ("frame", name, frames, error), ("done", name, summary), ("failed", name, problem),
        ("interrupted", name, summary or None), or from the pool: ("died", name, problem), a
        worker's death (it spends a retry only when the stream wrote nothing since it started)."""
        kind, name, *rest = message
        state = self.states[name]
        if kind == "died":
            if state.frames > state.frames_at_start:  # (the same backoff: a replacement takes its time anyway)
                state.problems.append(rest[0])
                state.failed_at = time.time()
                self.waiting.append((time.perf_counter() + BACKOFF * 2 ** min(state.restarts, 3), name, True))
                state.restarts += 1
                state.status = "queued"
                self.notify("retry", state)
                return
            kind = "failed"
        if kind == "start":
            if not state.attempts:
                state.resumed_from = rest[0]
            state.frames, state.frames_at_start, state.worker = rest[0], rest[0], worker
            state.status, state.attempts = "running", state.attempts + 1
            state.started = state.started or time.perf_counter()
        elif kind == "expected":
            (state.expected,) = rest
        elif kind == "missed":
            state.missed += rest[0]
        elif kind == "frame":
            state.frames, error = rest
            state.error = error if error is not None else state.error
        elif kind == "done":
            state.status, state.summary, state.finished = "done", rest[0], time.perf_counter()
            state.frames = rest[0].get("frames_written", state.frames)
        elif kind == "interrupted":
            state.status, state.finished = "interrupted", time.perf_counter()
            if rest[0]:
                state.summary = rest[0]
                state.frames = rest[0].get("frames_written", state.frames)
        elif kind == "failed":
            state.problems.append(rest[0])
            state.failed_at = time.time()
            if state.restarts < self.retries:
                delay = BACKOFF * 2 ** state.restarts
                state.restarts += 1
                state.status = "queued"
                self.waiting.append((time.perf_counter() + delay, name, True))
                kind = "retry"
            else:
                state.status, state.finished = "failed", time.perf_counter()
        self.notify(kind, state)

    def stop(self) -> None:
        """What was not finished is interrupted; what never started is said so."""
        for state in self.states.values():
            if state.status == "running" or (state.status == "queued" and state.attempts):
                state.status = "interrupted"
            elif state.status == "queued":
                state.status = "not started"

    def report(self, workers: int, interrupted: bool) -> StreamsReport:
        """The report, also written to OUT/summary.json."""
        from deluceva.files import write_json

        rows = [self.states[s.name].row() for s in self.streams]
        report = StreamsReport(rows, sum(r["frames"] for r in rows), time.perf_counter() - self.started, workers,
                               interrupted)
        write_json(self.out / "summary.json", report.to_dict())
        return report


def run_streams(streams: Sequence[Stream], options, out: str | os.PathLike, files: StreamFiles = StreamFiles(),
                workers: int = 1, retries: int = 2, on_event: Callable[[str, StreamState], None] | None = None,
                poll: float = 0.1, together: bool = False, existing: str = "refuse") -> StreamsReport:
    """Run `streams` with `options` (a RunOptions whose video is replaced by each source) in
    `workers` processes, each stream writing into `out`/NAME/; returns the report and writes it
    to `out`/summary.json.

    `on_event` is called in this process as the run goes (see `Ledger`). With `together` (one
    worker per stream), every stream starts its first frame when all are set up: for timing
    them. `existing`: what to do when `out` holds a run (see `prepare_out`). A
    KeyboardInterrupt stops every worker (each writes what it finished), writes the report and
    raises StreamsInterrupted, which carries it.
    """
    from multiprocessing.connection import wait

    if together and workers < len(streams):
        raise DelucevaError(f"streams that start together need a worker each: {len(streams)} streams, {workers} workers")
    ledger = Ledger(streams, out, retries, on_event, existing)
    workers = max(1, min(workers, len(streams)))
    context = multiprocessing.get_context("spawn")  # onnxruntime's and numba's threads do not survive fork
    barrier = context.Barrier(len(streams)) if together else None
    # Each worker has its own two pipes: a lock shared between workers (a multiprocessing.Queue's)
    # stays taken when one is killed mid-write, and the others' messages never arrive.
    pool: list[_Worker] = []

    def start_worker():
        task_reader, task_writer = context.Pipe(duplex=False)
        event_reader, event_writer = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(task_reader, event_writer, options, str(out), files, barrier),
                                  daemon=True)
        # The worker inherits these signals blocked, and unblocks them once its own handlers are
        # in: a Ctrl-C while it starts up would otherwise print a KeyboardInterrupt traceback.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        task_reader.close()
        event_writer.close()
        pool.append(_Worker(process, task_writer, event_reader))

    def receive(worker) -> bool:
        """Handle what `worker` sent; False once its pipe is closed or broken (it died)."""
        while True:
            try:
                if not worker.events.poll():
                    return True
                message = worker.events.recv()
            except (EOFError, OSError, pickle.UnpicklingError, ValueError):
                return False  # closed, or half a message from a killed worker
            if message[0] in ("done", "failed", "interrupted"):
                worker.stream = None
            ledger.handle(message, worker.process.pid)

    interrupted = False
    try:
        for _ in range(workers):
            start_worker()
        while ledger.active():
            for name, resume in ledger.due():
                idle = next((w for w in pool if w.stream is None), None)
                if idle is None:
                    break
                idle.stream = name
                idle.tasks.send(ledger.take(name, resume))
            wait([w.events for w in pool] + [w.process.sentinel for w in pool], timeout=poll)
            for worker in list(pool):
                if receive(worker) and worker.process.is_alive():
                    continue
                if worker.process.is_alive():
                    worker.process.kill()
                worker.process.join()
                pool.remove(worker)
                if worker.stream is not None:
                    pid, code = worker.process.pid, worker.process.exitcode
                    ledger.handle(("died", worker.stream, f"worker {pid} died (exit code {code})"), pid)
                if ledger.active():
                    start_worker()
    except KeyboardInterrupt:
        interrupted = True
        _stop([w.process for w in pool])
        for worker in pool:
            receive(worker)
        ledger.stop()
    finally:
        for worker in pool:
            try:
                worker.tasks.send(None)
            except OSError:
                pass
        for worker in pool:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
        report = ledger.report(workers, interrupted)
    if interrupted:
        raise StreamsInterrupted(report)
    return report


@dataclass
class _Worker:
    """A worker process as the parent sees it: its pipes and the stream it was given."""

    process: multiprocessing.Process
    tasks: object  # Connection: (stream, resume, restarts) or None to stop
    events: object  # Connection: (kind, name, ...) messages
    stream: str | None = None


def _stop(processes) -> None:
    """Ask each worker once to stop (SIGTERM, which it takes as Ctrl-C), and wait for it to write
    what it has. Workers ignore SIGINT itself: Ctrl-C reaches the whole process group, and a
    second signal must not cut a worker's writing short."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.perf_counter() + 30
    for process in processes:
        process.join(timeout=max(0.1, deadline - time.perf_counter()))


# -- in each worker process ------------------------------------------------------------------


def _worker(tasks, events, options, out: str, files: StreamFiles, barrier=None) -> None:
    """Take streams from the `tasks` pipe until None; report on the `events` pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    _thread_lock_for_progress_bars()
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # (blocked by the parent until now)
    except KeyboardInterrupt:  # stopped while starting up: nothing to write
        return
    while True:
        try:
            task = tasks.recv()
        except (KeyboardInterrupt, EOFError):
            return
        if task is None:
            return
        stream, resume, restarts, failed_at = task
        try:
            summary = _run_stream(stream, resume, restarts, options, Path(out), files, events, barrier, failed_at)
            events.send(("done", stream.name, summary))
        except KeyboardInterrupt as stop:
            events.send(("interrupted", stream.name, getattr(stop, "summary", None)))
            return
        except DelucevaError as error:
            events.send(("failed", stream.name, str(error)))
        except Exception as error:  # a stream's bug must not take the pool down: reported, retried
            events.send(("failed", stream.name, f"{type(error).__name__}: {error}"))


def _thread_lock_for_progress_bars() -> None:
    """tqdm (the profiler's bar, when plans are compiled on the fly) otherwise makes a
    multiprocessing lock, a semaphore that a killed worker never releases: the parent's resource
    tracker then warns of a leaked semaphore at exit. A worker's bars need no lock across processes."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


_STOPPING = []


def _interrupt(signum, frame):
    """A worker's SIGTERM: stop once. A second signal (Ctrl-C reaches the whole process group,
    then the parent asks again) must not raise inside the cleanup, such as a video's
    decoder closing when its generator is collected, where Python can only print it."""
    if _STOPPING:
        return
    _STOPPING.append(signum)
    raise KeyboardInterrupt


# What a worker (or Ray actor) keeps from one stream to the next: the model loaded, and the plans'
# sessions (model graph, compiled kernels, onnxruntime sessions), which one stream uses at a time;
# each stream resets them and calibrates them on its own first frames.
_MODELS: dict = {}  # (path, input shape) -> Model
_PLANS: dict = {}  # (path, input shape, plan, threads) -> SessionsByPercentage


def _run_stream(stream: Stream, resume: bool, restarts: int, options, out: Path, files: StreamFiles, events,
                barrier=None, failed_at: float | None = None) -> dict:
    """One stream, as `deluceva run` runs it, resumed after the frames already written. The
    model and plans of this worker's earlier streams are reused (see _PLANS)."""
    from deluceva.playback.job import Interrupted, RunFiles, run_video
    from deluceva.playback.recorder import written_frames
    from deluceva.playback.setup import build_plans, prepare

    folder = out / stream.name
    outputs = str(folder / "outputs.npz") if files.outputs else None
    detections = str(folder / "detections.jsonl") if files.detections else None
    frame_log = str(folder / "frames.jsonl")
    done = written_frames(outputs, detections, frame_log) if resume else 0
    events.send(("start", stream.name, done))
    remaining = None if options.frames is None else options.frames - done
    if done and remaining is None and not stream.live:
        from deluceva.media.video import open_video

        video = open_video(stream.source, start=options.start, every=options.every)
        remaining = None if video.expected is None else video.expected - done
        video.close()
    if remaining is not None and remaining <= 0:  # killed after its last frame: only the packing is left
        return _finish(outputs, detections, frame_log, done, stream, restarts, folder / "summary.json")
    # A file resumes where its outputs end, its filters calibrated on the same first frames as
    # before; a live source resumes at its current frame, calibrated on what comes now.
    start = options.start if stream.live else options.start + done * options.every
    run = dataclasses.replace(options, video=stream.source, start=start, frames=remaining,
                              calibration_start=None if stream.live else options.start)
    setup = prepare(run, models=_MODELS)
    if stream.live and failed_at is not None and setup.video.fps:
        # A live source goes on while it is down: the frames that passed are lost, and counted.
        events.send(("missed", stream.name, max(0, round((time.time() - failed_at) * setup.video.fps))))
    events.send(("expected", stream.name, None if setup.video.expected is None else done + setup.video.expected))
    key = (str(options.model), setup.input_shape, options.plan, options.threads)
    reused = _PLANS.pop(key, None)  # (taken while in use: a stream that fails half-way leaves none behind)
    plans = build_plans(setup, announce=lambda text: None, plans=reused)
    if barrier is not None:
        wait_together(barrier)

    def report(result):
        events.send(("frame", stream.name, done + result.index + 1, result.error))

    extra = {"stream": stream.name, "source": stream.source, "first_frame": done, "restarts": restarts,
             "plans_reused": reused is not None}
    try:
        job = run_video(setup, plans, RunFiles(outputs=outputs, summary=str(folder / "summary.json"),
                                              detections=detections, frame_log=frame_log, resume=done > 0,
                                              annotate=str(folder / "annotated.mp4") if files.annotate else None,
                                              save_inputs=files.save_inputs,
                                              first_frame=done, extra_summary=extra,
                                              drop_late=files.drop_late if stream.live else None), on_frame=report)
    except Interrupted as stop:
        stop.summary = _brief(stop.job.summary)  # the worker sends it on: the report counts every written frame
        raise
    _PLANS[key] = plans  # (only after a whole stream: an error may have left them mid-frame)
    return _brief(job.summary)


def _brief(summary: dict) -> dict:
    """A stream's summary without its per-frame traces (the parent's report needs the figures)."""
    return {key: value for key, value in summary.items() if not key.endswith("_trace")}


def wait_together(barrier) -> None:
    import threading

    try:
        barrier.wait(timeout=600)
    except threading.BrokenBarrierError:
        raise DelucevaError("another stream failed before the start they were to share") from None


def _finish(outputs, detections, frame_log, done: int, stream: Stream, restarts: int, summary: Path) -> dict:
    """A stream whose every frame was written: its files cut to the same frame and packed; its
    summary as the run that wrote the last frame left it, when it did."""
    import json

    from deluceva.playback.recorder import FrameRecorder, JsonLines

    if outputs:
        FrameRecorder(outputs, resume=True, frames=done).close()
    for path in (detections, frame_log):
        if path:
            JsonLines(path, resume=True, frames=done).close()
    try:
        earlier = json.loads(summary.read_text())
        if earlier.get("frames_written") == done:
            return _brief({**earlier, "restarts": restarts})
    except (OSError, ValueError):
        pass
    return {"stream": stream.name, "source": stream.source, "frames_written": done, "restarts": restarts}
