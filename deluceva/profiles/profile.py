"""The profile file: what `deluceva profile` measured for one model on one machine, as JSON.

Format (schema version 2), all times in milliseconds per frame, lists aligned with `percentages`:

    {
      "format": "deluceva-profile", "schema_version": 2, "created": "2024-...Z",
      "model": {"path": str, "sha256": str, "input_shape": [1, C, H, W]},
      "machine": {"cpu_model", "cores", "threads", "onnxruntime", "numpy", "deluceva", "platform"},
      "settings": {"frames": int, "fit_frames": int, "holdout_frames": int,
                   "dense_method": str},
      "percentages": [0.0, 0.5, ...],
      "dense_model_ms": float,       # whole model in one onnxruntime session (the baseline)
      "segment_overhead_ms": float,  # fixed cost of one onnxruntime run() call
      "nodes": {name: {"op_type": str, "flops": int, "output_shape": [...] | null,
                       "dense_ms": float,                 # the node alone, less the call overhead
                       "delta_reason": str | null,        # why no delta variant (null: it has one)
                       "delta_ms": [..] | null,           # mean over fit frames, per percentage
                       "in_density": [..] | null, "out_density": [..] | null,
                       "samples": {"density": [[..] per percentage], "ms": [[..] per percentage]} | null}},
      "tensors": {name: {"to_delta_ms": [..], "to_dense_ms": [..], "density": [..]}},
      "validation": {...}            # the cost model against held-out frames (see cost_model)
    }

Densities are shares of changed positions. A node's delta time excludes the conversions at its
edges, which are per tensor in "tensors".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from deluceva.errors import DelucevaError
from deluceva.files import read_json

__all__ = [
    "Profile",
    "FORMAT",
    "SCHEMA_VERSION",
    "DEFAULT_PERCENTAGES",
    "load_profile",
]

FORMAT = "deluceva-profile"
SCHEMA_VERSION = 2
DEFAULT_PERCENTAGES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
@dataclass
class Profile:
    """A loaded (or freshly measured) profile; see the module docstring for the fields."""

    model: dict
    machine: dict
    settings: dict
    percentages: list[float]
    dense_model_ms: float
    segment_overhead_ms: float
    nodes: dict[str, dict]
    tensors: dict[str, dict]
    validation: dict = field(default_factory=dict)
    created: str = ""
    path: str = "<memory>"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "model": self.model,
            "machine": self.machine,
            "settings": self.settings,
            "percentages": list(self.percentages),
            "dense_model_ms": self.dense_model_ms,
            "segment_overhead_ms": self.segment_overhead_ms,
            "nodes": self.nodes,
            "tensors": self.tensors,
            "validation": self.validation,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile as JSON (atomically: a temporary file renamed into place)."""
        from deluceva.files import check_output, write_text

        path = check_output(path, ".json", "profile")
        write_text(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        self.path = str(path)
        return path

    def check_model(self, sha256: str, input_shape) -> None:
        """Refuse a profile measured on another model or input shape."""
        if self.model["sha256"] != sha256:
            raise DelucevaError(f"{self.path}: profile is for another model (sha256 {self.model['sha256'][:12]}…, "
                                f"this model {sha256[:12]}…)")
        if tuple(self.model["input_shape"]) != tuple(input_shape):
            raise DelucevaError(f"{self.path}: profile is for input shape {tuple(self.model['input_shape'])}, "
                                f"not {tuple(input_shape)}")

    @classmethod
    def from_json(cls, data, label: str = "<memory>") -> "Profile":
        _validate(data, label)
        return cls(
            model=data["model"], machine=data["machine"], settings=data["settings"],
            percentages=[float(p) for p in data["percentages"]],
            dense_model_ms=float(data["dense_model_ms"]),
            segment_overhead_ms=float(data["segment_overhead_ms"]),
            nodes=data["nodes"], tensors=data["tensors"], validation=data.get("validation") or {},
            created=data.get("created", ""), path=label,
        )


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file.

    Raises:
        DelucevaError: one line naming the file when it is missing, not JSON, not a deluceva
            profile, of another schema version, or has missing or malformed fields.

    Example:
        >>> profile = load_profile("yolox.profile.json")       # doctest: +SKIP
        >>> profile.percentages
        [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
    """
    return Profile.from_json(read_json(path, "profile"), str(path))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(data, label: str) -> None:
    def fail(what: str):
        raise DelucevaError(f"{label}: corrupt profile ({what})")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DelucevaError(f"{label}: not a deluceva profile (no \"format\": \"{FORMAT}\")")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise DelucevaError(f"{label}: profile schema version {data.get('schema_version')!r} is not supported "
                            f"(this deluceva reads {SCHEMA_VERSION}); profile again")
    for key, kind in (("model", dict), ("machine", dict), ("settings", dict), ("percentages", list),
                      ("nodes", dict), ("tensors", dict)):
        if not isinstance(data.get(key), kind):
            fail(f"{key!r} missing or not a {kind.__name__}")
    model = data["model"]
    if not isinstance(model.get("sha256"), str) or len(model["sha256"]) != 64:
        fail("model sha256")
    shape = model.get("input_shape")
    if not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        fail("model input_shape")
    percentages = data["percentages"]
    if not percentages or not all(_number(p) and 0 <= p < 1 for p in percentages) or sorted(set(percentages)) != percentages:
        fail("percentages must be increasing numbers in [0, 1)")
    for key in ("dense_model_ms", "segment_overhead_ms"):
        if not _number(data.get(key)) or data[key] < 0:
            fail(key)
    n = len(percentages)

    def series(value, where):
        if not isinstance(value, list) or len(value) != n or not all(_number(v) and v >= 0 for v in value):
            fail(f"{where} must be {n} non-negative numbers")

    for name, node in data["nodes"].items():
        if not isinstance(node, dict) or not isinstance(node.get("op_type"), str):
            fail(f"node {name!r}")
        if not _number(node.get("dense_ms")) or node["dense_ms"] < 0:
            fail(f"node {name!r} dense_ms")
        for key in ("delta_ms", "in_density", "out_density"):
            if node.get(key) is not None:
                series(node[key], f"node {name!r} {key}")
        samples = node.get("samples")
        if samples is not None:
            if (not isinstance(samples, dict) or not isinstance(samples.get("density"), list)
                    or not isinstance(samples.get("ms"), list) or len(samples["density"]) != n
                    or len(samples["ms"]) != n):
                fail(f"node {name!r} samples")
            for xs, ys in zip(samples["density"], samples["ms"]):
                if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys) \
                        or not all(_number(v) for v in xs + ys):
                    fail(f"node {name!r} samples")
    for name, tensor in data["tensors"].items():
        if not isinstance(tensor, dict):
            fail(f"tensor {name!r}")
        for key in ("to_delta_ms", "to_dense_ms", "density"):
            series(tensor.get(key), f"tensor {name!r} {key}")
