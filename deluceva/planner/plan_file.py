"""Compiled plans: per node and filtering percentage, dense or delta, with costs and reasons; as JSON.

Format (schema version 2), lists per node aligned with "percentages":

    {
      "format": "deluceva-plan", "schema_version": 2,
      "model": {"path": str, "sha256": str, "input_shape": [1, C, H, W]},
      "profile": {"path": str, "machine": {...}, "created": str},
      "threads": int, "percentages": [..],
      "nodes": [{"name", "op_type", "output_shape", "delta_reason", "dense_ms",
                 "variant": [..], "delta_ms": [..|null], "density": [..|null],
                 "predicted_ms": [..], "measured_ms": [..|null], "reason": [..]}],
      "edges": [[producer, consumer], ...],
      "totals": {"plan_ms": [..], "all_dense_ms": [..], "all_delta_ms": [..]}
    }
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from deluceva.errors import DelucevaError, check_percentage
from deluceva.files import read_json
from deluceva.planner.attach_costs import attach_costs
from deluceva.planner.cost_model import CostModel
from deluceva.planner.choose_variants import all_delta_variants, choose_variants, frame_cost
from deluceva.planner.load_model import Model
from deluceva.planner.pipeline import build_dag

__all__ = ["PlanFile", "compile_plan", "load_plan", "check_machine", "plans_for_run", "FORMAT", "SCHEMA_VERSION"]

FORMAT = "deluceva-plan"
SCHEMA_VERSION = 2
# A mixed plan must be predicted to save this share of the all-dense time, or the plan is all
# dense. The cost model's whole-frame error on held-out frames is tens of percent (see the
# profile's `validation`), so a smaller predicted gain is noise and could make p = 0 slower
# than onnxruntime.
MIN_GAIN = 0.10
# A mixed plan's dense segments, weighed against the all-delta plan, at this multiple of their
# nodes' predicted times (see `choose_variants`): measured at 2x on YOLOX-nano's input segment
# (0.53 ms against 0.26 predicted), 1.3x on P-Net's.
SEGMENT_FACTOR = 2.0


def _distinct_prefixes(a: str, b: str, least: int = 12) -> tuple[str, str]:
    """The shortest prefixes (at least `least` long) that still tell two hashes apart."""
    differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    length = max(least, differ + 4)
    return a[:length], b[:length]


# Plans are also compiled between the percentages a profile measured (the cost model
# interpolates the density in p): the controllers settle between 0.5 and 0.9 on the shared
# models, and a run uses the plan compiled for the largest percentage not above its p, so with
# only the measured 0.5 and 0.8 a PI controller holding p = 0.75 ran the all-dense 0.5 plan.
BETWEEN_MEASURED = (0.6, 0.65, 0.7, 0.75, 0.85)


def default_percentages(measured) -> list[float]:
    """The percentages a plan is compiled for by default: those the profile measured, and
    BETWEEN_MEASURED where they lie inside the measured range."""
    measured = sorted(float(p) for p in measured)
    between = [p for p in BETWEEN_MEASURED if measured and measured[0] < p < measured[-1]]
    return sorted(set(measured) | set(between))


def _measured(profile, node: str, variant: str, percentage: float) -> float | None:
    """What the profile measured for `node` in `variant` (dense: alone in its own session; delta:
    mean over the fit frames at `percentage`, where the profile measured at it)."""
    entry = profile.nodes.get(node)
    if entry is None:
        return None
    if variant == "dense":
        return _finite(entry["dense_ms"])
    if entry.get("delta_ms") is None or percentage not in profile.percentages:
        return None
    return _finite(entry["delta_ms"][profile.percentages.index(percentage)])


def _finite(value: float) -> float | None:
    return None if value is None or math.isinf(value) else round(float(value), 5)


@dataclass
class PlanFile:
    """A compiled plan (see the module docstring); `variants_for(p)` gives a Session's `plan`."""

    data: dict
    path: str = "<memory>"

    @property
    def percentages(self) -> list[float]:
        return list(self.data["percentages"])

    @property
    def threads(self) -> int:
        return int(self.data["threads"])

    def nearest_index(self, percentage: float) -> int:
        """The covered percentage nearest to `percentage` (the lower one on a tie)."""
        check_percentage(percentage)
        return min(range(len(self.percentages)), key=lambda i: (abs(self.percentages[i] - percentage), i))

    def variants_for(self, percentage: float) -> dict[str, str]:
        """{node: "dense"|"delta"} of the plan for the covered percentage nearest `percentage`."""
        i = self.nearest_index(percentage)
        return {node["name"]: node["variant"][i] for node in self.data["nodes"]}

    def check_model(self, model: Model) -> None:
        """Refuse to run this plan on another model or input shape."""
        want = self.data["model"]
        if want["sha256"] != model.sha256:
            a, b = _distinct_prefixes(want["sha256"], model.sha256)
            raise DelucevaError(f"{self.path}: plan was compiled for another model "
                                f"({Path(want.get('path', '?')).name}, sha256 {a}…), "
                                f"not {Path(model.path).name} (sha256 {b}…)")
        if tuple(want["input_shape"]) != tuple(model.input_shape):
            raise DelucevaError(f"{self.path}: plan was compiled for input shape {tuple(want['input_shape'])}, "
                                f"not {tuple(model.input_shape)}")
        # The hash is the file's: a plan edited by hand (or cut short) must still name every
        # node of the model, with its op type, and no other.
        nodes = {n.name: n.op_type for n in model.onnx.graph.node}
        planned = {n["name"]: n["op_type"] for n in self.data["nodes"]}
        if planned != nodes:
            missing = sorted(set(nodes) - set(planned))
            extra = sorted(set(planned) - set(nodes))
            wrong = sorted(n for n in set(nodes) & set(planned) if nodes[n] != planned[n])
            what = "; ".join(part for part in (
                f"{len(missing)} of its nodes missing (e.g. {missing[0]})" if missing else "",
                f"{len(extra)} nodes it does not have (e.g. {extra[0]})" if extra else "",
                f"{len(wrong)} with another op type (e.g. {wrong[0]})" if wrong else "") if part)
            raise DelucevaError(f"{self.path}: plan does not describe the model's {len(nodes)} nodes: {what}; "
                                "compile it again")

    def save(self, path: str | os.PathLike) -> Path:
        from deluceva.files import check_output, write_text

        path = check_output(path, ".json", "plan")
        write_text(path, json.dumps(self.data, indent=1, allow_nan=False) + "\n")
        self.path = str(path)
        return path


def check_machine(profile, threads: int | None = None, force: bool = False) -> list[str]:
    """Compare the profile's machine with this one; an error unless `force`, then warnings.

    Returns the differences (empty when it is this machine).
    """
    from deluceva.machine import compare_machines, machine_fingerprint

    here = machine_fingerprint(profile.machine.get("threads", 1) if threads is None else threads)
    differences = compare_machines(profile.machine, here)
    if differences and not force:
        raise DelucevaError(f"{profile.path}: profile was measured on another machine ({'; '.join(differences)}); "
                            "profile here, or pass --force to use it anyway")
    if differences:
        warnings.warn(f"{profile.path}: profile from another machine ({'; '.join(differences)})", stacklevel=2)
    return differences


def compile_plan(model: Model, profile, percentages: Iterable[float] | None = None, force: bool = False) -> PlanFile:
    """Choose variants for `model` at each percentage from `profile`'s cost model.

    Args:
        percentages: which to plan for (default: `default_percentages` of the profile's grid);
            each in [0, 1).
        force: accept a profile from another machine (with a warning) instead of refusing it.

    Raises:
        DelucevaError: the profile is for another model or input shape, or (without `force`)
            another machine; a percentage outside [0, 1).

    Example:
        >>> plan = compile_plan(load_model("m.onnx"), load_profile("m.profile.json"), [0.0, 0.9])  # doctest: +SKIP
        >>> session = Session(model, plan=plan.variants_for(0.9))
    """
    profile.check_model(model.sha256, model.input_shape)
    check_machine(profile, force=force)
    percentages = sorted({float(p) for p in (default_percentages(profile.percentages) if percentages is None
                                            else percentages)})
    for p in percentages:
        check_percentage(p, "percentage")
    if not percentages:
        raise DelucevaError("no percentage to compile for")
    threads = int(profile.machine.get("threads", 1))
    graph = build_dag(model)
    costs = CostModel(profile, graph)
    nodes = {name: {"name": name, "op_type": d["op_type"],
                    "output_shape": list(d["output_shapes"][0]) if d["output_shapes"] and d["output_shapes"][0] else None,
                    "delta_reason": d["delta_reason"], "dense_ms": None,
                    "variant": [], "delta_ms": [], "density": [], "predicted_ms": [], "measured_ms": [],
                    "reason": []}
             for name, d in graph.nodes(data=True)}
    totals = {"plan_ms": [], "all_dense_ms": [], "all_delta_ms": []}
    all_dense = {v: "dense" for v in graph.nodes}
    for p in percentages:
        attach_costs(graph, costs, p)
        choose_variants(graph, min_gain=MIN_GAIN, segment_factor=SEGMENT_FACTOR)
        all_delta = all_delta_variants(graph)
        chosen = {v: d["variant"] for v, d in graph.nodes(data=True)}
        totals["plan_ms"].append(_finite(frame_cost(graph, chosen)))
        totals["all_dense_ms"].append(_finite(frame_cost(graph, all_dense)))
        totals["all_delta_ms"].append(_finite(frame_cost(graph, all_delta)))
        for name, d in graph.nodes(data=True):
            entry = nodes[name]
            entry["dense_ms"] = _finite(d["cost_dense"])
            entry["variant"].append(d["variant"])
            entry["delta_ms"].append(_finite(d["cost_delta"]))
            entry["density"].append(None if d["density"] is None else round(d["density"], 4))
            entry["predicted_ms"].append(_finite(d["predicted_ms"]))
            entry["measured_ms"].append(_measured(profile, name, d["variant"], p))
            entry["reason"].append(d["reason"])
    data = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "model": {"path": str(model.path), "sha256": model.sha256, "input_shape": list(model.input_shape)},
        "profile": {"path": profile.path, "machine": profile.machine, "created": profile.created},
        "threads": threads, "percentages": percentages,
        "nodes": list(nodes.values()),
        "edges": [[u, v] for u, v in graph.edges],
        "totals": totals,
    }
    return PlanFile(data)


def load_plan(path: str | os.PathLike) -> PlanFile:
    """Read and validate a plan file; one-line DelucevaError naming the file when it is bad."""
    label = str(path)
    data = read_json(path, "plan")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DelucevaError(f"{label}: not a deluceva plan (no \"format\": \"{FORMAT}\")")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise DelucevaError(f"{label}: plan schema version {data.get('schema_version')!r} is not supported "
                            f"(this deluceva reads {SCHEMA_VERSION}); compile again")
    try:
        percentages = data["percentages"]
        n = len(percentages)
        _require(n and all(isinstance(p, (int, float)) and 0 <= p < 1 for p in percentages))
        _require(isinstance(data["model"]["sha256"], str) and len(data["model"]["input_shape"]) == 4)
        int(data["threads"])
        for node in data["nodes"]:
            _require(isinstance(node["name"], str) and isinstance(node["op_type"], str))
            _require(all(len(node[k]) == n for k in ("variant", "delta_ms", "density", "predicted_ms", "reason")))
            _require(len(node.setdefault("measured_ms", [None] * n)) == n)
            _require(all(v in ("dense", "delta") for v in node["variant"]))
        _require(all(len(e) == 2 for e in data["edges"]))
        _require(all(len(data["totals"][k]) == n for k in ("plan_ms", "all_dense_ms", "all_delta_ms")))
    except (KeyError, TypeError, ValueError):
        raise DelucevaError(f"{label}: corrupt plan (missing or malformed fields)") from None
    return PlanFile(data, label)


def _require(condition) -> None:
    """A check of a user's plan file that `python -O` keeps (an `assert` would be stripped)."""
    if not condition:
        raise ValueError("malformed plan field")


def plans_for_run(path: str | os.PathLike, model: Model) -> list[tuple[float, dict[str, str]]]:
    """[(percentage, {node: variant}), ...] from a plan file, checked against `model`."""
    plan = load_plan(path)
    plan.check_model(model)
    return [(p, plan.variants_for(p)) for p in plan.percentages]
