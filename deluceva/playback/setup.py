"""Setting up a run: the model fitted to the video, the plans, the metric and the controller.

`prepare` checks the options, opens the video and fits the preprocessing to the model; then
`build_plans` makes the sessions (from a plan file, or profiled and compiled on the fly),
calibrates their filters on the video's first frames, warms them up and starts the controller.
`deluceva run`, `bench` and `demo` all start here.

Example:
    >>> setup = prepare(RunOptions("yolox.onnx", "street.mp4", preset="yolox", metric="det"))  # doctest: +SKIP
    >>> plans = build_plans(setup)                                                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

from deluceva.errors import DelucevaError, check_percentage
from deluceva.memory import release_freed_memory
from deluceva.runtime.thresholds import CALIBRATION_FRAMES

__all__ = ["RunOptions", "Setup", "prepare", "preprocessor", "build_plans", "compile_plans", "run_info",
           "ON_THE_FLY_PERCENTAGES", "PROFILE_FRAMES", "calibrate_gate",
           "controller_for"]

# Without --plan: percentages compiled on the fly, and frames profiled for them; `deluceva
# compile` makes a finer plan once and for all. The grid is dense below 0.5 because that is where
# the controllers settle: YOLOX-nano on intersection_cctv keeps det error 0 up to p = 0.2 and
# reaches 0.35 at p = 0.5, and the plan for p = 0 is all dense, so a coarse grid (0, 0.5, 0.9)
# left the PI controller only "exact" or "far over budget" to choose from.
ON_THE_FLY_PERCENTAGES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
# The video's first frames, profiled on the fly; the same frames calibrate the filters.
PROFILE_FRAMES = CALIBRATION_FRAMES



@dataclass
class RunOptions:
    """What a run is asked to do: `deluceva run`'s options, as the library takes them.

    Attributes:
        model, video: the ONNX file, and the video file or stream URL.
        plan: a plan JSON from `deluceva compile`, "dense", "delta", or None to profile the
            video's first frames and compile plans on the fly.
        controller: "fixed", "pi" or "learned"; percentage: the fixed p, or where the
            controller starts (None: PI starts where the first frames say the budget holds).
        error_budget: the error to hold on reference frames (None: the metric's default).
        metric: "rel-l2", "norm-l2" or "det"; preset: "yolox", "yunet", "mtcnn" or None (generic).
        layout: the model's image input layout, "NCHW" or "NHWC" (None: read off the graph;
            an NHWC or uint8 input runs as float32 NCHW, see `deluceva.planner.load_model`).
        detector: generic det options (`deluceva.presets.DetectorOptions`): which outputs are
            boxes and scores, for det and detections without a preset (they override its decoder).
        preprocessing: generic `Preprocessor` fields overriding the preset's or the defaults.
        reference_every: a dense reference frame every K frames.
        frames, start, every: which frames of the video (at most N, from S, one in K).
        learned_model: a learned controller JSON (None with "learned": trained on the video).
        calibration_start: where the first frames that profile, calibrate and train are read
            (None: `start`). A resumed stream reads the ones its first run read.
        gate: add the frame gate (`deluceva.playback.gate`): the controller's setting moves p and
            the gate's share g together, as calibrated on the first frames.
    """

    model: str
    video: str
    plan: str | None = None
    controller: str = "pi"
    percentage: float | None = None
    error_budget: float | None = None
    metric: str = "rel-l2"
    preset: str | None = None
    preprocessing: dict = field(default_factory=dict)
    reference_every: int = 30
    threads: int = 1
    frames: int | None = None
    start: int = 0
    every: int = 1
    learned_model: str | None = None
    calibration_start: int | None = None
    detector: object | None = None
    layout: str | None = None
    gate: bool = False

    @property
    def first_frames_start(self) -> int:
        return self.start if self.calibration_start is None else self.calibration_start


@dataclass
class Setup:
    """Everything a run needs before its sessions are built."""

    options: RunOptions
    video: object
    preprocess: object
    input_shape: tuple[int, ...]
    model: object  # deluceva Model, bound to input_shape
    metric: object
    budget: float
    controller: object
    notes: list[str] = field(default_factory=list)
    start_percentage: float = 0.0
    calibration_frames: list = field(default_factory=list)  # the first frames, once read
    # When `prepare` began: the summary's seconds to the first output count from here (loading,
    # calibration, profiling and compiling, the sessions and their kernels).
    started: float = field(default_factory=time.perf_counter)
    gate: object = None  # a GateSchedule with RunOptions.gate, once calibrated (build_plans)


def prepare(options: RunOptions, models: dict | None = None) -> Setup:
    """Check options, open the video, fit the preprocessing to the model, make metric and controller.

    `models`: models this process loaded before, by (path, input shape), reused and added to (a
    streams worker's: its next stream does not load and normalise the model again).
    """
    from deluceva.controller import make_controller
    from deluceva.planner import load_model
    from deluceva.metrics import get_metric
    from deluceva.presets import check_preset
    from deluceva.media.video import open_video

    if options.reference_every < 1:
        raise DelucevaError(f"--reference-every {options.reference_every} must be at least 1")
    if options.percentage is not None:
        check_percentage(options.percentage, "--percentage")
    video = open_video(options.video, frames=options.frames, start=options.start, every=options.every)
    preprocess = preprocessor(options)
    input_shape = tuple(int(d) for d in preprocess.input_shape((video.height, video.width)))
    key = (str(options.model), input_shape, options.layout)
    model = models.get(key) if models is not None else None
    if model is None:
        model = load_model(options.model, input_shape, layout=options.layout)
        if models is not None:
            models[key] = model
    check_preset(options.preset, model, options.detector)
    metric = get_metric(options.metric, options.preset, input_shape=input_shape, output_names=model.output_names,
                        detector=options.detector)
    budget = options.error_budget if options.error_budget is not None else metric.budget
    percentage = options.percentage
    if options.controller == "fixed" and percentage is None:
        percentage = 0.0
    controller = None  # trained on the run's own plans, once they are built (build_plans)
    if options.controller != "learned" or options.learned_model:
        controller = make_controller(options.controller, percentage=percentage, budget=budget,
                                     learned_path=options.learned_model)
    return Setup(options, video, preprocess, input_shape, model, metric, budget, controller)


def preprocessor(options: RunOptions):
    """The preprocessing that fits `options.model`'s declared input: the preset's, with the
    generic fields given overriding it (what every run, and the plain onnxruntime baseline of
    `bench-streams`, feeds the model)."""
    from deluceva.media.preprocess import Preprocessor
    from deluceva.planner.load_model import read_image_input
    from deluceva.presets import preprocessing

    image = read_image_input(options.model, options.layout)
    pre = Preprocessor.for_model(image.dims, preset=preprocessing(options.preset),
                                 model_name=str(options.model), **options.preprocessing)
    if image.uint8:
        check_uint8_pixels(pre, options.model, image.name)
    return pre


def check_uint8_pixels(pre, model, name: str) -> None:
    """Refuse preprocessing that would not give a uint8 model the whole pixels 0..255 it takes
    (the graph casts and normalises them itself; deluceva feeds them as float32, exactly)."""
    changes = []
    if pre.scale != 1 or any(m != 0 for m in pre.mean) or any(d != 1 for d in pre.std):
        changes.append(f"scales them (scale {pre.scale:g}, mean {', '.join(f'{m:g}' for m in pre.mean)}, "
                       f"std {', '.join(f'{d:g}' for d in pre.std)})")
    if pre.channels == "GRAY":
        changes.append("makes fractional grey levels (GRAY)")
    if float(pre.pad_value) != int(pre.pad_value) or not 0 <= pre.pad_value <= 255:
        changes.append(f"pads with {pre.pad_value:g}")
    if changes:
        who = f"preset {pre.name}" if pre.name != "generic" else "the preprocessing"
        raise DelucevaError(f"{model}: input {name!r} takes uint8 pixels 0..255 (the graph converts them itself), "
                            f"but {who} {' and '.join(changes)}: drop the preset or --scale/--mean/--std")


def build_plans(setup: Setup, announce=None, plans=None):
    """Sessions for `--plan`, or compiled on the fly (said on stderr through `announce`).

    `plans`: sessions built before in this process for the same model, input shape, plan and
    threads (a streams worker's previous stream, which has ended): reset and calibrated on this
    video's first frames instead of loaded, profiled and compiled again.
    """
    from deluceva.playback.loop import SessionsByPercentage
    from deluceva.session import Session, calibrate_sessions

    options = setup.options
    announce = announce or (lambda text: print(f"deluceva: {text}", file=sys.stderr))
    frames = setup.calibration_frames = _first_frames(setup)
    reused = plans is not None
    if reused:
        calibrate_sessions(plans.sessions, frames)
    elif options.plan in ("dense", "delta"):
        session = Session(setup.model, plan=options.plan, threads=options.threads)
        plans = SessionsByPercentage([session], [0.0], description=f"{options.plan} (every node that can)")
    elif options.plan:
        plans = _plans_from_file(options.plan, setup)
    else:
        announce(f"no --plan given: profiling on the first {len(frames)} frames at p = "
                 f"{', '.join(f'{p:g}' for p in ON_THE_FLY_PERCENTAGES)} and compiling plans on the fly for those p "
                 "and the ones between (save them with `deluceva compile`)")
        plans = compile_plans(setup.model, frames, options.threads)
    if options.plan and not reused:  # compile_plans calibrated its own
        calibrate_sessions(plans.sessions, frames)
    if reused:  # (warm already) the next frame is an exact keyframe, and its counts start again
        for session in plans.sessions:
            session.reset()
            for counts in (session.executor.forms.delta, session.executor.forms.dense):
                counts.update(dict.fromkeys(counts, 0))  # in place: the steps' calls hold these dicts
    else:
        _warm_up(plans, frames)
        _retire_slow_plans(plans, frames, announce)
    _calibrate_metric(setup, plans, frames, announce)
    if options.gate:  # before the controller: it starts on the gate's knob
        setup.gate = calibrate_gate(setup, plans, announce)
    _start_controller(setup, plans, announce, setup.gate)
    if setup.controller is None:
        _train_controller(setup, plans, announce, setup.gate)
    elif options.controller == "learned":  # loaded with --learned-model
        _fit_learned_to_video(setup, plans, setup.controller, frames, setup.gate)
    _warm_controller(setup.controller)
    release_freed_memory()  # what the first frames' measurements left, before the run's own peak
    return plans


def controller_for(setup: Setup, plans, name: str, gate=None, announce=None):
    """A `name` controller ("pi" or "learned") started on `plans` (and on `gate`'s knob when
    given) as a run with that controller and no --percentage would start it; returns
    (controller, starting setting). `setup` is unchanged (`bench` lands several controllers on
    the same plans)."""
    from dataclasses import replace

    announce = announce or (lambda text: None)
    other = replace(setup, options=replace(setup.options, controller=name, percentage=None, learned_model=None),
                    controller=None, start_percentage=0.0, notes=[])
    if name == "learned":
        _train_controller(other, plans, announce, gate)
    else:
        _start_controller(other, plans, announce, gate)
    _warm_controller(other.controller)
    return other.controller, other.start_percentage


def _warm_controller(controller) -> None:
    """A learned controller's first choice loads its compiled tree walk from numba's cache (or
    compiles it, the first time on a machine: about a second): set-up time, not the first frame's."""
    from deluceva.controller import LearnedController, Observation

    if isinstance(controller, LearnedController) and controller.model is not None:
        controller.choose(Observation())


def calibrate_gate(setup: Setup, plans, announce=None):
    """The frame gate's schedule, measured on the video's first frames (see
    `deluceva.playback.gate.calibrate_gate`); said on stderr through `announce`."""
    from deluceva.controller import RUN_SETPOINT
    from deluceva.media.video import open_video
    from deluceva.metrics import DET_FRAME_LIMIT
    from deluceva.playback.calibration import LEARNING_FRAMES
    from deluceva.playback.gate import GATE_CLIFF
    from deluceva.playback.gate import calibrate_gate as measure

    options = setup.options
    video = open_video(options.video, frames=LEARNING_FRAMES, start=options.first_frames_start, every=options.every)
    frames = [setup.preprocess(rgb) for rgb in video]
    frame_limit = DET_FRAME_LIMIT if getattr(setup.metric, "name", None) == "det" else None
    schedule = measure(plans, setup.metric, frames, RUN_SETPOINT * setup.budget, GATE_CLIFF * setup.budget,
                       frame_limit=frame_limit)
    if announce is not None:
        announce(f"frame gate calibrated on the first {len(frames)} frames: tile threshold {schedule.threshold:.4g}; "
                 f"setting -> (p, g): {schedule.describe()}; controllers start at {schedule.start:.2f}, at most "
                 f"{schedule.ceiling:.2f}")
    return schedule


def _train_controller(setup: Setup, plans, announce, gate=None) -> None:
    """`--controller learned` without a file: trained on the video's first frames, through the
    run's own plans (as `deluceva profile --controller-out` would save one)."""
    from deluceva.media.video import open_video
    from deluceva.playback.calibration import LEARNING_FRAMES, train_learned_controller

    options = setup.options
    video = open_video(options.video, frames=LEARNING_FRAMES, start=options.first_frames_start, every=options.every)
    frames = [setup.preprocess(rgb) for rgb in video]
    announce(f"no --learned-model given: training the learned controller on the first {len(frames)} frames "
             "(save one with `deluceva profile --controller-out`)")
    controller = train_learned_controller(plans, setup.metric, frames, setup.budget, gate=gate)
    _fit_learned_to_video(setup, plans, controller, frames, gate)


def _fit_learned_to_video(setup: Setup, plans, controller, frames: list, gate=None) -> None:
    """A learned controller, trained here or loaded with --learned-model, made the run's: kept
    below the PI's ceiling and started as `_learned_start` says.

    The PI's ceiling holds for the learned controller too: past the first p whose calibration
    error is over CLIFF x the budget, one frame costs more than the speed pays for (on
    YOLOX-nano / intersection_cctv it went to p = 0.8 and ran at det 0.026 against 0.02)."""
    found = gate if gate is not None else _starting_range(setup, plans)
    controller.p_max = max(controller.step, min(controller.p_max, found.ceiling))
    setup.controller = controller
    setup.start_percentage = _learned_start(controller, frames, found.start)


def _learned_start(controller, frames: list, highest: float) -> float:
    """Where a learned controller starts: the median of what it chooses for each change between
    `frames` (the video's first), but no higher than `highest`, where a PI controller would
    start (the calibration frames' error within its setpoint there).

    Plans switch up only on reference frames, so a run starting at p = 0 ran its first reference
    interval on the all-dense plan: 30 of 120 frames on YOLOX-nano / intersection_cctv, 1.07x
    where the PI ran at 1.21x. Started at its own choice alone (p = 0.75 there, from frames
    busier than the rest) it ran at det 0.028 against the 0.02 budget."""
    import statistics

    from deluceva.controller import Observation
    from deluceva.playback.loop import change_statistics

    choices = [controller.choose(Observation(**change_statistics(frame, previous)))
               for previous, frame in zip(frames, frames[1:])]
    start = min(float(statistics.median_low(choices)) if choices else 0.0, highest)
    controller.state.percentage = start
    return start


def _starting_range(setup: Setup, plans):
    """The PI's start and ceiling (see `starting_range`) on the calibration frames."""
    from deluceva.controller import RUN_SETPOINT
    from deluceva.playback.calibration import starting_range

    frames = setup.calibration_frames
    return starting_range(plans, setup.metric, frames, RUN_SETPOINT * setup.budget, setup.budget)


def _retire_slow_plans(plans, frames: list, announce) -> None:
    """Plans slower than the all-dense one on the first frames never run (see
    `deluceva.playback.calibration.retire_slow_plans`); said on stderr."""
    from deluceva.playback.calibration import retire_slow_plans

    ratios = retire_slow_plans(plans, frames)
    if plans.retired:
        ranges = ", ".join(f"{plans.percentages[i]:g} ({ratios[i]:.2f}x the time)" for i in sorted(plans.retired))
        announce(f"plans slower than dense on the first {len(frames)} frames run dense instead: the plans from p = {ranges}")


def _calibrate_metric(setup: Setup, plans, frames: list, announce) -> None:
    """norm-l2 takes each output's typical norm from the calibration frames' dense outputs; rel-l2
    held on softmax or sigmoid scores gets a warning (their norm is the background's: errors on
    the few boxes that matter vanish in it)."""
    from deluceva.metrics import score_outputs

    metric = setup.metric
    if getattr(metric, "needs_calibration", False):
        metric.calibrate([plans.sessions[0].reference(frame) for frame in frames])
    if getattr(metric, "name", None) == "rel-l2":
        scores = score_outputs(setup.model)
        if scores:
            announce(f"warning: {', '.join(scores)} {'is' if len(scores) == 1 else 'are'} softmax or sigmoid scores: "
                     "rel-l2 on them is dominated by the background and can hide missed detections; --metric det "
                     "(with a preset, or --boxes/--scores) measures the detections themselves")


def _warm_up(plans, frames: list) -> None:
    """Run each plan once on the calibration frames: the first keyframe builds the shared
    keyframe session, the first delta frame loads the compiled kernels from numba's cache
    (0.1-0.3 s on a fresh process). Done here, set-up time, not the first frames' time."""
    for session in plans.sessions:
        session.run(frames[0], keyframe=True)
        session.run(frames[1], 0.5)
        session.reset()


def _start_controller(setup: Setup, plans, announce, gate=None) -> None:
    """A PI controller without --percentage starts at the p the calibration frames say holds the
    budget, and stays below the first p where they are far over it (see `starting_range`); on a
    gate's knob, where its calibration says."""
    from deluceva.controller import RUN_SETPOINT, make_controller
    from deluceva.playback.calibration import CLIFF

    options = setup.options
    if options.controller != "pi" or options.percentage is not None:
        return
    if gate is not None:
        setup.controller = make_controller("pi", percentage=gate.start, budget=setup.budget, ceiling=gate.ceiling)
        setup.start_percentage = gate.start
        return
    frames = setup.calibration_frames
    found = _starting_range(setup, plans)
    setup.controller = make_controller("pi", percentage=found.start, budget=setup.budget, ceiling=found.ceiling)
    setup.start_percentage = found.start
    text = (f"pi controller starts at p = {found.start:g}, where the first {len(frames)} frames "
            f"stay within {RUN_SETPOINT:g} x the budget")
    if found.cliff:
        p, error = found.cliff
        text += (f", and stays at or below p = {found.ceiling:g}: at p = {p:g} their error is {error:.3g}, "
                 f"over {CLIFF:g} x the budget")
    announce(text)


def _first_frames(setup: Setup) -> list:
    """The video's first frames (model inputs): what profiling and threshold calibration see."""
    from deluceva.media.video import open_video

    options = setup.options
    video = open_video(options.video, frames=PROFILE_FRAMES, start=options.first_frames_start, every=options.every)
    frames = [setup.preprocess(rgb) for rgb in video]
    if len(frames) < 2:
        raise DelucevaError(f"{options.video}: needs at least 2 frames to calibrate the filters, has {len(frames)}")
    return frames


def _plans_from_file(path: str, setup: Setup):
    """SessionsByPercentage from a plan JSON written by `deluceva compile`."""
    from deluceva.planner import plan_file
    from deluceva.playback.loop import SessionsByPercentage

    entries = plan_file.plans_for_run(path, setup.model)  # [(percentage, {node: variant}), ...]
    return SessionsByPercentage.from_variants(setup.model, entries, setup.options.threads, description=f"from {path}")


def compile_plans(model, frames: list, threads: int = 1, percentages=None, progress: bool = True):
    """Profile `model` on `frames` (model inputs) and choose a plan by cost for each percentage.

    Args:
        percentages: to profile and plan for exactly; default: profile at ON_THE_FLY_PERCENTAGES
            and plan for those and the ones between (as `deluceva compile` does).

    Returns a SessionsByPercentage (plans identical to a lower percentage's are merged).
    """
    from deluceva.planner.plan_file import compile_plan
    from deluceva.profiles import measure_profile
    from deluceva.playback.loop import SessionsByPercentage
    from deluceva.session import calibrate_sessions

    planned = percentages
    percentages = tuple(percentages or ON_THE_FLY_PERCENTAGES)
    profile = measure_profile(model, frames, threads=threads, percentages=percentages, progress=progress)
    plan = compile_plan(model, profile, planned)
    plans = SessionsByPercentage.from_variants(model, [(p, plan.variants_for(p)) for p in plan.percentages], threads,
                                               description=f"profiled on {len(frames)} frames, compiled on the fly")
    calibrate_sessions(plans.sessions, frames)
    return plans


def run_info(setup: Setup, plans) -> dict:
    """The summary fields that describe the run rather than measure it."""
    options = setup.options
    return {
        "model": str(options.model),
        "video": str(options.video),
        "input_shape": list(setup.input_shape),
        "preset": options.preset,
        **({"detector": dataclasses.asdict(options.detector)} if options.detector is not None else {}),
        **({"input_as_exported": setup.model.exported_input.describe()}
           if getattr(setup.model, "exported_input", None) is not None else {}),
        "metric": options.metric,
        "budget": setup.budget,
        "controller": options.controller,
        "threads": options.threads,
        "reference_every": options.reference_every,
        "plan": plans.description,
        "retired_plans": [plans.percentages[i] for i in sorted(plans.retired)],
        "gate": None if setup.gate is None else {"threshold": setup.gate.threshold, "schedule": setup.gate.points},
    }
