"""`deluceva bench MODEL VIDEO`: deluceva against plain onnxruntime on the same frames.

Two passes over the same frames with the same preprocessing: plain onnxruntime (an
InferenceSession on the original model file, default optimisations, the same intra-op threads,
one inter-op thread), then deluceva. Each frame's time is the model work alone (decoding and
preprocessing, identical for both, are left out). Onnxruntime's outputs are kept in a temporary
file and deluceva's error against them is computed on every frame outside deluceva's timing.

With one thread, the times compared are interleaved in blocks: during deluceva's pass, a second
plain onnxruntime session runs each block of 8 frames right after deluceva has run them, outside
deluceva's timing, so a busy or drifting machine slows both alike (on this project's shared
2-core machine, two consecutive passes of the same model differed by up to 10%). Blocks rather
than single frames: each side evicting the other's working set every frame is something neither
meets on a user's machine (`deluceva.bench.compare.PAIRED_BLOCK`). The first pass gives the
outputs and onnxruntime's memory. With more threads, that first pass is also the baseline's
time: two sessions interleaved in one process slow each other (a pool spins after its run while
the other's needs the cores), so deluceva is timed against onnxruntime run alone, in separate
passes.

`--sweep P,P,...` also runs the same plans at each fixed p (p = 0 with the all-dense plan), the
same reference interval counted, and lands the PI and learned controllers on that curve (each
started as `run` starts it); `--gate` adds deluceva with the frame gate beside frame skipping.

Peak memory of each pass is measured as `deluceva.baseline.PeakMemory` says; the measurements
themselves are `deluceva.bench.compare`'s.
"""

from __future__ import annotations

import argparse

import numpy as np

__all__ = ["add_parser", "handle", "format_table", "format_sweep", "plot", "percentages"]


def percentages(text: str) -> list[float]:
    """`--sweep`'s comma-separated filtering percentages, each in [0, 1), sorted, 0 included."""
    from deluceva.commands._types import percentage

    values = {percentage(part.strip()) for part in text.split(",") if part.strip()}
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no percentage")
    return sorted(values | {0.0})


def add_parser(commands, percentage, positive_int) -> None:
    from deluceva.commands.run import add_run_options

    parser = commands.add_parser("bench", help="compare deluceva with plain onnxruntime on a video",
                                 description=__doc__.splitlines()[0])
    add_run_options(parser, percentage, positive_int)
    parser.add_argument("--json", metavar="OUT.json", help="write every figure, per-frame traces and the machine")
    parser.add_argument("--plot", metavar="OUT.png", help="plot per-frame time, error and percentage")
    parser.add_argument("--skip-curve", action="store_true",
                        help="also measure frame skipping at every threshold it tries (its speed-versus-error curve)")
    parser.add_argument("--sweep", type=percentages, metavar="P,P,...",
                        help="also run the run's plans at each fixed p (p = 0: the all-dense plan) and land the pi and "
                        "learned controllers on that speed/error curve, e.g. 0.1,0.2,...,0.9")
    parser.set_defaults(handler=handle)


def format_table(figures: dict, metric: str, budget: float | None = None) -> str:
    """A plain-text table of `compare`'s figures."""

    def number(value, pattern):
        return "n/a" if value is None else pattern.format(value)

    budget_note = "" if budget is None else f" (budget {budget:g})"
    rows = [
        ("", "onnxruntime", "deluceva"),
        ("ms/frame mean", number(figures["onnxruntime_ms_mean"], "{:.2f}"), number(figures["deluceva_ms_mean"], "{:.2f}")),
        ("ms/frame median", number(figures["onnxruntime_ms_median"], "{:.2f}"), number(figures["deluceva_ms_median"], "{:.2f}")),
        ("peak memory MiB", number(figures["onnxruntime_peak_mib"], "{:.0f}"), number(figures["deluceva_peak_mib"], "{:.0f}")),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{r[0]:<{width}}{r[1]:>12}{r[2]:>12}" for r in rows]
    lines += [
        f"speedup                {figures['speedup']:.2f}x  ({figures['frames']} frames, "
        f"{figures['reference_frames']} reference frames, mean p {figures['percentage_mean']:.2f})",
        f"{metric} error vs onnxruntime  mean {figures['error_mean']:.4f}  p95 {figures['error_p95']:.4f}  "
        f"max {figures['error_max']:.4f}{budget_note}",
        f"mean density           {number(figures['density_mean'], '{:.3f}')}",
        f"FLOP-reduction bound   {number(figures['flop_reduction_bound'], '{:.2f}x')}",
        f"efficiency             {number(figures['efficiency'], '{:.2f}')}  (speedup / bound)",
    ]
    for prefix, label in (("skip", "frame skipping"), ("skip_equal", "  at equal error")):
        if f"{prefix}_speedup" in figures:
            lines.append(
                f"{label:<23}{figures[f'{prefix}_speedup']:.2f}x  (skip under {figures[f'{prefix}_threshold']:g} of "
                f"tiles changed: {figures[f'{prefix}_share']:.0%} skipped; {metric} error mean "
                f"{figures[f'{prefix}_error_mean']:.4f}, max {figures[f'{prefix}_error_max']:.4f})")
    return "\n".join(lines)


def format_sweep(figures: dict, metric: str, budget: float) -> str:
    """The fixed-p curve, its best point within the budget, and where each controller lands."""
    det = metric == "det"
    limit = "frames<=0.1" if det else ""

    def row(label, point, best=None):
        text = (f"{label:<18}{point['speedup']:>7.2f}x  {point['error_mean']:>9.4f}  {point['error_p95']:>8.4f}"
                f"  {point['frames_within_limit']:>10.0%}" if det else
                f"{label:<18}{point['speedup']:>7.2f}x  {point['error_mean']:>9.4f}  {point['error_p95']:>8.4f}  {'':>10}")
        text += f"  {point['reference_frames']:>4} ref {point['gated_frames']:>4} gated {point['plan_switches']:>3} switches"
        if best is not None:
            text += f"  {point['speedup'] / best['speedup']:.0%} of best"
        if "skip_equal_speedup" in point:
            text += f"  (frame skipping at its error: {point['skip_equal_speedup']:.2f}x)"
        return text

    header = f"{'':<18}{'speedup':>8}  {'err mean':>9}  {'err p95':>8}  {limit:>10}"
    lines = [f"fixed-p curve of this run's plans (p = 0: all dense; reference frames counted; {metric}, budget {budget:g})",
             header]
    lines += [row(f"p = {p['percentage']:g}", p) for p in figures["sweep"]]
    best = figures.get("sweep_best")
    if best is None:
        lines.append("best within the budget: none")
    else:
        lines.append(f"best within the budget: p = {best['percentage']:g} at {best['speedup']:.2f}x")
    lines.append("controllers")
    lines += [row(name, point, best) for name, point in figures.get("controllers", {}).items()]
    return "\n".join(lines)


def plot(path: str, ort_run, delta_run, metric: str, budget: float | None) -> None:
    """Per-frame time (both), error against onnxruntime, and filtering percentage."""
    from deluceva.commands._plotting import pyplot

    plt = pyplot("--plot")

    frames = np.arange(len(delta_run.results))
    figure, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    ort_ms = delta_run.paired_ms or ort_run.ms
    axes[0].plot(np.arange(len(ort_ms)), ort_ms, label="onnxruntime", lw=0.8)
    axes[0].plot(frames, [r.seconds * 1000 for r in delta_run.results], label="deluceva", lw=0.8)
    references = [r.index for r in delta_run.results if r.reference]
    axes[0].plot(references, [delta_run.results[i].seconds * 1000 for i in references], "k.", ms=3, label="reference frames")
    axes[0].set_ylabel("ms / frame")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(frames, delta_run.errors, lw=0.8)
    if budget is not None:
        axes[1].axhline(budget, color="red", ls="--", lw=0.8, label="budget")
        axes[1].legend(loc="upper right", fontsize=8)
    axes[1].set_ylabel(f"{metric} error")
    axes[2].plot(frames, [r.percentage for r in delta_run.results], lw=0.8)
    axes[2].set_ylabel("filtering p")
    axes[2].set_xlabel("frame")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- the command ---------------------------------------------------------------------------


def handle(args: argparse.Namespace) -> int:
    from deluceva.bench.baseline import plain_onnxruntime, run_onnxruntime
    from deluceva.planner.load_model import for_onnxruntime
    from deluceva.commands.run import progress, run_options
    from deluceva.files import write_json
    from deluceva.controller import RUN_SETPOINT
    from deluceva.machine import machine_info
    from deluceva.files import check_output
    from deluceva.bench.compare import compare, frame_skipping, run_deluceva
    from deluceva.playback.loop import VideoRunner
    from deluceva.playback.setup import build_plans, prepare, run_info

    check_output(args.json, ".json", "--json")
    check_output(args.plot, ".png", "--plot")
    setup = prepare(run_options(args))
    preprocess = setup.preprocess
    bar = progress(setup.video.expected, "onnxruntime")
    try:
        ort_run = run_onnxruntime(for_onnxruntime(args.model, setup.options.layout), (preprocess(rgb) for rgb in setup.video), args.threads, bar)
    finally:
        bar.close()
    try:
        holder = {}

        def make_runner():
            holder["plans"] = build_plans(setup)
            controller, start = _without_gate(args, setup, holder["plans"])
            return VideoRunner(holder["plans"], controller, setup.metric, args.reference_every, percentage=start)

        # With more than one thread, two sessions interleaved in one process slow each other: an
        # onnxruntime pool spins after its run while the other's needs the cores (YOLOX-nano at
        # 2 threads on 2 cores: 6.9 ms alone, 15.5 ms interleaved). There onnxruntime's own
        # first pass is the baseline (separate passes).
        paired = plain_onnxruntime(for_onnxruntime(args.model, setup.options.layout), args.threads) \
            if args.threads == 1 else None
        bar = progress(len(ort_run.ms), "deluceva")
        try:
            frames = (preprocess(rgb) for rgb, _ in zip(setup.video, range(len(ort_run.ms))))
            delta_run = run_deluceva(make_runner, frames, ort_run, setup.metric, bar, paired=paired)
        finally:
            bar.close()
        figures = compare(ort_run, delta_run)
        # What users do instead, tuned as they would (on the first frames, to the controller's
        # aim) and tuned on the run itself to deluceva's own mean error (equal error).
        frames = lambda: (preprocess(rgb) for rgb in setup.video)  # noqa: E731
        ort_ms = delta_run.paired_ms or ort_run.ms
        for prefix, target, calibration in (("skip", RUN_SETPOINT * setup.budget, len(setup.calibration_frames)),
                                            ("skip_equal", figures["error_mean"], None)):
            skipping = frame_skipping(frames, ort_run, ort_ms, setup.metric, target, calibration)
            figures.update({
                f"{prefix}_threshold": skipping["threshold"], f"{prefix}_share": skipping["skipped"],
                f"{prefix}_speedup": skipping["speedup"],
                f"{prefix}_error_mean": skipping["error_mean"], f"{prefix}_error_p95": skipping["error_p95"],
                f"{prefix}_error_max": skipping["error_max"], f"{prefix}_error_trace": skipping["error_trace"],
            })
        if args.skip_curve:
            figures["skip_curve"] = frame_skipping(frames, ort_run, ort_ms, setup.metric, None)["curve"]
        if setup.gate is not None or args.sweep:
            figures.update(_curve_and_landings(args, setup, holder["plans"], ort_run, paired, frames))
        print(format_table(figures, args.metric, setup.budget))
        if "gate" in figures:
            gate = figures["gate"]
            print(f"deluceva + gate        {gate['speedup']:.2f}x  ({gate['gated_frames']} frames gated; {args.metric} "
                  f"error mean {gate['error_mean']:.4f}, max {gate['error_max']:.4f}); frame skipping at that error: "
                  f"{gate['skip_equal_speedup']:.2f}x (error mean {gate['skip_equal_error_mean']:.4f})")
        if args.sweep:
            print(format_sweep(figures, args.metric, setup.budget))
        if args.json:
            write_json(args.json, {
                **run_info(setup, delta_run.plans), **figures,
                "plan_variants": delta_run.summary["plan_variants"],
                "memory_method": "VmHWM reset per pass (see deluceva bench --help)",
                "machine": machine_info(),
                "onnxruntime_ms_trace": [round(m, 4) for m in (delta_run.paired_ms or ort_run.ms)],
                "deluceva_ms_trace": delta_run.summary["ms_trace"],
                "error_trace": [round(e, 6) for e in delta_run.errors],
                "percentage_trace": delta_run.summary["percentage_trace"],
                "density_trace": delta_run.summary["density_trace"],
                "reference_error_trace": delta_run.summary["error_trace"],
                "gated_frames": delta_run.summary["gated_frames"],
                "plan_switches": delta_run.summary["plan_switches"],
            })
        if args.plot:
            plot(args.plot, ort_run, delta_run, args.metric, setup.budget)
    finally:
        ort_run.close()
    return 0


def _curve_and_landings(args, setup, plans, ort_run, paired, frames) -> dict:
    """`--sweep`'s fixed-p points and the pi and learned controllers on the same plans; with
    `--gate`, the run's controller with the gate (and, with --sweep, each controller with it).
    Each point is a fresh pass over the frames, timed beside plain onnxruntime."""
    from deluceva.bench.compare import best_within, frame_skipping, point, run_deluceva
    from deluceva.controller import FixedController
    from deluceva.playback.loop import SessionsByPercentage, VideoRunner
    from deluceva.playback.setup import _warm_up, controller_for
    from deluceva.session import Session, calibrate_sessions

    def land(on, controller, start, gate=None, percentage=None) -> dict:
        def make_runner():
            for session in on.sessions:
                session.reset()
            return VideoRunner(on, controller, setup.metric, args.reference_every, percentage=start, gate=gate)

        run = run_deluceva(make_runner, frames(), ort_run, setup.metric, paired=paired)
        figures = point(ort_run, run)
        if percentage is not None:
            figures["percentage"] = percentage
        # Frame skipping tuned on these very frames to this run's own mean error (equal error).
        skipping = frame_skipping(frames, ort_run, run.paired_ms or ort_run.ms, setup.metric, figures["error_mean"])
        figures.update(skip_equal_speedup=skipping["speedup"], skip_equal_error_mean=skipping["error_mean"],
                       skip_equal_threshold=skipping["threshold"], skip_equal_share=skipping["skipped"])
        return figures

    out: dict = {}
    if setup.gate is not None:  # the run's own controller, started on the gate's knob
        out["gate"] = land(plans, setup.controller, args.percentage or setup.start_percentage, gate=setup.gate)
    if not args.sweep:
        return out
    dense = Session(setup.model, plan="dense", threads=setup.options.threads)
    dense_plans = SessionsByPercentage([dense], [0.0], description="dense")
    calibrate_sessions(dense_plans.sessions, setup.calibration_frames)
    _warm_up(dense_plans, setup.calibration_frames)
    # The curve of the plans themselves, retired ones included (the controllers never run those:
    # where a plan is slower than dense, dense is the point to beat anyway).
    retired, plans.retired = plans.retired, set()
    try:
        out["sweep"] = [land(dense_plans if p == 0 else plans, FixedController(p), p, percentage=p) for p in args.sweep]
    finally:
        plans.retired = retired
    out["sweep_best"] = best_within(out["sweep"], setup.budget, args.metric == "det")
    controllers = out["controllers"] = {}
    for name in ("pi", "learned"):
        controllers[name] = land(plans, *controller_for(setup, plans, name))
        if setup.gate is not None:
            controllers[f"{name} + gate"] = land(plans, *controller_for(setup, plans, name, setup.gate), gate=setup.gate)
    best = out["sweep_best"]
    for figures in controllers.values():
        figures["of_best"] = figures["speedup"] / best["speedup"] if best else None
    return out


def _without_gate(args, setup, plans):
    """The main run's controller and start: the run's own, or with --gate (whose controller was
    started on the gate's knob, for the gated run) one started as it would be without the gate."""
    from deluceva.controller import make_controller
    from deluceva.playback.setup import controller_for

    if setup.gate is None:
        return setup.controller, args.percentage or setup.start_percentage
    if args.controller == "fixed" or args.percentage is not None or args.learned_model:
        return (make_controller(args.controller, percentage=args.percentage, budget=setup.budget,
                                learned_path=args.learned_model), args.percentage or 0.0)
    return controller_for(setup, plans, args.controller)
