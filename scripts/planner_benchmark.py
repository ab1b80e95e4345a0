"""Issue 3's comparison: the compiled plan against all-dense and all-delta, per percentage.

Usage:
    python scripts/planner_benchmark.py [--data ../shared/data] [--frames 40] [--profile-frames 24]

For each model of the issue-5 table, on its video: profile on the first --profile-frames
frames (as `deluceva profile`), compile for p in PERCENTAGES (as `deluceva compile`), then time
on the next --frames frames, in one process with one thread: plain onnxruntime, the all-dense
plan, the compiled plan and the all-delta plan at each p, with the filter thresholds
calibrated on the first 10 frames (as `deluceva run`). The four run each frame in turn
(interleaved), so the machine's drift hits them alike. Prints a markdown table: ms per frame
(median), the error against onnxruntime (mean over frames, the row's metric) and the cost
model's prediction for the compiled plan.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from deluceva.cli import build_parser
from deluceva.commands.run import PROFILE_FRAMES, prepare
from deluceva.operators._ort import session_options
from deluceva.planner.plan_file import compile_plan
from deluceva.profiles import measure_profile
from deluceva.session import Session

PERCENTAGES = [0.0, 0.5, 0.8, 0.9]
ROWS = [
    ("YOLOX-nano / intersection_cctv", "yolox_nano_coco_416.onnx", "intersection_cctv_640x480_909f.mp4", "yolox", "det"),
    ("YuNet 1280x736 / overhead", "yunet_face_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "yunet", "rel-l2"),
    ("P-Net 1280x720 / overhead", "mtcnn_pnet_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "mtcnn", "rel-l2"),
]


def interleaved(runs: dict, frames, references, metric) -> dict:
    """{label: (median ms per frame, mean error)} for runs {label: (callable(frame), has_error)},
    each frame run by every callable in turn, so a drifting machine slows all of them alike."""
    times = {label: [] for label in runs}
    errors = {label: [] for label in runs}
    for frame, reference in zip(frames, references):
        for label, run in runs.items():
            start = time.perf_counter()
            outputs = run(frame)
            times[label].append(time.perf_counter() - start)
            errors[label].append(metric(outputs, reference))
    # The first frame is every session's keyframe (and onnxruntime's warm-up): left out.
    return {label: (float(np.median(times[label][1:])) * 1e3, float(np.mean(errors[label][1:]))) for label in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--profile-frames", type=int, default=24)
    args = parser.parse_args()
    print("| model | p | onnxruntime | all dense | compiled (delta nodes) | all delta | error compiled / all delta | predicted compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model_file, video, preset, metric_name in ROWS:
        total = args.profile_frames + args.frames
        setup = prepare(build_parser().parse_args(
            ["run", str(args.data / "models" / model_file), str(args.data / "videos" / video), "--frames", str(total),
             "--preset", preset, "--metric", metric_name, "--plan", "dense"]))
        frames = [setup.preprocess(rgb) for rgb in setup.video]
        calibration, timing = frames[: args.profile_frames], frames[args.profile_frames - 1:]
        profile = measure_profile(setup.model, calibration, threads=1, percentages=PERCENTAGES, progress=False)
        plan = compile_plan(setup.model, profile, PERCENTAGES)
        plain = ort.InferenceSession(str(args.data / "models" / model_file), session_options(1),
                                     providers=["CPUExecutionProvider"])
        feed = setup.model.input_name
        references = [plain.run(None, {feed: frame}) for frame in timing]
        dense = Session(setup.model, plan="dense")
        delta = Session(setup.model, plan="delta")
        thresholds = delta.calibrate(frames[:PROFILE_FRAMES])
        for index, p in enumerate(PERCENTAGES):
            variants = plan.variants_for(p)
            compiled = Session(setup.model, plan=variants, thresholds=thresholds)
            for session in (dense, delta, compiled):
                session.reset()
            measured = interleaved({
                "ort": lambda frame: plain.run(None, {feed: frame}),
                "dense": lambda frame: dense.run(frame),
                "compiled": lambda frame, p=p, s=compiled: s.run(frame, p),
                "delta": lambda frame, p=p: delta.run(frame, p),
            }, timing, references, setup.metric)
            count = sum(v == "delta" for v in variants.values())
            predicted = plan.data["totals"]["plan_ms"][index]
            ms = {label: value[0] for label, value in measured.items()}
            print(f"| {name} | {p:g} | {ms['ort']:.1f} | {ms['dense']:.1f} | {ms['compiled']:.1f} ({count}) | "
                  f"{ms['delta']:.1f} | {measured['compiled'][1]:.3f} / {measured['delta'][1]:.3f} ({metric_name}) | "
                  f"{predicted:.1f} |", flush=True)


if __name__ == "__main__":
    main()
