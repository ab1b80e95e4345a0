"""Per-layer breakdown of one model on a video: where the delta frame time goes, density per layer.

Usage:
    python scripts/layer_breakdown.py MODEL VIDEO --preset yolox [--percentage 0.8] [--frames 40]

Runs the all-delta plan with per-step timing (the profiler's executor), its filter thresholds
calibrated on the first 10 frames as `deluceva run` does, and prints markdown:
time and mean output density per op type, then the ten most expensive steps, against the
same frames through plain onnxruntime.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import onnxruntime as ort

from deluceva.cli import build_parser
from deluceva.commands.run import PROFILE_FRAMES as CALIBRATION_FRAMES
from deluceva.commands.run import prepare
from deluceva.operators._ort import session_options
from deluceva.session import Session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("video")
    parser.add_argument("--preset")
    parser.add_argument("--percentage", type=float, default=0.8)
    parser.add_argument("--frames", type=int, default=40)
    options = parser.parse_args()
    # The same option checks and preprocessing as `deluceva run`.
    setup = prepare(build_parser().parse_args(
        ["run", options.model, options.video, "--frames", str(options.frames), "--plan", "delta",
         *(["--preset", options.preset] if options.preset else [])]))
    args = options
    session = Session(setup.model, plan="delta", profile=True)
    frames = [setup.preprocess(rgb) for rgb in setup.video]
    session.calibrate(frames[:CALIBRATION_FRAMES])
    frames = frames[CALIBRATION_FRAMES - 1:]  # timed from the last calibration frame on
    plain = ort.InferenceSession(args.model, session_options(1), providers=["CPUExecutionProvider"])
    dense_ms = []
    for frame in frames[1:]:
        start = time.perf_counter()
        plain.run(None, {session.model.input_name: frame})
        dense_ms.append((time.perf_counter() - start) * 1e3)
    session.run(frames[0])
    session.executor.step_times.clear()
    densities: dict[str, list[float]] = defaultdict(list)
    frame_ms = []
    for frame in frames[1:]:
        start = time.perf_counter()
        session.run(frame, args.percentage)
        frame_ms.append((time.perf_counter() - start) * 1e3)
        for tensor, density in session.executor.densities.items():
            densities[tensor].append(density)
    graph = session.graph
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0])  # ms, count, density sum
    steps = []
    step_outputs = {step.name: step.outputs[0] for step in session.executor.plan.steps if step.outputs}
    fused = {step.name: len(step.fused) for step in session.executor.plan.steps if getattr(step, "fused", None)}
    for name, times in session.executor.step_times.items():
        ms = float(np.median(times)) * 1e3  # median: the first call of a kernel includes compiling it
        if name.startswith("delta["):
            node = name[len("delta["):-1]
            op = graph.nodes[node]["op_type"] + ("+epilogue" if name in fused else "")
            density = float(np.mean(densities.get(step_outputs[name], [1.0])))
        else:
            op, density = name.split("[")[0], float("nan")
        entry = by_op[op]
        entry[0] += ms
        entry[1] += 1
        entry[2] += 0.0 if np.isnan(density) else density
        steps.append((ms, name, density))
    print(f"all-delta plan, p = {args.percentage}, {len(frames) - 1} frames after a keyframe, 1 thread")
    print(f"onnxruntime {np.median(dense_ms):.2f} ms/frame; deluceva {np.median(frame_ms):.2f} ms/frame (medians) "
          f"(steps and conversions below; the rest is the executor's own loop)\n")
    print("| op type | steps | ms/frame | mean output density |\n|---|---|---|---|")
    for op, (ms, count, density) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        shown = f"{density / count:.3f}" if not op.startswith(("to_", "dense", "keyframe")) else "-"
        print(f"| {op} | {count} | {ms:.2f} | {shown} |")
    print("\n| step | ms/frame | output density |\n|---|---|---|")
    for ms, name, density in sorted(steps, reverse=True)[:10]:
        print(f"| {name} | {ms:.3f} | {'-' if np.isnan(density) else f'{density:.3f}'} |")


if __name__ == "__main__":
    main()
