"""A Conv and its elementwise epilogue (activation, SiLU's x * sigmoid(x), bias...) as one delta step.

Run node by node, a Conv -> Sigmoid -> Mul chain costs three Python steps, three filters and
two numpy passes over cached tiles per frame; fused, it costs one. The fused step recomputes
instead of propagating: it keeps the Conv's current input in a padded buffer, adds the input's
change to it, and runs the Conv and its epilogue in one onnxruntime session over the patches
under the affected output tiles. The output's change is the new value less the cached one, so
the result is exact however nonlinear the epilogue is.

`deluceva.planner.mark_fusion` finds the groups; a group runs fused only when all of its nodes
run delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from deluceva.operators._common import Delta, DeltaOperator, OpSpec, TiledBuffer, take_tiles
from deluceva.operators._kernels import (
    dilate_tiles,
    exchange_tiles,
    gather_patches,
    gather_patches_in_row,
    scatter_add_tiles,
)
from deluceva.operators._ort import session_options
from deluceva.operators.conv import ConvWindows

__all__ = ["EpilogueNode", "FusedConv", "EPILOGUE_OP_TYPES"]

# Elementwise op types that may follow a Conv inside a fused step.
EPILOGUE_OP_TYPES = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Softplus", "Softsign", "Abs", "Neg", "Add", "Sub", "Mul", "Div",
})

_DEFAULT_OPSET = 17


@dataclass
class EpilogueNode:
    """One epilogue node: its spec and the tensor names it reads and writes."""

    spec: OpSpec
    inputs: list[str]
    outputs: list[str]


def _fused_session(conv: OpSpec, conv_output: str, epilogue: list[EpilogueNode], exit_tensor: str, attrs: dict):
    """A session patch -> epilogue(Conv(patch)) with VALID padding and a dynamic batch."""
    in_channels = conv.input_grids[0].channels
    patch = helper.make_tensor_value_info("patch", TensorProto.FLOAT, ["n", in_channels, "h", "w"])
    result = helper.make_tensor_value_info(exit_tensor, TensorProto.FLOAT, None)
    initializers = [numpy_helper.from_array(np.asarray(conv.constants[1], np.float32), "weight")]
    conv_inputs = ["patch", "weight"]
    if 2 in conv.constants:
        initializers.append(numpy_helper.from_array(np.asarray(conv.constants[2], np.float32), "bias"))
        conv_inputs.append("bias")
    nodes = [helper.make_node("Conv", conv_inputs, [conv_output], **attrs)]
    seen = set()
    for node in epilogue:
        for i, tensor in enumerate(node.inputs):
            if i in node.spec.constants and tensor not in seen:
                seen.add(tensor)
                initializers.append(numpy_helper.from_array(np.asarray(node.spec.constants[i]), tensor))
        nodes.append(helper.make_node(node.spec.op_type, node.inputs, node.outputs, **node.spec.attrs))
    graph = helper.make_graph(nodes, "fused", [patch], [result], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", conv.opset or _DEFAULT_OPSET)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), session_options(conv.threads),
                                   providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"patch": np.ascontiguousarray(batch, np.float32)})[0]

    return run


def _inverse_ranges(lo: np.ndarray, hi: np.ndarray, in_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """For each input tile along an axis, the first and last output tile whose window reads it."""
    ranges = np.arange(in_tiles)
    first = np.searchsorted(hi, ranges, side="left")
    last = np.searchsorted(lo, ranges, side="right") - 1
    return first.astype(np.int64), last.astype(np.int64)


class FusedConv(DeltaOperator):
    """Conv (2-D, constant weights) followed by `epilogue`, producing `exit_tensor`.

    Args:
        spec: the Conv's spec (its checks are DeltaConv's).
        conv_output: the Conv's output tensor, which only the epilogue reads.
        epilogue: the elementwise nodes after the Conv, in topological order.
        exit_tensor: the one tensor of the group that anything outside it reads.

    The patches go to onnxruntime in one of two layouts. Where an output tile is one position
    (deep layers) or the Conv is pointwise, the patches sit side by side in one image and a
    Conv whose horizontal stride is the patch width computes exactly one tile per patch: one
    large GEMM instead of thousands of tiny ones, which onnxruntime runs several times slower.
    Otherwise they form a batch (N, C, ph, pw).
    """

    op_type = "Conv"

    def __init__(self, spec: OpSpec, conv_output: str, epilogue: list[EpilogueNode], exit_tensor: str):
        super().__init__(spec)
        self.in_grid, self.out_grid = spec.input_grids[0], spec.output_grids[0]
        window = ConvWindows(spec)
        self.patch = window.patch
        # The Conv's current input; its zero border stands for the Conv's own zero padding.
        self.state = TiledBuffer(self.in_grid, window.buffer_pad)
        to = self.out_grid.tile
        self.steps = (to * window.strides[0], to * window.strides[1])  # buffer offset between patches
        # Past this many output tiles, one call over the whole buffer reads less than the patches.
        self.dense_from = self.state.data[0].size // (self.patch[0] * self.patch[1])
        self.reach = (*_inverse_ranges(*window.rows, self.in_grid.tiles_h),
                      *_inverse_ranges(*window.cols, self.in_grid.tiles_w))
        self.mask = np.zeros((self.out_grid.tiles_h, self.out_grid.tiles_w), np.uint8)
        kh, kw = spec.constants[1].shape[2:]
        self.pointwise = ((kh, kw) == (1, 1) and window.strides == (1, 1) and window.pads == (0, 0, 0, 0)
                          and self.in_grid.tile == to)
        attrs = {"strides": list(window.strides), "dilations": list(window.dilations), "group": window.group}
        self.session = _fused_session(spec, conv_output, epilogue, exit_tensor, attrs)
        self.in_row = self.pointwise or to == 1
        self.row_session = self.session
        if self.in_row and not self.pointwise:
            # One output position per patch: a horizontal stride of one patch width.
            self.row_session = _fused_session(spec, conv_output, epilogue, exit_tensor,
                                              {**attrs, "strides": [window.strides[0], self.patch[1]]})
        self.cache: np.ndarray | None = None  # (n_tiles, C, t, t): the exit tensor's value

    def reset(self, inputs, outputs) -> None:
        self.state.load(inputs[0])
        self.cache = self.out_grid.tile_dense(outputs[0])

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        if len(change.index) == 0:
            return [Delta.empty(self.out_grid)]
        state, grid = self.state, self.out_grid
        scatter_add_tiles(state.data, state.top, state.left, self.in_grid.tile, self.in_grid.tiles_w,
                          change.index, np.ascontiguousarray(change.values))
        if self.pointwise:
            index = change.index
        else:
            index = dilate_tiles(change.index, self.in_grid.tiles_w, *self.reach, self.mask)
        channels = state.data.shape[0]
        ph, pw = self.patch
        if len(index) > self.dense_from:
            new = take_tiles(self.session(state.data[None])[0], grid, index)
        elif self.in_row:
            row = np.empty((1, channels, ph, len(index) * pw), np.float32)
            gather_patches_in_row(state.data, *self.steps, index, grid.tiles_w, ph, pw, row[0])
            result = self.row_session(row)[0]  # (C_out, t, n * t)
            t = grid.tile
            new = result.reshape(result.shape[0], t, len(index), t).transpose(2, 0, 1, 3)
        else:
            batch = np.empty((len(index), channels, ph, pw), np.float32)
            gather_patches(state.data, *self.steps, index, grid.tiles_w, batch)
            new = self.session(batch)
        out = np.empty((len(index), grid.channels, grid.tile, grid.tile), np.float32)
        exchange_tiles(self.cache, index, new, out)
        return [Delta(grid, index, grid.zero_phantom(index, out))]
