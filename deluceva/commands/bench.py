"""`deluceva bench MODEL VIDEO`: deluceva against plain onnxruntime on the same frames.

Two passes over the same frames with the same preprocessing: plain onnxruntime (an
InferenceSession on the original model file, default optimisations, the same intra-op threads,
one inter-op thread), then deluceva. Each frame's time is the model work alone (decoding and
preprocessing, identical for both, are left out). Onnxruntime's outputs are kept in a temporary
file and deluceva's error against them is computed on every frame outside deluceva's timing.

The times compared are interleaved: during deluceva's pass, a second plain onnxruntime session
runs each frame right after deluceva does, outside deluceva's timing, so a busy or drifting
machine slows both alike (on this project's shared 2-core machine, two consecutive passes of
the same model differed by up to 10%). The first pass gives the outputs and onnxruntime's
memory.

Peak memory of each pass: the process's peak resident set (VmHWM in /proc/self/status) is reset
before the pass (`echo 5 > /proc/self/clear_refs`, Linux 4.0+), and the pass's peak is VmHWM at
its end minus the resident set at its start, so it counts the sessions, their buffers and the
decoder. tracemalloc would miss onnxruntime's native allocations. Where /proc cannot be reset,
ru_maxrss deltas are used instead, which read 0 when the second pass peaks lower than the first.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


__all__ = ["add_parser", "handle", "PeakMemory", "OnnxruntimeRun", "run_onnxruntime", "plain_onnxruntime", "run_deluceva",
           "frame_skipping", "compare", "format_table", "machine_info", "plot"]


def add_parser(commands, percentage, positive_int) -> None:
    from deluceva.commands.run import add_run_options

    parser = commands.add_parser("bench", help="compare deluceva with plain onnxruntime on a video",
                                 description=__doc__.splitlines()[0])
    add_run_options(parser, percentage, positive_int)
    parser.add_argument("--json", metavar="OUT.json", help="write every figure, per-frame traces and the machine")
    parser.add_argument("--plot", metavar="OUT.png", help="plot per-frame time, error and percentage")
    parser.add_argument("--skip-curve", action="store_true",
                        help="also measure frame skipping at every threshold it tries (its speed-versus-error curve)")
    parser.set_defaults(handler=handle)


# -- memory ----------------------------------------------------------------------------------


def _status_kib(name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


class PeakMemory:
    """Peak resident memory added while the `with` block runs, in MiB (see the module docstring)."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.method = "ru_maxrss"
        self.start = _status_kib("VmRSS") if self.method == "VmHWM" else None
        if self.start is None:
            self.method = "ru_maxrss"
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = None
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            end = _status_kib("VmHWM") or self.start
        else:
            end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = max(0, end - self.start) / 1024


# -- the two passes --------------------------------------------------------------------------


@dataclass
class OnnxruntimeRun:
    """Plain onnxruntime's per-frame times and outputs (kept on disk, read back one frame at a time)."""

    ms: list[float]
    store: dict  # output name -> GrowingNpy
    names: list[str]
    memory_mib: float | None
    folder: tempfile.TemporaryDirectory

    def outputs(self, index: int) -> list[np.ndarray]:
        return [self.store[name].read(index) for name in self.names]

    def close(self) -> None:
        for part in self.store.values():
            part.close()
        self.folder.cleanup()


def run_onnxruntime(model: str | bytes, tensors: Iterable[np.ndarray], threads: int,
                    progress=None) -> OnnxruntimeRun:
    """Time plain onnxruntime on each (preprocessed) frame; keep its outputs on disk."""
    import onnxruntime as ort

    from deluceva.operators._ort import session_options
    from deluceva.runtime.video_runner import GrowingNpy

    folder = tempfile.TemporaryDirectory(prefix="deluceva-bench-")
    store: dict = {}
    ms: list[float] = []
    with PeakMemory() as memory:
        options = session_options(threads)  # intra-op = threads, inter-op 1, default optimisation level
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        names = [o.name for o in session.get_outputs()]
        for tensor in tensors:
            start = time.perf_counter()
            outputs = session.run(None, {input_name: tensor})
            ms.append((time.perf_counter() - start) * 1000)
            for index, (name, value) in enumerate(zip(names, outputs)):
                if name not in store:
                    store[name] = GrowingNpy(Path(folder.name) / f"{index}.npy", value.shape, value.dtype)
                store[name].append(value)
            if progress is not None:
                progress.update(1)
        del session
    return OnnxruntimeRun(ms, store, names, memory.mib, folder)


def plain_onnxruntime(model: str | bytes, threads: int) -> Callable[[np.ndarray], list]:
    """tensor -> outputs through plain onnxruntime, configured as the baseline is, for timing it
    frame by frame beside deluceva."""
    import onnxruntime as ort

    from deluceva.operators._ort import session_options

    session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda tensor: session.run(None, {input_name: tensor})


@dataclass
class DelucevaRun:
    """Deluceva's per-frame figures, with the error against onnxruntime on every frame."""

    results: list  # FrameResult, outputs dropped
    errors: list[float]
    memory_mib: float | None
    plans: object
    summary: dict = field(default_factory=dict)
    paired_ms: list[float] = field(default_factory=list)  # plain onnxruntime, interleaved


def run_deluceva(make_runner: Callable, tensors: Iterable[np.ndarray], reference: OnnxruntimeRun,
                 error_metric: Callable, progress=None, paired: Callable | None = None) -> DelucevaRun:
    """Run deluceva on each frame; `make_runner()` builds the sessions inside the memory count.

    `paired(tensor)`, when given, runs plain onnxruntime on the same frame right after deluceva,
    timed on its own (see the module docstring).
    """
    from deluceva.runtime.video_runner import summarise

    results, errors, paired_ms = [], [], []
    with PeakMemory() as memory:
        runner = make_runner()
        for index, tensor in enumerate(tensors):
            result = runner.step(tensor)
            if paired is not None:
                start = time.perf_counter()
                paired(tensor)
                paired_ms.append((time.perf_counter() - start) * 1000)
            # Outside the timed region: deluceva's error against plain onnxruntime on this frame.
            errors.append(float(error_metric(result.outputs, reference.outputs(index))))
            result.outputs = None
            results.append(result)
            if progress is not None:
                progress.update(1)
        plans = runner.plans
        del runner
    run = DelucevaRun(results, errors, memory.mib, plans, paired_ms=paired_ms)
    run.summary = summarise(results, plans)
    return run


# -- what users do instead: skip frames that barely changed ----------------------------------

SKIP_GRID = (0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3)


def frame_skipping(frames: Callable[[], Iterable[np.ndarray]], ort_run: OnnxruntimeRun, ort_ms: list[float],
                   metric: Callable, target: float | None, calibration: int | None = None) -> dict:
    """Plain onnxruntime that reuses its last outputs while the frame barely changed.

    A frame is skipped when the share of 8x8 tiles changed by more than 1% of the input's range
    since the last frame onnxruntime ran on (`change_statistics`) is under k. k is the largest on
    SKIP_GRID whose mean error stays within `target` on the first `calibration` frames (as a
    user would tune it, and as deluceva's controller is started), or, without `calibration`, on
    all the frames (tuned on the very frames it is measured on: the best skipping can do at that
    error). The time of a frame is the statistic's, measured, plus onnxruntime's measured time on
    the frames it runs. `frames()` iterates the preprocessed frames from the first. Without a
    `target`: {"curve": figures at every k of SKIP_GRID}.
    """
    from deluceva.runtime.video_runner import change_statistics

    def simulate(k: float, count: int) -> tuple[list[float], list[float], int]:
        errors, ms, skipped = [], [], 0
        last_input, last_index = None, None
        for index, tensor in zip(range(count), frames()):
            start = time.perf_counter()
            share = change_statistics(tensor, last_input)["changed_tiles"]
            spent = (time.perf_counter() - start) * 1000
            if last_input is not None and share < k:
                skipped += 1
                errors.append(float(metric(ort_run.outputs(last_index), ort_run.outputs(index))))
            else:
                last_input, last_index = tensor, index
                spent += ort_ms[index]
                errors.append(0.0)
            ms.append(spent)
        return errors, ms, skipped

    def figures(k: float) -> dict:
        errors, ms, skipped = simulate(k, len(ort_ms))
        return {"threshold": k, "ms_mean": statistics.fmean(ms), "speedup": statistics.fmean(ort_ms) / statistics.fmean(ms),
                "error_mean": statistics.fmean(errors), "error_p95": _percentile_of(errors, 0.95),
                "error_max": max(errors), "skipped": skipped / len(ms),
                "error_trace": [round(e, 6) for e in errors], "ms_trace": [round(m, 4) for m in ms]}

    if target is None:  # the whole curve
        return {"curve": [{k: v for k, v in figures(k).items() if not k.endswith("trace")} for k in SKIP_GRID]}
    chosen = 0.0
    for k in SKIP_GRID:
        errors, _, _ = simulate(k, min(calibration or len(ort_ms), len(ort_ms)))
        if statistics.fmean(errors) > target:
            break
        chosen = k
    return figures(chosen)


def _percentile_of(values, q):
    from deluceva.runtime.video_runner import _percentile

    return _percentile(values, q)


def compare(ort_run: OnnxruntimeRun, delta_run: DelucevaRun) -> dict:
    """The headline figures: speedup, error, density, FLOP bound, efficiency, memory."""
    from deluceva.runtime.video_runner import _percentile

    frames = min(len(ort_run.ms), len(delta_run.results))
    ort_ms = (delta_run.paired_ms or ort_run.ms)[:frames]
    delta_ms = [r.seconds * 1000 for r in delta_run.results[:frames]]
    errors = delta_run.errors[:frames]
    speedup = statistics.fmean(ort_ms) / statistics.fmean(delta_ms)
    bound = delta_run.summary["flop_reduction_bound"]
    return {
        "frames": frames,
        "timing": "interleaved" if delta_run.paired_ms else "separate passes",
        "onnxruntime_ms_mean": statistics.fmean(ort_ms),
        "onnxruntime_ms_median": statistics.median(ort_ms),
        "deluceva_ms_mean": statistics.fmean(delta_ms),
        "deluceva_ms_median": statistics.median(delta_ms),
        "speedup": speedup,
        "error_mean": statistics.fmean(errors),
        "error_p95": _percentile(errors, 0.95),
        "error_max": max(errors),
        "density_mean": delta_run.summary["density_mean"],
        "flop_reduction_bound": bound,
        "efficiency": speedup / bound if bound else None,
        "reference_frames": delta_run.summary["reference_frames"],
        "percentage_mean": statistics.fmean(r.percentage for r in delta_run.results[:frames]),
        "onnxruntime_peak_mib": ort_run.memory_mib,
        "deluceva_peak_mib": delta_run.memory_mib,
        "memory_ratio": (delta_run.memory_mib / ort_run.memory_mib) if ort_run.memory_mib else None,
    }


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


def machine_info() -> dict:
    """Where the figures were measured: CPU, cores, versions, commit."""
    import numpy
    import onnxruntime

    cpu = platform.processor() or ""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }


def plot(path: str, ort_run: OnnxruntimeRun, delta_run: DelucevaRun, metric: str, budget: float | None) -> None:
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
    from deluceva.commands.run import build_plans, prepare, progress, run_info, write_json
    from deluceva.output_files import check_output
    from deluceva.controller import RUN_SETPOINT
    from deluceva.runtime.video_runner import VideoRunner

    check_output(args.json, ".json", "--json")
    check_output(args.plot, ".png", "--plot")
    setup = prepare(args)
    preprocess = setup.preprocess
    bar = progress(setup.video.expected, "onnxruntime")
    try:
        ort_run = run_onnxruntime(str(args.model), (preprocess(rgb) for rgb in setup.video), args.threads, bar)
    finally:
        bar.close()
    try:
        holder = {}

        def make_runner():
            holder["plans"] = build_plans(setup)
            return VideoRunner(holder["plans"], setup.controller, setup.metric, args.reference_every,
                               percentage=args.percentage or setup.start_percentage)

        paired = plain_onnxruntime(str(args.model), args.threads)
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
        print(format_table(figures, args.metric, setup.budget))
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
            })
        if args.plot:
            plot(args.plot, ort_run, delta_run, args.metric, setup.budget)
    finally:
        ort_run.close()
    return 0
