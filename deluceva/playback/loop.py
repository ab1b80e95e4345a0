"""The run loop shared by `deluceva run`, `bench` and `demo`: frames in; outputs, times and errors out.

Each frame runs through a `Session` at the controller's filtering percentage. Every K frames, and
whenever the controller asks, the frame is a *reference*: its delta result is computed as usual,
then the same frame runs densely in onnxruntime (an executor keyframe, which also refreshes every
cache, when the plan changes or p fell since the last one); the error of the delta result
against the dense one feeds the controller, and the frame's output is the exact dense one. When
the controller moves p into another compiled plan's range, the plan switches on that reference
(when a reference's measurement moved it) or at the next reference (when p moved on another
frame): a keyframe fills the new plan's caches, and the next frame is a reference too, so a new
plan's error is measured on its first delta frame. A reference frame's whole cost counts in the
frame's time.

With a frame gate (`deluceva.playback.gate`), the controller's setting maps to a pair (p, g): a
frame where under g of the 8x8 tiles changed since the last frame that ran reuses the outputs the
user last received; when such a frame is due for a reference (every K frames, or after K // 3
gated frames since the last one), the reused outputs are what is measured against the dense run,
and the frame gets the dense outputs. On the all-dense plan (p = 0) that measurement waits for
the next frame that runs, whose outputs are exact anyway (no dense run on the gated frame). At
the setting 0 the gate is not read at all.

How the run starts (the controller's first p, a learned controller's training) is in
`deluceva.playback.calibration`; writing outputs as the run goes, in `deluceva.playback.recorder`.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from deluceva.errors import DelucevaError

__all__ = ["FrameResult", "SessionsByPercentage", "VideoRunner", "frame_flops", "summarise", "change_statistics"]

ErrorFunction = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]

GATED_SHARE_OF_K = 3  # with the gate, a reference also comes after K // 3 gated frames


@dataclass
class FrameResult:
    """What one frame produced and cost.

    Attributes:
        index: position in the run (0 for the first frame processed).
        outputs: the model's outputs, in its output order (exact on reference frames).
        seconds: wall time of the model work for the frame: the delta run, plus the dense run
            and the error measurement on a reference frame, plus the controller update.
        reference: whether the frame ran densely: the first frame, every K-th frame, and when
            the controller asks (plans switch only on these).
        error: the delta result's error against the dense one on reference frames; None
            otherwise, and on the first frame.
        percentage: the filtering percentage the frame ran at.
        density: FLOP-weighted share of the delta nodes' outputs recomputed (1.0 on the first
            frame, which has no delta run).
        flops: FLOPs actually computed for the frame (dense FLOPs on the first frame; delta run
            plus dense run on a reference frame).
        plan: index of the plan (in `SessionsByPercentage.percentages`) the frame's delta run used.
        gated: the frame gate held it (see `deluceva.playback.gate`): the last outputs were
            reused (on a reference frame, measured against the dense run, whose outputs it gives).
        setting: the controller's setting the frame ran at; with a gate it maps to (p, g), and
            `percentage` is that p; without, it is p.
    """

    index: int
    outputs: list[np.ndarray]
    seconds: float
    reference: bool
    error: float | None
    percentage: float
    density: float
    flops: float
    plan: int = 0
    gated: bool = False
    setting: float | None = None


# -- plans ----------------------------------------------------------------------------------


class FlopCounts:
    """Per-session FLOP bookkeeping: dense total, and each delta node's FLOPs and output tensor."""

    def __init__(self, session):
        graph = session.graph
        self.total = float(sum(data.get("flops", 0) for _, data in graph.nodes(data=True)))
        # A delta step's nodes are measured by the step's output: for a fused Conv and its
        # epilogue, that is the group's one exit tensor, not each node's own output.
        measured_by = {node: step.outputs[0] for step in session.plan.steps
                       if step.kind == "delta" and step.outputs for node in step.nodes}
        self.delta = [
            (float(data.get("flops", 0)), measured_by[name])
            for name, data in graph.nodes(data=True)
            if data.get("variant") == "delta" and name in measured_by
        ]
        self.delta_total = sum(f for f, _ in self.delta)
        self.dense_part = self.total - self.delta_total

    def delta_frame(self, densities: Mapping[str, float]) -> tuple[float, float]:
        """(computed FLOPs, FLOP-weighted density of the delta nodes) for one delta run."""
        computed = sum(f * densities.get(t, 1.0) for f, t in self.delta)
        density = computed / self.delta_total if self.delta_total else 1.0
        return self.dense_part + computed, density


def frame_flops(session, densities: Mapping[str, float]) -> float:
    """FLOPs a delta run computed: each delta node's FLOPs times its output's density, dense nodes whole."""
    return FlopCounts(session).delta_frame(densities)[0]


class SessionsByPercentage:
    """Sessions compiled for a sorted list of filtering percentages; p uses the plan for the
    largest compiled percentage not above it.

    Args:
        sessions: one `Session` per plan.
        percentages: the percentage each plan was compiled for (ascending; the first one is used
            for any p below it too).
        description: how the plans were made, for messages and the summary.
    """

    def __init__(self, sessions: Sequence, percentages: Sequence[float] = (0.0,), description: str = ""):
        if len(sessions) != len(percentages) or not sessions:
            raise ValueError("one session per compiled percentage")
        order = sorted(range(len(sessions)), key=lambda i: percentages[i])
        self.sessions = [sessions[i] for i in order]
        self.percentages = [float(percentages[i]) for i in order]
        self.description = description
        self.flops = [FlopCounts(s) for s in self.sessions]
        # Plans measured slower than the first (all-dense) one on this video: their range of p
        # runs the first plan at p = 0 instead (see `retire`).
        self.retired: set[int] = set()

    @classmethod
    def from_variants(cls, model, entries, threads: int = 1, description: str = "") -> SessionsByPercentage:
        """One Session per distinct plan in `entries`, [(percentage, {node: variant}), ...] in
        ascending percentage: a plan equal to the one below it is not built again (that session
        serves its range too). The sessions share working buffers and tensors' state, since one
        plan runs at a time.

        Example:
            >>> plans = SessionsByPercentage.from_variants(model, [(0.0, dense), (0.5, mixed)])  # doctest: +SKIP
        """
        from deluceva.operators._buffers import Buffers
        from deluceva.session import Session

        sessions, percentages, previous, buffers = [], [], None, Buffers()
        for percentage, variants in entries:
            if variants == previous:
                continue
            previous = variants
            sessions.append(Session(model, plan=variants, threads=threads, buffers=buffers))
            percentages.append(percentage)
        return cls(sessions, percentages, description)

    def index_below(self, percentage: float) -> int:
        """The plan compiled for the largest percentage not above `percentage` (the first plan
        below them all): its filters hold back at least what it was planned for. A retired plan's
        range gives the first plan."""
        index = max(0, bisect.bisect_right(self.percentages, percentage) - 1)
        return 0 if index in self.retired else index

    def effective(self, percentage: float) -> float:
        """The p a frame runs at for `percentage`: 0 in a retired plan's range and in the first
        plan's when it is all dense (exact, and a reference has nothing to measure there), else
        `percentage`. (An all-dense plan at p > 0 only skips frames whose every change is under
        its threshold, which real video almost never has, and it paid a dense reference run on
        every reference for that: 0.82-0.90x against 0.96x at p = 0 on YOLOX-nano.)"""
        index = max(0, bisect.bisect_right(self.percentages, percentage) - 1)
        if index in self.retired or (index == 0 and len(self.sessions) > 1 and not self.flops[0].delta):
            return 0.0
        return percentage

    def retire(self, indices) -> None:
        """Never run these plans (not the first): a p in their range runs the first plan at p = 0."""
        self.retired = {int(i) for i in indices if int(i) != 0}

    def variant_counts(self) -> list[dict[str, int]]:
        return [s.plan.counts() for s in self.sessions]

    def step_forms(self) -> dict[str, dict[str, int]]:
        """Per delta step with a dense form, the frames it ran as delta and as dense, all plans
        together (`deluceva.runtime.dense_form`)."""
        total: dict[str, dict[str, int]] = {}
        for session in self.sessions:
            for step, counts in session.executor.forms.as_dict().items():
                row = total.setdefault(step, {"delta": 0, "dense": 0})
                row["delta"] += counts["delta"]
                row["dense"] += counts["dense"]
        return total


# -- the loop -------------------------------------------------------------------------------


def change_statistics(frame: np.ndarray, previous: np.ndarray | None, tile: int = 8) -> dict[str, float]:
    """Frame-level change of the model input against `previous`: mean |change| and the share of
    tile x tile tiles whose largest change exceeds 1% of the input's range (see
    `deluceva.playback.gate.FrameChange`, which a run keeps instead of the previous frame)."""
    from deluceva.playback.gate import FrameChange

    change = FrameChange(tile)
    if previous is not None:
        change.keep(previous)
    return change.measure(frame)


class VideoRunner:
    """Runs frames through a `SessionsByPercentage` with a controller, reference frames and timing.

    Args:
        plans: the compiled plans (a `SessionsByPercentage`).
        controller: object with `update(observation) -> percentage` (see `deluceva.controller`);
            it may set `wants_reference = True` to ask for a reference on the next frame.
        metric: callable(outputs, reference_outputs) -> error.
        reference_every: K, a dense reference every K frames (counted from the last reference).
        percentage: the starting filtering percentage.
        observation: factory building the controller's observation from keyword fields
            (frame, error, percentage, statistics); defaults to `deluceva.controller.Observation`.
        gate: a `deluceva.playback.gate.GateSchedule`: the controller's setting maps to (p, g),
            and a frame with under g of its tiles changed since the last frame that ran reuses
            the last outputs. None: no gate (the setting is p).
    """

    def __init__(
        self,
        plans: SessionsByPercentage,
        controller,
        metric: ErrorFunction,
        reference_every: int = 30,
        percentage: float = 0.0,
        observation: Callable | None = None,
        gate=None,
    ):
        if reference_every < 1:
            raise DelucevaError(f"reference interval {reference_every} must be at least 1")
        self.plans = plans
        self.controller = controller
        self.metric = metric
        self.reference_every = reference_every
        self.percentage = float(percentage)
        self.observation = observation or _default_observation()
        self.current = plans.index_below(self.percentage)
        self.index = 0
        self.since_reference = 0
        self.probing = False  # measure the next frame: the plan just switched
        self.change = _frame_change()  # since the previous frame, for controllers that read it
        self.held_at = 0.0  # the largest p since the last keyframe: the caches hold back up to it
        self.schedule = gate
        self.gate = None if gate is None else _frame_gate(gate.threshold)
        self.last_outputs: list[np.ndarray] | None = None  # what the user last received
        self.gated_since_reference = 0
        self.reuse_pending = False  # a reference due on a gated frame waits for the next frame that runs

    @property
    def session(self):
        return self.plans.sessions[self.current]

    def step(self, frame: np.ndarray) -> FrameResult:
        """Run one (preprocessed) frame."""
        start = time.perf_counter()  # the controller's statistics are deluceva's work too
        stats = {}
        if getattr(self.controller, "uses_statistics", False):
            stats = self.change.measure(frame)
            self.change.keep(frame)
        setting = self.percentage
        percentage, share = (setting, 0.0) if self.schedule is None else self.schedule.pair(setting)
        percentage = self.plans.effective(percentage)
        wanted = self.plans.index_below(percentage)
        asked = bool(getattr(self.controller, "wants_reference", False))
        error = None
        probe = False
        # The gate is read only where g > 0 (never at the setting 0), after the first frame, and
        # not on a new plan's probe (its first delta frame must be measured).
        gated = bool(share) and self.index > 0 and not self.probing and self.gate.share(frame) < share
        # The plan running now is all dense and p = 0: its frames are onnxruntime's exact answer.
        exact = percentage == 0 and not self.plans.flops[self.current].delta
        if gated:
            used = self.current
            outputs, flops, density = self.last_outputs, 0.0, 0.0
            # Reused outputs are what the user gets, and their error grows with their age: a
            # reference comes after K / 3 gated frames too. (With K = 30 on intersection_cctv,
            # 3 references in 120 frames all measured 0 while 43 frames were off, at det 0.04.)
            self.gated_since_reference += 1
            reference = (asked or self.since_reference + 1 >= self.reference_every
                         or self.gated_since_reference >= max(1, self.reference_every // GATED_SHARE_OF_K))
            if reference and wanted == used and exact and self.since_reference + 1 < 2 * self.reference_every:
                # On the all-dense plan the next frame that runs is exact anyway: the reused
                # outputs are measured there, against its outputs (the frame that changed most
                # since the last run: no less than what the gated frames received), instead of
                # paying a dense run here. (On YOLOX-nano / intersection_cctv three such runs in
                # 120 frames were most of what the gate cost beyond frame skipping.)
                reference, self.reuse_pending = False, True
            if reference:
                # What the user receives here is the reused outputs: that is what is measured.
                # The dense run gives this frame's exact outputs, so later frames are gated
                # against it. A plan switch due here still needs its keyframe.
                if wanted != used and _may_switch(used, wanted, False):
                    self.probing = wanted > used
                    self.current = wanted
                    dense = self.session.run(frame, percentage, keyframe=True)
                    self.held_at = percentage
                else:
                    dense = self.session.reference(frame)
                error = float(self.metric(outputs, dense))
                outputs = dense
                flops = self.plans.flops[self.current].total
                self.gate.ran(frame)
        elif self.index == 0:
            self.current = wanted
            if percentage == 0 and not self.plans.flops[wanted].delta:
                # An all-dense plan has no state to fill: onnxruntime's run answers (as below),
                # and a later switch to a delta plan runs its keyframe (2x a dense run).
                outputs = self.session.reference(frame, copy=False)
            else:
                outputs = self.session.run(frame, percentage, keyframe=True)
            self.held_at = percentage
            flops, density, reference = self.plans.flops[self.current].total, 1.0, True
            used = self.current
        else:
            used = self.current
            reuse_error = None
            if exact:
                # An all-dense plan at p = 0 is plain onnxruntime's answer, and there it is
                # onnxruntime's run that gives it (no delta state to keep; a switch to a delta
                # plan runs a keyframe): on YuNet the compiled all-dense plan ran at 0.78x where
                # plain onnxruntime's session ran at 0.91x. Not copied: kept until the next
                # frame ran (or, gated, until one does), as onnxruntime's own outputs would be.
                outputs = self.session.reference(frame, copy=False)
                if self.reuse_pending and self.last_outputs is not None:
                    # A reference deferred from a gated frame: the reused outputs against these.
                    reuse_error = float(self.metric(self.last_outputs, outputs))
            else:
                outputs = self.session.run(frame, percentage)
            self.held_at = max(self.held_at, percentage)
            flops, density = self.plans.flops[used].delta_frame(self.session.executor.densities)
            probe = self.probing
            reference = asked or probe or self.since_reference + 1 >= self.reference_every or reuse_error is not None
            self.probing = False
            if reference:
                # The plan switches only here: the reference's dense run fills the new plan's
                # caches, and the error of this frame is still measured on the plan that ran it.
                # (Switching on any frame p crosses a compiled percentage let a controller that
                # moves p every frame trigger a dense run every frame and never get a measurement.)
                # A new plan is probed: its first delta frame is measured at once, so a plan far
                # over budget costs one frame's error rather than K frames of drift (YuNet with
                # rel-l2: 0.3 after one frame at p = 0.8, 5.3 after ten).
                # A probe never climbs to a higher plan itself (see `_may_switch`).
                if not _may_switch(used, wanted, probe):
                    wanted = used
                self.probing = wanted > used
                if wanted == used and exact:
                    # A plan without delta steps is exact at p = 0 (above, a frame whose change
                    # stays under the frame's threshold is skipped): nothing to measure.
                    error = 0.0
                else:
                    # The reference refreshes the caches (a keyframe, 3x a dense run: it loads
                    # every delta tensor) only where they need it: a new plan's are empty, and
                    # after p fell, what was held back below the old, higher thresholds would
                    # stay. Otherwise what they hold back is within the current thresholds
                    # and a plain dense run measures the error.
                    refresh = wanted != used or percentage < self.held_at
                    self.current = wanted
                    if refresh:
                        dense = self.session.run(frame, percentage, keyframe=True)
                        self.held_at = percentage
                    else:
                        dense = self.session.reference(frame)
                    error = float(self.metric(outputs, dense))
                    outputs = dense
                    flops += self.plans.flops[self.current].total
                if reuse_error is not None:
                    error = reuse_error  # this frame's own outputs are exact: the deferred measurement
        if not gated and self.gate is not None:
            self.gate.ran(frame)
        self.last_outputs = outputs
        self.since_reference = 0 if reference else self.since_reference + 1
        if reference:
            self.gated_since_reference = 0
            self.reuse_pending = False
        observation = self.observation(
            frame=self.index, error=error, percentage=setting, statistics={**stats, "density": density}
        )
        self.percentage = float(self.controller.update(observation))
        next_p = self.plans.effective(self.percentage if self.schedule is None else self.schedule.pair(self.percentage)[0])
        switch = self.plans.index_below(next_p)
        if reference and error is not None and switch != self.current and _may_switch(self.current, switch, probe):
            # What this reference measured moved p into another plan's range: switch now, on
            # this frame, rather than at the next reference (PI moves p only on references, so
            # waiting left a run on the old plan for a whole interval: 30 of 120 frames all
            # dense on YOLOX). A keyframe fills the new plan's caches; a higher plan's first
            # delta frame is measured (probing).
            self.probing = switch > self.current
            self.current = switch
            self.session.run(frame, next_p, keyframe=True)
            self.held_at = next_p
            flops += self.plans.flops[self.current].total
        seconds = time.perf_counter() - start
        result = FrameResult(self.index, outputs, seconds, reference, error, percentage, density, flops, used,
                             gated, setting)
        self.index += 1
        return result


def _may_switch(current: int, wanted: int, probe: bool) -> bool:
    """Whether a reference frame may switch from plan `current` to plan `wanted` (indices in
    ascending percentage). Down, always: the error says so. Up, only on a regular reference, not
    on a probe: a probe's measurement moves p too, and when p sits on a plan boundary (P-Net's
    plans were exact below 0.75 and 0.06 rel-l2 at 0.75, over the aim), switching on every probe
    made every frame a probe, a keyframe and a reference: 141 references in 150 frames, 311
    against 64 ms a frame."""
    return wanted < current or not probe


def _frame_change():
    from deluceva.playback.gate import FrameChange

    return FrameChange()


def _frame_gate(threshold: float):
    from deluceva.playback.gate import FrameGate

    return FrameGate(threshold)


def _default_observation() -> Callable:
    from deluceva.controller import Observation

    def build(frame, error, percentage, statistics):
        return Observation(frame=frame, error=error, percentage=percentage, **statistics)

    return build


# -- summary ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def summarise(results: Sequence[FrameResult], plans: SessionsByPercentage) -> dict:
    """The per-run figures `deluceva run --summary` writes (errors over measured references)."""
    ms = [r.seconds * 1000 for r in results]
    errors = [r.error for r in results if r.error is not None]
    dense = sum(c.total for c in plans.flops[:1]) or 1.0
    computed = sum(r.flops for r in results)
    counts = plans.variant_counts()
    used = statistics.mode(r.plan for r in results) if results else 0
    return {
        "frames": len(results),
        "ms_per_frame_median": statistics.median(ms) if ms else None,
        "ms_per_frame_mean": statistics.fmean(ms) if ms else None,
        "reference_frames": sum(r.reference for r in results),
        "gated_frames": sum(r.gated for r in results),
        "plan_switches": sum(a.plan != b.plan for a, b in zip(results, results[1:])),
        "measured_reference_frames": len(errors),
        "error_mean": statistics.fmean(errors) if errors else None,
        "error_p95": percentile(errors, 0.95) if errors else None,
        "error_max": max(errors) if errors else None,
        "density_mean": statistics.fmean(r.density for r in results) if results else None,
        "flop_reduction_bound": dense * len(results) / computed if computed else None,
        "percentage_trace": [round(r.percentage, 6) for r in results],
        "density_trace": [round(r.density, 6) for r in results],
        "error_trace": [None if r.error is None else round(r.error, 6) for r in results],
        "ms_trace": [round(m, 4) for m in ms],
        # The plan most frames used; every compiled plan's counts follow when there are several.
        "plan_variants": dict(counts[used]),
        "plan_variants_per_plan": counts,
        "plan_percentages": plans.percentages,
        # Frames each delta step ran in its delta and in its dense form (warm-up frames included).
        "step_forms": plans.step_forms(),
    }
