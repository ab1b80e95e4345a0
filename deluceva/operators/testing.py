"""Run one delta operator standalone, without a graph, against onnxruntime on a single-node model.

Used by the per-operator tests and usable by the profiler: `run_operator` builds the node's
OpSpec, resets the operator from dense onnxruntime values on frame 0, then feeds it the changes of
a frame sequence (ToDelta at p = 0) and accumulates its outputs (ToDense).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from deluceva.operators._common import Grid, OpSpec, delta_support, get_operator, tile_size_for
from deluceva.operators._ort import session_options

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


def make_spec(op_type: str, attrs: dict, inputs: list, output_shapes: list, tile: int,
              out_tiles: list[int] | None = None, opset: int = 17) -> OpSpec:
    """The OpSpec of a single node; tiles scale with each tensor's size as in the planner."""
    varying = [item for item in inputs if isinstance(item, tuple)]
    reference = varying[0][2:] if varying else output_shapes[0][2:]

    def grid(shape, explicit=None):
        if shape is None or len(shape) != 4:
            return None
        t = explicit or tile_size_for(shape[2], shape[3], reference, tile)
        return Grid(shape[1], shape[2], shape[3], t)

    constants = {i: np.asarray(item) for i, item in enumerate(inputs) if item is not None and not isinstance(item, tuple)}
    shapes = [tuple(item) if isinstance(item, tuple) else (None if item is None else tuple(np.shape(item))) for item in inputs]
    out_tiles = out_tiles or [None] * len(output_shapes)
    spec = OpSpec(
        name=op_type, op_type=op_type, attrs=dict(attrs), input_shapes=shapes,
        output_shapes=[tuple(s) for s in output_shapes], constants=constants,
        input_grids=[grid(s) if isinstance(item, tuple) else None for s, item in zip(shapes, inputs)],
        output_grids=[grid(s, t) for s, t in zip(output_shapes, out_tiles)], opset=opset,
    )
    return spec


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
    """Relative L2 error, with an absolute floor so all-zero references are handled."""
    diff = np.linalg.norm((actual.astype(np.float64) - expected).ravel())
    return float(diff / max(np.linalg.norm(expected.ravel().astype(np.float64)), 1e-6))


@dataclass
class OperatorRun:
    """What `run_operator` saw: the per-frame errors and output densities."""

    errors: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    reason: str | None = None


def run_operator(op_type: str, attrs: dict, inputs: list, tile: int = 4, frames: int = 6, seed: int = 0,
                 n_outputs: int = 1, opset: int = 17, out_tiles: list[int] | None = None,
                 shared_changes: bool = False, values: list | None = None, positive: bool = False) -> OperatorRun:
    """Delta vs onnxruntime over a sparse-change frame sequence; see the module docstring.

    `inputs` as in `single_node_model`. `shared_changes`: all varying inputs of the same shape
    change at the same places (like x and sigmoid(x)). `values`: explicit frame sequences, one
    list per varying input, instead of random ones. `positive`: keep inputs in [0.5, inf)
    (divisors away from zero).
    """
    from deluceva.runtime.boundaries import ToDelta, ToDense

    rng = np.random.default_rng(seed)
    model = single_node_model(op_type, inputs, attrs, n_outputs, opset)
    session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
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
    spec = make_spec(op_type, attrs, inputs, [o.shape for o in dense[0]], tile, out_tiles, opset)
    result = OperatorRun(reason=delta_support(spec))
    if result.reason is not None:
        return result
    operator = get_operator(op_type)(spec)
    frame0 = [None] * len(inputs)
    for i, seq in zip(varying, values):
        frame0[i] = seq[0]
    operator.reset(frame0, dense[0])
    to_delta = {i: ToDelta(spec.input_grids[i]) for i in varying}
    for i, seq in zip(varying, values):
        to_delta[i].reset(seq[0])
    to_dense = [ToDense(g) for g in spec.output_grids]
    for sink, value in zip(to_dense, dense[0]):
        sink.reset(value)
    for f in range(1, frames):
        deltas = [None] * len(inputs)
        for i, seq in zip(varying, values):
            deltas[i] = to_delta[i](seq[f], 0.0)
        outs = operator.step(deltas)
        assert len(outs) == len(to_dense)
        for sink, change, expected in zip(to_dense, outs, dense[f]):
            assert change.grid == sink.grid, (change.grid, sink.grid)
            assert change.values.shape == (len(change.index), *change.values.shape[1:])
            assert np.all(np.diff(change.index) > 0), "output tile indices must ascend"
            assert np.isfinite(change.values).all(), "non-finite output change"
            phantom = ~sink.grid.phantom_mask()[change.index]
            assert not np.any(np.where(phantom, change.values, 0)), "phantom positions must stay zero"
            sink.apply(change)
            result.errors.append(relative_error(sink.value(), expected))
            result.densities.append(change.density)
    return result
