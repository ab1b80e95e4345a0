"""Delta nearest-neighbour Resize and Upsample: every output position copies one input position.

Which one is found once by running onnxruntime's own Resize on an image of position numbers, so
every coordinate_transformation_mode and nearest_mode it accepts maps exactly as it does.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from deluceva.operators._common import Delta, DeltaOperator, OpSpec, TiledBuffer, affected_tiles, register
from deluceva.operators._ort import session_options

__all__ = ["DeltaResize", "nearest_map"]


def nearest_map(spec: OpSpec) -> tuple[np.ndarray, np.ndarray] | str:
    """(rows, cols): the input row of each output row and input column of each output column,
    or the reason the node cannot run as a delta."""
    a = spec.attrs
    if a.get("mode", "nearest") != "nearest":
        return f"{spec.op_type} mode {a.get('mode')} has no delta kernel (nearest only)"
    if a.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        return "Resize tf_crop_and_resize has no delta kernel"
    if "axes" in a or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "Resize with axes or keep_aspect_ratio_policy has no delta kernel"
    _, c, h, w = spec.input_shapes[0]
    names, inits = ["x"], []
    for i in range(1, len(spec.input_shapes)):
        value = spec.constants.get(i)
        if value is None:
            if spec.input_shapes[i] is not None:
                return f"{spec.op_type} input {i} is not constant"
            names.append("")
            continue
        value = np.array(value)
        if value.size == 4:
            # Probe one channel: the channel scale (or size) must leave channels alone.
            if value[0] != 1 or value[1] != (c if value.dtype == np.int64 else 1):
                return f"{spec.op_type} changes the batch or channel axis"
            value[1] = 1
        names.append(f"c{i}")
        inits.append(numpy_helper.from_array(value, f"c{i}"))
    opset = spec.opset or (9 if spec.op_type == "Upsample" else 10 if len(names) == 2 else 13)
    node = helper.make_node(spec.op_type, names, ["y"], **a)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
        probe = session.run(None, {"x": np.arange(h * w, dtype=np.float32).reshape(1, 1, h, w)})[0][0, 0]
    except Exception as error:  # onnxruntime refuses: the node would fail dense too
        return f"{spec.op_type} probe failed: {str(error).splitlines()[0]}"
    index = probe.astype(np.int64)
    rows, cols = index[:, 0] // w, index[0, :] % w
    if probe.shape != tuple(spec.output_shapes[0][2:]) or not np.array_equal(index, rows[:, None] * w + cols[None, :]):
        return f"{spec.op_type} is not a separable nearest-neighbour copy"
    return rows, cols


@register("Resize", "Upsample")
class DeltaResize(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        found = nearest_map(spec)
        return found if isinstance(found, str) else None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        rows, cols = nearest_map(spec)
        self.in_grid, self.grid = gi, go = spec.input_grids[0], spec.output_grids[0]
        ti, to = gi.tile, go.tile
        factor = to // ti
        # Fast path: an integer upsample whose output tiles are the input tiles, enlarged.
        self.repeat = factor if (
            to == factor * ti and (go.tiles_h, go.tiles_w) == (gi.tiles_h, gi.tiles_w)
            and np.array_equal(rows, np.arange(go.height) // factor) and np.array_equal(cols, np.arange(go.width) // factor)
            and (go.height, go.width) == (gi.height * factor, gi.width * factor)
        ) else 0
        if self.repeat:
            return
        # One zero row and column past the buffer stand for the output's phantom positions.
        self.scratch = TiledBuffer(gi, (0, 0, 1, 1))

        def layout(mapping, n_tiles, zero):
            full = np.full(n_tiles * to, zero)
            full[: len(mapping)] = mapping
            real = np.arange(n_tiles * to) < len(mapping)
            blocks, real = full.reshape(n_tiles, to), real.reshape(n_tiles, to)
            lo = np.where(real, blocks, zero).min(axis=1) // ti
            hi = np.where(real, blocks, -1).max(axis=1) // ti
            return blocks, (lo, hi)

        self.rows, self.row_range = layout(rows, go.tiles_h, gi.tiles_h * ti)
        self.cols, self.col_range = layout(cols, go.tiles_w, gi.tiles_w * ti)

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        go = self.grid
        if self.repeat:
            values = np.repeat(np.repeat(change.values, self.repeat, axis=2), self.repeat, axis=3)
            return [Delta(go, change.index, values)]
        if len(change.index) == 0:
            return [Delta.empty(go)]
        self.scratch.assign(change.index, change.values)
        index = affected_tiles(change.mask(), self.row_range, self.col_range)
        oy, ox = np.divmod(index, go.tiles_w)
        out = self.scratch.data[:, self.rows[oy][:, :, None], self.cols[ox][:, None, :]]
        self.scratch.assign(change.index, 0.0)
        return [Delta(go, index, np.ascontiguousarray(out.transpose(1, 0, 2, 3)))]
