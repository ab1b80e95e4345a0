"""`deluceva streams SOURCES... --model M.onnx --out DIR`: many videos at once, each as `run` runs one.

Sources are video files, stream URLs, or .txt files listing them one a line (`name=source` or
just the source). Each stream writes DIR/NAME/summary.json, detections.jsonl with a detection
preset (or --boxes/--scores), annotated.mp4 with --annotate, and outputs.npz with --outputs;
DIR/summary.json holds every stream and the aggregate throughput. See `deluceva.streams.pool` for how faults are handled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from deluceva.commands._types import seconds
from deluceva.commands.run import add_run_options, progress, run_options
from deluceva.errors import DelucevaError

__all__ = ["add_parser", "handle"]


def add_parser(commands, percentage, positive_int) -> None:
    parser = commands.add_parser("streams", help="run a model on many videos or streams at once, a worker per core",
                                 description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="video files, stream URLs, or .txt files listing them")
    parser.add_argument("--model", required=True, help="ONNX model file")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for each stream's files and the summary")
    add_run_options(parser, percentage, positive_int, one_video=False)
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="worker processes, or Ray actors with --ray (default: cores // threads, or the Ray "
                        "cluster's CPUs // threads)")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a failed stream is tried again, after 1, 2, 4 ... s (default: 2)")
    parser.add_argument("--outputs", action="store_true", help="also write each stream's outputs.npz")
    parser.add_argument("--annotate", action="store_true",
                        help="also write each stream's annotated.mp4: its video with the detections drawn (a detection "
                        "preset or --boxes/--scores)")
    parser.add_argument("--drop-late", type=seconds, default=None, metavar="SECONDS",
                        help="live sources (URLs): skip frames while a stream is more than SECONDS behind its source; "
                        "each stream's summary counts them")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run the streams as Ray actors: on a new local cluster, or on the cluster at ADDRESS "
                        "(needs pip install \"deluceva[ray]\"; OUT must be a folder every machine shares)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from deluceva.commands.run import detector_options
    from deluceva.presets import decodes_detections
    from deluceva.streams.pool import StreamFiles, read_sources, run_streams

    if args.retries < 0:
        raise DelucevaError(f"--retries {args.retries} must not be negative")
    if not os.path.isfile(args.model):
        raise DelucevaError(f"{args.model}: no such model file")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise DelucevaError(f"{out}: --out must be a folder, and this is a file")
    streams = read_sources(args.sources)
    workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads)
    decodes = decodes_detections(args.preset, detector_options(args))
    if args.annotate and not decodes:
        raise DelucevaError("--annotate needs a preset that decodes detections (yolox, yunet, mtcnn) or the model's "
                            f"boxes and scores (--boxes B --scores S); got {args.preset or 'no preset'}")
    files = StreamFiles(outputs=args.outputs, detections=decodes, drop_late=args.drop_late, annotate=args.annotate)
    where = f"Ray at {args.ray}" if args.ray else f"{min(workers, len(streams))} workers"
    bar = progress(None, f"deluceva streams ({len(streams)} on {where})")
    states, shown = {}, [0.0]

    def show(kind, state):
        """The live line: frames done in all, then each running stream's frames/s and last error."""
        states[state.stream.name] = state
        total = sum(s.frames for s in states.values())
        if total > bar.n:
            bar.update(total - bar.n)
        if kind in ("retry", "failed"):
            bar.write(f"deluceva: {state.stream.name}: {state.problems[-1]}"
                      + (" (trying again)" if kind == "retry" else " (given up)"))
        now = time.monotonic()
        if kind == "frame" and now - shown[0] < 0.5:
            return
        shown[0] = now
        done = sum(s.status == "done" for s in states.values())
        running = []
        for s in [s for s in states.values() if s.status == "running"][:4]:
            fps = s.row()["frames_per_second"]
            running.append(f"{s.stream.name} {fps or 0:.1f} f/s" + ("" if s.error is None else f" err {s.error:.3f}"))
        bar.set_postfix_str(f"{done}/{len(streams)} done" + ("; " + ", ".join(running) if running else ""))

    try:
        if args.ray:
            from deluceva.streams.on_ray import import_ray, run_streams_on_ray

            import_ray()  # refused in one line before any work when Ray is missing
            report = run_streams_on_ray(streams, run_options(args), out, files, retries=args.retries, on_event=show,
                                        address=None if args.ray == "local" else args.ray, actors=args.workers)
        else:
            report = run_streams(streams, run_options(args), out, files, workers=workers, retries=args.retries,
                                 on_event=show)
    finally:
        bar.close()
    _print_table(report)
    if report.failed:
        raise DelucevaError(f"{len(report.failed)} of {len(streams)} streams failed: {', '.join(report.failed)} "
                            f"(see {os.path.join(out, 'summary.json')})")
    return 0


def _print_table(report) -> None:
    print(f"{'stream':<24} {'status':<11} {'frames':>7} {'frames/s':>9} {'error':>8} {'restarts':>8}", file=sys.stderr)
    for row in report.streams:
        fps = "-" if row["frames_per_second"] is None else f"{row['frames_per_second']:.1f}"
        error = "-" if row["error_mean"] is None else f"{row['error_mean']:.4f}"
        print(f"{row['name'][:24]:<24} {row['status']:<11} {row['frames']:>7} {fps:>9} {error:>8} {row['restarts']:>8}",
              file=sys.stderr)
    rate = report.frames / report.seconds if report.seconds else 0.0
    print(f"{report.frames} frames in {report.seconds:.1f} s on {report.workers} workers: {rate:.1f} frames/s in all",
          file=sys.stderr)
