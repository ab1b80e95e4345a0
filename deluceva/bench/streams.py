"""Many streams' aggregate throughput: `deluceva streams` (its process pool, and with `ray` its
Ray actors) against as many plain onnxruntime processes on the same frames (`deluceva
bench-streams`)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from pathlib import Path

from deluceva.errors import DelucevaError
from deluceva.streams.pool import Stream, run_streams, wait_together

__all__ = ["throughput"]


def throughput(count: int, options, out: str | os.PathLike, ray: str | None = None) -> dict:
    """`count` copies of `options.video` through `run_streams` (`count` workers) and through
    `count` plain onnxruntime processes (same frames, preprocessing and threads): each side's
    aggregate frames/s over the span from the first stream's first frame to the last one's last.

    Every stream of a side starts its first frame when all of them are set up (model, plans,
    calibration), and that first frame starts the clock (it is counted out): set-up is not frame
    time on either side, and the streams really run side by side.

    With `ray` ("local", or a cluster's address), the same streams also run as `count` Ray
    actors (`deluceva streams --ray`): actors cannot wait for each other, so there the clock
    runs from the first progress message any stream sent (after its first frame) to the last
    one's last, counting the frames between; the figure thus carries Ray's own costs
    (scheduling, the progress queue, streams not starting together) beside the pool's.
    """
    streams = [Stream(f"stream{i + 1}", options.video) for i in range(count)]
    seen: dict[str, list[float]] = {}

    def record(kind, state):
        if kind == "frame":
            seen.setdefault(state.stream.name, []).append(time.monotonic())

    report = run_streams(streams, options, Path(out) / "pool", workers=count, retries=0, on_event=record,
                         together=True)
    if report.failed:
        raise DelucevaError(f"{options.video}: streams failed in the throughput run: {', '.join(report.failed)}")
    deluceva = _aggregate([(len(t) - 1, t[0], t[-1]) for t in seen.values()])
    context = multiprocessing.get_context("spawn")
    events, barrier = context.Queue(), context.Barrier(count)
    processes = [context.Process(target=_onnxruntime_worker, args=(options, events, barrier), daemon=True)
                 for _ in range(count)]
    for process in processes:
        process.start()
    spans = []
    while len(spans) < count:
        try:
            spans.append(events.get(timeout=1.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in processes):
                for process in processes:
                    process.kill()
                raise DelucevaError(f"{options.video}: a plain onnxruntime stream failed in the throughput run") from None
    for process in processes:
        process.join()
    plain = _aggregate(spans)
    errors = [row["error_mean"] for row in report.streams if row["error_mean"] is not None]
    row = {
        "streams": count, "threads": options.threads,
        "deluceva_frames_per_second": deluceva, "onnxruntime_frames_per_second": plain,
        "ratio": deluceva / plain if plain else None,
        "error_mean": sum(errors) / len(errors) if errors else None,
    }
    if ray is not None:
        row["ray_frames_per_second"] = _on_ray(streams, options, Path(out) / "ray", ray)
        row["ray_ratio"] = row["ray_frames_per_second"] / plain if plain else None
    return row


def _on_ray(streams, options, out: Path, address: str) -> float:
    """The streams' aggregate frames/s as Ray actors, one per stream (see `throughput`)."""
    from deluceva.streams.on_ray import run_streams_on_ray

    first: dict[str, tuple[float, int]] = {}
    last: dict[str, tuple[float, int]] = {}

    def record(kind, state):  # progress comes every PROGRESS_EVERY s: frames counted between the first and last
        if kind == "frame":
            now = time.monotonic()
            first.setdefault(state.stream.name, (now, state.frames))
            last[state.stream.name] = (now, state.frames)

    report = run_streams_on_ray(streams, options, out, retries=0, on_event=record, actors=len(streams),
                                address=None if address == "local" else address)
    if report.failed or len(first) < len(streams):
        raise DelucevaError(f"{options.video}: streams failed in the Ray throughput run: {', '.join(report.failed)}")
    spans = [(last[name][1] - first[name][1], first[name][0], last[name][0]) for name in first]
    if all(frames > 0 for frames, _, _ in spans):
        return _aggregate(spans)
    # A stream shorter than the progress interval reports once: its span is empty. Then the
    # actors' own pace (the mean time of their frames, set-up not counted), added up.
    paces = [row["frames_per_second"] for row in report.streams if row.get("frames_per_second")]
    return float(sum(paces)) if paces else float("nan")


def _aggregate(spans) -> float:
    """Frames per second over (frames after the first, first frame's end, last frame's end) spans."""
    frames = sum(n for n, _, _ in spans)
    seconds = max(end for _, _, end in spans) - min(begin for _, begin, _ in spans)
    return frames / seconds if seconds > 0 else float("nan")


def _onnxruntime_worker(options, events, barrier) -> None:
    """One plain onnxruntime stream: decode, preprocess and run each frame, as the baseline does."""
    from deluceva.bench.baseline import plain_onnxruntime
    from deluceva.planner.load_model import for_onnxruntime
    from deluceva.media.video import open_video
    from deluceva.playback.setup import preprocessor

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    video = open_video(options.video, frames=options.frames, start=options.start, every=options.every)
    preprocess = preprocessor(options)
    run = plain_onnxruntime(for_onnxruntime(options.model, options.layout), options.threads)
    wait_together(barrier)
    times = []
    for rgb in video:
        run(preprocess(rgb))
        times.append(time.monotonic())
    events.put((len(times) - 1, times[0], times[-1]))
