"""Regenerate docs/BENCHMARKS.md: `deluceva bench` on every row of the issue-5 table.

Usage:
    python scripts/benchmarks.py [--data ../shared/data] [--frames 120] [--threads 1 2]
        [--out docs/benchmarks] [--markdown docs/BENCHMARKS.md]

Each row runs `deluceva bench` (onnxruntime and deluceva in the same process, same frames,
same preprocessing, same thread count) with the PI controller at the row's error budget, then
a fixed-percentage sweep of the all-delta plan for the speed-versus-error curve. JSON results and plots go to --out;
the table is written to --markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROWS = [
    # name, model, video, preset, metric, budget
    ("YOLOX-nano / intersection_cctv", "yolox_nano_coco_416.onnx", "intersection_cctv_640x480_909f.mp4", "yolox", "det", 0.02),
    ("YOLOX-nano / overhead_pedestrians", "yolox_nano_coco_416.onnx", "overhead_pedestrians_1280x720_341f.avi", "yolox", "det", 0.02),
    ("YuNet 1280x736 / overhead_pedestrians", "yunet_face_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "yunet", "rel-l2", 0.05),
    ("MTCNN P-Net 1280x720 / overhead_pedestrians", "mtcnn_pnet_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "mtcnn", "rel-l2", 0.05),
]
SWEEP = [0.0, 0.5, 0.7, 0.8, 0.9]


def bench(data: Path, row, out: Path, tag: str, frames: int, threads: int, extra: list[str]) -> dict:
    _, model, video, preset, metric, budget = row
    target = out / f"{tag}.json"
    command = [
        sys.executable, "-m", "deluceva.cli", "bench", str(data / "models" / model), str(data / "videos" / video),
        "--preset", preset, "--metric", metric, "--error-budget", str(budget), "--frames", str(frames),
        "--threads", str(threads), "--json", str(target), *extra,
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(target.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))), help="row numbers (0-based)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the fixed-percentage curves")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/table.md"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| row | threads | controller | speedup | error mean / p95 / max (metric) | mean p | density | FLOP bound | efficiency | peak MiB ort / deluceva |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number in args.rows:
        row = ROWS[number]
        for threads in args.threads:
            tag = f"row{number}_t{threads}_pi"
            result = bench(args.data, row, args.out, tag, args.frames, threads, ["--controller", "pi", "--plot", str(args.out / f"{tag}.png")])
            lines.append(_line(row, threads, "pi", result))
        if not args.no_sweep:
            for p in SWEEP:
                tag = f"row{number}_t1_p{p}"
                # The curve runs the all-delta plan, so it shows the delta kernels themselves
                # at each p, without the planner moving work back to dense.
                result = bench(args.data, row, args.out, tag, args.frames, 1,
                               ["--controller", "fixed", "--percentage", str(p), "--plan", "delta"])
                lines.append(_line(row, 1, f"all-delta, fixed p={p}", result))
    args.markdown.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _line(row, threads: int, controller: str, r: dict) -> str:
    name, *_, metric, _budget = row
    peak = f"{r.get('onnxruntime_peak_mib', 0):.0f} / {r.get('deluceva_peak_mib', 0):.0f}"
    efficiency = r.get("efficiency")
    return (
        f"| {name} | {threads} | {controller} | {r['speedup']:.2f}x | {r['error_mean']:.3f} / {r['error_p95']:.3f} / "
        f"{r['error_max']:.3f} ({metric}) | {r['percentage_mean']:.2f} | {r['density_mean']:.3f} | "
        f"{r['flop_reduction_bound']:.2f}x | {efficiency if efficiency is None else f'{efficiency:.2f}'} | {peak} |"
    )


if __name__ == "__main__":
    sys.exit(main())
