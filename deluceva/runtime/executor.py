"""The executor: a small interpreter over the physical plan, one frame at a time.

A keyframe (the first frame, after `reset`, or when asked) runs the whole model in onnxruntime,
returns its outputs exactly and refreshes every cache. Any other frame runs the plan's steps in
order: dense segments in onnxruntime, delta operators on the changes, with conversions at the
boundaries between them.
"""

from __future__ import annotations

import time
from collections import defaultdict
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from threadpoolctl import threadpool_limits

from deluceva.errors import DelucevaError
from deluceva.operators import Delta, get_operator
from deluceva.operators.fused import EpilogueNode, FusedConv
from deluceva.operators._ort import session_options
from deluceva.planner.load_model import Model
from deluceva.planner.physical import DeltaStep, DenseSegment, PhysicalPlan
from deluceva.runtime.boundaries import Filter, ToDelta, ToDense
from deluceva.runtime.thresholds import Thresholds

__all__ = ["Executor", "StepError"]


class StepError(RuntimeError):
    """A step failed while running; the message names the step."""


def _subgraph(model: Model, nodes: list[str], inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The model restricted to `nodes`, reading `inputs` and producing `outputs`."""
    wanted = set(nodes)
    graph_nodes = [n for n in model.onnx.graph.node if n.name in wanted]
    used = {t for n in graph_nodes for t in n.input}
    initializers = [i for i in model.onnx.graph.initializer if i.name in used]

    def info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, model.dtypes.get(name, onnx.TensorProto.FLOAT), model.shapes.get(name))

    graph = helper.make_graph(graph_nodes, "segment", [info(t) for t in inputs], [info(t) for t in outputs], initializers)
    sub = helper.make_model(graph, opset_imports=list(model.onnx.opset_import))
    sub.ir_version = model.onnx.ir_version
    return sub


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = session_options(threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class Executor:
    """Runs a model frame after frame under a physical plan.

    Args:
        model: the loaded model.
        graph: its annotated logical DAG (each node's spec is used to build its operator).
        plan: the physical plan.
        threads: onnxruntime intra-op threads, as a user would give plain onnxruntime.
        profile: record the time of every step (see `step_times`).
    """

    def __init__(self, model: Model, graph, plan: PhysicalPlan, threads: int = 1, profile: bool = False):
        # numpy's BLAS (the pointwise delta Conv) gets the same thread count as onnxruntime: the
        # comparison with plain onnxruntime is at equal threads, and on a busy 2-core machine a
        # second BLAS thread made a 128x128x2000 product 1.5x slower, not faster.
        threadpool_limits(limits=threads, user_api="blas")
        self.model = model
        self.graph = graph
        self.plan = plan
        self.threads = threads
        self.profile = profile
        self.step_times: dict[str, list[float]] = defaultdict(list)
        self._last_deltas: dict[str, Delta] | None = None
        self._densities: dict[str, float] | None = None  # computed from _last_deltas on demand
        self.keyframe_pending = True
        self._segments: dict[int, ort.InferenceSession] = {}
        self._operators = {}
        delta_consumed, delta_produced, dense_consumed = set(), set(), set(model.output_names)
        for step in plan.steps:
            if isinstance(step, DeltaStep):
                spec = graph.nodes[step.node]["spec"]
                self._operators[step.node] = self._delta_operator(step)
                delta_consumed.update(t for i, t in enumerate(step.inputs) if t and i not in spec.constants)
                delta_produced.update(t for t in step.outputs if t)
            else:
                sub = _subgraph(model, step.nodes, step.inputs, step.outputs)
                self._segments[id(step)] = _session(sub, threads)
                dense_consumed.update(step.inputs)
        self.grids = {}
        for step in plan.steps:
            if isinstance(step, DeltaStep):
                spec = graph.nodes[step.node]["spec"]
                for tensor, grid in zip(step.inputs, spec.input_grids):
                    if grid is not None:
                        self.grids[tensor] = grid
                for tensor, grid in zip(step.outputs, spec.output_grids):
                    self.grids[tensor] = grid
        self.to_delta = {t: ToDelta(self.grids[t]) for t in delta_consumed - delta_produced}
        self.to_dense = {t: ToDense(self.grids[t]) for t in dense_consumed & delta_produced}
        self.filters = {t: Filter(self.grids[t]) for t in delta_produced}
        # A change that only dense steps or the model's outputs read saves no work when held
        # back, only adds error: those filters pass everything (p = 0).
        self.filtered = delta_produced & delta_consumed
        self.thresholds: Thresholds | None = None
        # The keyframe session exposes every tensor a cache is filled from.
        keyframe = model.exposing(sorted(delta_consumed | delta_produced))
        self._keyframe_names = [o.name for o in keyframe.graph.output]
        self._keyframe = _session(keyframe, threads)
        self._compiled = self._compile_steps()

    def _delta_operator(self, step: DeltaStep):
        spec = self.graph.nodes[step.node]["spec"]
        if not step.fused:
            return get_operator(spec.op_type)(spec)
        epilogue = [EpilogueNode(self.graph.nodes[n]["spec"], list(self.graph.nodes[n]["inputs"]),
                                 list(self.graph.nodes[n]["outputs"])) for n in step.fused]
        return FusedConv(spec, self.graph.nodes[step.node]["outputs"][0], epilogue, step.outputs[0])

    # -- public API --------------------------------------------------------------------

    def reset(self) -> None:
        """Make the next frame a keyframe: exact, and every cache refreshed from it."""
        self.keyframe_pending = True

    def use_thresholds(self, thresholds: Thresholds | None) -> None:
        """Filter with thresholds calibrated on frames (see `deluceva.runtime.thresholds`).

        Without them (or for a tensor they do not cover), a filter's threshold is the p-quantile
        of the changes arriving on that frame.
        """
        self.thresholds = thresholds
        for tensor, boundary in [*self.filters.items(), *self.to_delta.items()]:
            boundary.threshold_at = None if thresholds is None else thresholds.for_tensor(tensor)

    def run(self, frame: np.ndarray, percentage: float = 0.0, keyframe: bool = False) -> list[np.ndarray]:
        """Outputs for one frame, in the model's output order.

        Args:
            frame: the model input, shape `model.input_shape`, float32.
            percentage: filtering percentage p in [0, 1): the share of changes held back.
            keyframe: run this frame densely and refresh every cache.
        """
        frame = self._check_frame(frame)
        if not 0.0 <= percentage < 1.0:
            raise DelucevaError(f"filtering percentage {percentage} is outside [0, 1)")
        if keyframe or self.keyframe_pending:
            return self._run_keyframe(frame)
        return self._run_delta(frame, percentage)

    # -- internals ---------------------------------------------------------------------

    def _check_frame(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if tuple(frame.shape) != tuple(self.model.input_shape):
            raise DelucevaError(
                f"{self.model.path}: frame has shape {tuple(frame.shape)}, the model takes {self.model.input_shape}"
            )
        return np.ascontiguousarray(frame, dtype=np.float32)

    def _timed(self, name: str, start: float, exclude: float = 0.0) -> float:
        """Record the time since `start` (less `exclude`) under `name`; return the time spent."""
        spent = time.perf_counter() - start
        if self.profile:
            self.step_times[name].append(spent - exclude)
        return spent

    def _run_keyframe(self, frame: np.ndarray) -> list[np.ndarray]:
        start = time.perf_counter()
        values = dict(zip(self._keyframe_names, self._keyframe.run(None, {self.model.input_name: frame})))
        values[self.model.input_name] = frame
        for step in self.plan.steps:
            if isinstance(step, DeltaStep):
                self._operators[step.node].reset([values.get(t) if t else None for t in step.inputs],
                                                 [values[t] for t in step.outputs])
        for tensor, boundary in self.to_delta.items():
            boundary.reset(values[tensor])
        for tensor, boundary in self.to_dense.items():
            boundary.reset(values[tensor])
        for delta_filter in self.filters.values():
            delta_filter.reset()
        self._last_deltas, self._densities = None, None
        self.keyframe_pending = False
        self._timed("keyframe", start)
        return [values[name] for name in self.model.output_names]

    def _compile_steps(self) -> list[tuple]:
        """Per step, everything the frame loop needs, looked up once instead of every frame.

        A delta step becomes (step, operator, input tensors with None for constants, outputs as
        (tensor, filter, ToDense or None, whether to filter)); a dense step becomes (step, session).
        """
        compiled = []
        for step in self.plan.steps:
            if isinstance(step, DenseSegment):
                compiled.append((step, self._segments[id(step)]))
                continue
            operator = self._operators[step.node]
            inputs = [None if (not t or i in operator.spec.constants) else t for i, t in enumerate(step.inputs)]
            outputs = [(t, self.filters[t], self.to_dense.get(t), t in self.filtered) for t in step.outputs]
            compiled.append((step, operator, inputs, outputs))
        return compiled

    @property
    def densities(self) -> dict[str, float]:
        """Share of changed tiles per delta tensor on the last frame (1.0 after a keyframe)."""
        if self._densities is None:
            if self._last_deltas is None:
                self._densities = {t: 1.0 for t in self.grids}
            else:
                self._densities = {t: len(d.index) / d.grid.n_tiles for t, d in self._last_deltas.items()}
        return self._densities

    def _run_delta(self, frame: np.ndarray, percentage: float) -> list[np.ndarray]:
        dense: dict[str, np.ndarray] = {self.model.input_name: frame}
        deltas: dict[str, Delta] = {}
        self._last_deltas, self._densities = deltas, None
        profile = self.profile

        # When profiling, conversions are timed on their own ("to_delta[t]", "to_dense[t]") and
        # left out of the step that triggered them, so a step's time is its operator's alone.
        converting = [0.0]

        def read_dense(tensor: str) -> np.ndarray:
            if tensor not in dense:
                start = time.perf_counter() if profile else 0.0
                dense[tensor] = np.ascontiguousarray(self.to_dense[tensor].value())
                if profile:
                    converting[0] += self._timed(f"to_dense[{tensor}]", start)
            return dense[tensor]

        def read_delta(tensor: str) -> Delta:
            if tensor not in deltas:
                value = read_dense(tensor)
                start = time.perf_counter() if profile else 0.0
                deltas[tensor] = self.to_delta[tensor](value, percentage)
                if profile:
                    converting[0] += self._timed(f"to_delta[{tensor}]", start)
            return deltas[tensor]

        for compiled in self._compiled:
            step = compiled[0]
            if profile:
                start = time.perf_counter()
                converting[0] = 0.0
            try:
                if len(compiled) == 2:
                    session = compiled[1]
                    results = session.run(step.outputs, {t: read_dense(t) for t in step.inputs})
                    dense.update(zip(step.outputs, results))
                else:
                    _, operator, inputs, outputs = compiled
                    changes = operator.step([None if t is None else deltas.get(t) or read_delta(t) for t in inputs])
                    for (tensor, delta_filter, to_dense, filtered), change in zip(outputs, changes):
                        change = delta_filter(change, percentage if filtered else 0.0)
                        deltas[tensor] = change
                        if to_dense is not None:
                            applied = time.perf_counter() if profile else 0.0
                            to_dense.apply(change)
                            if profile:
                                converting[0] += self._timed(f"to_dense_apply[{tensor}]", applied)
            except DelucevaError:
                raise
            except Exception as error:
                raise StepError(f"{step.name}: {type(error).__name__}: {error}") from error
            if profile:
                self._timed(step.name, start, exclude=converting[0])
        # An output kept by ToDense is a view of its buffer, which the next frame updates: copied.
        # One that a dense segment produced is onnxruntime's fresh array: returned as it is.
        return [np.array(read_dense(name)) if name in self.to_dense else read_dense(name)
                for name in self.model.output_names]

