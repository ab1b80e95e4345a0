"""Generated CNN DAGs, differential against onnxruntime: every frame, every output, p = 0.

Hypothesis builds small random networks (branches, residual adds, concats, squeeze-excite
style broadcast multiplies, pools, upsampling, channel slices and splits, Conv blocks with the
epilogues the planner fuses) with random channel
counts, kernels, strides, dilations, groups and odd spatial sizes, and runs each under the
all-delta plan and a random mixed plan.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_end_to_end import Differential, random_plan, sparse_frames

OPSET = 14  # HardSwish needs 14


class Builder:
    """Grows a random ONNX graph one operator at a time; tensors are tracked with their shapes."""

    def __init__(self, data, channels: int, height: int, width: int, seed: int):
        self.data = data
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.tensors = {"x": (channels, height, width)}
        self.order = ["x"]

    def draw(self, strategy, label: str):
        return self.data.draw(strategy, label=label)

    def name(self, prefix: str) -> str:
        return f"{prefix}{len(self.nodes)}"

    def const(self, value: np.ndarray) -> str:
        name = f"w{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def add(self, op_type: str, inputs: list[str], shape, **attrs) -> str:
        out = self.name("t")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type.lower()}_{len(self.nodes)}", **attrs))
        self.tensors[out] = shape
        self.order.append(out)
        return out

    def pick(self) -> str:
        # Prefer recent tensors so the graph gets deep, but older ones make branches.
        index = self.draw(st.integers(0, len(self.order) - 1), "source")
        return self.order[-1 - index] if self.draw(st.booleans(), "recent") else self.order[index]

    # -- operators ---------------------------------------------------------------------------

    def conv(self, source: str, out_channels: int | None = None, same: bool = False) -> str:
        c, h, w = self.tensors[source]
        kernel = 3 if same else self.draw(st.sampled_from([1, 3, 5, 7]), "kernel")
        stride = 1 if same else self.draw(st.sampled_from([1, 1, 2]), "stride")
        dilation = 1 if same or kernel == 1 else self.draw(st.sampled_from([1, 1, 2]), "dilation")
        span = (kernel - 1) * dilation + 1
        if out_channels is None:
            out_channels = self.draw(st.integers(1, 8), "out_channels")
        groups = 1
        if not same and out_channels == c and c > 1 and self.draw(st.booleans(), "depthwise"):
            groups = c
        attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "dilations": [dilation, dilation], "group": groups}
        padding = "same" if same else self.draw(st.sampled_from(["same", "valid", "SAME_UPPER", "SAME_LOWER", "asym"]), "pads")
        if padding == "same":
            p = span // 2
            attrs["pads"] = [p, p, p, p]
        elif padding == "asym":
            attrs["pads"] = [int(v) for v in self.rng.integers(0, span // 2 + 1, 4)]
        elif padding == "valid":
            attrs["pads"] = [0, 0, 0, 0]
        else:
            attrs["auto_pad"] = padding
            if dilation > 1:  # onnxruntime refuses dilation with auto_pad
                span = kernel
                attrs["dilations"] = [1, 1]
        if padding in ("SAME_UPPER", "SAME_LOWER"):
            oh, ow = -(-h // stride), -(-w // stride)
        else:
            top, left, bottom, right = attrs["pads"]
            oh = (h + top + bottom - span) // stride + 1
            ow = (w + left + right - span) // stride + 1
        if oh < 1 or ow < 1:
            return self.unary(source)
        fan_in = (c // groups) * kernel * kernel
        weight = self.rng.standard_normal((out_channels, c // groups, kernel, kernel)) * np.sqrt(2.0 / fan_in)
        inputs = [source, self.const(weight)]
        if self.draw(st.booleans(), "bias"):
            inputs.append(self.const(0.1 * self.rng.standard_normal(out_channels)))
        return self.add("Conv", inputs, (out_channels, oh, ow), **attrs)

    def unary(self, source: str) -> str:
        op = self.draw(st.sampled_from(["Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "Clip", "PRelu"]), "unary")
        shape = self.tensors[source]
        if op == "Clip":
            return self.add(op, [source, self.const(np.float32(-1.0)), self.const(np.float32(1.5))], shape)
        if op == "PRelu":
            return self.add(op, [source, self.const(0.25 * self.rng.random((shape[0], 1, 1)))], shape)
        if op == "LeakyRelu":
            return self.add(op, [source], shape, alpha=0.1)
        return self.add(op, [source], shape)

    def conv_block(self, source: str) -> str:
        """A Conv and an elementwise epilogue, the groups the planner fuses into one delta step:
        SiLU (x * sigmoid(x)), an activation, or a per-channel scale and shift then an activation."""
        conv = self.conv(source)
        if self.nodes[-1].op_type != "Conv":  # the Conv did not fit and became a unary
            return conv
        shape = self.tensors[conv]
        kind = self.draw(st.sampled_from(["silu", "activation", "affine"]), "epilogue")
        if kind == "silu":
            return self.add("Mul", [conv, self.add("Sigmoid", [conv], shape)], shape)
        if kind == "affine":
            conv = self.scale(conv)
        return self.unary(conv)

    def residual(self, source: str) -> str:
        shape = self.tensors[source]
        others = [t for t in self.order if t != source and self.tensors[t] == shape]
        other = self.draw(st.sampled_from(others), "partner") if others else self.conv(source, shape[0], same=True)
        op = self.draw(st.sampled_from(["Add", "Add", "Sub", "Mul", "Sum"]), "binary")
        return self.add(op, [source, other], shape)

    def excite(self, source: str) -> str:
        """Squeeze-excite: GlobalAveragePool -> 1x1 Conv -> Sigmoid -> Mul, broadcast over H, W."""
        c, h, w = self.tensors[source]
        pooled = self.add("GlobalAveragePool", [source], (c, 1, 1))
        weight = self.rng.standard_normal((c, c, 1, 1)) * np.sqrt(2.0 / c)
        gate = self.add("Sigmoid", [self.add("Conv", [pooled, self.const(weight)], (c, 1, 1))], (c, 1, 1))
        return self.add("Mul", [source, gate], (c, h, w))

    def scale(self, source: str) -> str:
        """Per-channel constant affine: Mul and Add with broadcast (C, 1, 1) constants."""
        c, h, w = self.tensors[source]
        scaled = self.add("Mul", [source, self.const(1 + 0.2 * self.rng.standard_normal((c, 1, 1)))], (c, h, w))
        return self.add("Add", [scaled, self.const(0.1 * self.rng.standard_normal((1, c, 1, 1)))], (c, h, w))

    def concat(self, source: str) -> str:
        c, h, w = self.tensors[source]
        others = [t for t in self.order if t != source and self.tensors[t][1:] == (h, w)]
        other = self.draw(st.sampled_from(others), "partner") if others else self.conv(source, same=True)
        return self.add("Concat", [source, other], (c + self.tensors[other][0], h, w), axis=1)

    def pool(self, source: str) -> str:
        c, h, w = self.tensors[source]
        op = self.draw(st.sampled_from(["MaxPool", "AveragePool"]), "pool")
        kernel = self.draw(st.sampled_from([2, 3]), "pool_kernel")
        stride = self.draw(st.sampled_from([1, 2]), "pool_stride")
        pad = self.draw(st.integers(0, kernel // 2), "pool_pad")
        oh, ow = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
        if oh < 1 or ow < 1:
            return self.unary(source)
        attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": [pad] * 4}
        if op == "AveragePool":
            attrs["count_include_pad"] = self.draw(st.sampled_from([0, 1]), "count_include_pad")
        return self.add(op, [source], (c, oh, ow), **attrs)

    def upsample(self, source: str) -> str:
        c, h, w = self.tensors[source]
        scales = self.const(np.array([1, 1, 2, 2], np.float32))
        return self.add("Resize", [source, "", scales], (c, 2 * h, 2 * w), mode="nearest")

    def channels(self, source: str) -> str:
        """A channel Slice, or a Split whose parts are added back together when they match."""
        c, h, w = self.tensors[source]
        if c < 2:
            return self.unary(source)
        if self.draw(st.booleans(), "slice"):
            start = self.draw(st.integers(0, c - 1), "slice_start")
            end = self.draw(st.integers(start + 1, c), "slice_end")
            names = [self.const(np.array(v, np.int64)) for v in ([start], [end], [1])]
            self.inits[-3:] = [numpy_helper.from_array(np.array(v, np.int64), n)
                               for v, n in zip(([start], [end], [1]), names)]
            return self.add("Slice", [source, *names], (end - start, h, w))
        half = c // 2
        parts = [self.name("s") + "a", self.name("s") + "b"]
        sizes = numpy_helper.from_array(np.array([half, c - half], np.int64), f"w{len(self.inits)}")
        self.inits.append(sizes)
        self.nodes.append(helper.make_node("Split", [source, sizes.name], parts, axis=1, name=f"split_{len(self.nodes)}"))
        for part, size in zip(parts, (half, c - half)):
            self.tensors[part] = (size, h, w)
            self.order.append(part)
        return parts[1]


STEPS = ["conv", "conv", "conv_block", "conv_block", "unary", "residual", "excite", "scale", "concat", "pool",
         "upsample", "channels"]


def build(data) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    channels = data.draw(st.integers(1, 4), label="channels")
    height = data.draw(st.integers(9, 37), label="height")
    width = data.draw(st.integers(9, 37), label="width")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    builder = Builder(data, channels, height, width, seed)
    for _ in range(data.draw(st.integers(2, 12), label="steps")):
        step = data.draw(st.sampled_from(STEPS), label="op")
        source = builder.pick()
        if step == "upsample" and max(builder.tensors[source][1:]) > 40:
            step = "pool"
        getattr(builder, step)(source)
    # Every tensor nobody reads is an output, so no branch is dead (and outputs are several).
    consumed = {t for node in builder.nodes for t in node.input}
    outputs = [t for t in builder.order if t != "x" and t not in consumed]
    graph = helper.make_graph(
        builder.nodes,
        "generated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, height, width])],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, *builder.tensors[t]]) for t in outputs],
        builder.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, (1, channels, height, width)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_generated_dag_matches_onnxruntime(data):
    model, shape = build(data)
    differential = Differential(model, sparse_frames(shape, 4, seed=data.draw(st.integers(0, 999), label="frames")),
                                measured_bound=False)
    differential.check("delta", "generated all-delta")
    # Each step's two forms on their own: the delta kernels however much changed, and the
    # dense forms (onnxruntime on the channels-last state) on frames that changed little.
    differential.check("delta", "generated all-delta, delta kernels only", dense_forms="never")
    differential.check("delta", "generated all-delta, dense forms only", dense_forms="always")
    differential.check(random_plan(differential.model, seed=data.draw(st.integers(0, 999), label="plan")),
                       "generated mixed")


def test_one_tile_tensor_read_by_two_delta_operators():
    """Found by the generator: a (1, C, 1, 1) tensor from a dense GlobalAveragePool, read by two
    delta operators. Its tiling is trivial, so both caches were views of the same keyframe array
    and each change was applied twice."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"], name="gap"),
        helper.make_node("Sigmoid", ["p"], ["s"], name="sigmoid"),
        helper.make_node("Relu", ["p"], ["r"], name="relu"),
        helper.make_node("Mul", ["p", "s"], ["m"], name="mul"),
    ]
    info = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 2, 1, 1]) for t in ("r", "m")]
    graph = helper.make_graph(nodes, "one_tile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 9, 9])], info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    frames = [rng.standard_normal((1, 2, 9, 9)).astype(np.float32)]
    for _ in range(4):
        frames.append(frames[-1] + np.float32(0.5) * rng.standard_normal((1, 2, 9, 9)).astype(np.float32))
    differential = Differential(model, frames, measured_bound=False)
    differential.check({"sigmoid": "delta", "relu": "delta", "mul": "delta"}, "one tile, gap dense")
    differential.check("delta", "one tile, all delta")
