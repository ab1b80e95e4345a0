"""End to end, differential against plain onnxruntime: every frame, every output.

Each model runs frame after frame under the all-delta plan and under seeded random mixed plans
(a random subset of the delta-capable nodes set to delta) at p = 0, and every output of every
frame must match onnxruntime on the original model within a relative L2 error of 1e-4.

Some outputs are ill-conditioned in float32: YuNet's obj_* are sigmoids of very negative logits,
so a rounding difference deep in the network shows up amplified in them. For those the check
measures onnxruntime's own disagreement on the same frame (ORT_DISABLE_ALL against the default
optimisation level) and allows at most twice that where it exceeds the 1e-4 bound; every such
case is counted and printed (run with `-s` to see the table).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import relative_error, video_inputs
from onnx import helper, numpy_helper

from deluceva.planner import build_dag, load_model
from deluceva.session import Session

TOLERANCE = 1e-4
LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"


# -- the differential check ------------------------------------------------------------------


def ort_session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    """Plain onnxruntime, one thread, on the original file or proto."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_plan(model, seed: int, share: float = 0.5) -> dict[str, str]:
    """A seeded random subset of the delta-capable nodes set to delta, the rest dense."""
    graph = build_dag(model)
    capable = [name for name, data in graph.nodes(data=True) if data["delta_reason"] is None]
    rng = np.random.default_rng(seed)
    return {name: "delta" if rng.random() < share else "dense" for name in capable}


class Differential:
    """Runs one model under several plans against onnxruntime and keeps the worst errors."""

    def __init__(self, source, frames: list[np.ndarray], input_shape=None, measured_bound: bool = True):
        self.measured_bound = measured_bound  # False: 1e-4 on every output, whatever ORT does
        self.model = load_model(source, input_shape)
        self.frames = frames
        self.reference = ort_session(source)
        self.unoptimised = ort_session(source, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        feed = self.model.input_name
        self.want = [self.reference.run(self.model.output_names, {feed: f}) for f in frames]
        # onnxruntime against itself: how well conditioned each output is on each frame.
        self.own = [
            [relative_error(a, b) for a, b in zip(self.unoptimised.run(self.model.output_names, {feed: f}), want)]
            for f, want in zip(frames, self.want)
        ]
        self.report: dict[str, dict[str, tuple[float, float]]] = {}

    def check(self, plan, label: str, dense_forms: str = "auto") -> Session:
        """Run every frame under `plan`; assert every output of every frame is within bounds."""
        session = Session(self.model, plan=plan, dense_forms=dense_forms)
        worst: dict[str, tuple[float, float]] = {}
        failures = []
        for index, (frame, want, own) in enumerate(zip(self.frames, self.want, self.own)):
            got = session.run(frame)
            assert len(got) == len(want)
            for name, g, w, o in zip(self.model.output_names, got, want, own):
                assert g.shape == w.shape, f"{label} frame {index} {name}: shape {g.shape} != {w.shape}"
                error = relative_error(g, w)
                bound = max(TOLERANCE, 2 * o) if self.measured_bound else TOLERANCE
                if error > bound:
                    failures.append(f"frame {index} {name}: {error:.2e} > {bound:.2e} (onnxruntime vs itself {o:.2e})")
                previous = worst.get(name, (0.0, 0.0))
                worst[name] = (max(previous[0], error), max(previous[1], o))
        self.report[label] = worst
        print(f"\n{label}: {session.plan.counts()}")
        for name, (error, own) in worst.items():
            flag = "  (ill-conditioned: bound is 2x onnxruntime vs itself)" if error > TOLERANCE else ""
            print(f"    {name:>12}: max rel L2 {error:.2e}   onnxruntime vs itself {own:.2e}{flag}")
        assert not failures, f"{label}: " + "; ".join(failures[:8])
        return session


# -- the models in ../shared/data ----------------------------------------------------------------

CCTV = "intersection_cctv_640x480_909f.mp4"
OVERHEAD = "overhead_pedestrians_1280x720_341f.avi"

# (model file, video, preprocessing preset, input size or None for the preset's own, frames)
FAST = {
    "yolox": ("yolox_nano_coco_416.onnx", CCTV, "yolox", None, 4),
    "yunet": ("yunet_face_dynamic.onnx", OVERHEAD, "yunet", (192, 320), 6),
    "mtcnn": ("mtcnn_pnet_dynamic.onnx", OVERHEAD, "mtcnn", (180, 320), 10),
}
FULL = {
    "yolox": ("yolox_nano_coco_416.onnx", CCTV, "yolox", None, 30),
    "yunet": ("yunet_face_dynamic.onnx", OVERHEAD, "yunet", None, 30),  # 1280x736
    "mtcnn": ("mtcnn_pnet_dynamic.onnx", OVERHEAD, "mtcnn", (360, 640), 30),
}


@functools.lru_cache(maxsize=4)
def _frames(shared: Path, video: str, count: int, preset: str, size) -> tuple[np.ndarray, ...]:
    return tuple(video_inputs(shared, video, count, preset, size))


def _shared_differential(shared: Path, config) -> Differential:
    file, video, preset, size, count = config
    frames = list(_frames(shared, video, count, preset, size))
    return Differential(shared / "models" / file, frames, input_shape=frames[0].shape)


@pytest.mark.parametrize("name", sorted(FAST))
def test_shared_model_fast(shared_data, name):
    differential = _shared_differential(shared_data, FAST[name])
    differential.check("delta", f"{name} all-delta")
    differential.check(random_plan(differential.model, seed=1), f"{name} mixed seed 1")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_shared_model_full(shared_data, name):
    differential = _shared_differential(shared_data, FULL[name])
    differential.check("delta", f"{name} all-delta")
    for seed in (1, 2):
        differential.check(random_plan(differential.model, seed=seed), f"{name} mixed seed {seed}")


# -- p > 0 on a static camera, and reset --------------------------------------------------------

# Relative L2 error bound (worst output, worst frame) at p = 0.9 over 20 frames of the static
# CCTV clip, thresholds calibrated on the first 10 frames as `deluceva run` does. The bound
# leaves headroom over what was measured (printed with -s); a filter that loses held-back
# changes keeps growing past it.
P90_BOUND = {"mtcnn": 0.5, "yolox": 0.5}


@pytest.mark.parametrize(
    "name, config",
    [
        ("mtcnn", ("mtcnn_pnet_dynamic.onnx", CCTV, "mtcnn", (240, 320), 20)),
        pytest.param("yolox", ("yolox_nano_coco_416.onnx", CCTV, "yolox", None, 20), marks=pytest.mark.slow),
    ],
)
def test_filtering_error_is_bounded_and_reset_is_exact(shared_data, name, config):
    file, video, preset, size, count = config
    frames = list(_frames(shared_data, video, count + 1, preset, size))
    source = shared_data / "models" / file
    reference = ort_session(source)
    session = Session(source, plan="delta", input_shape=frames[0].shape)
    session.calibrate(frames[:10])
    feed, names = session.model.input_name, session.model.output_names
    errors = []
    for frame in frames[:count]:
        got = session.run(frame, percentage=0.9)
        want = reference.run(names, {feed: frame})
        errors.append(max(relative_error(g, w) for g, w in zip(got, want)))
    print(f"\n{name} p=0.9 max rel L2 per frame: " + " ".join(f"{e:.1e}" for e in errors))
    assert max(errors[1:]) > 0, "p = 0.9 held nothing back: the filter is not exercised"
    assert max(errors) <= P90_BOUND[name]
    # The error must not grow without bound: the last frames are no worse than the bound either,
    # and held-back changes are not lost (the reference is what was propagated).
    session.reset()
    got = session.run(frames[count], percentage=0.9)
    want = reference.run(names, {feed: frames[count]})
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= 1e-6


# -- the architecture graphs that onnx ships ---------------------------------------------------

FAST_LIGHT = {"light_squeezenet", "light_shufflenet", "light_inception_v1"}
LIGHT_MODELS = sorted(p.stem for p in LIGHT.glob("light_*.onnx"))
NO_DELTA = {"Gemm", "LRN", "Flatten", "Reshape"}  # not spatial elementwise/windowed: always dense


def randomise_weights(proto: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """`proto` with every float weight replaced by seeded random values.

    The light models hold their weights as ConstantOfShape nodes (and a few float initializers)
    filled with one constant; a network of constants hides most errors. Conv and Gemm weights get
    He initialisation so activations neither explode nor vanish; BatchNorm gets a scale near 1
    and a positive variance; Mul factors sit near 1; biases and the rest are small.
    """
    rng = np.random.default_rng(seed)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    shape_tensors = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for k, tensor in enumerate(node.input):
            consumers.setdefault(tensor, []).append((node, k))

    def role(name: str):
        for _ in range(4):  # look through Unsqueeze/Reshape to the node that uses the weight
            uses = consumers.get(name, [])
            if not uses:
                return None, 0
            node, k = uses[0]
            if node.op_type in ("Unsqueeze", "Reshape") and k == 0:
                name = node.output[0]
                continue
            return node, k
        return None, 0

    def weight(name: str, shape) -> np.ndarray:
        node, k = role(name)
        op = node.op_type if node is not None else ""
        shape = tuple(int(s) for s in shape)
        normal = rng.standard_normal(shape).astype(np.float32)
        if op == "Conv" and k == 1:
            return normal * np.float32(np.sqrt(2.0 / max(1, int(np.prod(shape[1:])))))
        if op == "Gemm" and k == 1:
            transposed = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return normal * np.float32(np.sqrt(2.0 / max(1, shape[1] if transposed else shape[0])))
        if op == "BatchNormalization" and k == 1:
            return 1 + 0.1 * normal
        if op == "BatchNormalization" and k == 4:
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if op == "Mul":
            return 1 + 0.1 * normal
        return 0.1 * normal

    nodes, weights = [], []
    for node in graph.node:
        fill = [a.t for a in node.attribute if a.name == "value"]
        if (
            node.op_type == "ConstantOfShape"
            and node.input[0] in shape_tensors
            and (not fill or fill[0].data_type == onnx.TensorProto.FLOAT)
        ):
            weights.append(numpy_helper.from_array(weight(node.output[0], shape_tensors[node.input[0]]), node.output[0]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(weight(init.name, init.dims), init.name))
    graph.initializer.extend(weights)
    used = {t for n in graph.node for t in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    names = {i.name for i in kept}
    inputs = [i for i in graph.input if i.name not in names and i.name in used]
    if model.ir_version < 4:  # IR 3 wants every initializer listed as a graph input as well
        inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in kept]
    del graph.input[:]
    graph.input.extend(inputs)
    # Softmax saturates with random weights and would hide errors: expose its input as well.
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for node in graph.node:
        if node.op_type == "Softmax" and node.input[0] not in {o.name for o in graph.output}:
            graph.output.append(inferred[node.input[0]])
    onnx.checker.check_model(model)
    return model


def sparse_frames(shape, count: int, seed: int, patches: int = 2) -> list[np.ndarray]:
    """A random first frame, then each frame changes a few small random squares."""
    rng = np.random.default_rng(seed)
    frame = rng.standard_normal(shape).astype(np.float32)
    frames = [frame.copy()]
    _, channels, height, width = shape
    for _ in range(count - 1):
        for _ in range(patches):
            side = int(rng.integers(2, max(3, min(height, width) // 8)))
            y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            frame[:, :, y : y + side, x : x + side] += rng.standard_normal((1, channels, side, side)).astype(np.float32)
        frames.append(frame.copy())
    return frames


def _light(stem: str):
    marks = () if stem in FAST_LIGHT else (pytest.mark.slow,)
    return pytest.param(stem, marks=marks, id=stem)


@pytest.mark.parametrize("stem", [_light(s) for s in LIGHT_MODELS])
def test_onnx_architecture_graph(stem):
    proto = randomise_weights(onnx.load(str(LIGHT / f"{stem}.onnx")), seed=0)
    differential = Differential(proto, sparse_frames(_image_shape(proto), 3, seed=1), measured_bound=False)
    session = differential.check("delta", f"{stem} all-delta")
    for name, data in session.graph.nodes(data=True):
        if data["op_type"] in NO_DELTA:
            assert data["variant"] == "dense", name
            assert data["reason"] and data["reason"] != "requested", name
        if data["variant"] == "dense":
            assert data["reason"] == data["delta_reason"], f"{name} dense without its reason"
    differential.check(random_plan(differential.model, seed=3), f"{stem} mixed seed 3")


def _image_shape(proto: onnx.ModelProto) -> tuple[int, ...]:
    weights = {i.name for i in proto.graph.initializer}
    image = next(i for i in proto.graph.input if i.name not in weights)
    return tuple(d.dim_value for d in image.type.tensor_type.shape.dim)


# -- an operator with no delta variant in the middle -------------------------------------------


def _model_with_undeltable_ops() -> onnx.ModelProto:
    """Conv -> LRN -> Conv -> InstanceNormalization -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(5)

    def const(name, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = rng.standard_normal(shape).astype(np.float32) * np.float32(scale or np.sqrt(2.0 / fan_in))
        return numpy_helper.from_array(value, name)

    inits = [
        const("w1", 8, 3, 3, 3), const("w2", 8, 8, 3, 3), const("w3", 16, 8, 1, 1),
        const("s", 8, scale=0.1), const("b", 8, scale=0.1), const("fc", 10, 16), const("fcb", 10, scale=0.1),
    ]
    inits[3].CopyFrom(numpy_helper.from_array(1 + numpy_helper.to_array(inits[3]), "s"))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("LRN", ["c1"], ["l1"], size=3, name="lrn"),
        helper.make_node("Conv", ["l1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("InstanceNormalization", ["c2", "s", "b"], ["n2"], name="instnorm"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes, "undeltable",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 37, 45])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10]),
         helper.make_tensor_value_info("c3", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_operator_without_delta_variant_runs_dense_with_reason():
    proto = _model_with_undeltable_ops()
    differential = Differential(proto, sparse_frames((1, 3, 37, 45), 6, seed=2), measured_bound=False)
    session = differential.check("delta", "undeltable all-delta")
    nodes = {data["op_type"]: (name, data) for name, data in session.graph.nodes(data=True)}
    for op_type in ("LRN", "InstanceNormalization", "Gemm", "Flatten"):
        name, data = nodes[op_type]
        assert data["variant"] == "dense"
        assert session.plan.variants[name] == "dense"
        assert op_type in session.plan.reasons[name], session.plan.reasons[name]
        assert f"{name}: dense (" in session.explain()
        assert op_type in session.explain()
    assert session.plan.variants[nodes["Conv"][0]] == "delta"  # the convs around them do run as delta
    differential.check(random_plan(differential.model, seed=4), "undeltable mixed seed 4")
