"""Is a benchmark row's window typical of its video? Fixed p over the whole video, window by window.

The curve rows (`scripts/curve_benchmarks.py`) run the first 120 frames of each video. This runs
the all-delta plan at each fixed p over the whole video (no reference frames: what a fixed p
holds back accumulates as in a run), the detection error of every frame against plain
onnxruntime's, and each frame's time beside onnxruntime's, interleaved in blocks of 8 frames as
`deluceva bench` times them, one thread. It prints,
per p, the error over the video, and per window of --window frames (every --step frames), the
best p within the budget (mean error within it, and with det 95% of the frames at det <= 0.1);
p = 0 is plain onnxruntime (1.00x).

Usage (from the project root, with ../shared/data beside it):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/fixed_p_windows.py [--row 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

import deluceva
from deluceva.bench.baseline import plain_onnxruntime
from deluceva.bench.compare import time_in_blocks
from deluceva.media.video import open_video
from deluceva.metrics import DET_FRAME_LIMIT, DET_FRAME_SHARE, get_metric
from deluceva.playback.setup import RunOptions, preprocessor
from deluceva.session import calibrate_sessions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curve_benchmarks import ROWS  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PERCENTAGES = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def measure(row: int, frames: int | None, percentages) -> dict:
    label, model, video, preset, metric_name, budget = ROWS[row]
    options = RunOptions(model=str(DATA / "models" / model), video=str(DATA / "videos" / video), preset=preset)
    preprocess = preprocessor(options)
    inputs = [preprocess(rgb) for rgb in open_video(options.video, frames=frames)]
    session = deluceva.Session(options.model, plan="delta", input_shape=inputs[0].shape, threads=1)
    metric = get_metric(metric_name, preset, session.model.input_shape, session.model.output_names)
    plain = plain_onnxruntime(options.model, 1)
    calibrate_sessions([session], inputs[:10])
    out = {"row": label, "budget": budget, "frames": len(inputs), "percentages": {}}
    for p in percentages:
        session.reset()
        session.run(inputs[0], p, keyframe=True)
        plain(inputs[0])
        got, ours, wanted, theirs = time_in_blocks(inputs[1:], lambda frame: session.run(frame, p), plain)
        errors = [0.0] + [float(metric(a, b)) for a, b in zip(got, wanted)]
        out["percentages"][p] = {"error_trace": errors, "deluceva_ms": [m * 1e3 for m in ours],
                                 "onnxruntime_ms": [m * 1e3 for m in theirs]}
        print(f"{label} p = {p}: det mean {statistics.fmean(errors):.4f} over {len(inputs)} frames, "
              f"{sum(theirs) / sum(ours):.2f}x", flush=True)
    return out


def windows(result: dict, window: int, step: int, det: bool) -> list[dict]:
    """Per window: each p's mean error, share of frames within the det limit, speed; the best p."""
    budget, rows = result["budget"], []
    for start in range(0, result["frames"] - window + 1, step):
        points = {}
        for p, run in result["percentages"].items():
            errors = run["error_trace"][start:start + window]
            ms = slice(max(0, start - 1), start + window - 1)  # times start at the second frame
            points[p] = {"error_mean": statistics.fmean(errors),
                         "within_limit": float(np.mean(np.array(errors) <= DET_FRAME_LIMIT)),
                         "speedup": sum(run["onnxruntime_ms"][ms]) / sum(run["deluceva_ms"][ms])}
        within = [p for p, f in points.items()
                  if f["error_mean"] <= budget and (not det or f["within_limit"] >= DET_FRAME_SHARE) and f["speedup"] > 1.0]
        best = max(within, key=lambda p: points[p]["speedup"]) if within else 0.0
        rows.append({"start": start, "best": best, "points": points})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", type=int, default=0, help="a row of scripts/curve_benchmarks.py (default 0)")
    parser.add_argument("--frames", type=int, default=None, help="frames to read (default: the whole video)")
    parser.add_argument("--window", type=int, default=120)
    parser.add_argument("--step", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.row, args.frames, PERCENTAGES)
    det = ROWS[args.row][4] == "det"
    result["windows"] = windows(result, args.window, args.step, det)
    print(f"\n{result['row']}: best fixed p within {result['budget']} per window of {args.window} frames")
    print("| first frame | best p | " + " | ".join(f"p = {p}: det, speed" for p in PERCENTAGES) + " |")
    print("|---|---|" + "---|" * len(PERCENTAGES))
    for row in result["windows"]:
        cells = " | ".join(f"{f['error_mean']:.3f}, {f['speedup']:.2f}x" for f in row["points"].values())
        print(f"| {row['start']} | {row['best']:g} | {cells} |")
    delta_windows = sum(row["best"] > 0 for row in result["windows"])
    print(f"\nwindows where a delta p is best: {delta_windows} of {len(result['windows'])}")
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
