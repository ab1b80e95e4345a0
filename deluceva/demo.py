"""The offline demo: a CNN the package builds itself and a clip it synthesises, run both ways.

No trained model fits in our dependencies: onnx ships only test graphs whose weights are
placeholders, onnxruntime only toy graphs (mul, sigmoid, logistic regression). So the demo's
model is synthetic: a small detector-shaped CNN (conv/relu stages, max-pooling, a residual add,
an upsampled branch concatenated with a finer one, two heads) with fixed pseudo-random weights.
Its outputs mean nothing; what the demo shows is speed and exactness against onnxruntime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_demo_model", "demo_clip", "run_demo", "DEMO_SIZE", "DEMO_PERCENTAGE"]

DEMO_SIZE = (192, 320)  # height, width: a quarter of 640x384, enough work per frame to measure
DEMO_PERCENTAGE = 0.9  # the filtering percentage the demo shows next to the exact p = 0


def build_demo_model(height: int = DEMO_SIZE[0], width: int = DEMO_SIZE[1], seed: int = 0) -> onnx.ModelProto:
    """A deterministic detector-shaped CNN for 1x3xHxW inputs in [0, 1] (H, W multiples of 4).

    Outputs: `heads` (1, 6, H/2, W/2) from the fine branch and `coarse` (1, 4, H/4, W/4).

    Example:
        >>> model = build_demo_model(64, 96)
        >>> [o.name for o in model.graph.output]
        ['heads', 'coarse']
    """
    if height % 4 or width % 4:
        raise ValueError("demo model height and width must be multiples of 4")
    rng = np.random.default_rng(seed)
    nodes, weights = [], []

    def conv(name, x, c_in, c_out, k=3, relu=True):
        # He-scaled weights keep activations in a steady range through the stack.
        w = rng.normal(0, np.sqrt(2.0 / (c_in * k * k)), (c_out, c_in, k, k)).astype(np.float32)
        b = rng.normal(0, 0.05, c_out).astype(np.float32)
        weights.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        out = f"{name}.y"
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [out], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [f"{name}.r"], name=f"{name}_relu"))
            out = f"{name}.r"
        return out

    def pool(name, x):
        nodes.append(helper.make_node("MaxPool", [x], [f"{name}.y"], name=name, kernel_shape=[2, 2], strides=[2, 2]))
        return f"{name}.y"

    x = conv("stem", "image", 3, 16)
    x = conv("stem2", x, 16, 16)
    x = pool("pool1", x)                                     # H/2
    a = conv("stage1", x, 16, 32)
    r = conv("res_a", a, 32, 32)
    r = conv("res_b", r, 32, 32, relu=False)
    nodes.append(helper.make_node("Add", [a, r], ["res.sum"], name="res_add"))
    nodes.append(helper.make_node("Relu", ["res.sum"], ["res.y"], name="res_relu"))
    x = pool("pool2", "res.y")                               # H/4
    b = conv("stage2", x, 32, 48)
    lateral = conv("lateral", b, 48, 32, k=1)
    weights.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up.scales"))
    nodes.append(helper.make_node("Resize", [lateral, "", "up.scales"], ["up.y"], name="upsample", mode="nearest"))
    nodes.append(helper.make_node("Concat", ["res.y", "up.y"], ["fuse.y"], name="fuse", axis=1))
    f = conv("fuse_conv", "fuse.y", 64, 32)
    nodes.append(helper.make_node("Identity", [conv("head", f, 32, 6, k=1, relu=False)], ["heads"], name="heads_out"))
    nodes.append(helper.make_node("Identity", [conv("coarse_head", b, 48, 4, k=1, relu=False)], ["coarse"], name="coarse_out"))
    graph = helper.make_graph(
        nodes, "deluceva_demo",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("heads", TensorProto.FLOAT, [1, 6, height // 2, width // 2]),
         helper.make_tensor_value_info("coarse", TensorProto.FLOAT, [1, 4, height // 4, width // 4])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="deluceva-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def demo_clip(path: str | Path, frames: int, height: int = DEMO_SIZE[0], width: int = DEMO_SIZE[1]) -> Path:
    """A synthetic static-camera clip (still background, moving objects, sensor noise), H.264."""
    from deluceva.media.video import synthesise_clip

    return synthesise_clip(path, width=width, height=height, frames=frames, objects=3, noise=1.5, seed=1)


def _to_tensor(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], np.float32) / np.float32(255)


def run_demo(frames: int = 60, threads: int = 1, percentage: float = DEMO_PERCENTAGE,
             reference_every: int = 30) -> list[dict]:
    """Onnxruntime, deluceva's compiled plan at p = 0 and at `percentage`, and the all-delta
    plan at `percentage` (what the planner weighed), on the demo clip.

    Returns one row per run: name, ms_per_frame, beside (onnxruntime's ms/frame, timed on each
    frame beside deluceva's run, as `bench` times it), speedup, error_mean, error_max (relative L2 against
    onnxruntime, the largest over the two outputs, on every frame).
    """
    from deluceva.bench.baseline import plain_onnxruntime, run_onnxruntime
    from deluceva.controller import make_controller
    from deluceva.media.video import open_video
    from deluceva.metrics import get_metric
    from deluceva.planner import load_model
    from deluceva.bench.compare import run_deluceva
    from deluceva.playback.loop import SessionsByPercentage, VideoRunner
    from deluceva.playback.setup import PROFILE_FRAMES, compile_plans
    from deluceva.session import Session, calibrate_sessions

    proto = build_demo_model()
    metric = get_metric("rel-l2", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="deluceva-demo-") as folder:
        video = open_video(demo_clip(Path(folder) / "demo.mp4", frames))
        # Decoded once: the three runs see the very same tensors.
        tensors = [_to_tensor(rgb) for rgb in video]
        reference = run_onnxruntime(proto.SerializeToString(), tensors, threads)
        try:
            model = load_model(proto)
            # Onnxruntime is timed on each frame beside deluceva (as `bench` does), so the
            # machine's drift slows both alike; its row shows the mean over all runs.
            # With more threads, interleaved sessions slow each other (see `deluceva bench`):
            # onnxruntime's own first pass is the baseline then.
            paired = plain_onnxruntime(proto.SerializeToString(), threads) if threads == 1 else None
            ort_row = dict(name="onnxruntime", ms_per_frame=0.0, speedup=1.0, error_mean=0.0, error_max=0.0)
            rows.append(ort_row)
            ort_times = []
            # Profiled on the clip's first frames like `deluceva run` without --plan; compiled
            # once for both percentages (plan construction is outside the per-frame times).
            plans = compile_plans(model, tensors[:PROFILE_FRAMES], threads, (0.0, percentage), progress=False)
            all_delta = Session(model, plan="delta", threads=threads)
            calibrate_sessions([all_delta], tensors[:PROFILE_FRAMES])
            runs = [("deluceva", plans, 0.0), ("deluceva", plans, percentage),
                    ("all delta", SessionsByPercentage([all_delta], [0.0], description="all delta"), percentage)]
            for label, plan_set, p in runs:
                def make_runner(plan_set=plan_set, p=p):
                    for session in plan_set.sessions:
                        session.reset()
                    return VideoRunner(plan_set, make_controller("fixed", percentage=p), metric, reference_every, p)

                run = run_deluceva(make_runner, tensors, reference, metric, paired=paired)
                ms = float(np.mean([r.seconds * 1000 for r in run.results]))
                ort_times += run.paired_ms or reference.ms
                beside = float(np.mean(run.paired_ms or reference.ms))
                rows.append(dict(name=f"{label} p={p:g}", ms_per_frame=ms, beside=beside, speedup=beside / ms,
                                 error_mean=float(np.mean(run.errors)), error_max=float(np.max(run.errors)),
                                 density=run.summary["density_mean"], bound=run.summary["flop_reduction_bound"]))
            ort_row["ms_per_frame"] = float(np.mean(ort_times))
        finally:
            reference.close()
    return rows
