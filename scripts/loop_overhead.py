"""What the run loop costs on a small model: the p = 0 (all-dense) plan through `VideoRunner`
against plain onnxruntime, interleaved frame by frame (each goes first on every other frame),
one thread. The model is the demo's CNN at a size where onnxruntime takes about 2 ms.

Usage:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/loop_overhead.py [--size 64 128] [--frames 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from deluceva.bench.baseline import plain_onnxruntime
from deluceva.controller import FixedController
from deluceva.demo import build_demo_model
from deluceva.metrics import rel_l2
from deluceva.planner import load_model
from deluceva.playback.loop import SessionsByPercentage, VideoRunner
from deluceva.session import Session


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[64, 128], metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args()
    height, width = args.size
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "small.onnx")
        onnx.save(build_demo_model(height, width), path)
        model = load_model(path)
        rng = np.random.default_rng(0)
        base = rng.random((1, 3, height, width), dtype=np.float32)
        frames = [base + 0.01 * rng.random(base.shape, dtype=np.float32) for _ in range(args.frames)]
        plans = SessionsByPercentage([Session(model, plan="dense", threads=1)], [0.0])
        runner = VideoRunner(plans, FixedController(0.0), lambda a, b: rel_l2(list(a), list(b)), 30, 0.0)
        plain = plain_onnxruntime(path, 1)
        ours, theirs = [], []
        for index, frame in enumerate(frames):
            if index % 2:
                start = time.perf_counter()
                plain(frame)
                theirs.append(time.perf_counter() - start)
                ours.append(runner.step(frame).seconds)
            else:
                ours.append(runner.step(frame).seconds)
                start = time.perf_counter()
                plain(frame)
                theirs.append(time.perf_counter() - start)
    ours_ms, theirs_ms = statistics.fmean(ours[10:]) * 1e3, statistics.fmean(theirs[10:]) * 1e3
    print(f"demo CNN {height}x{width}, {len(frames) - 10} frames: onnxruntime {theirs_ms:.3f} ms, "
          f"deluceva p = 0 {ours_ms:.3f} ms: {ours_ms / theirs_ms:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
