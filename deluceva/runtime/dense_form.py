"""A delta step's dense form: the step's own nodes run by onnxruntime on every position, reading
and writing the delta tensors' channels-last state in place.

A delta step recomputes only the positions whose inputs changed, but each recomputed position
costs it 1.5-5x what onnxruntime pays for one (gathering windows, marking, the filter's
bookkeeping). On the layers where that cost is highest (few channels: image stems, narrow
depthwise layers), past a share of changed positions (`break_even_share`) computing every
position is cheaper: the executor then runs the step's dense form instead (`either_form`).

The dense form is the step's nodes (a Conv and its fused epilogue) cut out of the model, wrapped in Transpose nodes so that it reads (1, H, W, C) and writes
(1, H', W', M): onnxruntime folds that layout change into the reorders its kernels make anyway
(0.97-1.08x the plain node on 1x1, depthwise and 3x3 layers; `../shared/probes/ort_nhwc.py`).
Inputs and output are bound to the state's own memory (`io_binding`), so nothing is converted
or copied on the way in. On the way out:
- at p = 0 (threshold 0), onnxruntime writes the output's seen value directly (or through one
  copy when the output lives inside a Concat's wider storage) and every position is listed as
  changed: a superset of the exact change, so what follows stays exact;
- at p > 0, the new rows go to scratch and the filter emits those that changed enough, as the
  delta kernels do, so held-back changes keep accumulating.
"""

from __future__ import annotations

import numba
import numpy as np
import onnx
from onnx import helper, numpy_helper

from deluceva.onnxruntime_session import inference_session
from deluceva.operators import DeltaTensor
from deluceva.operators._kernels import emit_rows

__all__ = ["DenseForm", "dense_form_model", "dense_form_session", "either_form", "break_even_share", "FormCounts", "DENSE_FORM_OP_TYPES"]

# Steps that have a dense form: Conv. Elementwise nodes, Add and the copies cost the delta
# kernels less than onnxruntime even with every position changed (a fused Relu + Add: 0.78x);
# pools' onnxruntime kernels work on NCHW (not blocked) data, so the transposes around them are
# real passes (MaxPool 10 ch at 718x1278: 10.9 ms through Transposes, 2.7 ms plain, 7 ms as delta
# at full density).
DENSE_FORM_OP_TYPES = frozenset({"Conv"})
def break_even_share(spec) -> float | None:
    """The share of a Conv's input positions changed from which its dense form is cheaper than
    its delta kernels, or None where it never is.

    Measured in whole models at full density, one thread, the kernels and the dense forms side by
    side on the same frames: a dense form costs 1.3-2x onnxruntime's node there (each is one
    call that converts to and from onnxruntime's blocked layout, which the whole model does once),
    while the kernels cost 1.1-1.5x on most layers (YOLOX-nano all delta: 2.0x onnxruntime with
    the kernels, 2.5x with every Conv's dense form; P-Net 1280x720: 1.3x against 1.5x). They
    lose clearly only on few channels: a stride-2 stem reading the image (3->16 at 1280x736:
    6.9x onnxruntime's node with every position changed) and depthwise layers under 32 channels
    (2.6x at 16 channels). Fixed per layer, not timed while the video plays: timing-based choices
    would make two runs of one video differ in the last float bits.
    """
    weight = spec.constants[1]
    out_channels, group_channels, kh, kw = weight.shape
    groups = int(spec.attrs.get("group", 1))
    strides = tuple(int(v) for v in spec.attrs.get("strides", [1, 1]))
    if group_channels == 1 and groups == out_channels > 1:  # depthwise
        return 0.6 if out_channels < 32 else None
    if group_channels <= 4 and max(strides) >= 2 and (kh, kw) != (1, 1):
        return 0.15
    return None


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _copy_all(rows, value, offset, changed, count) -> None:
    """value[p, offset:offset + M] = rows[p] for every position p, each listed as changed."""
    positions, channels = rows.shape
    base = np.uint64(offset)
    for p in range(positions):
        for c in range(np.uint64(channels)):
            value[p, base + c] = rows[p, c]
        changed[p] = p
    count[0] = positions


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _list_all(changed, count, positions) -> None:
    for p in range(positions):
        changed[p] = p
    count[0] = positions


def dense_form_session(segment: onnx.ModelProto, inputs: list[tuple[str, DeltaTensor, bool]], output: str,
                       out_layout, threads: int):
    """onnxruntime's session on `dense_form_model(...)`, its memory from the shared arena (without
    memory patterns: see `shared_arena_options`)."""
    return inference_session(dense_form_model(segment, inputs, output, out_layout), threads, shared_arena=True,
                             memory_pattern=False)


def dense_form_model(segment: onnx.ModelProto, inputs: list[tuple[str, DeltaTensor, bool]], output: str,
                     out_layout) -> onnx.ModelProto:
    """`segment` (reading the NCHW `inputs`, writing the NCHW `output`) rewritten to write
    (1, H', W', M) and to read each input as its storage's (1, H, W, width) rows, or as it is
    where its third element says the executor keeps a (C, H*W) copy of it (the frame, a tensor
    entering from dense, a mirror), which spares a transpose.

    An input that lives in columns [offset, offset + C) of a wider storage (a Concat's part) is
    sliced inside the graph, so it can still be bound to the storage as it is.
    """
    graph = segment.graph
    nodes, inits, graph_inputs = [], [], []
    for name, tensor, planar in inputs:
        g = tensor.layout
        if planar:
            graph_inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, g.channels, g.height, g.width]))
            continue
        width = tensor.storage.shape[1]
        rows = f"{name}__rows"
        graph_inputs.append(helper.make_tensor_value_info(rows, onnx.TensorProto.FLOAT, [1, g.height, g.width, width]))
        source = rows
        if tensor.offset != 0 or g.channels != width:
            bounds = [f"{name}__{part}" for part in ("starts", "ends", "axes")]
            for part, value in zip(bounds, ([tensor.offset], [tensor.offset + g.channels], [3])):
                inits.append(numpy_helper.from_array(np.asarray(value, np.int64), part))
            source = f"{name}__sliced"
            nodes.append(helper.make_node("Slice", [rows, *bounds], [source]))
        nodes.append(helper.make_node("Transpose", [source], [name], perm=[0, 3, 1, 2]))
    nodes.extend(graph.node)
    result = f"{output}__rows"
    nodes.append(helper.make_node("Transpose", [output], [result], perm=[0, 2, 3, 1]))
    g = out_layout
    outputs = [helper.make_tensor_value_info(result, onnx.TensorProto.FLOAT, [1, g.height, g.width, g.channels])]
    wrapped = helper.make_graph(nodes, "dense_form", graph_inputs, outputs, [*graph.initializer, *inits])
    model = helper.make_model(wrapped, opset_imports=list(segment.opset_import))
    model.ir_version = segment.ir_version
    return model


class DenseForm:
    """One delta step's dense form, bound to its tensors' state (see the module docstring).

    Args:
        session: onnxruntime's session on `dense_form_model(...)` of the step (sessions can be
            shared between the executors of a run's plans; bindings cannot).
        inputs: (DeltaTensor, its (C, H*W) copy or None) for each varying input, in the
            session's input order: the copy, where there is one, is what the session reads.
        out: the step's output DeltaTensor.
        scratch: (P' * M) float32 working rows, for the filter at p > 0 or a Concat's part.
    """

    def __init__(self, session, inputs: list[tuple[DeltaTensor, np.ndarray | None]], out: DeltaTensor,
                 scratch: np.ndarray):
        self.session = session
        self.out = out
        positions, channels = out.layout.positions, out.layout.channels
        self.rows = scratch[: positions * channels].reshape(positions, channels)
        self.direct = out.offset == 0 and out.storage.shape[1] == channels
        self.binding = session.io_binding()
        for (tensor, planar), bound in zip(inputs, session.get_inputs()):
            g = tensor.layout
            # Bound by address: onnxruntime reads the state itself each time, no copy.
            if planar is not None:
                self.binding.bind_input(bound.name, "cpu", 0, np.float32, [1, g.channels, g.height, g.width],
                                        planar.ctypes.data)
            else:
                self.binding.bind_input(bound.name, "cpu", 0, np.float32, [1, g.height, g.width, tensor.storage.shape[1]],
                                        tensor.storage.ctypes.data)
        self._result = session.get_outputs()[0].name
        g = out.layout
        self._shape = [1, g.height, g.width, channels]
        self._exact_target = out.storage if self.direct else self.rows
        self._all = np.arange(positions, dtype=np.int64)
        self._bind_output(self._exact_target)
        self._bound = self._exact_target

    def _bind_output(self, target: np.ndarray) -> None:
        self.binding.bind_output(self._result, "cpu", 0, np.float32, self._shape, target.ctypes.data)

    def run(self) -> None:
        """Every position of the output from the inputs' seen values, then emitted."""
        out = self.out
        threshold = out.threshold[0]
        exact = threshold == 0
        target = self._exact_target if exact else self.rows
        if target is not self._bound:
            self._bind_output(target)
            self._bound = target
        self.session.run_with_iobinding(self.binding)
        positions = out.layout.positions
        if exact:
            if self.direct:
                _list_all(out.changed, out.count, positions)
            else:
                _copy_all(self.rows, out.storage, out.offset, out.changed, out.count)
        else:
            out.count[0] = emit_rows(self.rows, self._all, 0, positions, out.storage, out.offset, threshold,
                                     out.changed, 0)


def either_form(name: str, form: DenseForm, calls: list, counts: list[np.ndarray], limit: int,
                forms: "FormCounts"):
    """One step's call for the frame loop: its dense form on frames where an input has at least
    `limit` changed positions (`break_even_share` of them; 1: whenever anything changed), else
    its delta kernels; the frames run in each form are counted in `forms`."""
    dense_frames, delta_frames = forms.dense, forms.delta
    dense_frames[name] = delta_frames[name] = 0
    run_dense = form.run

    def run_step() -> None:
        for count in counts:
            if count[0] >= limit:
                dense_frames[name] += 1
                run_dense()
                return
        delta_frames[name] += 1
        for kernel, arguments in calls:
            kernel(*arguments)

    return run_step


class FormCounts:
    """How many frames each step ran in its delta form and in its dense form."""

    def __init__(self):
        self.delta: dict[str, int] = {}
        self.dense: dict[str, int] = {}

    def as_dict(self) -> dict[str, dict[str, int]]:
        names = sorted(set(self.delta) | set(self.dense))
        return {name: {"delta": self.delta.get(name, 0), "dense": self.dense.get(name, 0)} for name in names}
