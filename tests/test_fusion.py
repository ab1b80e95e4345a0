"""Conv + elementwise epilogue groups: which the planner fuses, and that fused steps stay exact."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_end_to_end import Differential, sparse_frames

from deluceva.planner import build_dag, build_plan, load_model
from deluceva.planner.choose_variants import choose_variants, frame_cost

OPSET = 14


class Net:
    """A tiny ONNX graph builder for hand-written fusion cases."""

    def __init__(self, channels: int, height: int, width: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape = {"x": (channels, height, width)}

    def const(self, value) -> str:
        name = f"w{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op_type: str, inputs: list[str], shape, name: str | None = None, **attrs) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name or f"{op_type}_{len(self.nodes)}", **attrs))
        self.shape[out] = shape
        return out

    def conv(self, source: str, out_channels: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
             group: int = 1, name: str | None = None) -> str:
        c, h, w = self.shape[source]
        pad = (kernel - 1) * dilation // 2
        oh = (h + 2 * pad - (kernel - 1) * dilation - 1) // stride + 1
        ow = (w + 2 * pad - (kernel - 1) * dilation - 1) // stride + 1
        weight = self.rng.standard_normal((out_channels, c // group, kernel, kernel)) / math.sqrt(c * kernel * kernel / group)
        bias = 0.1 * self.rng.standard_normal(out_channels)
        return self.node("Conv", [source, self.const(weight), self.const(bias)], (out_channels, oh, ow), name=name,
                         kernel_shape=[kernel, kernel], strides=[stride, stride], dilations=[dilation, dilation],
                         pads=[pad] * 4, group=group)

    def silu(self, source: str) -> str:
        shape = self.shape[source]
        return self.node("Mul", [source, self.node("Sigmoid", [source], shape)], shape)

    def model(self, outputs: list[str]):
        c, h, w = self.shape["x"]
        graph = helper.make_graph(
            self.nodes, "fusion", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
            [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, *self.shape[t]]) for t in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


def backbone():
    """Stride 1, 2, 4 and 8 stages (tiles 8 down to 1), SiLU, PReLU, Clip and affine epilogues,
    depthwise, dilated and pointwise convolutions, odd sizes so edge tiles are partial."""
    net = Net(3, 45, 61)
    x = net.silu(net.conv("x", 8, name="stem"))
    x = net.silu(net.conv(x, 8, stride=2, group=8, name="down1"))
    x = net.silu(net.conv(x, 12, kernel=1, name="point1"))
    slope = net.const(0.25 * np.ones((12, 1, 1)))
    x = net.node("PRelu", [net.conv(x, 12, stride=2, name="down2"), slope], None)
    net.shape[x] = net.shape[net.nodes[-1].input[0]]
    y = net.conv(x, 12, dilation=2, name="dilated")
    scaled = net.node("Mul", [y, net.const(1.5 * np.ones((1, 12, 1, 1)))], net.shape[y])
    shifted = net.node("Add", [scaled, net.const(np.float32(0.1))], net.shape[y])
    y = net.node("Clip", [shifted, net.const(np.float32(-1.0)), net.const(np.float32(2.0))], net.shape[y])
    deep = net.silu(net.conv(net.conv(y, 16, stride=2, name="down3"), 16, name="deep"))
    deep = net.silu(net.conv(deep, 16, kernel=1, name="point2"))
    return net.model([deep])


def test_backbone_groups_are_found():
    graph = build_dag(load_model(backbone()))
    groups = {n: d["epilogue"] for n, d in graph.nodes(data=True) if d.get("epilogue")}
    op_types = {n: [graph.nodes[m]["op_type"] for m in members] for n, members in groups.items()}
    assert op_types == {
        "stem": ["Sigmoid", "Mul"], "down1": ["Sigmoid", "Mul"], "point1": ["Sigmoid", "Mul"],
        # Loading folds the constant Mul into the Conv's weights (onnxruntime's basic level).
        "down2": ["PRelu"], "dilated": ["Add", "Clip"], "deep": ["Sigmoid", "Mul"],
        "point2": ["Sigmoid", "Mul"],
    }
    plan = build_plan(graph, "delta")
    fused = {s.node: s.fused for s in plan.steps if s.kind == "delta" and s.fused}
    assert fused == groups
    # down3 has no epilogue (a Conv reads it), so it runs as a plain delta Conv.
    assert any(s.kind == "delta" and s.node == "down3" and not s.fused for s in plan.steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_backbone_matches_onnxruntime(seed):
    frames = sparse_frames((1, 3, 45, 61), 6, seed=seed)
    differential = Differential(backbone(), frames, measured_bound=False)
    differential.check("delta", "fused backbone")
    # A group with one member dense runs unfused; mixing must stay exact too.
    differential.check({"stem": "delta", "down1": "delta", "point1": "delta"}, "part delta")


def test_no_group_when_the_conv_output_is_read_outside():
    net = Net(2, 16, 16)
    conv = net.conv("x", 4, name="conv")
    act = net.node("Relu", [conv], net.shape[conv])
    other = net.node("Add", [conv, act], net.shape[conv])  # reads the Conv's output: that leaves the group...
    graph = build_dag(load_model(net.model([other])))
    # ...unless the Add is absorbed too (it reads only group tensors), leaving one exit.
    assert graph.nodes["conv"]["epilogue"] == ["Relu_1", "Add_2"]
    net = Net(2, 16, 16)
    conv = net.conv("x", 4, name="conv")
    act = net.node("Relu", [conv], net.shape[conv])
    graph = build_dag(load_model(net.model([act, conv])))  # the Conv's output is a model output
    assert graph.nodes["conv"]["epilogue"] is None
    assert graph.nodes["Relu_1"]["fused_into"] is None


def test_group_with_a_spatially_varying_constant_stays_exact():
    """An epilogue constant that varies over space is read per position by the program."""
    net = Net(2, 16, 16)
    conv = net.conv("x", 4, name="conv")
    factor = net.const(np.random.default_rng(3).uniform(0.5, 2.0, (1, 4, 16, 16)))
    varying = net.node("Mul", [net.node("Relu", [conv], net.shape[conv]), factor], net.shape[conv])
    model = net.model([varying])
    graph = build_dag(load_model(model))
    assert graph.nodes["conv"]["epilogue"] == ["Relu_1", "Mul_2"]
    Differential(model, sparse_frames((1, 2, 16, 16), 5, seed=2), measured_bound=False).check("delta", "varying")


def _tied_brute_force(graph) -> float:
    nodes = list(graph.nodes)
    best = math.inf
    for bits in range(2 ** len(nodes)):
        variants = {n: "delta" if bits >> i & 1 else "dense" for i, n in enumerate(nodes)}
        if any(d.get("fused_into") and variants[n] != variants[d["fused_into"]] for n, d in graph.nodes(data=True)):
            continue
        best = min(best, frame_cost(graph, variants))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_min_cut_keeps_groups_together_and_stays_optimal(seed):
    """Random costs on a chain conv -> sigmoid -> mul -> conv2 -> relu with two groups: the cut
    never splits a group, and its cost equals brute force over the assignments that keep them."""
    rng = np.random.default_rng(seed)
    graph = nx.DiGraph(input_name="x", output_names=["r"])
    chain = [("conv", ["x"], ["c"]), ("sigmoid", ["c"], ["s"]), ("mul", ["c", "s"], ["m"]),
             ("conv2", ["m"], ["c2"]), ("relu", ["c2"], ["r"])]
    for name, inputs, outputs in chain:
        graph.add_node(name, inputs=inputs, outputs=outputs, delta_reason=None,
                       cost_dense=float(rng.uniform(0, 2)), cost_delta=float(rng.uniform(0, 2)))
    for a, b in [("conv", "sigmoid"), ("conv", "mul"), ("sigmoid", "mul"), ("mul", "conv2"), ("conv2", "relu")]:
        graph.add_edge(a, b)
    for member, head in [("sigmoid", "conv"), ("mul", "conv"), ("relu", "conv2")]:
        graph.nodes[member]["fused_into"] = head
    graph.nodes["conv"]["epilogue"], graph.nodes["conv2"]["epilogue"] = ["sigmoid", "mul"], ["relu"]
    graph.graph["conversion"] = {t: (float(rng.uniform(0, 1)), float(rng.uniform(0, 1))) for t in "x c s m c2 r".split()}
    graph.graph["segment_ms"] = float(rng.uniform(0, 0.5))
    choose_variants(graph)
    variants = {n: d["variant"] for n, d in graph.nodes(data=True)}
    assert variants["sigmoid"] == variants["mul"] == variants["conv"]
    assert variants["relu"] == variants["conv2"]
    assert frame_cost(graph, variants) == pytest.approx(_tied_brute_force(graph))
    # The reason compares the group's step with the whole group run dense.
    group_dense = sum(graph.nodes[n]["cost_dense"] for n in ("conv", "sigmoid", "mul"))
    assert f"vs dense {group_dense:.3f} ms with its 2-node epilogue" in graph.nodes["conv"]["reason"]
    assert graph.nodes["mul"]["reason"] == f"fused with conv: takes its variant ({variants['conv']})"


# -- A Conv and its epilogue on their own: each kind, against onnxruntime on the whole tensor -------

from deluceva.operators import DeltaTensor, Layout, get_operator  # noqa: E402
from deluceva.operators._kernels import FINISH_KINDS  # noqa: E402
from deluceva.operators.program import ElementwiseNode  # noqa: E402
from operator_harness import make_spec  # noqa: E402
from deluceva.onnxruntime_session import inference_session  # noqa: E402
from deluceva.runtime.boundaries import Entry  # noqa: E402


def _silu_conv_model(weight, bias, attrs):
    c = weight.shape[1] * attrs["group"]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return inference_session(model, 1)


@pytest.mark.parametrize("kernel,stride,dilation,group,changed", [
    (3, 1, 1, 1, 2),    # windows and one product
    (3, 2, 1, 4, 3),    # depthwise, strided
    (5, 1, 2, 1, 1),    # dilated
    (1, 1, 1, 1, 4),    # pointwise: the changed rows themselves
    (3, 1, 1, 2, 5),    # two groups: a product each
    (3, 1, 1, 4, 143),  # every position: the marks are read in order, not sorted
])
def test_conv_with_silu_epilogue(kernel, stride, dilation, group, changed):
    rng = np.random.default_rng(kernel * 100 + stride * 10 + group)
    c, h, w = 4, 13, 11
    pad = (kernel - 1) * dilation // 2
    attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "dilations": [dilation, dilation],
             "pads": [pad] * 4, "group": group}
    weight = rng.standard_normal((4, c // group, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    reference = _silu_conv_model(weight, bias, attrs)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    y = reference.run(None, {"x": x})[0]
    spec = make_spec("Conv", attrs, [(1, c, h, w), weight, bias], [y.shape])
    source, sink = DeltaTensor(Layout(c, h, w)), DeltaTensor(Layout(*y.shape[1:]))
    epilogue = [ElementwiseNode(make_spec("Sigmoid", {}, [y.shape], [y.shape]), ["c"], ["s"]),
                ElementwiseNode(make_spec("Mul", {}, [y.shape, y.shape], [y.shape]), ["c", "s"], ["y"])]
    operator = get_operator("Conv")(spec, [source, None, None], [sink], epilogue=epilogue, head_output="c", result="y")
    assert operator.program.code.tolist() == [[14, 1, 0, 0]]  # the Sigmoid and Mul run as one SiLU
    assert operator.finish == FINISH_KINDS["SiLU"]  # applied in the one pass with the bias and the filter
    entry = Entry(source)
    entry.load(x)
    sink.load(y)
    for _ in range(3):
        x = x.copy()
        where = rng.choice(h * w, min(changed, h * w), replace=False)
        x.reshape(c, -1)[:, where] += rng.standard_normal((c, len(where))).astype(np.float32)
        assert entry(x)
        operator.run()
        np.testing.assert_allclose(sink.dense(), reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_flop_accounting_measures_fused_nodes_by_the_group_output():
    """A fused Conv's own output never exists as a delta: its work is read off the group's exit."""
    from deluceva.playback.loop import frame_flops
    from deluceva.session import Session

    session = Session(backbone(), plan="delta")
    total = sum(d["flops"] for _, d in session.graph.nodes(data=True))
    delta_flops = sum(d["flops"] for _, d in session.graph.nodes(data=True) if d["variant"] == "delta")
    outputs = [s.outputs[0] for s in session.plan.steps if s.kind == "delta"]
    assert frame_flops(session, {t: 0.0 for t in outputs}) == pytest.approx(total - delta_flops)
    assert frame_flops(session, {t: 1.0 for t in outputs}) == pytest.approx(total)


@pytest.mark.parametrize("plan", ["delta", "dense"])
def test_returned_outputs_are_not_changed_by_later_frames(plan):
    """Delta outputs are views of a buffer the next frame updates, so they are copied; dense
    segments' outputs are onnxruntime's own arrays and are returned as they are."""
    from deluceva.session import Session

    frames = sparse_frames((1, 3, 45, 61), 3, seed=5)
    session = Session(backbone(), plan=plan)
    session.run(frames[0])
    second = session.run(frames[1])
    kept = [o.copy() for o in second]
    session.run(frames[2])  # must not write into the arrays frame 1 returned
    for a, b in zip(kept, second):
        np.testing.assert_array_equal(a, b)


# -- Copy chains and copy tails -------------------------------------------------------------------


def _focus_model():
    """YOLOX's stem: SpaceToDepth then a channel Gather, a Conv, and a head laid out by
    Reshape + Transpose + Concat like YOLOX's output (a dense segment that only copies)."""
    net = Net(3, 16, 20)
    s2d = net.node("SpaceToDepth", ["x"], (12, 8, 10), blocksize=2)
    order = np.array([0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11], np.int64)
    net.inits.append(numpy_helper.from_array(order, "order"))
    gathered = net.node("Gather", [s2d, "order"], (12, 8, 10), axis=1)
    a = net.silu(net.conv(gathered, 6, name="stem"))
    b = net.conv(a, 5, kernel=1, name="head")
    shape = net.const(np.array([1, 5, 80], np.float32))
    net.inits[-1] = numpy_helper.from_array(np.array([1, 5, 80], np.int64), net.inits[-1].name)
    flat = net.node("Reshape", [b, shape], (5, 80))
    flat_a = net.node("Reshape", [net.conv(a, 5, kernel=1, name="head2"), shape], (5, 80))
    both = net.node("Concat", [flat, flat_a], (5, 160), axis=2)
    out = net.node("Transpose", [both], (160, 5), perm=[0, 2, 1])
    c, h, w = net.shape["x"]
    graph = helper.make_graph(net.nodes, "focus", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 160, 5])], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def test_copy_chain_is_one_step_and_the_copy_tail_is_exact():

    model = _focus_model()
    graph = build_dag(load_model(model))
    assert graph.nodes["SpaceToDepth_0"]["epilogue"] == ["Gather_1"]
    session = Differential(model, sparse_frames((1, 3, 16, 20), 6, seed=4), measured_bound=False).check("delta", "focus")
    steps = [s.name for s in session.plan.steps]
    assert "delta[SpaceToDepth_0]" in steps and "delta[Gather_1]" not in steps
    tails = [s for s in session.plan.steps if id(s) in session.executor._tails]
    assert [t.nodes for t in tails] == [["Reshape_6", "Reshape_8", "Concat_9", "Transpose_10"]]
    assert not session.executor.mirrors  # the tail reads the delta tensors themselves


def test_copy_tail_feeding_a_delta_step():
    """A Concat run densely as a copy tail, whose output enters a delta Conv."""
    net = Net(2, 12, 12)
    a, b = net.conv("x", 3, name="a"), net.conv("x", 2, name="b")
    both = net.node("Concat", [a, b], (5, 12, 12), axis=1, name="cat")
    out = net.silu(net.conv(both, 4, name="after"))
    model = net.model([out])
    plan = {"a": "delta", "b": "delta", "cat": "dense", "after": "delta", "Sigmoid_4": "delta", "Mul_5": "delta"}
    session = Differential(model, sparse_frames((1, 2, 12, 12), 6, seed=5), measured_bound=False).check(plan, "tail")
    assert [s.nodes for s in session.plan.steps if id(s) in session.executor._tails] == [["cat"]]


def test_every_blas_runs_on_the_session_thread_count():
    """The delta Conv's products go through SciPy's BLAS (numba's np.dot); it must be limited to
    the session's threads like onnxruntime, or the comparison is not at equal threads."""
    from threadpoolctl import threadpool_info

    from deluceva.session import Session

    session = Session(backbone(), plan="delta", threads=1)
    frames = sparse_frames((1, 3, 45, 61), 2, seed=1)
    session.run(frames[0])
    session.run(frames[1])
    blas = [info for info in threadpool_info() if info["user_api"] == "blas"]
    assert any("scipy_openblas-" in info["filepath"] or "scipy" in info["filepath"] for info in blas)
    assert all(info["num_threads"] == 1 for info in blas), blas


def test_dense_segments_are_skipped_when_nothing_they_read_changed():
    """A repeated frame (30% of a static camera's) reruns no dense segment; outputs stay exact."""
    from deluceva.session import Session

    frames = sparse_frames((1, 3, 45, 61), 3, seed=7)
    frames = [frames[0], frames[1], frames[1].copy(), frames[2]]
    graph = build_dag(load_model(backbone()))
    plan = {n: ("dense" if n in ("stem", "Sigmoid_1", "Mul_2") else "delta")
            for n, d in graph.nodes(data=True) if d["delta_reason"] is None}
    session = Session(backbone(), plan=plan)
    segments = session.executor._sessions
    assert len(segments) == 1
    calls = []
    run = segments[0].run
    segments[0].run = lambda *a, **k: calls.append(1) or run(*a, **k)
    reference = Session(backbone(), plan="dense")
    for index, frame in enumerate(frames):
        got = session.run(frame)
        np.testing.assert_allclose(got[0], reference.run(frame)[0], rtol=1e-5, atol=1e-5)
        assert len(calls) == {0: 0, 1: 1, 2: 1, 3: 2}[index], index


def test_plans_sharing_buffers_share_the_sessions_of_their_common_dense_segments():
    """A run's compiled plans cut many of the same dense segments: each is one onnxruntime
    session for all of them (a session per plan kept its memory for the whole run)."""
    from deluceva.operators._buffers import Buffers
    from deluceva.session import Session

    graph = build_dag(load_model(backbone()))
    delta = [n for n, d in graph.nodes(data=True) if d["delta_reason"] is None]
    stem_dense = {n: ("dense" if n in ("stem", "Sigmoid_1", "Mul_2") else "delta") for n in delta}
    buffers = Buffers()
    first = Session(backbone(), plan=stem_dense, buffers=buffers)
    second = Session(backbone(), plan=dict(stem_dense), buffers=buffers)
    apart = Session(backbone(), plan=dict(stem_dense))
    assert len(first.executor._sessions) == 1
    assert second.executor._sessions[0] is first.executor._sessions[0]
    assert apart.executor._sessions[0] is not first.executor._sessions[0]
    frames = sparse_frames((1, 3, 45, 61), 3, seed=3)
    reference = Session(backbone(), plan="dense")
    for session in (first, second):
        session.reset()
        for frame in frames:
            np.testing.assert_allclose(session.run(frame)[0], reference.run(frame)[0], rtol=1e-5, atol=1e-5)


def test_sessions_sharing_buffers_stay_exact_across_plan_switches():
    """Plans of one run share their tensors' state; a switch is a keyframe, so each plan runs
    exactly on state the other left."""
    from deluceva.operators._buffers import Buffers
    from deluceva.session import Session

    buffers = Buffers()
    graph = build_dag(load_model(backbone()))
    capable = [n for n, d in graph.nodes(data=True) if d["delta_reason"] is None]
    half = {n: ("delta" if i % 2 else "dense") for i, n in enumerate(capable)}
    sessions = [Session(backbone(), plan="delta", buffers=buffers), Session(backbone(), plan=half, buffers=buffers)]
    assert sessions[0].executor.tensors["t2"].storage is sessions[1].executor.tensors["t2"].storage
    reference = Session(backbone(), plan="dense")
    frames = sparse_frames((1, 3, 45, 61), 9, seed=11)
    for index, frame in enumerate(frames):
        session = sessions[(index // 3) % 2]  # switch every third frame, with a keyframe
        got = session.run(frame, keyframe=index % 3 == 0)
        np.testing.assert_allclose(got[0], reference.run(frame)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", ["dense", "delta"])
def test_a_frame_whose_change_stays_under_the_threshold_is_skipped(plan):
    """Above p = 0 the frame's change is filtered: a frame that changed only under the frame's
    threshold runs nothing and returns the last outputs; at p = 0 any change runs, exactly."""
    from deluceva.session import Session

    rng = np.random.default_rng(3)
    base = rng.standard_normal((1, 3, 45, 61)).astype(np.float32)
    frames = [base + 0.01 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(6)]
    tiny = frames[5] + 1e-6 * rng.standard_normal(base.shape).astype(np.float32)  # under every threshold
    moved = tiny.copy()
    moved[:, :, 10:20, 10:20] += 3.0
    session = Session(backbone(), plan=plan)
    thresholds = session.calibrate(frames)
    assert thresholds.threshold("x", 0.5) > 1e-5
    exact = Session(backbone(), plan="dense")
    first = session.run(frames[5])  # a keyframe
    held = session.run(tiny, 0.5)
    np.testing.assert_array_equal(held[0], first[0])
    assert all(d == 0.0 for d in session.executor.densities.values())
    got = session.run(moved, 0.5)  # the square passes: the frame runs
    assert not np.array_equal(got[0], held[0])
    np.testing.assert_allclose(got[0], exact.run(moved)[0], rtol=2e-3, atol=2e-3)
    got = session.run(tiny, 0.0)  # p = 0: any change runs, exactly
    np.testing.assert_allclose(got[0], exact.run(tiny)[0], rtol=1e-5, atol=1e-5)
