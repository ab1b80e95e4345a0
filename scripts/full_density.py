"""Whole models at full density: every node that has a delta kernel runs delta, p = 0, on real
video, against plain onnxruntime on the same frames (issue 14's full-density table).

Both sides run the frames interleaved in blocks of 8 (as `deluceva bench` times them), one thread; each figure is the median per-frame time over
the frames after the first (the keyframe). The error is the largest relative L2 of any output on
any frame against onnxruntime's. With `--forms never`, Conv steps always run their delta kernels
(no dense form): the kernels' own cost at full density.

Usage (from the project root, with ../shared/data beside it):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/full_density.py [--frames 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

import deluceva
from deluceva.bench.baseline import plain_onnxruntime
from deluceva.bench.compare import time_in_blocks
from deluceva.media.video import open_video
from deluceva.metrics import rel_l2
from deluceva.playback.setup import RunOptions, preprocessor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS = [
    ("YOLOX-nano 416", "yolox_nano_coco_416.onnx", "intersection_cctv_640x480_909f.mp4", "yolox"),
    ("YuNet 1280x736", "yunet_face_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "yunet"),
    ("P-Net 1280x720", "mtcnn_pnet_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "mtcnn"),
]


def measure(label: str, model: str, video: str, preset: str, frames: int, forms: str) -> dict:
    options = RunOptions(model=str(DATA / "models" / model), video=str(DATA / "videos" / video), preset=preset)
    preprocess = preprocessor(options)
    inputs = [preprocess(rgb) for rgb in open_video(options.video, frames=frames)]
    session = deluceva.Session(options.model, plan="delta", input_shape=inputs[0].shape, threads=1, dense_forms=forms)
    plain = plain_onnxruntime(options.model, 1)
    session.run(inputs[0])
    plain(inputs[0])
    got, ours, wanted, theirs = time_in_blocks(inputs[1:], session.run, plain)
    error = max(rel_l2(a, b) for a, b in zip(got, wanted))
    forms_ran = session.executor.forms.as_dict()
    return {"model": label, "forms": forms, "input": list(inputs[0].shape), "frames": len(inputs) - 1,
            "deluceva_ms": float(np.median(ours) * 1e3), "onnxruntime_ms": float(np.median(theirs) * 1e3),
            "ratio": float(np.median(ours) / np.median(theirs)), "max_rel_l2": error,
            "dense_form_frames": sum(v["dense"] for v in forms_ran.values()),
            "delta_form_frames": sum(v["delta"] for v in forms_ran.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--forms", nargs="+", default=["auto", "never"], choices=["auto", "never"])
    parser.add_argument("--json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"commit": commit, "threads": 1}))
    rows = []
    for row in ROWS:
        for forms in args.forms:
            result = measure(*row, args.frames, forms)
            rows.append(result)
            print(f"{result['model']:16s} {forms:6s} deluceva {result['deluceva_ms']:7.2f} ms  onnxruntime "
                  f"{result['onnxruntime_ms']:7.2f} ms  {result['ratio']:.2f}x  max rel L2 {result['max_rel_l2']:.1e}  "
                  f"dense-form step-frames {result['dense_form_frames']}/{result['dense_form_frames'] + result['delta_form_frames']}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
