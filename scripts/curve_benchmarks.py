"""Issue 15's table: per row, the fixed-p curve of the run's own plans, where the PI and learned
controllers land on it, and deluceva with and without the frame gate beside frame skipping.

Usage:
    python scripts/curve_benchmarks.py [--data ../shared/data] [--rows 0 1 2 3] [--runs 3]
        [--frames 120] [--out docs/benchmarks/curve] [--render]

Each run is one `deluceva bench MODEL VIDEO --sweep 0.1,...,0.9 --gate` (plans compiled on the
fly, 1 thread, reference every 30 frames, counted), its JSON kept in --out; the table printed
(markdown) gives the median over the runs of each figure, since the machine is shared and one
run's ratios move by 10-20%. `--render` prints the table from the JSON files already there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROWS = [
    # label, model, video, preset, metric, budget (issue 9's rows)
    ("YOLOX-nano / intersection_cctv", "yolox_nano_coco_416.onnx", "intersection_cctv_640x480_909f.mp4", "yolox", "det", 0.02),
    ("MTCNN P-Net / overhead_pedestrians", "mtcnn_pnet_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "mtcnn",
     "det", 0.02),
    ("YuNet / overhead_pedestrians", "yunet_face_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "yunet", "det", 0.02),
    ("YOLOX-nano / overhead_pedestrians", "yolox_nano_coco_416.onnx", "overhead_pedestrians_1280x720_341f.avi", "yolox",
     "det", 0.02),
]
SWEEP = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/curve"))
    parser.add_argument("--render", action="store_true", help="measure nothing: the table from --out's JSON files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        for number in args.rows:
            _, model, video, preset, metric, budget = ROWS[number]
            for run in range(args.runs):
                target = args.out / f"row{number}_run{run}.json"
                command = [sys.executable, "-m", "deluceva.cli", "bench", str(args.data / "models" / model),
                           str(args.data / "videos" / video), "--preset", preset, "--metric", metric,
                           "--error-budget", str(budget), "--frames", str(args.frames), "--threads", "1",
                           "--sweep", SWEEP, "--gate", "--json", str(target)]
                print("$", " ".join(command), flush=True)
                subprocess.run(command, check=True)
    print(table(args))
    return 0


def table(args) -> str:
    """Markdown: per row, medians over its runs."""
    lines = [
        "| row | runs | best fixed p within budget | pi | learned | pi + gate | learned + gate | frame skipping at the gated pi's error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, (label, *_rest) in enumerate(ROWS):
        runs = [json.loads(path.read_text()) for path in sorted(args.out.glob(f"row{number}_run*.json"))]
        if not runs:
            continue

        def median(get):
            values = [v for v in (get(r) for r in runs) if v is not None]
            return statistics.median(values) if values else None

        def landing(name):
            speed = median(lambda r: r["controllers"][name]["speedup"])
            error = median(lambda r: r["controllers"][name]["error_mean"])
            within = median(lambda r: r["controllers"][name]["frames_within_limit"])
            of_best = median(lambda r: r["controllers"][name]["of_best"])
            gated = median(lambda r: r["controllers"][name]["gated_frames"])
            text = f"{speed:.2f}x, det {error:.4f}, {within:.0%} of frames <= 0.1, {of_best:.0%} of best"
            return text + (f", {gated:g} gated" if gated else "")

        best_p = [r["sweep_best"]["percentage"] for r in runs if r.get("sweep_best")]
        best = (f"p = {statistics.median(best_p):g}: {median(lambda r: r['sweep_best']['speedup']):.2f}x, "
                f"det {median(lambda r: r['sweep_best']['error_mean']):.4f}") if best_p else "none"
        skip = (f"{median(lambda r: r['controllers']['pi + gate']['skip_equal_speedup']):.2f}x at det "
                f"{median(lambda r: r['controllers']['pi + gate']['skip_equal_error_mean']):.4f}")
        lines.append(f"| {label} | {len(runs)} | {best} | {landing('pi')} | {landing('learned')} | "
                     f"{landing('pi + gate')} | {landing('learned + gate')} | {skip} |")
    lines += ["", "The sweep per row (median speedup / det error mean per p, p = 0 all dense):", ""]
    for number, (label, *_rest) in enumerate(ROWS):
        runs = [json.loads(path.read_text()) for path in sorted(args.out.glob(f"row{number}_run*.json"))]
        if not runs:
            continue
        points = []
        for index, point in enumerate(runs[0]["sweep"]):
            speed = statistics.median(r["sweep"][index]["speedup"] for r in runs)
            error = statistics.median(r["sweep"][index]["error_mean"] for r in runs)
            points.append(f"{point['percentage']:g}: {speed:.2f}x / {error:.3f}")
        retired = sorted({p for r in runs for p in r.get("retired_plans", [])})
        lines.append(f"- {label}: " + "; ".join(points)
                     + (f" (plans retired as slower than dense in some run: from p = {retired})" if retired else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
