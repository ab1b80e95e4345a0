"""The profiler: the executor with timing, run on calibration frames to measure every node.

What is measured, and how:
- dense time per node: the executor on an all-dense plan in which every node is its own
  segment (one onnxruntime session per node), less the fixed cost of one session call, which is
  measured on its own on a one-value model. Summing these and adding one call reproduces the
  whole-model time to within the error that `validation` reports.
- delta time per node and densities: the executor on the all-delta plan (delta wherever a kernel
  exists), at each filtering percentage, on the calibration frames after a keyframe. Step times
  exclude the conversions at a step's edges (the executor times those on their own). A fused
  step (a Conv and its epilogue) counts against its Conv; its epilogue nodes get 0 ms, and the
  planner keeps a group's nodes on one variant.
- conversion cost per tensor: turning its dense value into a change (`to_delta_step`) and keeping
  its dense mirror (`mirror_step`), timed on each 1xCxHxW tensor's real change between
  consecutive frames, at each percentage, whether or not the all-delta plan converts it.
Filters use thresholds calibrated on the fit frames (`deluceva.runtime.thresholds`), as `run` does.
The last quarter of the frames is held out: measured there, never fitted, to validate the cost
model (see `deluceva.planner.cost_model.validate`).
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from typing import Iterable

import numpy as np
from onnx import TensorProto, helper

from deluceva.errors import DelucevaError, check_percentage
from deluceva.onnxruntime_session import inference_session
from deluceva.planner import Model, load_model
from deluceva.planner.assign_variants import assign_variants
from deluceva.operators import DeltaTensor
from deluceva.planner.partition_dense import partition_dense
from deluceva.planner.physical import DenseSegment, PhysicalPlan
from deluceva.planner.pipeline import build_dag
from deluceva.machine import machine_fingerprint
from deluceva.memory import release_freed_memory
from deluceva.profiles.profile import DEFAULT_PERCENTAGES, Profile
from deluceva.runtime.boundaries import Entry, mirror_step
from deluceva.runtime.executor import Executor, _session, segment_model
from deluceva.runtime.thresholds import Thresholds, tensor_groups, tensor_layouts, tensor_values

__all__ = ["measure_profile", "session_call_overhead", "DENSE_METHOD"]

DENSE_METHOD = "one onnxruntime session per node, less the session call overhead"
MIN_FRAMES = 4  # a keyframe and at least three timed frames


def _round(value: float) -> float:
    return float(f"{value:.5g}")


def session_call_overhead(threads: int, repeats: int = 300) -> float:
    """Seconds one onnxruntime `run` costs on a one-value model: the price of a segment."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "overhead", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    session = inference_session(proto, threads)
    feed = {"x": np.ones((1, 1, 1, 1), np.float32)}
    for _ in range(20):
        session.run(["y"], feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["y"], feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _per_node_plan(graph) -> PhysicalPlan:
    """All dense, each node its own segment, in the model's (topological) order."""
    assign_variants(graph, "dense")
    model = graph.graph["model"]
    steps = []
    for name, data in graph.nodes(data=True):
        inputs = [t for t in dict.fromkeys(data["inputs"]) if t and t not in model.constants]
        steps.append(DenseSegment([name], inputs, [t for t in data["outputs"] if t]))
    plan = partition_dense(graph)  # for variants and reasons
    return PhysicalPlan(steps, plan.variants, plan.reasons)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="profiling", unit="step", file=sys.stderr,
                disable=None if enabled else True, dynamic_ncols=True)


def measure_profile(
    model: Model | str,
    frames: Iterable[np.ndarray],
    threads: int = 1,
    percentages: Iterable[float] = DEFAULT_PERCENTAGES,
    dense_frames: int = 10,
    conversion_pairs: int = 3,
    holdout: float = 0.25,
    progress: bool = True,
) -> Profile:
    """Measure `model` on calibration `frames` (model inputs, (1, C, H, W) float32, in video order).

    Args:
        frames: consecutive inputs; the first is the keyframe, the last `holdout` share is held out.
        percentages: the filtering percentages to measure at, each in [0, 1).
        dense_frames: frames the dense times are averaged over.
        conversion_pairs: consecutive frame pairs each tensor's conversions are timed on.
        progress: show a progress bar on stderr.

    Example:
        >>> profile = measure_profile("tiny.onnx", inputs, threads=1)      # doctest: +SKIP
        >>> profile.save("tiny.profile.json")
    """
    model = model if isinstance(model, Model) else load_model(model)
    percentages = sorted({float(p) for p in percentages})
    if not percentages:
        raise DelucevaError("no percentage to profile at")
    for p in percentages:
        check_percentage(p, "percentage")
    inputs = [np.ascontiguousarray(f, np.float32) for f in frames]
    if len(inputs) < MIN_FRAMES:
        raise DelucevaError(f"profiling needs at least {MIN_FRAMES} frames, got {len(inputs)}")
    for frame in inputs:
        if tuple(frame.shape) != tuple(model.input_shape):
            raise DelucevaError(f"{model.path}: frame has shape {tuple(frame.shape)}, the model takes {model.input_shape}")
    held = int(len(inputs) * holdout) if len(inputs) * holdout >= 2 and len(inputs) >= 8 else 0
    fit = inputs[: len(inputs) - held]
    # The held-out run starts from the last fitted frame as its keyframe, so no frame is skipped.
    heldout = inputs[len(inputs) - held - 1:] if held else []
    dense_frames = max(1, min(dense_frames, len(inputs)))
    conversion_pairs = max(1, min(conversion_pairs, len(fit) - 1))

    graph = build_dag(model)
    grids = tensor_layouts(graph)
    delta_nodes = [n for n, d in graph.nodes(data=True) if d["delta_reason"] is None]
    total = (dense_frames * 2 + len(percentages) * (len(fit) - 1 + max(0, len(heldout) - 1))
             + len(grids) * len(percentages))
    bar = _progress(total, progress)
    try:
        overhead = session_call_overhead(threads)
        node_dense, dense_model = _measure_dense(model, graph, inputs[:dense_frames], threads, bar)
        thresholds = Thresholds.calibrate(model, fit, grids)
        delta = _measure_delta(model, graph, fit, heldout, percentages, threads, thresholds, bar)
        release_freed_memory()  # the all-delta executor's states, before the conversions' values
        conversions = _measure_conversions(model, grids, fit[: conversion_pairs + 1], percentages, thresholds, bar)
    finally:
        bar.close()

    nodes = {}
    for name, data in graph.nodes(data=True):
        out_shape = data["output_shapes"][0] if data["output_shapes"] else None
        entry = {
            "op_type": data["op_type"],
            "flops": int(data["flops"]),
            "output_shape": list(out_shape) if out_shape is not None else None,
            "dense_ms": _round(max(0.0, node_dense[name] - overhead) * 1e3),
            "delta_reason": data["delta_reason"],
            "delta_ms": None, "in_density": None, "out_density": None, "samples": None,
        }
        samples = delta["samples"].get(name)
        if samples is not None:
            entry["delta_ms"] = [_round(float(np.mean(ms))) for ms in samples["ms"]]
            entry["samples"] = {"density": [[_round(d) for d in ds] for ds in samples["density"]],
                                "ms": [[_round(m) for m in ms] for ms in samples["ms"]]}
        for key, tensors in (("in_density", [t for t in data["inputs"] if t in grids]),
                             ("out_density", [t for t in data["outputs"] if t in grids])):
            per_p = []
            for i in range(len(percentages)):
                values = [delta["density"][i].get(t, conversions[t]["density"][i]) for t in tensors]
                per_p.append(_round(max(values)) if values else None)
            if per_p and None not in per_p:
                entry[key] = per_p
        nodes[name] = entry
    tensors = {t: {k: [_round(v) for v in values] for k, values in c.items()} for t, c in conversions.items()}
    for i in range(len(percentages)):
        for t, value in delta["density"][i].items():
            if t in tensors:
                tensors[t]["density"][i] = _round(value)
    profile = Profile(
        model={"path": str(model.path), "sha256": model.sha256, "input_shape": list(model.input_shape)},
        machine=machine_fingerprint(threads),
        settings={"frames": len(inputs), "fit_frames": len(fit), "holdout_frames": held,
                  "dense_frames": dense_frames, "conversion_pairs": conversion_pairs,
                  "dense_method": DENSE_METHOD, "delta_nodes": len(delta_nodes)},
        percentages=percentages,
        dense_model_ms=_round(dense_model * 1e3),
        segment_overhead_ms=_round(overhead * 1e3),
        nodes=nodes,
        tensors=tensors,
        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    if held:
        from deluceva.planner.cost_model import validate

        session = _session(model.onnx, threads)
        times = []
        for frame in heldout[1:]:
            start = time.perf_counter()
            session.run(None, {model.input_name: frame})
            times.append((time.perf_counter() - start) * 1e3)
        profile.validation = validate(profile, graph, measured=delta["heldout"], measured_dense=float(np.median(times)))
    release_freed_memory()  # the per-node sessions, the all-delta executor's states, the tensors' values
    return profile


def _measure_dense(model, graph, frames, threads, bar):
    """Per-node seconds (one session per node) and the whole model's seconds, as medians.

    Each value is dropped after its last reader: the node sessions' outputs live in the run's
    shared arena, which keeps the largest set of values ever alive at once for the rest of the
    process (every tensor of YuNet at 1280x736, 630 MiB, when they were all kept).
    """
    steps = _per_node_plan(graph).steps
    sessions = [inference_session(segment_model(model, s.nodes, s.inputs, s.outputs), threads, shared_arena=True)
                for s in steps]
    last_reader = {t: i for i, s in enumerate(steps) for t in s.inputs}
    kept = set(model.output_names)
    times = [[] for _ in steps]
    for number, frame in enumerate([frames[0], *frames]):  # the first run warms the sessions
        values = {model.input_name: frame}
        for i, (step, session) in enumerate(zip(steps, sessions)):
            feeds = {t: values[t] for t in step.inputs}
            start = time.perf_counter()
            values.update(zip(step.outputs, session.run(step.outputs, feeds)))
            times[i].append(time.perf_counter() - start)
            for t in [*step.inputs, *step.outputs]:
                if last_reader.get(t, -1) <= i and t not in kept:
                    values.pop(t, None)
        if number:
            bar.update(1)
    # Medians: a busy machine's stalls hit a few frames hard and would inflate means.
    per_node = {step.nodes[0]: float(np.median(t[1:])) for step, t in zip(steps, times)}
    del sessions, values
    session = _session(model.onnx, threads)
    session.run(None, {model.input_name: frames[0]})
    times = []
    for frame in frames:
        start = time.perf_counter()
        session.run(None, {model.input_name: frame})
        times.append(time.perf_counter() - start)
        bar.update(1)
    return per_node, float(np.median(times))


def _measure_delta(model, graph, fit, heldout, percentages, threads, thresholds, bar):
    """Per-node delta samples on the fit frames, tensor densities, held-out per-frame times."""
    assign_variants(graph, "delta")
    plan = partition_dense(graph)
    executor = Executor(model, graph, plan, threads=threads, profile=True)
    executor.use_thresholds(thresholds)
    delta_nodes = [s.node for s in plan.steps if s.kind == "delta"]
    # A fused step's time is its Conv's; the epilogue nodes inside it cost nothing more.
    fused = {m: s.node for s in plan.steps if s.kind == "delta" for m in s.fused}
    # Warm-up: the first delta frame compiles the numba kernels.
    executor.reset()
    executor.run(fit[0])
    executor.run(fit[1], percentages[-1])
    samples = {n: {"density": [], "ms": []} for n in [*delta_nodes, *fused]}
    densities = []
    heldout_ms = []
    for p in percentages:
        for n in samples:
            samples[n]["density"].append([])
            samples[n]["ms"].append([])
        seen: dict[str, list[float]] = {}
        executor.reset()
        executor.run(fit[0])
        for frame in fit[1:]:
            executor.step_times.clear()
            executor.run(frame, p)
            frame_densities = executor.densities
            for n in delta_nodes:
                spec = graph.nodes[n]["spec"]
                ins = [frame_densities[t] for i, t in enumerate(graph.nodes[n]["inputs"])
                       if t and i not in spec.constants and t in frame_densities]
                samples[n]["density"][-1].append(max(ins) if ins else 0.0)
                # A frame whose change stayed under the frame's threshold ran no step: 0 ms.
                times = executor.step_times.get(f"delta[{n}]") or [0.0]
                samples[n]["ms"][-1].append(times[0] * 1e3)
            for member, head in fused.items():
                samples[member]["density"][-1].append(samples[head]["density"][-1][-1])
                samples[member]["ms"][-1].append(0.0)
            for t, d in frame_densities.items():
                seen.setdefault(t, []).append(d)
            bar.update(1)
        densities.append({t: float(np.mean(v)) for t, v in seen.items()})
        times = []
        if heldout:
            executor.reset()
            executor.run(heldout[0])
            for frame in heldout[1:]:
                start = time.perf_counter()
                executor.run(frame, p)
                times.append((time.perf_counter() - start) * 1e3)
                bar.update(1)
        heldout_ms.append(times)
    return {"samples": samples, "density": densities, "heldout": heldout_ms}


def _measure_conversions(model, layouts, frames, percentages, thresholds, bar):
    """Per tensor and percentage: ms of turning its dense value into a change, of mirroring the
    change back into a dense copy, and the density of that change."""
    result = {}
    for group in tensor_groups(model, list(layouts)):
        # One group's values at a time (all of YOLOX-nano's tensors on 4 frames: 500 MiB).
        values = list(tensor_values(model, frames, group))
        for tensor in group:
            result[tensor] = _conversion_costs(values, tensor, layouts[tensor], percentages, thresholds)
            bar.update(len(percentages))
    return result


def _conversion_costs(values, tensor, layout, percentages, thresholds) -> dict:
    """`tensor`'s conversion times and densities per percentage, over the frame pairs of `values`."""
    to_delta_ms, to_dense_ms, density = [], [], []
    state = DeltaTensor(layout)
    entry = Entry(state)
    mirror = np.zeros((layout.channels, layout.positions), np.float32)
    for p in percentages:
        a, b, d = [], [], []
        state.threshold[0] = thresholds.threshold(tensor, p) if p > 0 else 0.0
        for before, after in zip(values, values[1:]):
            entry.load(before[tensor])
            start = time.perf_counter()
            entry(after[tensor])
            a.append(time.perf_counter() - start)
            start = time.perf_counter()
            mirror_step(state.storage, state.offset, state.changed, state.count, mirror)
            b.append(time.perf_counter() - start)
            d.append(state.density)
        to_delta_ms.append(float(np.mean(a)) * 1e3 if a else 0.0)
        to_dense_ms.append(float(np.mean(b)) * 1e3 if b else 0.0)
        density.append(float(np.mean(d)) if d else 1.0)
    return {"to_delta_ms": to_delta_ms, "to_dense_ms": to_dense_ms, "density": density}
