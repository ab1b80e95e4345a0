"""`deluceva bench-streams MODEL VIDEO --streams 1,2,4`: N streams' aggregate frames/s, deluceva against N onnxruntime processes.

Each side runs on the same frames, preprocessing and threads.

Each N runs `deluceva streams` on N copies of VIDEO (N workers), then N onnxruntime processes;
see `deluceva.streams.pool.throughput` for what is timed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from deluceva.commands.run import add_run_options, run_options

__all__ = ["add_parser", "handle"]


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not counts or min(counts) < 1 or max(counts) > 64:
        raise argparse.ArgumentTypeError(f"stream counts must be between 1 and 64, got {text!r}")
    return counts


def add_parser(commands, percentage, positive_int) -> None:
    parser = commands.add_parser("bench-streams", help="frames/s of N streams at once, against N onnxruntime processes",
                                 description=__doc__.splitlines()[0])
    add_run_options(parser, percentage, positive_int)
    parser.add_argument("--streams", type=_counts, default=(1, 2, 4), metavar="N,N,...",
                        help="stream counts to measure (default: 1,2,4)")
    parser.add_argument("--json", metavar="OUT.json", help="write the rows as JSON")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="also run the streams as Ray actors (`streams --ray`): on a new local cluster, or the "
                        "cluster at ADDRESS")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from deluceva.files import check_output, write_json
    from deluceva.machine import machine_info
    from deluceva.bench.streams import throughput

    check_output(args.json, ".json", "--json")
    options = run_options(args)
    rows = []
    if args.ray:
        from deluceva.streams.on_ray import import_ray

        import_ray()  # refused in one line before any work when Ray is missing
    error_name = f"{args.metric} error"  # the mean over the deluceva streams' reference frames
    ray_head = f" {'Ray f/s':>9} {'ratio':>7}" if args.ray else ""
    print(f"{'streams':>7} {'deluceva f/s':>13} {'onnxruntime f/s':>16} {'ratio':>7}{ray_head} {error_name:>14}",
          file=sys.stderr)
    for count in args.streams:
        with tempfile.TemporaryDirectory(prefix="deluceva-bench-streams-") as out:
            row = throughput(count, options, out, ray=args.ray)
        rows.append(row)
        error = "-" if row["error_mean"] is None else f"{row['error_mean']:.4f}"
        ray_cells = f" {row['ray_frames_per_second']:>9.1f} {row['ray_ratio']:>6.2f}x" if args.ray else ""
        print(f"{count:>7} {row['deluceva_frames_per_second']:>13.1f} {row['onnxruntime_frames_per_second']:>16.1f} "
              f"{row['ratio']:>6.2f}x{ray_cells} {error:>14}", file=sys.stderr)
    if args.json:
        write_json(args.json, {"model": args.model, "video": args.video, "plan": args.plan, "controller": args.controller,
                               "metric": args.metric, "error": f"{args.metric}, the mean over the deluceva streams' "
                               "reference frames", "threads": args.threads, "frames": args.frames,
                               "machine": machine_info(), "rows": rows})
    return 0
