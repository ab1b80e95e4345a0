"""Many videos at once: `deluceva streams`. Each stream runs as `deluceva run` does (its own
plans' state, controller, reference frames and calibration on its own first frames) in a pool of
worker processes, one stream per worker at a time; more streams than workers wait their turn.

Streams are independent, so a fault stays in its stream:
- a source that cannot be opened, or fails mid-way, is tried again after 1, 2, 4 ... seconds,
  `retries` times, then reported as failed; the others go on;
- a worker that dies (killed, out of memory) is replaced, and its stream resumes with a keyframe
  at the first frame without written output (`written_frames`), so every frame's outputs and
  detections are written exactly once. A live source (a URL) resumes at its current frame; the
  frame numbers go on from the last written one, and the frames that went by while it was down
  (estimated from its frame rate) are counted as frames_missed;
- Ctrl-C or SIGTERM stops every worker; each writes what it finished, and the run's summary says
  it was interrupted.

Per stream, DIR/NAME/ holds summary.json, detections.jsonl (a detection preset), annotated.mp4
(with --annotate) and outputs.npz
(when asked); DIR/summary.json holds every stream's figures and the aggregate throughput.
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

__all__ = ["Stream", "StreamFiles", "read_sources", "run_streams", "Ledger", "StreamsReport", "wait_together"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BACKOFF = 1.0  # seconds before a failed stream's first retry; doubled for each next one


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
        else:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/").split("?")[0]).stem).strip("._-") or "stream"
            name, n = stem[:60], 2
            while name in taken:
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
    expected: int | None = None
    worker: int | None = None  # the pid of the worker running it
    missed: int = 0  # frames of a live source that passed while it was down (estimated from its frame rate)
    failed_at: float | None = None  # wall time (time.time()) of the last failure
    error: float | None = None  # last measured error on a reference frame
    problems: list[str] = field(default_factory=list)
    summary: dict | None = None
    started: float | None = None
    finished: float | None = None

    def row(self) -> dict:
        seconds = (self.finished or time.perf_counter()) - self.started if self.started else None
        return {
            "name": self.stream.name, "source": self.stream.source, "status": self.status,
            "frames": self.frames, "seconds": seconds,
            "frames_per_second": self.frames / seconds if seconds and self.frames else None,
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
        return [s["name"] for s in self.streams if s["status"] != "done"]

    def to_dict(self) -> dict:
        return {"streams": self.streams, "frames": self.frames, "seconds": self.seconds,
                "frames_per_second": self.frames / self.seconds if self.seconds else None,
                "workers": self.workers, "failed": self.failed, "interrupted": self.interrupted}


class Ledger:
    """The parent's account of every stream: status, attempts, retries with backoff, and the
    report. Both the process pool and Ray (`deluceva.streams.on_ray`) keep theirs here.

    `on_event(kind, state)` is called as things happen: kind is "start", "expected", "frame",
    "done", "failed", "interrupted" or "retry".
    """

    def __init__(self, streams: Sequence[Stream], out: str | os.PathLike, retries: int = 2,
                 on_event: Callable[[str, StreamState], None] | None = None):
        self.streams = list(streams)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        for stream in self.streams:
            (self.out / stream.name).mkdir(exist_ok=True)
        self.states = {s.name: StreamState(s) for s in self.streams}
        self.waiting: list[tuple[float, str, bool]] = [(0.0, s.name, False) for s in self.streams]  # (not before, name, resume)
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
        ("interrupted", name, None)."""
        kind, name, *rest = message
        state = self.states[name]
        if kind == "start":
            state.frames, state.worker = rest[0], worker
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
        """What was not finished is interrupted."""
        for state in self.states.values():
            if state.status in ("queued", "running"):
                state.status = "interrupted"

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
                poll: float = 0.1, together: bool = False) -> StreamsReport:
    """Run `streams` with `options` (a RunOptions whose video is replaced by each source) in
    `workers` processes, each stream writing into `out`/NAME/; returns the report and writes it
    to `out`/summary.json.

    `on_event` is called in this process as the run goes (see `Ledger`). With `together` (one
    worker per stream), every stream starts its first frame when all are set up: for timing
    them. A KeyboardInterrupt stops every worker (each writes what it finished), writes the
    report and is raised again.
    """
    from multiprocessing.connection import wait

    if together and workers < len(streams):
        raise DelucevaError(f"streams that start together need a worker each: {len(streams)} streams, {workers} workers")
    ledger = Ledger(streams, out, retries, on_event)
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
        process.start()
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
                    ledger.handle(("failed", worker.stream, f"worker {pid} died (exit code {code})"), pid)
                if ledger.active():
                    start_worker()
    except KeyboardInterrupt:
        interrupted = True
        _stop([w.process for w in pool])
        for worker in pool:
            receive(worker)
        ledger.stop()
        raise
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
        except KeyboardInterrupt:
            events.send(("interrupted", stream.name, None))
            return
        except DelucevaError as error:
            events.send(("failed", stream.name, str(error)))
        except Exception as error:  # a stream's bug must not take the pool down: reported, retried
            events.send(("failed", stream.name, f"{type(error).__name__}: {error}"))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_stream(stream: Stream, resume: bool, restarts: int, options, out: Path, files: StreamFiles, events,
                barrier=None, failed_at: float | None = None) -> dict:
    """One stream, as `deluceva run` runs it, resumed after the frames already written."""
    from deluceva.playback.job import Outputs, run_video
    from deluceva.playback.recorder import written_frames
    from deluceva.playback.setup import build_plans, prepare

    folder = out / stream.name
    outputs = str(folder / "outputs.npz") if files.outputs else None
    detections = str(folder / "detections.jsonl") if files.detections else None
    done = written_frames(outputs, detections) if resume else 0
    events.send(("start", stream.name, done))
    remaining = None if options.frames is None else options.frames - done
    if done and remaining is None and not stream.live:
        from deluceva.media.video import open_video

        video = open_video(stream.source, start=options.start, every=options.every)
        remaining = None if video.expected is None else video.expected - done
        video.close()
    if remaining is not None and remaining <= 0:  # killed after its last frame: only the packing is left
        return _finish(outputs, detections, done, stream, restarts)
    # A file resumes where its outputs end, its filters calibrated on the same first frames as
    # before; a live source resumes at its current frame, calibrated on what comes now.
    start = options.start if stream.live else options.start + done * options.every
    run = dataclasses.replace(options, video=stream.source, start=start, frames=remaining,
                              calibration_start=None if stream.live else options.start)
    setup = prepare(run)
    if stream.live and failed_at is not None and setup.video.fps:
        # A live source goes on while it is down: the frames that passed are lost, and counted.
        events.send(("missed", stream.name, max(0, round((time.time() - failed_at) * setup.video.fps))))
    events.send(("expected", stream.name, None if setup.video.expected is None else done + setup.video.expected))
    plans = build_plans(setup, announce=lambda text: None)
    if barrier is not None:
        wait_together(barrier)

    def report(result):
        events.send(("frame", stream.name, done + result.index + 1, result.error))

    extra = {"stream": stream.name, "source": stream.source, "first_frame": done, "restarts": restarts}
    annotate = str(folder / "annotated.mp4") if files.annotate else None
    job = run_video(setup, plans, Outputs(outputs=outputs, summary=str(folder / "summary.json"), detections=detections,
                                          annotate=annotate,
                                          resume=done > 0, first_frame=done, extra_summary=extra,
                                          drop_late=files.drop_late if stream.live else None), on_frame=report)
    return {key: value for key, value in job.summary.items() if not key.endswith("_trace")}


def wait_together(barrier) -> None:
    import threading

    try:
        barrier.wait(timeout=600)
    except threading.BrokenBarrierError:
        raise DelucevaError("another stream failed before the start they were to share") from None


def _finish(outputs, detections, done: int, stream: Stream, restarts: int) -> dict:
    from deluceva.playback.recorder import FrameRecorder

    if outputs:
        FrameRecorder(outputs, resume=True, frames=done).close()
    return {"stream": stream.name, "source": stream.source, "frames_written": done, "restarts": restarts}
