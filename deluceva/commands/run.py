"""`deluceva run MODEL VIDEO`: the model's outputs for every frame, with adaptive filtering.

The options here are shared with `bench`; the setup they describe is `deluceva.playback.setup`.
"""

from __future__ import annotations

import argparse
import sys


from deluceva.commands._types import budget, non_negative_int, seconds
from deluceva.errors import DelucevaError
from deluceva.playback.setup import RunOptions, Setup, build_plans, prepare

__all__ = ["add_parser", "add_run_options", "add_detector_options", "detector_options", "run_options", "progress", "handle"]

def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def generic_preprocessing(args: argparse.Namespace) -> dict:
    """The generic preprocessing fields given on the command line."""
    names = {"resize": "mode", "channels": "channels", "scale": "scale", "mean": "mean", "std": "std"}
    return {field: getattr(args, option) for option, field in names.items() if getattr(args, option, None) is not None}


def add_detector_options(parser: argparse.ArgumentParser) -> None:
    """The generic det options (a detector without a preset), shared by run, bench, streams and profile."""
    det = parser.add_argument_group("generic detections (a detector without a preset: for --metric det, --detections "
                                    "and --annotate; override a preset's decoder)")
    det.add_argument("--boxes", metavar="OUTPUT", help="the output holding boxes, N x 4 or 1 x N x 4 (with --head: "
                     "the head output; default its first)")
    det.add_argument("--scores", metavar="OUTPUT", help="the output holding class scores, N x C or 1 x N x C")
    det.add_argument("--box-format", choices=["xyxy", "xywh", "cxcywh"], default=None,
                     help="corners, corner and size, or centre and size (default: xyxy)")
    det.add_argument("--normalized", action="store_true", default=None,
                     help="boxes are in 0..1 of the model input's width and height (default: input pixels)")
    det.add_argument("--background-class", type=int, default=None, metavar="K",
                     help="score column K is background, not a class")
    det.add_argument("--score-threshold", type=float, default=None, help="keep boxes scoring above this (default: 0.5)")
    det.add_argument("--nms-iou", type=float, default=None, help="NMS overlap per class (default: 0.45)")
    det.add_argument("--head", choices=["yolov8"], default=None,
                     help="yolov8: one output 1 x (4 + C) x N, cxcywh in input pixels, then C class scores")


def add_run_options(parser: argparse.ArgumentParser, percentage, positive_int, one_video: bool = True) -> None:
    """The options `run`, `bench` and `streams` share (`streams` takes the model as --model and
    several sources: `one_video` False)."""
    if one_video:
        parser.add_argument("model", help="ONNX model file")
        parser.add_argument("video", help="video file or stream URL (anything FFmpeg decodes)")
    parser.add_argument("--plan", help="plan JSON from `deluceva compile`, or 'dense' or 'delta' (every node that "
                        "has a delta kernel) without profiling (default: profile briefly, compile on the fly)")
    parser.add_argument("--controller", choices=["fixed", "pi", "learned"], default="pi",
                        help="how the filtering percentage moves (default: pi)")
    parser.add_argument("--percentage", type=percentage, default=None,
                        help="filtering percentage in [0, 1): fixed value, or starting value")
    parser.add_argument("--error-budget", type=budget, default=None,
                        help="error to hold on reference frames (default: 0.05 rel-l2 and norm-l2, 0.02 det)")
    parser.add_argument("--metric", choices=["det", "rel-l2", "norm-l2"], default="rel-l2",
                        help="error metric on reference frames: rel-l2 (relative to each frame's output norm), "
                        "norm-l2 (relative to the output's typical norm on the first frames), det (detections "
                        "lost or found, 1 - F1) (default: rel-l2)")
    parser.add_argument("--preset", help="preprocessing preset: yolox, yunet, mtcnn (default: generic)")
    generic = parser.add_argument_group("generic preprocessing (override the preset's or the defaults)")
    generic.add_argument("--resize", choices=["none", "resize", "letterbox", "pad"], help="how a frame fits the input")
    generic.add_argument("--channels", choices=["RGB", "BGR", "GRAY"], help="channel order")
    generic.add_argument("--scale", type=float, help="input = (pixel * scale - mean) / std")
    generic.add_argument("--mean", type=_floats, help="per-channel mean, comma-separated")
    generic.add_argument("--std", type=_floats, help="per-channel std, comma-separated")
    generic.add_argument("--layout", choices=["NCHW", "NHWC"], default=None,
                         help="the model's image input layout, where its graph cannot tell (default: from the graph: "
                         "NHWC when a Transpose to NCHW follows the input, or its shape is 1xHxWx3)")
    add_detector_options(parser)
    parser.add_argument("--reference-every", type=positive_int, default=30, metavar="K",
                        help="run a dense reference frame every K frames (default: 30)")
    parser.add_argument("--threads", type=positive_int, default=1, help="onnxruntime intra-op threads (default: 1)")
    parser.add_argument("--frames", type=positive_int, default=None, metavar="N", help="process at most N frames")
    parser.add_argument("--start", type=non_negative_int, default=0, metavar="S", help="skip the first S frames")
    parser.add_argument("--every", type=positive_int, default=1, metavar="K", help="keep one frame in K")
    parser.add_argument("--learned-model", help="learned controller JSON from `deluceva profile --controller-out` "
                        "(for --controller learned; without it one is trained on the video's first frames)")
    parser.add_argument("--gate", action="store_true",
                        help="also reuse the last outputs on frames where few 8x8 tiles changed since the last frame "
                        "that ran; the controller moves p and that share on one knob, calibrated on the first frames")


def add_parser(commands, percentage, positive_int) -> None:
    parser = commands.add_parser("run", help="run a model on a video with adaptive filtering",
                                 description=__doc__.splitlines()[0])
    add_run_options(parser, percentage, positive_int)
    parser.add_argument("--outputs", metavar="OUT.npz", help="each output stacked over frames, written as the run goes")
    parser.add_argument("--save-inputs", action="store_true", help="also store each model input, keyed input:<name>")
    parser.add_argument("--summary", metavar="SUMMARY.json", help="write times, errors and traces as JSON")
    parser.add_argument("--drop-late", type=seconds, default=None, metavar="SECONDS",
                        help="skip frames while the run is more than SECONDS behind the video's own clock (for live "
                        "streams; the summary counts them; default: process every frame)")
    parser.add_argument("--detections", metavar="OUT.jsonl",
                        help="with a detection preset (yolox, yunet, mtcnn) or --boxes/--scores: each frame's boxes, "
                        "scores and classes in the video's pixels, one JSON line per frame, written as the run goes")
    parser.add_argument("--annotate", metavar="OUT.mp4",
                        help="with a detection preset or --boxes/--scores: the video with each frame's boxes, class "
                        "and score drawn, written as the run goes (.mp4, .mkv or .mov)")
    parser.set_defaults(handler=handle)


_DETECTOR_FIELDS = ("boxes", "scores", "box_format", "normalized", "background_class", "score_threshold",
                    "nms_iou", "head")


def detector_options(args: argparse.Namespace):
    """The generic det options given (`DetectorOptions`), or None when none is.

    Raises:
        DelucevaError: a reading option (--box-format, ...) without --boxes/--scores or --head.
    """
    from deluceva.presets.generic import DetectorOptions

    given = {f: getattr(args, f, None) for f in _DETECTOR_FIELDS if getattr(args, f, None) is not None}
    if not given:
        return None
    if not any(f in given for f in ("boxes", "scores", "head")):
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise DelucevaError(f"{flags} says how to read boxes and scores: give --boxes OUTPUT --scores OUTPUT "
                            "(or --head yolov8) too")
    return DetectorOptions(**given)


def run_options(args: argparse.Namespace) -> RunOptions:
    """The library's `RunOptions` from `run`'s (or `bench`'s) parsed command line."""
    return RunOptions(model=args.model, video=getattr(args, "video", ""), plan=args.plan, controller=args.controller,
                      percentage=args.percentage, error_budget=args.error_budget, metric=args.metric,
                      preset=args.preset, preprocessing=generic_preprocessing(args),
                      reference_every=args.reference_every, threads=args.threads, frames=args.frames,
                      start=args.start, every=args.every, learned_model=args.learned_model,
                      detector=detector_options(args), layout=getattr(args, "layout", None),
                      gate=getattr(args, "gate", False))


# -- printing and writing, shared with bench -------------------------------------------------


def progress(total: int | None, description: str):
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="frame", file=sys.stderr, disable=None, dynamic_ncols=True)


# -- the command ---------------------------------------------------------------------------


def handle(args: argparse.Namespace) -> int:
    from deluceva.files import check_output
    from deluceva.presets import PRESETS, decodes_detections
    from deluceva.playback.job import RunFiles, run_video

    check_output(args.outputs, ".npz", "--outputs")
    check_output(args.summary, ".json", "--summary")
    check_output(args.detections, ".jsonl", "--detections")
    from deluceva.playback.annotate import ANNOTATION_SUFFIXES

    check_output(args.annotate, ANNOTATION_SUFFIXES, "--annotate")
    options = run_options(args)
    for flag, given in (("--detections", args.detections), ("--annotate", args.annotate)):
        if given and not decodes_detections(args.preset, options.detector):
            raise DelucevaError(f"{flag} needs a preset that decodes detections ({', '.join(sorted(PRESETS))}) or "
                                f"the model's boxes and scores (--boxes B --scores S); got {args.preset or 'no preset'}")
    setup = prepare(options)
    plans = build_plans(setup)
    bar = progress(setup.video.expected, "deluceva run")

    def show(result):
        bar.update(1)
        if result.error is not None:
            bar.set_postfix(p=f"{result.percentage:.2f}", err=f"{result.error:.4f}")

    files = RunFiles(outputs=args.outputs, summary=args.summary, detections=args.detections, annotate=args.annotate,
                    save_inputs=args.save_inputs,
                    drop_late=args.drop_late)
    try:
        job = run_video(setup, plans, files, on_frame=show)
    finally:
        bar.close()
    _print_summary(job.summary, setup)
    if job.summary.get("dropped_frames"):
        print(f"{job.summary['dropped_frames']} frames dropped: the run fell more than {args.drop_late:g} s behind "
              "the video", file=sys.stderr)
    return 0


def _print_summary(summary: dict, setup: Setup) -> None:
    error = summary["error_mean"]
    measured = "n/a" if error is None else f"{error:.4f} mean, {summary['error_max']:.4f} max"
    print(
        f"{summary['frames']} frames, {summary['ms_per_frame_mean']:.2f} ms/frame mean "
        f"({summary['ms_per_frame_median']:.2f} median), {summary['reference_frames']} reference frames, "
        f"{setup.options.metric} error on references {measured} (budget {setup.budget:g})",
        file=sys.stderr,
    )
