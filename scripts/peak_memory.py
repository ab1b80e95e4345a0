"""Peak resident memory of whole processes: `deluceva run` (plans compiled on the fly, and
`--plan delta`) against plain onnxruntime, on issue 14's rows (item 5: at most
max(3x, +500 MiB) of onnxruntime's).

Plain onnxruntime is measured two ways: lean (PyAV decodes, numpy resizes, onnxruntime runs:
what a user's own script needs) and with deluceva's preprocessing imported (the same libraries
loaded as in `deluceva run`). Each figure is the child process's own peak (`os.wait4`'s
ru_maxrss).

Usage:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/peak_memory.py [--frames 60] [--rows 0 1 2 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ROWS = [  # model, video, preset, model input height and width
    ("yolox_nano_coco_416.onnx", "intersection_cctv_640x480_909f.mp4", "yolox", 416, 416),
    ("mtcnn_pnet_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "mtcnn", 720, 1280),
    ("yunet_face_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "yunet", 736, 1280),
    ("yolox_nano_coco_416.onnx", "overhead_pedestrians_1280x720_341f.avi", "yolox", 416, 416),
]

LEAN = """
import sys, av, numpy as np, onnxruntime as ort
model, video, h, w, frames = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
with av.open(video) as container:
    for i, frame in enumerate(container.decode(video=0)):
        if i >= frames:
            break
        rgb = frame.to_ndarray(format="rgb24")
        ys, xs = np.arange(h) * rgb.shape[0] // h, np.arange(w) * rgb.shape[1] // w
        session.run(None, {name: np.ascontiguousarray(rgb[ys][:, xs].transpose(2, 0, 1)[None], np.float32)})
"""

WITH_DELUCEVA = """
import sys, onnxruntime as ort
from deluceva.media.video import open_video
from deluceva.presets import get_preset
model, video, preset, frames = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name, prepare = session.get_inputs()[0].name, get_preset(preset).PREPROCESSING
for rgb in open_video(video, frames=frames):
    session.run(None, {name: prepare(rgb)})
"""


def peak_mib(command: list[str]) -> float:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))), help="which rows (0-based)")
    args = parser.parse_args()
    print("| model / video | onnxruntime lean | with deluceva's imports | run, compiled | run --plan delta | target (lean) |")
    print("|---|---|---|---|---|---|")
    for model, video, preset, height, width in (ROWS[i] for i in args.rows):
        m, v, n = str(DATA / "models" / model), str(DATA / "videos" / video), str(args.frames)
        lean = peak_mib([sys.executable, "-c", LEAN, m, v, str(height), str(width), n])
        heavy = peak_mib([sys.executable, "-c", WITH_DELUCEVA, m, v, preset, n])
        run = ["deluceva", "run", m, v, "--preset", preset, "--metric", "det", "--frames", n]
        compiled, delta = peak_mib(run), peak_mib(run + ["--plan", "delta"])
        print(f"| {model} / {video} | {lean:.0f} | {heavy:.0f} | {compiled:.0f} | {delta:.0f} | {max(3 * lean, lean + 500):.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
