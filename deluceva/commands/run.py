"""`deluceva run MODEL VIDEO`: the model's outputs for every frame, with adaptive filtering.

The setup here (model, video, preprocessing, plans, metric, controller) is shared with `bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deluceva.commands._types import budget, non_negative_int
from deluceva.errors import DelucevaError
from deluceva.runtime.thresholds import CALIBRATION_FRAMES

__all__ = ["add_parser", "add_run_options", "Setup", "prepare", "build_plans", "compile_plans", "progress", "write_json", "handle"]

# Without --plan: percentages compiled on the fly, and frames profiled for them; `deluceva
# compile` makes a finer plan once and for all. The grid is dense below 0.5 because that is where
# the controllers settle: YOLOX-nano on intersection_cctv keeps det error 0 up to p = 0.2 and
# reaches 0.35 at p = 0.5, and the plan for p = 0 is all dense, so a coarse grid (0, 0.5, 0.9)
# left the PI controller only "exact" or "far over budget" to choose from.
ON_THE_FLY_PERCENTAGES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
# The video's first frames, profiled on the fly; the same frames calibrate the filters.
PROFILE_FRAMES = CALIBRATION_FRAMES


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def generic_preprocessing(args: argparse.Namespace) -> dict:
    """The generic preprocessing fields given on the command line."""
    names = {"resize": "mode", "channels": "channels", "scale": "scale", "mean": "mean", "std": "std"}
    return {field: getattr(args, option) for option, field in names.items() if getattr(args, option, None) is not None}


def add_run_options(parser: argparse.ArgumentParser, percentage, positive_int) -> None:
    """The options `run` and `bench` share."""
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("video", help="video file or stream URL (anything FFmpeg decodes)")
    parser.add_argument("--plan", help="plan JSON from `deluceva compile`, or 'dense' or 'delta' (every node that "
                        "has a delta kernel) without profiling (default: profile briefly, compile on the fly)")
    parser.add_argument("--controller", choices=["fixed", "pi", "learned"], default="pi",
                        help="how the filtering percentage moves (default: pi)")
    parser.add_argument("--percentage", type=percentage, default=None,
                        help="filtering percentage in [0, 1): fixed value, or starting value")
    parser.add_argument("--error-budget", type=budget, default=None,
                        help="error to hold on reference frames (default: 0.05 rel-l2, 0.02 det)")
    parser.add_argument("--metric", choices=["det", "rel-l2"], default="rel-l2",
                        help="error metric on reference frames (default: rel-l2)")
    parser.add_argument("--preset", help="preprocessing preset: yolox, yunet, mtcnn (default: generic)")
    generic = parser.add_argument_group("generic preprocessing (override the preset's or the defaults)")
    generic.add_argument("--resize", choices=["none", "resize", "letterbox", "pad"], help="how a frame fits the input")
    generic.add_argument("--channels", choices=["RGB", "BGR", "GRAY"], help="channel order")
    generic.add_argument("--scale", type=float, help="input = (pixel * scale - mean) / std")
    generic.add_argument("--mean", type=_floats, help="per-channel mean, comma-separated")
    generic.add_argument("--std", type=_floats, help="per-channel std, comma-separated")
    parser.add_argument("--reference-every", type=positive_int, default=30, metavar="K",
                        help="run a dense reference frame every K frames (default: 30)")
    parser.add_argument("--threads", type=positive_int, default=1, help="onnxruntime intra-op threads (default: 1)")
    parser.add_argument("--frames", type=positive_int, default=None, metavar="N", help="process at most N frames")
    parser.add_argument("--start", type=non_negative_int, default=0, metavar="S", help="skip the first S frames")
    parser.add_argument("--every", type=positive_int, default=1, metavar="K", help="keep one frame in K")
    parser.add_argument("--learned-model", help="learned controller JSON from `deluceva profile --controller-out` "
                        "(for --controller learned; without it one is trained on the video's first frames)")


def add_parser(commands, percentage, positive_int) -> None:
    parser = commands.add_parser("run", help="run a model on a video with adaptive filtering",
                                 description=__doc__.splitlines()[0])
    add_run_options(parser, percentage, positive_int)
    parser.add_argument("--outputs", metavar="OUT.npz", help="each output stacked over frames, written as the run goes")
    parser.add_argument("--save-inputs", action="store_true", help="also store each model input, keyed input:<name>")
    parser.add_argument("--summary", metavar="SUMMARY.json", help="write times, errors and traces as JSON")
    parser.set_defaults(handler=handle)


# -- setup shared with bench -----------------------------------------------------------------


@dataclass
class Setup:
    """Everything a run needs before its sessions are built."""

    args: argparse.Namespace
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


def prepare(args: argparse.Namespace) -> Setup:
    """Check options, open the video, fit the preprocessing to the model, make metric and controller."""
    from deluceva.controller import make_controller
    from deluceva.planner import load_model
    from deluceva.planner.load_model import declared_input_shape
    from deluceva.runtime.metrics import check_preset, get_metric
    from deluceva.runtime.preprocess import Preprocessor
    from deluceva.runtime.video import open_video

    if args.reference_every < 1:
        raise DelucevaError(f"--reference-every {args.reference_every} must be at least 1")
    if args.percentage is not None and not 0.0 <= args.percentage < 1.0:
        raise DelucevaError(f"--percentage {args.percentage} is outside [0, 1)")
    declared = declared_input_shape(args.model)
    video = open_video(args.video, frames=args.frames, start=args.start, every=args.every)
    preprocess = Preprocessor.for_model(tuple(declared), preset=args.preset, model_name=str(args.model),
                                        **generic_preprocessing(args))
    input_shape = tuple(int(d) for d in preprocess.input_shape((video.height, video.width)))
    model = load_model(args.model, input_shape)
    check_preset(args.preset, model)
    metric = get_metric(args.metric, args.preset, input_shape=input_shape, output_names=model.output_names)
    budget = args.error_budget if args.error_budget is not None else metric.budget
    percentage = args.percentage
    if args.controller == "fixed" and percentage is None:
        percentage = 0.0
    controller = None  # trained on the run's own plans, once they are built (build_plans)
    if args.controller != "learned" or args.learned_model:
        controller = make_controller(args.controller, percentage=percentage, budget=budget,
                                     learned_path=args.learned_model)
    return Setup(args, video, preprocess, input_shape, model, metric, budget, controller)


def build_plans(setup: Setup, announce=None):
    """Sessions for `--plan`, or compiled on the fly (said on stderr through `announce`)."""
    from deluceva.runtime.video_runner import PlanSet
    from deluceva.session import Session, calibrate_sessions

    args = setup.args
    announce = announce or (lambda text: print(f"deluceva: {text}", file=sys.stderr))
    frames = setup.calibration_frames = _first_frames(setup)
    if args.plan in ("dense", "delta"):
        session = Session(setup.model, plan=args.plan, threads=args.threads)
        plans = PlanSet([session], [0.0], description=f"{args.plan} (every node that can)")
    elif args.plan:
        plans = _plans_from_file(args.plan, setup)
    else:
        announce(f"no --plan given: profiling on the first {len(frames)} frames and compiling on the fly "
                 f"for p in {', '.join(f'{p:g}' for p in ON_THE_FLY_PERCENTAGES)} (save one with `deluceva compile`)")
        plans = compile_plans(setup.model, frames, args.threads)
    if args.plan:  # compile_plans calibrated its own
        calibrate_sessions(plans.sessions, frames)
    _warm_up(plans, frames)
    _start_controller(setup, plans, announce)
    if setup.controller is None:
        _train_controller(setup, plans, announce)
    return plans


def _train_controller(setup: Setup, plans, announce) -> None:
    """`--controller learned` without a file: trained on the video's first frames, through the
    run's own plans (as `deluceva profile --controller-out` would save one)."""
    from deluceva.runtime.video import open_video
    from deluceva.runtime.video_runner import LEARNING_FRAMES, train_learned_controller

    args = setup.args
    video = open_video(args.video, frames=LEARNING_FRAMES, start=args.start, every=args.every)
    frames = [setup.preprocess(rgb) for rgb in video]
    announce(f"no --learned-model given: training the learned controller on the first {len(frames)} frames "
             "(save one with `deluceva profile --controller-out`)")
    setup.controller = train_learned_controller(plans, setup.metric, frames, setup.budget)


def _warm_up(plans, frames: list) -> None:
    """Run each plan once on the calibration frames: the first keyframe builds the shared
    keyframe session, the first delta frame loads the compiled kernels from numba's cache
    (0.1-0.3 s on a fresh process). Done here, set-up time, not the first frames' time."""
    for session in plans.sessions:
        session.run(frames[0], keyframe=True)
        session.run(frames[1], 0.5)
        session.reset()


def _start_controller(setup: Setup, plans, announce) -> None:
    """A PI controller without --percentage starts at the p the calibration frames say holds the
    budget (see `starting_percentage`), rather than at 0."""
    from deluceva.controller import RUN_SETPOINT, make_controller
    from deluceva.runtime.video_runner import starting_percentage

    args = setup.args
    if args.controller != "pi" or args.percentage is not None:
        return
    start = starting_percentage(plans, setup.metric, setup.calibration_frames, RUN_SETPOINT * setup.budget)
    setup.controller = make_controller("pi", percentage=start, budget=setup.budget)
    setup.start_percentage = start
    announce(f"pi controller starts at p = {start:g}, where the first {len(setup.calibration_frames)} frames "
             f"stay within {RUN_SETPOINT:g} x the budget")


def _first_frames(setup: Setup) -> list:
    """The video's first frames (model inputs): what profiling and threshold calibration see."""
    from deluceva.runtime.video import open_video

    args = setup.args
    video = open_video(args.video, frames=PROFILE_FRAMES, start=args.start, every=args.every)
    frames = [setup.preprocess(rgb) for rgb in video]
    if len(frames) < 2:
        raise DelucevaError(f"{args.video}: needs at least 2 frames to calibrate the filters, has {len(frames)}")
    return frames


def _plans_from_file(path: str, setup: Setup):
    """PlanSet from a plan JSON written by `deluceva compile`."""
    from deluceva.operators._buffers import Buffers
    from deluceva.planner import plan_file
    from deluceva.runtime.video_runner import PlanSet
    from deluceva.session import Session

    entries = plan_file.plans_for_run(path, setup.model)  # [(percentage, {node: variant}), ...]
    sessions, percentages, previous = [], [], None
    buffers = Buffers()  # one plan runs at a time: they share working buffers and tensors' state
    for percentage, variants in entries:
        if variants == previous:
            continue  # the same plan as the next lower percentage: its session serves this range too
        previous = variants
        sessions.append(Session(setup.model, plan=variants, threads=setup.args.threads, buffers=buffers))
        percentages.append(percentage)
    return PlanSet(sessions, percentages, description=f"from {path}")


def compile_plans(model, frames: list, threads: int = 1, percentages=None, progress: bool = True):
    """Profile `model` on `frames` (model inputs) and choose a plan by cost for each percentage.

    Returns a PlanSet (plans identical to a lower percentage's are merged).
    """
    from deluceva.operators._buffers import Buffers
    from deluceva.planner.plan_file import compile_plan
    from deluceva.profiles import measure_profile
    from deluceva.runtime.video_runner import PlanSet
    from deluceva.session import Session, calibrate_sessions

    percentages = tuple(percentages or ON_THE_FLY_PERCENTAGES)
    profile = measure_profile(model, frames, threads=threads, percentages=percentages, progress=progress)
    plan = compile_plan(model, profile, percentages)
    sessions, compiled, previous = [], [], None
    buffers = Buffers()  # one plan runs at a time: they share working buffers and tensors' state
    for percentage in plan.percentages:
        variants = plan.variants_for(percentage)
        if variants == previous:
            continue  # same plan as the next lower percentage: that session serves this range too
        previous = variants
        sessions.append(Session(model, plan=variants, threads=threads, buffers=buffers))
        compiled.append(percentage)
    calibrate_sessions(sessions, frames)
    return PlanSet(sessions, compiled, description=f"profiled on {len(frames)} frames, compiled on the fly")


def progress(total: int | None, description: str):
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="frame", file=sys.stderr, disable=None, dynamic_ncols=True)


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as JSON, whole or, failing that, in the temporary folder (see output_files)."""
    from deluceva.output_files import write_text

    write_text(path, json.dumps(data, indent=1, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")



def run_info(setup: Setup, plans) -> dict:
    """The summary fields that describe the run rather than measure it."""
    args = setup.args
    return {
        "model": str(args.model),
        "video": str(args.video),
        "input_shape": list(setup.input_shape),
        "preset": args.preset,
        "metric": args.metric,
        "budget": setup.budget,
        "controller": args.controller,
        "threads": args.threads,
        "reference_every": args.reference_every,
        "plan": plans.description,
    }


# -- the command ---------------------------------------------------------------------------


def handle(args: argparse.Namespace) -> int:
    from deluceva.output_files import check_output
    from deluceva.runtime.video_runner import FrameRecorder, VideoRunner, summarise

    check_output(args.outputs, ".npz", "--outputs")
    check_output(args.summary, ".json", "--summary")
    setup = prepare(args)
    plans = build_plans(setup)
    runner = VideoRunner(plans, setup.controller, setup.metric, args.reference_every,
                         percentage=args.percentage or setup.start_percentage)
    recorder = FrameRecorder(args.outputs) if args.outputs else None
    names = setup.model.output_names
    input_key = f"input:{setup.model.input_name}"
    results = []
    interrupted = False
    bar = progress(setup.video.expected, "deluceva run")
    try:
        for rgb in setup.video:
            tensor = setup.preprocess(rgb)
            result = runner.step(tensor)
            results.append(result)
            if recorder is not None:
                arrays = dict(zip(names, result.outputs))
                if args.save_inputs:
                    arrays[input_key] = tensor
                recorder.add(arrays)
            result.outputs = None  # outputs live on disk only; keep memory flat on long videos
            bar.update(1)
            if result.error is not None:
                bar.set_postfix(p=f"{result.percentage:.2f}", err=f"{result.error:.4f}")
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        bar.close()
        failures = []  # each write is tried, whatever the other's fate: nothing done is lost
        if recorder is not None:
            try:
                recorder.close()
            except DelucevaError as error:
                failures.append(error)
        if args.summary and results:
            summary = {**run_info(setup, plans), **summarise(results, plans), "interrupted": interrupted}
            try:
                write_json(args.summary, summary)
            except DelucevaError as error:
                failures.append(error)
        for error in failures[0 if interrupted else 1:]:
            print(f"deluceva: error: {error}", file=sys.stderr)
        if failures and not interrupted:  # (an interrupted run ends as interrupted)
            raise failures[0]
    summary = summarise(results, plans)
    _print_summary(summary, setup)
    return 0


def _print_summary(summary: dict, setup: Setup) -> None:
    error = summary["error_mean"]
    measured = "n/a" if error is None else f"{error:.4f} mean, {summary['error_max']:.4f} max"
    print(
        f"{summary['frames']} frames, {summary['ms_per_frame_mean']:.2f} ms/frame mean "
        f"({summary['ms_per_frame_median']:.2f} median), {summary['reference_frames']} reference frames, "
        f"{setup.args.metric} error on references {measured} (budget {setup.budget:g})",
        file=sys.stderr,
    )
