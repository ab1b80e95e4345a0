"""A delta Conv's two forms and its one-pass finish.

- `finish_rows` (bias, one activation, the filter, a row at a time) against float64
  references, NaN and infinities included, and against `emit_rows`' filter decisions;
- every epilogue `finish_rows` takes, and one it leaves to the program, end to end against
  onnxruntime, with each step forced into its delta kernels and into its dense form;
- the dense form (onnxruntime on the channels-last state) at p > 0 agrees with the kernels, reads
  Concat parts sliced out of a wider storage, and is chosen on frames that changed much.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_end_to_end import Differential, sparse_frames

from deluceva import Session
from deluceva.operators._kernels import FINISH_KINDS, emit_rows, finish_rows

OPSET = 14
SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 90.0, -90.0]


def reference(kind: str, z: np.ndarray, alpha: float, beta: float, slopes: np.ndarray) -> np.ndarray:
    """The activation in float64."""
    x = z.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if kind == "none":
            return x
        if kind in ("SiLU", "Sigmoid"):
            sigmoid = 1 / (1 + np.exp(-np.clip(x, -87, 87)))
            return np.where(np.isnan(x), x, x * sigmoid if kind == "SiLU" else sigmoid)
        if kind == "Relu":
            return np.where(np.isnan(x), x, np.maximum(x, 0))
        if kind == "LeakyRelu":
            return np.where(x >= 0, x, x * alpha)
        if kind == "Clip":
            return np.where(np.isnan(x), x, np.clip(x, alpha, beta))
        if kind == "HardSwish":
            return np.where(np.isnan(x), x, x * np.clip(x / 6 + 0.5, 0, 1))
        if kind == "PRelu":
            return np.where(x >= 0, x, x * slopes)
    raise AssertionError(kind)


@pytest.mark.parametrize("channels", [1, 5, 64])
@pytest.mark.parametrize("kind", list(FINISH_KINDS))
def test_finish_rows_matches_float64(kind, channels):
    rng = np.random.default_rng(channels)
    n = 71
    z = (rng.standard_normal((n, channels)) * 8).astype(np.float32)
    z.reshape(-1)[rng.choice(z.size, min(z.size, 40), replace=False)] = rng.choice(SPECIAL, min(z.size, 40))
    bias = rng.standard_normal(channels).astype(np.float32)
    slopes = rng.uniform(0, 1, channels).astype(np.float32)
    alpha, beta = np.float32(-0.5), np.float32(0.7)
    if kind == "LeakyRelu":
        alpha = np.float32(0.1)
    positions = np.sort(rng.choice(3 * n, n, replace=False)).astype(np.int64)
    value = np.zeros((3 * n + 1, channels), np.float32)
    changed = np.zeros(3 * n, np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        want = reference(kind, z.astype(np.float64) + bias, float(alpha), float(beta), slopes)
    count = finish_rows(z.copy(), n, bias, FINISH_KINDS[kind], alpha, beta, slopes, positions, 0, value, 0,
                        np.float32(0), changed, 0)
    got = value[positions]
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), "NaN where onnxruntime has one, and only there"
    infinite = np.isinf(want)
    assert np.array_equal(got[infinite], want[infinite])
    finite = ~nan & ~infinite
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-6)
    # At threshold 0 every row that differs from the zero seen value is emitted, in order.
    emitted = positions[np.any(got != 0, axis=1) | np.any(np.isnan(got), axis=1)]
    assert changed[:count].tolist() == emitted.tolist()


@pytest.mark.parametrize("threshold", [0.0, 0.5, 3.0])
def test_finish_rows_filters_as_emit_rows_does(threshold):
    rng = np.random.default_rng(7)
    n, channels = 96, 6
    z = rng.standard_normal((n, channels)).astype(np.float32)
    bias = np.zeros(channels, np.float32)
    positions = np.arange(n, dtype=np.int64) * 2
    seen = (z + rng.standard_normal(z.shape).astype(np.float32) * rng.choice([0, 0.1, 2], (n, 1))).astype(np.float32)
    seen[5, 2] = np.nan  # a NaN seen before, now a number: a NaN change, which passes
    value_a = np.zeros((2 * n + 1, channels), np.float32)
    value_a[positions] = seen
    value_b, changed_a, changed_b = value_a.copy(), np.zeros(2 * n, np.int64), np.zeros(2 * n, np.int64)
    count_a = finish_rows(z.copy(), n, bias, FINISH_KINDS["none"], np.float32(0), np.float32(0), bias, positions, 0,
                          value_a, 0, np.float32(threshold), changed_a, 0)
    count_b = emit_rows(z.copy(), positions, 0, n, value_b, 0, np.float32(threshold), changed_b, 0)
    assert 0 < count_a < n or threshold == 0
    assert changed_a[:count_a].tolist() == changed_b[:count_b].tolist()
    np.testing.assert_array_equal(value_a, value_b)


def _conv_model(epilogue: str, channels: int = 6, size: tuple[int, int] = (15, 13), stride: int = 1):
    """x -> Conv 3x3 -> `epilogue` -> y."""
    rng = np.random.default_rng(3)
    h, w = size
    inits = [numpy_helper.from_array((rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv",
                              strides=[stride, stride])]
    if epilogue == "SiLU":
        nodes += [helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"), helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    elif epilogue in ("PRelu", "PRelu-spatial"):
        shape = (channels, 1, 1) if epilogue == "PRelu" else (channels, -(-h // stride), -(-w // stride))
        inits.append(numpy_helper.from_array(rng.uniform(0, 0.5, shape).astype(np.float32), "slope"))
        nodes.append(helper.make_node("PRelu", ["c", "slope"], ["y"], name="prelu"))
    elif epilogue == "Clip":
        inits += [numpy_helper.from_array(np.array(-0.5, np.float32), "low"), numpy_helper.from_array(np.array(0.8, np.float32), "high")]
        nodes.append(helper.make_node("Clip", ["c", "low", "high"], ["y"], name="clip"))
    elif epilogue == "Add+Relu":  # two instructions: the program runs, not finish_rows
        inits.append(numpy_helper.from_array(np.array(0.25, np.float32), "shift"))
        nodes += [helper.make_node("Add", ["c", "shift"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["y"], name="relu")]
    elif epilogue == "none":
        nodes[0].output[0] = "y"
    else:
        attrs = {"alpha": 0.1} if epilogue == "LeakyRelu" else {}
        nodes.append(helper.make_node(epilogue, ["c"], ["y"], name=epilogue.lower(), **attrs))
    graph = helper.make_graph(nodes, "conv_epilogue", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


# The epilogue each model's Conv gets from `finish_rows`, or None where its program runs (loading
# rewrites HardSwish as HardSigmoid and Mul: two instructions).
EPILOGUES = {"none": "none", "SiLU": "SiLU", "Sigmoid": "Sigmoid", "Relu": "Relu", "LeakyRelu": "LeakyRelu",
             "Clip": "Clip", "HardSwish": None, "PRelu": "PRelu", "PRelu-spatial": None, "Add+Relu": None}


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_conv_epilogues_in_both_forms_match_onnxruntime(epilogue):
    model = _conv_model(epilogue)
    frames = sparse_frames((1, 3, 15, 13), 6, seed=len(epilogue))
    frames[3] = frames[3] * np.float32(40)  # saturating values: exp's clamps, Clip's bounds
    differential = Differential(model, frames, measured_bound=False)
    for forms in ("never", "always"):
        session = differential.check("delta", f"conv + {epilogue}, {forms}", dense_forms=forms)
        operator = session.executor._operators["conv"]
        expected = EPILOGUES[epilogue]
        assert operator.finish == (FINISH_KINDS[expected] if expected else -1)
        counts = session.executor.forms.as_dict()
        if forms == "always":
            assert counts["delta[conv]"]["dense"] > 0 and counts["delta[conv]"]["delta"] == 0
        else:
            assert counts == {}  # no dense form was even built


def _concat_model():
    """Two Convs written into a Concat's storage, each read again by a Conv: dense forms that
    write a part of a wider storage and read one through a Slice."""
    rng = np.random.default_rng(5)

    def weight(name, m, c):
        return numpy_helper.from_array((rng.standard_normal((m, c, 3, 3)) * 0.3).astype(np.float32), name)

    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_a", **conv),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b", **conv),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="concat"),
             helper.make_node("Conv", ["b", "w3"], ["d"], name="conv_d", **conv),
             helper.make_node("Conv", ["c", "w4"], ["e"], name="conv_e", **conv)]
    outputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("d", "e")]
    graph = helper.make_graph(nodes, "concat_parts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 10])],
                              outputs, [weight("w1", 4, 3), weight("w2", 5, 3), weight("w3", 2, 5), weight("w4", 3, 9)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def test_dense_forms_read_and_write_concat_parts():
    differential = Differential(_concat_model(), sparse_frames((1, 3, 12, 10), 6, seed=2), measured_bound=False)
    session = differential.check("delta", "concat parts, dense forms", dense_forms="always")
    tensors = session.executor.tensors
    assert tensors["b"].offset == 4 and tensors["b"].storage is tensors["c"].storage  # b lives inside c


def _chain_model(size: tuple[int, int]):
    """Conv + SiLU, then a second Conv: the first one's output is filtered at p > 0 (the model's
    outputs are not)."""
    model = _conv_model("SiLU", channels=8, size=size, stride=2)  # a stem, which has a dense form
    rng = np.random.default_rng(11)
    graph = model.graph
    graph.node.append(helper.make_node("Conv", ["y", "w2"], ["z"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv2"))
    graph.initializer.append(numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32), "w2"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    return model


def test_dense_form_agrees_with_the_kernels_above_p_zero():
    model = _chain_model((24, 20))
    frames = sparse_frames((1, 3, 24, 20), 14, seed=9, patches=4)
    sessions = {forms: Session(model, plan="delta", dense_forms=forms) for forms in ("never", "always")}
    for session in sessions.values():
        session.calibrate(frames[:6])
    held_back = False
    for frame in frames:
        kernels = sessions["never"].run(frame, percentage=0.6)[0]
        dense = sessions["always"].run(frame, percentage=0.6)[0]
        np.testing.assert_allclose(dense, kernels, rtol=1e-4, atol=1e-4)
        exact = sessions["never"].reference(frame)[0]
        held_back |= not np.allclose(kernels, exact, atol=1e-4)
    assert held_back, "p = 0.6 held nothing back: the filter of the dense form is not exercised"


def test_the_dense_form_runs_on_frames_that_changed_much():
    model = _conv_model("SiLU", channels=8, size=(64, 64), stride=2)  # a stem: it has a dense form
    rng = np.random.default_rng(0)
    first = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    session = Session(model, plan="delta")
    session.run(first)
    little = first.copy()
    for index in range(6):
        little[:, :, index, :4] += 1  # a few positions change
        session.run(little)
    counts = session.executor.forms.as_dict()["delta[conv]"]
    assert counts == {"delta": 6, "dense": 0}
    for index in range(4):
        session.run(rng.standard_normal(first.shape).astype(np.float32))  # every position changes
    counts = session.executor.forms.as_dict()["delta[conv]"]
    assert counts == {"delta": 6, "dense": 4}


@pytest.mark.parametrize("weight, attrs, share", [
    ((64, 64, 1, 1), {}, None),                               # pointwise: the kernels always
    ((64, 1, 3, 3), {"group": 64}, None),                     # depthwise, many channels
    ((16, 1, 3, 3), {"group": 16}, 0.6),                      # depthwise, few
    ((64, 32, 3, 3), {}, None),
    ((16, 3, 3, 3), {"strides": [2, 2]}, 0.15),               # a stem reading the image
    ((10, 3, 3, 3), {}, None),                                # ... at stride 1
])
def test_break_even_share_by_kind_of_layer(weight, attrs, share):
    from deluceva.operators._common import OpSpec
    from deluceva.runtime.dense_form import break_even_share

    spec = OpSpec("conv", "Conv", attrs, [(1, weight[1] * attrs.get("group", 1), 8, 8), weight], [(1, weight[0], 8, 8)],
                  constants={1: np.zeros(weight, np.float32)})
    assert break_even_share(spec) == share


def test_runs_of_one_video_are_identical():
    """The form a step runs is decided by its change alone, not by timing: two sessions on the
    same frames give the same bits."""
    model = _chain_model((40, 36))
    rng = np.random.default_rng(4)
    frames = [rng.standard_normal((1, 3, 40, 36)).astype(np.float32)]
    for index in range(8):
        frame = frames[-1].copy()
        share = (0.05, 0.9)[index % 2]
        frame[:, :, : int(40 * share)] += 1
        frames.append(frame)
    outputs = []
    for _ in range(2):
        session = Session(model, plan="delta")
        outputs.append([session.run(frame)[0] for frame in frames])
        forms = session.executor.forms.as_dict()
        assert all(v["dense"] and v["delta"] for v in forms.values()), forms  # both forms ran
    for a, b in zip(*outputs):
        assert np.array_equal(a, b)
