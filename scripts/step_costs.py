"""Per-step cost of deluceva's delta steps against onnxruntime's node, at 10%, 50% and 100% of
the input's positions changed (issue 14's per-step table).

Each row is a one-layer model (the layer kinds of YOLOX-nano, YuNet and P-Net). Frames change a
given share of the input's positions, in whole 8x8 tiles picked at random (video changes come
in patches, not as scattered pixels); every other position keeps its value exactly. Both sides
run the same frames interleaved, one thread, and each figure is the median over the frames of
the step's own time (`Session(profile=True)`: the delta step, without the frame's entry or the
output's conversion) and of onnxruntime's whole run of the one-node model.

Usage:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/step_costs.py [--forms auto never] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import deluceva
from deluceva.bench.baseline import plain_onnxruntime

SHARES = (0.1, 0.5, 1.0)
FRAMES = 12

# (label, op, input channels, output channels, kernel, stride, height, width, groups, SiLU after)
LAYERS = [
    ("1x1 64->64 52x52", "Conv", 64, 64, 1, 1, 52, 52, 1, False),
    ("1x1 64->64 52x52 + SiLU", "Conv", 64, 64, 1, 1, 52, 52, 1, True),
    ("dw 3x3 64 ch 52x52 + SiLU", "Conv", 64, 64, 3, 1, 52, 52, 64, True),
    ("dw 3x3 16 ch 104x104 + SiLU", "Conv", 16, 16, 3, 1, 104, 104, 16, True),
    ("3x3 32->64 104x104 + SiLU", "Conv", 32, 64, 3, 1, 104, 104, 1, True),
    ("stem 3x3 12->16 208x208 + SiLU", "Conv", 12, 16, 3, 1, 208, 208, 1, True),
    ("stem 3x3 s2 3->16 736x1280", "Conv", 3, 16, 3, 2, 736, 1280, 1, False),
    ("MaxPool 2x2 s2 16 ch 368x640", "MaxPool", 16, 16, 2, 2, 368, 640, 1, False),
    ("Add 64 ch 52x52", "Add", 64, 64, 1, 1, 52, 52, 1, False),
    ("Resize x2 nearest 64 ch 26x26", "Resize", 64, 64, 1, 1, 26, 26, 1, False),
]


def layer_model(op, cin, m, k, stride, h, w, groups, silu) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, h, w])
    if op == "Conv":
        weight = rng.standard_normal((m, cin // groups, k, k)) / np.sqrt(cin // groups * k * k)
        inits = [numpy_helper.from_array(weight.astype(np.float32), "w"),
                 numpy_helper.from_array((rng.standard_normal(m) * 0.1).astype(np.float32), "b")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["a" if silu else "y"], pads=[k // 2] * 4, group=groups,
                                  kernel_shape=[k, k], strides=[stride, stride])]
        if silu:
            nodes += [helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["y"])]
    elif op == "MaxPool":
        nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[stride, stride])]
    elif op == "Add":
        inits = [numpy_helper.from_array(rng.standard_normal((1, cin, h, w)).astype(np.float32), "c")]
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    elif op == "Resize":
        inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
        nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")]
    graph = helper.make_graph(nodes, "layer", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def frames_changing(shape, share: float, count: int, seed: int = 1) -> list[np.ndarray]:
    """`count` frames, each changing `share` of the positions of the one before in 8x8 tiles."""
    rng = np.random.default_rng(seed)
    _, c, h, w = shape
    frame = rng.standard_normal(shape).astype(np.float32)
    frames = [frame]
    tiles = [(y, x) for y in range(0, h, 8) for x in range(0, w, 8)]
    for _ in range(count - 1):
        frame = frame.copy()
        picked = rng.choice(len(tiles), size=max(1, round(share * len(tiles))), replace=False)
        for index in picked:
            y, x = tiles[index]
            patch = frame[:, :, y:y + 8, x:x + 8]
            patch += rng.standard_normal(patch.shape).astype(np.float32)
        frames.append(frame)
    return frames


def measure(label, op, cin, m, k, stride, h, w, groups, silu, forms: str) -> dict:
    model = layer_model(op, cin, m, k, stride, h, w, groups, silu)
    path = os.path.join(tempfile.mkdtemp(prefix="deluceva-step-"), "layer.onnx")
    onnx.save(model, path)
    plain = plain_onnxruntime(path, 1)
    row = {"layer": label, "forms": forms}
    for share in SHARES:
        session = deluceva.Session(path, plan="delta", threads=1, profile=True, dense_forms=forms)
        step = next(s.name for s in session.plan.steps if s.kind == "delta" and session.graph.nodes[s.node]["op_type"] == op)
        frames = frames_changing((1, cin, h, w), share, FRAMES + 3)
        session.run(frames[0])
        plain(frames[0])
        ours, theirs = [], []
        for frame in frames[1:]:
            session.run(frame)
            start = time.perf_counter()
            plain(frame)
            theirs.append(time.perf_counter() - start)
        ours = session.executor.step_times[step][2:]
        row[f"{share:.0%}"] = float(np.median(ours) / np.median(theirs[2:]))
        row[f"onnxruntime_ms_{share:.0%}"] = float(np.median(theirs[2:]) * 1e3)
        row[f"deluceva_ms_{share:.0%}"] = float(np.median(ours) * 1e3)
    return row


def blas_kernel() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(sorted({f"{i.get('internal_api')} {i.get('architecture')}" for i in threadpool_info()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", nargs="+", default=["auto", "never"], choices=["auto", "never"])
    parser.add_argument("--json")
    args = parser.parse_args()
    import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's BLAS so that threadpoolctl sees it)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = {"commit": commit, "threads": 1, "blas": blas_kernel(), "processor": platform.processor() or platform.machine(),
              "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    print(json.dumps(header))
    rows = []
    print(f"{'layer':34s} {'forms':6s} " + " ".join(f"{s:>7.0%}" for s in SHARES) + "   onnxruntime ms")
    for layer in LAYERS:
        for forms in args.forms:
            row = measure(*layer, forms)
            rows.append(row)
            print(f"{row['layer']:34s} {forms:6s} " + " ".join(f"{row[f'{s:.0%}']:6.2f}x" for s in SHARES)
                  + f"   {row['onnxruntime_ms_100%']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
