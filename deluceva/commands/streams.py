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
    parser.add_argument("--save-inputs", action="store_true",
                        help="with --outputs, also store each model input in outputs.npz, keyed input:<name>")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="DIR holds an earlier run of these streams: continue each where its files end")
    again.add_argument("--overwrite", action="store_true",
                       help="DIR holds an earlier run: remove these streams' files and start again")
    parser.add_argument("--annotate", action="store_true",
                        help="also write each stream's annotated.mp4: its video with the detections drawn (a detection "
                        "preset or --boxes/--scores)")
    parser.add_argument("--drop-late", type=seconds, default=None, metavar="SECONDS",
                        help="live sources (URLs): skip frames while a stream is more than SECONDS behind its source; "
                        "each stream's summary counts them")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run the streams as Ray actors: on a new local cluster, or on the cluster at ADDRESS "
                        "(needs pip install \"deluceva[ray]\"; OUT must be a folder every machine shares)")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own messages and its workers' logs")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from deluceva.commands.run import detector_options
    from deluceva.presets import decodes_detections
    from deluceva.streams.pool import StreamFiles, StreamsInterrupted, read_sources, run_streams

    if args.retries < 0:
        raise DelucevaError(f"--retries {args.retries} must not be negative")
    if not os.path.isfile(args.model):
        raise DelucevaError(f"{args.model}: no such model file")
    for option, path in (("--plan", args.plan), ("--learned-model", args.learned_model)):
        if path not in (None, "dense", "delta") and not os.path.isfile(path):  # (not each stream, retried)
            raise DelucevaError(f"{path}: no such {option} file")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise DelucevaError(f"{out}: --out must be a folder, and this is a file")
    if args.save_inputs and not args.outputs:
        raise DelucevaError("--save-inputs stores the inputs in each stream's outputs.npz: add --outputs")
    streams = read_sources(args.sources)
    workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads)
    decodes = decodes_detections(args.preset, detector_options(args))
    if args.annotate and not decodes:
        raise DelucevaError("--annotate needs a preset that decodes detections (yolox, yunet, mtcnn) or the model's "
                            f"boxes and scores (--boxes B --scores S); got {args.preset or 'no preset'}")
    files = StreamFiles(outputs=args.outputs, save_inputs=args.save_inputs, detections=decodes,
                        drop_late=args.drop_late, annotate=args.annotate)
    existing = "resume" if args.resume else "overwrite" if args.overwrite else "refuse"
    from deluceva.streams.pool import prepare_out

    prepare_out(out, streams, existing)  # refused (a run already there, a folder that cannot be made) before any work
    if existing == "overwrite":
        existing = "resume"  # (cleared just now; what is there from here on is this run's)
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
                      + (" (trying again)" if kind == "retry" else " (given up)"), file=sys.stderr)
        if kind == "start" and state.frames:
            bar.write(f"deluceva: {state.stream.name}: resuming after frame {state.frames - 1} "
                      f"({state.frames} frames already written)", file=sys.stderr)
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
                                        address=None if args.ray == "local" else args.ray, actors=args.workers,
                                        existing=existing, verbose=args.verbose)
        else:
            report = run_streams(streams, run_options(args), out, files, workers=workers, retries=args.retries,
                                 on_event=show, existing=existing)
    except StreamsInterrupted as stop:
        bar.close()
        _print_table(stop.report)
        unfinished = stop.report.unfinished
        if unfinished:
            print(f"deluceva: {len(unfinished)} streams stopped before their end: {', '.join(unfinished)} "
                  "(the same command with --resume continues them)", file=sys.stderr)
        raise
    finally:
        bar.close()
    _print_table(report)
    if report.failed:
        raise DelucevaError(f"{len(report.failed)} of {len(streams)} streams failed: {', '.join(report.failed)} "
                            f"(see {os.path.join(out, 'summary.json')})")
    return 0


def _print_table(report) -> None:
    """frames/s is the model's pace (set-up not counted); with set-up: this run's frames over its
    wall time, loading, calibration and restarts included."""
    print(f"{'stream':<24} {'status':<11} {'frames':>7} {'frames/s':>9} {'with set-up':>11} {'error':>8} "
          f"{'restarts':>8}", file=sys.stderr)
    for row in report.streams:
        fps = "-" if row["frames_per_second"] is None else f"{row['frames_per_second']:.1f}"
        wall = "-" if row["frames_per_second_with_setup"] is None else f"{row['frames_per_second_with_setup']:.1f}"
        error = "-" if row["error_mean"] is None else f"{row['error_mean']:.4f}"
        print(f"{row['name'][:24]:<24} {row['status']:<11} {row['frames']:>7} {fps:>9} {wall:>11} {error:>8} "
              f"{row['restarts']:>8}", file=sys.stderr)
    rate = report.frames / report.seconds if report.seconds else 0.0
    print(f"{report.frames} frames in {report.seconds:.1f} s on {report.workers} workers: {rate:.1f} frames/s in all",
          file=sys.stderr)
