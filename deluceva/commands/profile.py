"""`deluceva profile`: measure a model on calibration frames of a video, write PROFILE.json."""

from __future__ import annotations

import sys
from pathlib import Path

from deluceva.errors import DelucevaError

__all__ = ["add_parser", "handle", "default_profile_path", "calibration_inputs"]


def default_profile_path(model: str) -> Path:
    """Beside the model: yolox.onnx -> yolox.profile.json."""
    path = Path(model)
    return path.with_name(path.stem + ".profile.json")


def calibration_inputs(model_path: str, video: str, frames: int, preset: str | None, start: int = 0):
    """(model, list of model inputs) for the first `frames` frames of `video`, preprocessed."""
    from deluceva.media.video import open_video
    from deluceva.planner import load_model
    from deluceva.playback.setup import RunOptions, preprocessor

    reader = open_video(video, frames=frames, start=start)
    preprocess = preprocessor(RunOptions(model=model_path, video=video, preset=preset))  # as `run` fits it
    input_shape = tuple(int(d) for d in preprocess.input_shape((reader.height, reader.width)))
    model = load_model(model_path, input_shape)
    inputs = [preprocess(frame) for frame in reader]
    return model, inputs


def _save_learned_controller(args, model, profile, inputs, path) -> None:
    """Train a learned controller on the profiled frames, through the plans this profile compiles
    to (calibrated on the first frames, as `run` calibrates), and save it as JSON."""
    from deluceva.planner.plan_file import compile_plan
    from deluceva.metrics import get_metric
    from deluceva.presets import check_preset
    from deluceva.runtime.thresholds import CALIBRATION_FRAMES
    from deluceva.playback.calibration import train_learned_controller
    from deluceva.playback.loop import SessionsByPercentage
    from deluceva.session import calibrate_sessions

    from deluceva.commands.run import detector_options

    detector = detector_options(args)
    check_preset(args.preset, model, detector)
    metric = get_metric(args.metric, args.preset, input_shape=model.input_shape, output_names=model.output_names,
                        detector=detector)
    budget = args.error_budget if args.error_budget is not None else metric.budget
    plan = compile_plan(model, profile)
    plans = SessionsByPercentage.from_variants(model, [(p, plan.variants_for(p)) for p in plan.percentages], args.threads)
    calibrate_sessions(plans.sessions, inputs[:CALIBRATION_FRAMES])
    metric.calibrate([plans.sessions[0].reference(x) for x in inputs[:CALIBRATION_FRAMES]])  # norm-l2's norms
    controller = train_learned_controller(plans, metric, inputs, budget)
    controller.to_json(path)
    print(f"learned controller: {path} ({args.metric}, budget {budget:g}, trained on {len(inputs)} frames)")


def add_parser(commands, percentage, positive_int) -> None:
    parser = commands.add_parser("profile", help="measure each node's dense and delta cost on this machine",
                                 description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--video", required=True, help="calibration video (anything FFmpeg decodes)")
    parser.add_argument("--frames", type=positive_int, default=60, metavar="N",
                        help="calibration frames (default: 60; the last quarter is held out to validate)")
    parser.add_argument("--start", type=int, default=0, metavar="S", help="skip the first S frames")
    parser.add_argument("--threads", type=positive_int, default=1, help="onnxruntime intra-op threads (default: 1)")
    parser.add_argument("--percentages", type=percentage, nargs="+", metavar="P",
                        help="filtering percentages to measure at (default: 0 0.5 0.8 0.9 0.95 0.98 0.99)")
    parser.add_argument("--preset", help="preprocessing preset: yolox, yunet, mtcnn (default: generic)")
    parser.add_argument("-o", "--output", metavar="PROFILE.json",
                        help="where to write the profile (default: beside the model, MODEL.profile.json)")
    parser.add_argument("--controller-out", metavar="CONTROLLER.json",
                        help="also train a learned controller on these frames, through the plans compiled from "
                        "this profile, for `run --controller learned --learned-model` (needs --metric)")
    parser.add_argument("--metric", choices=["det", "rel-l2", "norm-l2"], default="rel-l2",
                        help="the error the learned controller predicts (default: rel-l2)")
    parser.add_argument("--error-budget", type=float, default=None,
                        help="the learned controller's budget (default: the metric's; `run` can override it)")
    from deluceva.commands.run import add_detector_options

    add_detector_options(parser)  # --metric det for a detector without a preset
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from deluceva.profiles import DEFAULT_PERCENTAGES, measure_profile

    from deluceva.files import check_output

    output = check_output(args.output if args.output else default_profile_path(args.model), ".json", "-o")
    controller_out = check_output(args.controller_out, ".json", "--controller-out")
    if args.start < 0:
        raise DelucevaError(f"--start {args.start} must not be negative")
    model, inputs = calibration_inputs(args.model, args.video, args.frames, args.preset, args.start)
    profile = measure_profile(model, inputs, threads=args.threads,
                              percentages=args.percentages or DEFAULT_PERCENTAGES)
    profile.save(output)
    if controller_out is not None:
        _save_learned_controller(args, model, profile, inputs, controller_out)
    v = profile.validation
    print(f"profile: {output} ({len(profile.nodes)} nodes, {len(inputs)} frames, "
          f"dense onnxruntime {profile.dense_model_ms:.2f} ms/frame)")
    if v:
        rows = v["all_delta"]
        pairs = ", ".join(f"p={p:g}: {m:.2f}/{q:.2f}" for p, m, q in
                          zip(rows["percentages"], rows["measured_ms"], rows["predicted_ms"]))
        print(f"cost model on {profile.settings['holdout_frames']} held-out frames, all-delta measured/predicted ms: {pairs}")
        print(f"all-dense measured/predicted ms: {v['all_dense']['measured_ms']:.2f}/{v['all_dense']['predicted_ms']:.2f}; "
              f"mean |error| {v['mean_abs_error_pct']:.1f}%")
    else:
        print("cost model not validated: too few frames to hold some out (use --frames 8 or more)", file=sys.stderr)
    return 0
