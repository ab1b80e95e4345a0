"""`deluceva demo`: offline, no files needed; speed and error against onnxruntime on a synthetic clip."""

from __future__ import annotations

import argparse
import time

__all__ = ["add_parser", "handle", "format_rows"]


def add_parser(commands, percentage, positive_int) -> None:
    parser = commands.add_parser(
        "demo", help="run a built-in synthetic model on a synthesised clip, offline",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--frames", type=positive_int, default=60, help="frames in the synthetic clip (default: 60)")
    parser.add_argument("--threads", type=positive_int, default=1, help="onnxruntime intra-op threads (default: 1)")
    parser.add_argument("--percentage", type=percentage, default=None,
                        help="filtering percentage shown next to p = 0 (default: 0.9)")
    parser.set_defaults(handler=handle)


def format_rows(rows: list[dict]) -> str:
    """One line per run; `beside` is onnxruntime's ms/frame timed beside that run (in blocks of 8 frames)."""
    lines = [f"{'':<18}{'ms/frame':>10}{'onnxruntime':>13}{'speedup':>9}{'rel-l2 mean':>13}{'rel-l2 max':>12}"]
    for row in rows:
        lines.append(f"{row['name']:<18}{row['ms_per_frame']:>10.2f}{row.get('beside', row['ms_per_frame']):>13.2f}"
                     f"{row['speedup']:>8.2f}x{row['error_mean']:>13.5f}{row['error_max']:>12.5f}")
    return "\n".join(lines)


def handle(args: argparse.Namespace) -> int:
    from deluceva.demo import DEMO_PERCENTAGE, DEMO_SIZE, run_demo

    started = time.perf_counter()
    p = DEMO_PERCENTAGE if args.percentage is None else args.percentage
    rows = run_demo(frames=args.frames, threads=args.threads, percentage=p)
    height, width = DEMO_SIZE
    print(f"deluceva demo: synthetic CNN (untrained, built in), synthetic {width}x{height} clip of "
          f"{args.frames} frames, {args.threads} thread{'s' if args.threads != 1 else ''}; "
          f"error = relative L2 against onnxruntime on every frame")
    print(format_rows(rows))
    print(f"({time.perf_counter() - started:.1f} s in all)")
    return 0
