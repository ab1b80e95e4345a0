"""Delta data movement: nearest Resize and Upsample, SpaceToDepth, DepthToSpace, Gather, Slice, Split.

Each output value of these nodes is a copy of one input value. Which one is found once, by
running onnxruntime's own node on an input whose values are their own flat indices, so every
mode and attribute it accepts maps exactly as it does. A frame then recomputes the output
positions that copy from a changed input position (looked up in the inverse map) and emits them.
"""

from __future__ import annotations

import numba
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from deluceva.operators._common import DeltaOperator, DeltaTensor, OpSpec, register
from deluceva.operators._kernels import collect_marked, emit_rows
from deluceva.onnxruntime_session import inference_session
from deluceva.operators.elementwise import chunk_rows

__all__ = ["DeltaRearrange", "copy_maps", "COPY_OP_TYPES", "EXACT_INDEX_LIMIT"]

COPY_OP_TYPES = ("Resize", "Upsample", "SpaceToDepth", "DepthToSpace", "Gather", "Slice", "Split")

EXACT_INDEX_LIMIT = 1 << 24  # float32 holds every integer below this exactly
_DEFAULT_OPSET = 17


def copy_maps(spec: OpSpec) -> list[np.ndarray] | str:
    """Per output, (H_out * W_out, C_out) int64: the (position, channel) each output value
    copies, as position * C + channel; or the reason the node is not such a copy."""
    if spec.op_type in ("Resize", "Upsample"):
        mode = spec.attrs.get("mode", "nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "nearest":
            return f"{spec.op_type} mode {mode} has no delta kernel (nearest only)"
    layout = spec.input_layouts[0]
    size = layout.channels * layout.positions
    if size >= EXACT_INDEX_LIMIT:
        return f"{spec.op_type} input has {size} values, too many to map exactly"
    names, initializers = [], []
    for i, shape in enumerate(spec.input_shapes):
        if i == 0:
            names.append("x")
        elif i in spec.constants:
            names.append(f"c{i}")
            initializers.append(numpy_helper.from_array(np.asarray(spec.constants[i]), f"c{i}"))
        elif shape is None:
            names.append("")
        else:
            return f"{spec.op_type} input {i} is not constant"
    outputs = [f"y{k}" for k in range(len(spec.output_shapes))]
    node = helper.make_node(spec.op_type, names, outputs, **spec.attrs)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(spec.input_shapes[0]))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset or _DEFAULT_OPSET)])
    model.ir_version = 8
    probe = np.arange(size, dtype=np.float32).reshape(spec.input_shapes[0])
    try:
        session = inference_session(model, 1)
        results = session.run(None, {"x": probe})
    except Exception as error:  # onnxruntime refuses: the node would fail dense too
        return f"{spec.op_type} probe failed: {str(error).splitlines()[0]}"
    maps = []
    for result, expected in zip(results, spec.output_shapes):
        if tuple(result.shape) != tuple(expected):
            return f"{spec.op_type} probe gave shape {result.shape}, not {tuple(expected)}"
        index = result.astype(np.int64)
        if not np.array_equal(index, result) or index.min(initial=0) < 0 or index.max(initial=0) >= size:
            return f"{spec.op_type} does not copy input values"
        channel, position = np.divmod(index[0], layout.positions)  # (C_out, H_out, W_out) each
        flat = position * layout.channels + channel
        maps.append(np.ascontiguousarray(flat.reshape(flat.shape[0], -1).T))
    return maps


def _inverse(source: np.ndarray, in_channels: int, in_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, targets): the output positions reading input position p are
    targets[starts[p]:starts[p + 1]]."""
    out_positions = np.repeat(np.arange(source.shape[0], dtype=np.int64), source.shape[1])
    pairs = np.unique(np.stack([source.reshape(-1) // in_channels, out_positions], axis=1), axis=0)
    starts = np.searchsorted(pairs[:, 0], np.arange(in_positions + 1)).astype(np.int64)
    return starts, np.ascontiguousarray(pairs[:, 1])


def _lookups(spec: OpSpec, epilogue, x: DeltaTensor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per output: (starts, targets) of the output positions each input position is copied to,
    and the flat index into x's storage each output value copies."""
    maps = copy_maps(spec)
    for node in epilogue:
        after = copy_maps(node.spec)
        if isinstance(maps, str) or isinstance(after, str):
            maps = after if isinstance(after, str) else maps
            break
        # The next copy indexes the previous one's output, channels-last: look those up.
        maps = [maps[0].reshape(-1)[m] for m in after]
    if isinstance(maps, str):
        raise ValueError(f"{spec.name}: {maps}")
    width = x.storage.shape[1]
    lookups = []
    for source in maps:
        starts, targets = _inverse(source, x.layout.channels, x.layout.positions)
        position, channel = np.divmod(source, x.layout.channels)
        flat = (position * width + x.offset + channel).astype(np.uint64)  # unsigned: no wraparound checks
        lookups.append((starts, targets, flat))
    return lookups


@numba.njit(cache=True, nogil=True, error_model="numpy")
def rearrange_step(x, in_changed, in_count, starts, targets, source, out_value, out_offset, out_changed, out_count,
                   threshold, mark, found, rows) -> None:
    """Recompute the output positions that copy from a changed input position; emit."""
    n = 0
    for j in range(in_count[0]):
        p = in_changed[j]
        for t in range(starts[p], starts[p + 1]):
            q = targets[t]
            if mark[q] == 0:
                mark[q] = 1
                found[n] = q
                n += 1
    collect_marked(mark, found, n)
    chunk = rows.shape[0]
    channels = rows.shape[1]
    emitted = 0
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        for j in range(size):
            q = found[start + j]
            for c in range(channels):
                rows[j, c] = x[source[q, c]]
        emitted = emit_rows(rows, found, start, size, out_value, out_offset, threshold[0], out_changed, emitted)
    out_count[0] = emitted


@register(*COPY_OP_TYPES)
class DeltaRearrange(DeltaOperator):
    """A copy node, or a chain of them (`epilogue`: each reads the previous one's only output),
    whose maps compose into one."""

    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if spec.varying != [0]:
            return f"{spec.op_type} reads a varying tensor beside its data input"
        found = copy_maps(spec)
        return found if isinstance(found, str) else None

    def __init__(self, spec: OpSpec, inputs: list[DeltaTensor | None], outputs: list[DeltaTensor],
                 epilogue: list = (), head_output: str | None = None, result: str | None = None, buffers=None):
        super().__init__(spec, inputs, outputs, buffers)
        x = inputs[0]
        key = ("copy maps", spec.name, tuple(n.spec.name for n in epilogue), x.storage.shape[1], x.offset)
        lookups = self.buffers.shared(key, lambda: _lookups(spec, epilogue, x))
        # Flat indices into x's storage (a view of it: storages are only ever written in place).
        flat = x.storage.reshape(-1)
        for out, (starts, targets, source) in zip(outputs, lookups):
            channels = out.layout.channels
            self.calls.append((rearrange_step, (
                flat, x.changed, x.count, starts, targets, source, out.storage, out.offset, out.changed, out.count,
                out.threshold,
                self.buffers.scratch("mark", (out.layout.positions,), np.uint8),
                self.buffers.scratch("found", (out.layout.positions,), np.int64),
                self.buffers.scratch("rows", (chunk_rows(4 * channels), channels), np.float32),
            )))
