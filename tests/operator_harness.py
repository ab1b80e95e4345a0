"""Run one delta operator standalone, without a graph, against onnxruntime on a single-node model.

Used by the per-operator tests: `run_operator` builds the node's OpSpec and delta tensors, loads
them from dense onnxruntime values on frame 0, then feeds the operator the changes of a frame
sequence (at p = 0) and compares its outputs' seen values with onnxruntime's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from deluceva.operators._common import DeltaTensor, Layout, OpSpec, delta_support, get_operator
from deluceva.onnxruntime_session import inference_session
from deluceva.metrics import rel_l2

__all__ = ["OperatorRun", "single_node_model", "make_spec", "sparse_frames", "run_operator", "relative_error"]


def single_node_model(op_type: str, inputs: list, attrs: dict, n_outputs: int = 1, opset: int = 17):
    """A model with one node. `inputs[i]`: a shape tuple (graph input `x{i}`), an array (an
    initializer `c{i}`) or None (an omitted optional input)."""
    names, graph_inputs, inits = [], [], []
    for i, item in enumerate(inputs):
        if item is None:
            names.append("")
        elif isinstance(item, tuple):
            names.append(f"x{i}")
            graph_inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(item)))
        else:
            names.append(f"c{i}")
            inits.append(numpy_helper.from_array(np.asarray(item), f"c{i}"))
    outputs = [f"y{j}" for j in range(n_outputs)]
    node = helper.make_node(op_type, names, outputs, **attrs)
    infos = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph([node], "single", graph_inputs, infos, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def make_spec(op_type: str, attrs: dict, inputs: list, output_shapes: list, opset: int = 17) -> OpSpec:
    """The OpSpec of a single node; `inputs` as in `single_node_model`."""

    def layout(shape):
        return None if shape is None or len(shape) != 4 else Layout(*shape[1:])

    constants = {i: np.asarray(item) for i, item in enumerate(inputs) if item is not None and not isinstance(item, tuple)}
    shapes = [tuple(item) if isinstance(item, tuple) else (None if item is None else tuple(np.shape(item))) for item in inputs]
    return OpSpec(
        name=op_type, op_type=op_type, attrs=dict(attrs), input_shapes=shapes,
        output_shapes=[tuple(s) for s in output_shapes], constants=constants,
        input_layouts=[layout(s) if isinstance(item, tuple) else None for s, item in zip(shapes, inputs)],
        output_layouts=[layout(s) for s in output_shapes], opset=opset,
    )


def sparse_frames(shape: tuple, frames: int, rng: np.random.Generator, rectangles: int = 3,
                  base: np.ndarray | None = None) -> list[np.ndarray]:
    """`frames` values of a tensor: random, then a few random rectangles change per frame,
    some touching the borders; every third frame nothing changes."""
    x = rng.standard_normal(shape).astype(np.float32) if base is None else base.copy()
    out = [x.copy()]
    h, w = shape[2], shape[3]
    for f in range(1, frames):
        if f % 3 != 0:
            for _ in range(rng.integers(1, rectangles + 1)):
                rh, rw = rng.integers(1, max(2, h // 3) + 1), rng.integers(1, max(2, w // 3) + 1)
                y0 = rng.choice([0, h - rh, rng.integers(0, h - rh + 1)])
                x0 = rng.choice([0, w - rw, rng.integers(0, w - rw + 1)])
                patch = x[:, :, y0 : y0 + rh, x0 : x0 + rw]
                patch += rng.standard_normal(patch.shape).astype(np.float32)
        out.append(x.copy())
    return out


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Relative L2 error: the rel-l2 metric's, for one array."""
    return rel_l2([actual], [expected])


@dataclass
class OperatorRun:
    """What `run_operator` saw: the per-frame errors and output densities."""

    errors: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    reason: str | None = None


def run_operator(op_type: str, attrs: dict, inputs: list, frames: int = 6, seed: int = 0,
                 n_outputs: int = 1, opset: int = 17, shared_changes: bool = False, values: list | None = None,
                 positive: bool = False, offset: int = 0) -> OperatorRun:
    """Delta vs onnxruntime over a sparse-change frame sequence; see the module docstring.

    `inputs` as in `single_node_model`. `shared_changes`: all varying inputs of the same shape
    change at the same places (like x and sigmoid(x)). `values`: explicit frame sequences, one
    list per varying input, instead of random ones. `positive`: keep inputs in [0.5, inf)
    (divisors away from zero). `offset`: each tensor lives at this column of a wider storage
    whose other columns hold noise (as a Concat's inputs do), which the operator must not touch.
    """
    from deluceva.runtime.boundaries import Entry

    rng = np.random.default_rng(seed)
    model = single_node_model(op_type, inputs, attrs, n_outputs, opset)
    session = inference_session(model, 1)
    varying = [i for i, item in enumerate(inputs) if isinstance(item, tuple)]
    if values is None:
        values, first = [], None
        for i in varying:
            seq = sparse_frames(inputs[i], frames, rng)
            if shared_changes and first is not None and inputs[i] == inputs[first[0]]:
                seq = [first[1][0] * 0.5 + 0.25 + (s - first[1][0]) for s in first[1]]  # same change places
            values.append(seq)
            first = first or (i, seq)
        if positive:
            values = [[np.abs(v) + np.float32(0.5) for v in seq] for seq in values]
    dense = [session.run(None, {f"x{i}": seq[f] for i, seq in zip(varying, values)}) for f in range(frames)]
    spec = make_spec(op_type, attrs, inputs, [o.shape for o in dense[0]], opset)
    result = OperatorRun(reason=delta_support(spec))
    if result.reason is not None:
        return result
    sources = [DeltaTensor(spec.input_layouts[i]) if i in varying else None for i in range(len(inputs))]
    sinks = [DeltaTensor(layout) for layout in spec.output_layouts]
    if offset:
        for tensor in [*(s for s in sources if s is not None), *sinks]:
            g = tensor.layout
            storage = rng.standard_normal((g.positions + 1, offset + g.channels + 2)).astype(np.float32)
            storage[-1] = 0.0  # the zero row
            tensor.share_storage(storage, offset)
    noise = [s.storage.copy() for s in sinks]
    operator = get_operator(op_type)(spec, sources, sinks)
    entries = {i: Entry(sources[i]) for i in varying}
    for i, seq in zip(varying, values):
        entries[i].load(seq[0])
    for sink, value in zip(sinks, dense[0]):
        sink.load(value)
    for f in range(1, frames):
        for i, seq in zip(varying, values):
            assert entries[i](seq[f])
        operator.run()
        for sink, expected, before in zip(sinks, dense[f], noise):
            outside = np.ones(sink.storage.shape[1], bool)
            outside[sink.offset: sink.offset + sink.layout.channels] = False
            assert np.array_equal(sink.storage[:, outside], before[:, outside]), "wrote outside its columns"
            assert not sink.storage[-1].any(), "the zero row must stay zero"
            changed = sink.positions()
            assert np.all(np.diff(changed) > 0), "changed positions must ascend"
            assert np.isfinite(sink.value).all(), "non-finite output"
            result.errors.append(relative_error(sink.dense(), expected))
            result.densities.append(sink.density)
    return result
