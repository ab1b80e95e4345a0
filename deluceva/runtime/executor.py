"""The executor: a small interpreter over the physical plan, one frame at a time.

A keyframe (the first frame, after `reset`, when asked, or when a frame holds a NaN or an
infinity) runs the whole model in onnxruntime, returns its outputs exactly and refreshes every
delta tensor. Any other frame runs the plan's steps in order: dense segments in onnxruntime,
delta operators on the changed positions, with conversions where dense meets delta.

Everything a frame touches is built once, here: the frame loop is a flat list of (function,
arguments) calls, almost all compiled kernels over preallocated buffers, so the Python work per
step is one call.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from threadpoolctl import threadpool_limits

from deluceva.errors import DelucevaError, check_percentage
from deluceva.operators import DeltaTensor, Layout, get_operator
from deluceva.onnxruntime_session import inference_session
from deluceva.operators._buffers import Buffers
from deluceva.operators.program import ElementwiseNode
from deluceva.planner.load_model import Model
from deluceva.planner.physical import DeltaStep, DenseSegment, PhysicalPlan
from deluceva.runtime.boundaries import Entry, exceeds, mirror_step, same_values
from deluceva.runtime.copy_tail import TAIL_OP_TYPES, CopyTail, scatter_step
from deluceva.runtime.dense_form import (DENSE_FORM_OP_TYPES, DenseForm, FormCounts, break_even_share,
                                         dense_form_session, either_form)
from deluceva.runtime.thresholds import Thresholds

__all__ = ["Executor", "StepError", "segment_model"]


def _spans(state: DeltaTensor) -> bool:
    """Whether a delta tensor is its whole storage (not a part of a Concat's)."""
    return state.offset == 0 and state.storage.shape[1] == state.layout.channels


class StepError(RuntimeError):
    """A step failed while running; the message names the step."""


class _NotFinite(Exception):
    """A dense value entering the delta steps holds a NaN or an infinity."""


def segment_model(model: Model, nodes: list[str], inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
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


def _session(model: onnx.ModelProto, threads: int, arena: bool = True) -> ort.InferenceSession:
    # Without its arena, a session returns its outputs' memory after each run: the keyframe
    # session's outputs are every delta tensor (50 MB on YOLOX-nano) and run rarely.
    return inference_session(model, threads, arena=arena)


class Executor:
    """Runs a model frame after frame under a physical plan.

    Args:
        model: the loaded model.
        graph: its annotated logical DAG (each node's spec is used to build its operator).
        plan: the physical plan.
        threads: onnxruntime intra-op threads, as a user would give plain onnxruntime.
        profile: record the time of every step (see `step_times`).
        buffers: working buffers and tensors' state, shareable with executors that never run at
            the same time (`deluceva.operators._buffers`; default: this executor's own).
        dense_forms: "auto": a Conv step that has a break-even share runs its dense form on
            frames where more than that share of its input changed (`deluceva.runtime.dense_form`);
            "never": always the delta kernels (to measure or test them); "always": every Conv
            step its dense form whenever any input changed.
    """

    def __init__(self, model: Model, graph, plan: PhysicalPlan, threads: int = 1, profile: bool = False,
                 buffers: Buffers | None = None, dense_forms: str = "auto"):
        if dense_forms not in ("auto", "never", "always"):
            raise DelucevaError(f"dense_forms must be 'auto', 'never' or 'always', got {dense_forms!r}")
        self.dense_forms = dense_forms
        # The delta Conv's BLAS products get the same thread count as onnxruntime: the
        # comparison with plain onnxruntime is at equal threads.
        threadpool_limits(limits=threads, user_api="blas")
        self.model = model
        self.graph = graph
        self.plan = plan
        self.threads = threads
        self.profile = profile
        self.step_times: dict[str, list[float]] = defaultdict(list)
        self.keyframe_pending = True
        self.buffers = buffers if buffers is not None else Buffers()
        self.thresholds: Thresholds | None = None
        self._percentage: float | None = None
        self.forms = FormCounts()

        read_by_delta, written_by_delta, read_dense = set(), set(), set(model.output_names)
        for step in plan.steps:
            if isinstance(step, DeltaStep):
                spec = graph.nodes[step.node]["spec"]
                read_by_delta.update(step.inputs[i] for i in spec.varying)
                written_by_delta.update(t for t in step.outputs if t)
        self._tails: dict[int, CopyTail] = {}  # dense segments run as copies of changed positions
        for step in plan.steps:
            if isinstance(step, DenseSegment):
                tail = self._copy_tail(step, written_by_delta, threads)
                if tail is not None:
                    self._tails[id(step)] = tail
                else:
                    read_dense.update(step.inputs)
        # The frame is always a delta tensor: its filtered change decides whether the frame is
        # worth running at all (`_take_frame`), whoever reads it.
        self._input_read_by_delta = model.input_name in read_by_delta
        read_by_delta.add(model.input_name)
        self.tensors = {t: DeltaTensor(Layout(*model.shapes[t][1:])) for t in sorted(read_by_delta | written_by_delta)}
        self._share_concat_storage()
        self._use_shared_state()
        self.entering = sorted(read_by_delta - written_by_delta)  # dense values turned into changes
        leaving = sorted(written_by_delta & read_dense)  # delta tensors read densely: mirrored
        # Holding back a change that only dense steps or the model's outputs read saves no work,
        # only adds error: those tensors are never filtered.
        self.filtered = sorted(set(self.entering) | (written_by_delta & read_by_delta))
        self.mirrors = {t: self.buffers.state(("mirror", t), (self.tensors[t].layout.channels,
                                                              self.tensors[t].layout.positions), np.float32)
                        for t in leaving}
        # Dense values by name: the frame, dense segments' outputs, and mirrors and copy tails'
        # outputs (fixed arrays, updated in place).
        self._dense: dict[str, np.ndarray] = {
            t: m.reshape(model.shapes[t]) for t, m in self.mirrors.items()}
        self._kept = set(self.mirrors)  # updated in place: returned as copies
        # Whether a dense value changed this frame: from the counts of the delta tensors it is
        # made of (a mirror, a copy tail's output), or set by the step that wrote it.
        self._made_of: dict[str, list[np.ndarray]] = {t: [self.tensors[t].count] for t in self.mirrors}
        self._fresh: dict[str, bool] = {}
        for tail in self._tails.values():
            for name in tail.outputs:
                self._dense[name] = self.buffers.state(("dense", name), model.shapes[name], np.float32)
                self._kept.add(name)
                self._made_of[name] = [self.tensors[t].count for t in tail.inputs]
        self._calls: list[tuple[Callable, tuple]] = []
        self._names: list[str] = []
        self._sessions: list[ort.InferenceSession] = []  # its dense segments'
        self._operators = {}
        self.entries: dict[str, Entry] = {}
        self._frame_entry = self.entries[model.input_name] = Entry(self.tensors[model.input_name], self.buffers,
                                                                   model.input_name)
        self._last_frame = self.buffers.state(("last frame",), model.input_shape, np.float32)
        self._last_outputs: list[np.ndarray] = []
        for step in plan.steps:
            if isinstance(step, DenseSegment):
                if id(step) in self._tails:
                    self._add_tail(step, self._tails[id(step)])
                else:
                    self._add_dense(step, threads)
                for tensor in step.outputs:
                    if tensor in self.tensors:
                        self._add_to_delta(tensor)
            else:
                operator = self._delta_operator(step)
                self._operators[step.node] = operator
                spec = graph.nodes[step.node]["spec"]
                share = None
                if spec.op_type in DENSE_FORM_OP_TYPES and dense_forms != "never":
                    share = 0.0 if dense_forms == "always" else break_even_share(spec)
                form = self._dense_form(step) if share is not None else None
                if form is None:
                    for kernel, arguments in operator.calls:
                        self._calls.append((kernel, arguments))
                        self._names.append(step.name)
                else:
                    counts = [self.tensors[step.inputs[i]].count for i in spec.varying]
                    positions = self.tensors[step.inputs[spec.varying[0]]].layout.positions
                    limit = max(1, int(np.ceil(share * positions)))
                    self._calls.append((either_form(step.name, form, operator.calls, counts, limit, self.forms), ()))
                    self._names.append(step.name)
                for tensor in step.outputs:
                    if tensor in self.mirrors:
                        t = self.tensors[tensor]
                        self._calls.append((mirror_step, (t.storage, t.offset, t.changed, t.count, self.mirrors[tensor])))
                        self._names.append(f"to_dense[{tensor}]")
        self._segment_outputs = sorted({t for s in plan.steps if isinstance(s, DenseSegment) and id(s) not in self._tails
                                        for t in s.outputs})
        # One keyframe session for every executor sharing `buffers`, exposing what all of them
        # load; made at the first keyframe, when they all have said what they need.
        self._keyframes = self.buffers.shared("keyframe", lambda: {"tensors": set(), "rows": set(), "session": None})
        self._keyframes["tensors"] |= (set(self.entries) | set(self.mirrors) | set(self._segment_outputs)
                                       | {t for tail in self._tails.values() for t in tail.outputs})
        self._keyframes["rows"] |= {t for t, state in self.tensors.items() if t != model.input_name and _spans(state)}
        self._keyframes["session"] = None
        self._keyframe_binding = None

    # -- construction --------------------------------------------------------------------

    def _share_concat_storage(self) -> None:
        """Let each delta Concat's inputs live in the Concat's own storage, so it copies nothing.

        Outer Concats first (a Concat's output may itself be placed in another's storage), and
        a tensor is placed once: the input of two Concats, or twice in one, is copied instead.
        """
        placed: set[str] = set()
        for step in reversed(self.plan.steps):
            if not isinstance(step, DeltaStep) or self.graph.nodes[step.node]["op_type"] != "Concat":
                continue
            out = self.tensors[step.outputs[0]]
            placed.add(step.outputs[0])
            offset = out.offset
            for tensor in step.inputs:
                if tensor not in placed and step.inputs.count(tensor) == 1:
                    self._place(tensor, out.storage, offset)
                    placed.add(tensor)
                offset += self.tensors[tensor].layout.channels

    def _use_shared_state(self) -> None:
        """Keep each storage, and each list of changed positions, in `buffers` under the name of
        the tensor it belongs to, so that the sessions of one run's plans hold one of each."""
        groups: dict[int, list[str]] = {}
        for name, tensor in self.tensors.items():
            groups.setdefault(id(tensor.storage), []).append(name)
        for members in groups.values():
            storage = self.tensors[members[0]].storage
            # The group's root: the tensor that spans the whole storage (the outermost Concat).
            root = next(n for n in members if self.tensors[n].offset == 0
                        and self.tensors[n].layout.channels == storage.shape[1])
            shared = self.buffers.state(("storage", root), storage.shape, np.float32)
            for name in members:
                tensor = self.tensors[name]
                tensor.share_storage(shared, tensor.offset)
                tensor.changed = self.buffers.state(("changed", name), tensor.changed.shape, np.int64)

    def _place(self, tensor: str, storage: np.ndarray, offset: int) -> None:
        """Put `tensor` at `offset` of `storage`, with the tensors already placed inside it."""
        own = self.tensors[tensor]
        moved = [(t, s.offset - own.offset) for t, s in self.tensors.items() if s.storage is own.storage]
        for t, relative in moved:
            self.tensors[t].share_storage(storage, offset + relative)

    def _delta_operator(self, step: DeltaStep):
        data = self.graph.nodes[step.node]
        spec = data["spec"]
        inputs = [self.tensors.get(t) if i in spec.varying else None for i, t in enumerate(step.inputs)]
        outputs = [self.tensors[t] for t in step.outputs]
        if not step.fused:
            return get_operator(spec.op_type)(spec, inputs, outputs, buffers=self.buffers)
        epilogue = [ElementwiseNode(self.graph.nodes[n]["spec"], list(self.graph.nodes[n]["inputs"]),
                                    list(self.graph.nodes[n]["outputs"])) for n in step.fused]
        return get_operator(spec.op_type)(spec, inputs, outputs, epilogue=epilogue,
                                          head_output=data["outputs"][0], result=step.outputs[0],
                                          buffers=self.buffers)

    def _dense_form(self, step: DeltaStep) -> DenseForm | None:
        """The step's dense form, or None where it has none (copies, Concat, several outputs)."""
        spec = self.graph.nodes[step.node]["spec"]
        if spec.op_type not in DENSE_FORM_OP_TYPES or len(step.outputs) != 1:
            return None
        names = [step.inputs[i] for i in spec.varying]
        inputs = [self.tensors[t] for t in names]
        out = self.tensors[step.outputs[0]]
        # Where the executor keeps a (C, H*W) copy of an input up to date (an entry's, a
        # mirror), the dense form reads that: no transpose.
        planar = [self.entries[t].planar if t in self.entries else self.mirrors.get(t) for t in names]
        placement = tuple((t.offset, t.storage.shape[1], p is not None) for t, p in zip(inputs, planar))
        key = ("dense form", tuple(step.nodes), tuple(names), step.outputs[0], placement)

        def make():
            segment = segment_model(self.model, step.nodes, names, [step.outputs[0]])
            described = [(n, t, p is not None) for n, t, p in zip(names, inputs, planar)]
            return dense_form_session(segment, described, step.outputs[0], out.layout, self.threads)

        session = self.buffers.shared(key, make)
        size = out.layout.positions * out.layout.channels
        return DenseForm(session, list(zip(inputs, planar)), out,
                         self.buffers.scratch("dense form rows", (size,), np.float32))

    def _add_to_delta(self, tensor: str) -> None:
        entry = self.entries[tensor] = Entry(self.tensors[tensor], self.buffers, tensor)
        dense, fresh, count = self._dense, self._fresh, entry.target.count

        def to_delta() -> None:
            if not fresh.get(tensor, True):  # its dense segment was skipped: nothing changed
                count[0] = 0
            elif not entry(dense[tensor]):
                raise _NotFinite(tensor)

        self._calls.append((to_delta, ()))
        self._names.append(f"to_delta[{tensor}]")

    def _take_frame(self, frame: np.ndarray) -> bool:
        """Take the frame's change; False when it changes nothing, and the frame is skipped.

        Its change is filtered as any delta tensor's: a frame whose every change stays under the
        frame's threshold changes nothing, and returns the last outputs (a static camera's
        frames often change only by noise: frame skipping, at the threshold the controller
        sets). Where delta steps read the frame its whole change is taken (`Entry`); where only
        dense segments read it, the first position that moved more than the threshold since the
        last frame that ran answers (at p = 0: the first difference), where a full pass would
        cost 2-10% of a dense run (measured on YuNet at 1280x736, P-Net at 1280x720).
        """
        name = self.model.input_name
        if self._input_read_by_delta:
            if not self._frame_entry(frame):
                raise _NotFinite(name)
            changed = bool(self._frame_entry.target.count[0])
        else:
            # Only dense segments read it: whether anything moved more than the threshold since
            # the last frame that ran is enough, and the first such position answers it.
            threshold = self.tensors[name].threshold[0]
            if threshold > 0:
                changed = exceeds(frame, self._last_frame, threshold)
            else:
                changed = not same_values(frame, self._last_frame)
            if changed:
                np.copyto(self._last_frame, frame)
        self._fresh[name] = changed
        return changed

    def _copy_tail(self, step: DenseSegment, written_by_delta: set[str], threads: int) -> CopyTail | None:
        """The segment's copy map, when it only moves values out of delta tensors."""
        if not all(self.graph.nodes[n]["op_type"] in TAIL_OP_TYPES for n in step.nodes):
            return None
        if not step.inputs or not set(step.inputs) <= written_by_delta:
            return None
        shapes = self.model.shapes

        def probe() -> CopyTail | None:
            session = _session(segment_model(self.model, step.nodes, step.inputs, step.outputs), threads)
            return CopyTail.probe(session, {t: shapes[t] for t in step.inputs}, list(step.outputs),
                                  {t: shapes[t] for t in step.outputs})

        return self.buffers.shared(("copy tail", tuple(step.nodes), tuple(step.inputs), tuple(step.outputs)), probe)

    def _add_tail(self, step: DenseSegment, tail: CopyTail) -> None:
        for tensor, per_output in tail.maps.items():
            source = self.tensors[tensor]
            for out_name, starts, targets in per_output:
                if len(targets):
                    self._calls.append((scatter_step, (source.storage, source.offset, source.layout.channels,
                                                       source.changed, source.count, starts, targets,
                                                       self._dense[out_name].reshape(-1))))
                    self._names.append(step.name)

    def _add_dense(self, step: DenseSegment, threads: int) -> None:
        """The segment runs in onnxruntime on what its inputs' consumers have seen (the filtered
        frame, mirrors of delta tensors), and is skipped when none of them changed."""
        # One session per distinct segment for every plan sharing `buffers` (the plans of a run
        # cut many of the same segments), its memory from the process's shared arena: an arena
        # per session kept each one's largest intermediates for the whole run.
        key = ("dense segment", tuple(step.nodes), tuple(step.inputs), tuple(step.outputs), threads)
        if self._is_whole_model(step):  # an all-dense plan: the reference's session is the same model
            session = self._plain_session(answers_frames=True)
        else:
            session = self.buffers.shared(key, lambda: inference_session(
                segment_model(self.model, step.nodes, step.inputs, step.outputs), threads, shared_arena=True))
        self._sessions.append(session)
        dense, fresh, inputs, outputs = self._dense, self._fresh, list(step.inputs), list(step.outputs)
        counts = [c for t in inputs for c in self._made_of.get(t, [])]
        names = [t for t in inputs if t not in self._made_of]

        def run_segment() -> None:
            if any(c[0] for c in counts) or any(fresh[t] for t in names):
                dense.update(zip(outputs, session.run(outputs, {t: dense[t] for t in inputs})))
                changed = True
            else:
                changed = False
            for t in outputs:
                fresh[t] = changed

        self._calls.append((run_segment, ()))
        self._names.append(step.name)

    # -- public API --------------------------------------------------------------------

    def reset(self) -> None:
        """Make the next frame a keyframe: exact, and every cache refreshed from it."""
        self.keyframe_pending = True

    def use_thresholds(self, thresholds: Thresholds | None) -> None:
        """Filter with thresholds calibrated on frames (see `deluceva.runtime.thresholds`)."""
        missing = [] if thresholds is None else [t for t in self.filtered if t not in thresholds]
        if missing:
            raise DelucevaError(f"the thresholds do not cover {len(missing)} filtered tensor(s), e.g. {missing[0]}")
        self.thresholds = thresholds
        self._percentage = None

    def run(self, frame: np.ndarray, percentage: float = 0.0, keyframe: bool = False) -> list[np.ndarray]:
        """Outputs for one frame, in the model's output order.

        Args:
            frame: the model input, shape `model.input_shape`, float32.
            percentage: filtering percentage p in [0, 1): the share of changes held back.
            keyframe: run this frame densely and refresh every cache.
        """
        frame = self._check_frame(frame)
        check_percentage(percentage)
        if keyframe or self.keyframe_pending:
            return self._run_keyframe(frame)
        self._set_percentage(percentage)
        try:
            return self._run_delta(frame)
        except _NotFinite:
            return self._run_keyframe(frame)

    def reference(self, frame: np.ndarray, copy: bool = True) -> list[np.ndarray]:
        """Exact outputs from plain onnxruntime on the whole model; caches untouched.

        copy: copy the outputs out of the shared arena, for a caller that keeps them
            (`starting_range` keeps nine): each would hold its chunk of the arena, between the
            blocks the next keyframe reuses. False where they are dropped within a frame or two
            (a run's dense frames): the copy cost 0.13 ms of YOLOX-nano's 10.
        """
        frame = self._check_frame(frame)
        outputs = self._plain_session().run(self.model.output_names, {self.model.input_name: frame})
        return [np.array(output) for output in outputs] if copy else outputs

    @property
    def densities(self) -> dict[str, float]:
        """Share of positions changed per delta tensor on the last frame (1.0 after a keyframe)."""
        if self._last_was_keyframe:
            return {t: 1.0 for t in self.tensors}
        if self._skipped:
            return {t: 0.0 for t in self.tensors}
        return {t: tensor.density for t, tensor in self.tensors.items()}

    # -- internals ---------------------------------------------------------------------

    def _check_frame(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if tuple(frame.shape) != tuple(self.model.input_shape):
            raise DelucevaError(
                f"{self.model.path}: frame has shape {tuple(frame.shape)}, the model takes {self.model.input_shape}"
            )
        return np.ascontiguousarray(frame, dtype=np.float32)

    def _plain_session(self, answers_frames: bool = False):
        """The whole model in onnxruntime, one session for every plan sharing `buffers`: references,
        and the frames a run answers densely (an all-dense plan at p = 0, whose one segment is this
        session too). Its memory is from the shared arena.

        answers_frames: asked by an all-dense plan (built with the run's other plans, before any
        reference), whose frames the session answers: it then has onnxruntime's memory pattern
        and a spinning thread pool, as plain onnxruntime has. Without the pattern, the session
        ran at 10.42 ms against plain onnxruntime's 9.69 on YOLOX-nano (each intermediate a block
        of its own in an arena the keyframes had fragmented), with it 9.74-9.85. Without an all-dense plan it
        runs only on references, where the pattern's one block grew the arena by 78 MiB on P-Net
        at 1280x720 for no speed that counts. Not spinning (see `session_options`), it ran
        YOLOX-nano with 2 threads at 0.56x onnxruntime's speed; spinning, 1.02x.
        """
        return self.buffers.shared("plain", lambda: inference_session(
            self.model.onnx, self.threads, shared_arena=True, memory_pattern=answers_frames, spinning=answers_frames))

    def _is_whole_model(self, step: DenseSegment) -> bool:
        return (list(step.inputs) == [self.model.input_name] and set(step.outputs) == set(self.model.output_names)
                and len(step.nodes) == len(self.model.onnx.graph.node))

    def _set_percentage(self, percentage: float) -> None:
        if percentage == self._percentage:
            return
        if percentage > 0 and self.thresholds is None and self.filtered:
            raise DelucevaError("filtering at p > 0 needs thresholds calibrated on the video's first frames: "
                                "call session.calibrate(frames) first")
        for tensor in self.filtered:
            threshold = self.thresholds.threshold(tensor, percentage) if percentage > 0 else 0.0
            self.tensors[tensor].threshold[0] = threshold
        self._percentage = percentage

    _last_was_keyframe = True
    _skipped = False

    def _keyframe_session(self):
        """The keyframe session: the whole model, also writing every delta tensor, as rows
        (`{tensor}__rows`, for the states) and as it is (for the (C, H*W) copies); one for all the
        executors that share `buffers`, made when the first of them runs a keyframe."""
        keyframes = self._keyframes
        if keyframes["session"] is None:
            exposing = self.model.exposing(sorted(keyframes["tensors"]))
            for tensor in sorted(keyframes["rows"]):
                channels, height, width = self.model.shapes[tensor][1:]
                exposing.graph.node.append(helper.make_node("Transpose", [tensor], [f"{tensor}__rows"], perm=[0, 2, 3, 1]))
                exposing.graph.output.append(helper.make_tensor_value_info(
                    f"{tensor}__rows", onnx.TensorProto.FLOAT, [1, height, width, channels]))
            # Only what is written into deluceva's memory is an output: the other tensors stay
            # onnxruntime's own, in the arena the dense forms share (exposing every tensor, as
            # outputs onnxruntime allocates, made a keyframe of YuNet at 1280x736 cost 4.3x a
            # dense run).
            keyframes["session"] = inference_session(exposing, self.threads, shared_arena=True, memory_pattern=False)
        return keyframes["session"]

    def _bind_keyframe(self, session):
        """This executor's binding of the keyframe session's outputs to the memory they refresh.

        Every state whose tensor spans its storage (a Concat's parts live in the Concat's, and
        are written with it) is written by onnxruntime as rows, in place; entries' and mirrors'
        (C, H*W) copies and copy tails' outputs likewise; dense segments' and the model's outputs
        that none of those hold, into arrays of the keyframe's own. Before, the session returned every tensor
        as a new array and each was then copied into its state: on a 1280x736 detector that
        doubled the states' 453 MiB at every keyframe, and cost a pass over them.
        """
        if self._keyframe_binding is not None and self._keyframe_binding[0] is session:
            return self._keyframe_binding[1:]
        binding = session.io_binding()
        held: dict[str, np.ndarray] = {}  # output -> the array onnxruntime writes it into

        def bind(name: str, array: np.ndarray, shape) -> None:
            binding.bind_output(name, "cpu", 0, np.float32, list(shape), array.ctypes.data)
            held[name] = array

        for tensor, state in self.tensors.items():
            if tensor == self.model.input_name:
                continue
            g = state.layout
            if _spans(state):
                bind(f"{tensor}__rows", state.storage, (1, g.height, g.width, g.channels))
            planar = self.entries[tensor].planar if tensor in self.entries else self.mirrors.get(tensor)
            if planar is not None:
                bind(tensor, planar, (1, g.channels, g.height, g.width))
        for tail in self._tails.values():
            for name in tail.outputs:
                if name not in held:
                    bind(name, self._dense[name], self._dense[name].shape)
        # The rest (dense segments' and the model's outputs) into arrays of their own, rewritten
        # by each keyframe: onnxruntime's would be chunks of the shared arena kept between
        # keyframes, and the next keyframe, finding no room between them, grew the arena (by
        # 160 MiB on YuNet at 1280x736).
        own = {}
        for name in dict.fromkeys([*self._segment_outputs, *self.model.output_names]):
            if name not in held:
                shape = self.model.shapes[name]
                dtype = helper.tensor_dtype_to_np_dtype(self.model.dtypes.get(name, onnx.TensorProto.FLOAT))
                own[name] = self.buffers.state(("keyframe output", name), shape, dtype)
                binding.bind_output(name, "cpu", 0, dtype, list(shape), own[name].ctypes.data)
        self._keyframe_binding = (session, binding, held, own)
        return binding, held, own

    def _run_keyframe(self, frame: np.ndarray) -> list[np.ndarray]:
        start = time.perf_counter()
        session = self._keyframe_session()
        binding, held, own = self._bind_keyframe(session)
        binding.bind_input(self.model.input_name, "cpu", 0, np.float32, list(frame.shape), frame.ctypes.data)
        session.run_with_iobinding(binding)
        values = dict(own)
        for name, array in held.items():
            if not name.endswith("__rows"):
                values.setdefault(name, array.reshape(self.model.shapes[name]))
        for state in self.tensors.values():
            state.count[0] = 0
        self.entries[self.model.input_name].load(frame)
        for tail in self._tails.values():
            for name in tail.outputs:  # written into an entry's copy instead, when it is one
                if held.get(name) is not self._dense[name]:
                    np.copyto(self._dense[name], values[name])
        for name in self._segment_outputs:  # a segment skipped next frame leaves these as they are
            self._dense[name] = values[name] if name in own else np.array(values[name])
        np.copyto(self._last_frame, frame)
        # Outputs held in state arrays are updated in place by later frames: returned as copies.
        outputs = [values[name] if name in own else np.array(values[name]) for name in self.model.output_names]
        self._last_outputs = outputs
        # After a frame with a NaN or an infinity, the caches hold it: the next frame is a
        # keyframe too, until the video is finite again.
        self.keyframe_pending = not bool(np.isfinite(frame).all())
        self._last_was_keyframe = True
        if self.profile:
            self.step_times["keyframe"].append(time.perf_counter() - start)
        return [np.array(output) for output in outputs]

    def _run_delta(self, frame: np.ndarray) -> list[np.ndarray]:
        dense = self._dense
        dense[self.model.input_name] = frame
        self._last_was_keyframe = False
        self._skipped = not self._take_frame(frame)
        if self._skipped:
            return [np.array(output) for output in self._last_outputs]
        calls = self._calls
        index = 0
        try:
            if self.profile:
                spent: dict[str, float] = defaultdict(float)  # a step of several calls: their sum
                for index, (function, arguments) in enumerate(calls):
                    start = time.perf_counter()
                    function(*arguments)
                    spent[self._names[index]] += time.perf_counter() - start
                for name, seconds in spent.items():
                    self.step_times[name].append(seconds)
            else:
                for index, (function, arguments) in enumerate(calls):
                    function(*arguments)
        except (_NotFinite, DelucevaError):
            raise
        except Exception as error:
            raise StepError(f"{self._names[index]}: {type(error).__name__}: {error}") from error
        # An output mirrored from delta steps is updated in place by the next frame: copied.
        outputs = [np.array(dense[name]) if name in self._kept else dense[name] for name in self.model.output_names]
        self._last_outputs = outputs
        return outputs
