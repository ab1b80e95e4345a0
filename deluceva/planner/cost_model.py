"""The cost model: predicted ms per node and variant at a filtering percentage, from a profile.

- dense cost of a node: measured (the profile's `dense_ms`, the node alone in its own session),
  less what crossing a session's boundary costs it. Alone, a node reads and writes its tensors
  as plain NCHW arrays of their own (onnxruntime's blocked layout, its fused activations, its
  reuse of cache-hot memory all stop at a session's edge): the nodes alone sum to 2.1x the
  whole model on YOLOX-nano. Given the model's DAG, that excess is spread over the values every
  node reads and writes (one cost per value, fitted so that all nodes together cost what the
  whole model costs in one session, `dense_model_ms`), and each tensor that crosses between a
  dense segment and a delta step pays it again (`boundary_ms`). Scaling every node by one
  factor instead made the dense segments of YOLOX-nano's compiled plans cost 1.2-1.9x their
  prediction, and the plans slower than the all-delta plan they were chosen over. Without the
  DAG, the one factor;
- delta cost of a node: a non-decreasing function of its input density, fitted per node with
  scikit-learn's isotonic regression on the profile's per-frame samples (all percentages
  together). A straight line (fixed part + part per changed tile) was tried first and
  over-predicted YOLOX-nano's sparse frames 4x: per-frame times are heavy-tailed and the cost
  per tile is not constant (small deltas stay in cache), so a monotone fit that follows the data
  locally predicts far better;
- expected input density of a node at p: the profile's mean density at the measured
  percentages, linearly interpolated in p;
- conversions: the profile's per-tensor ToDelta / ToDense times, interpolated in p;
- one onnxruntime session call: the profile's `segment_overhead_ms`.

`validate` reports the model's quality: predicted against measured ms per frame on held-out
frames, for the all-delta plan at each percentage and for plain dense onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CostModel", "validate"]


class CostModel:
    """Predictions from one profile.

    Example:
        >>> costs = CostModel(load_profile("yolox.profile.json"))   # doctest: +SKIP
        >>> costs.delta_ms("Conv_0", 0.9) < costs.dense_ms("Conv_0")
        True
    """

    def __init__(self, profile, graph=None):  # a deluceva.profiles.Profile (the planner does not import profiles)
        from sklearn.isotonic import IsotonicRegression

        self.profile = profile
        self.percentages = np.asarray(profile.percentages, float)
        self.segment_ms = float(profile.segment_overhead_ms)
        self._values = _tensor_values(graph) if graph is not None else {}
        self._dense, self.value_ms = _split_dense(profile, graph, self._values, self.segment_ms)
        self._fits: dict[str, object] = {}
        for name, node in profile.nodes.items():
            if node.get("delta_ms") is None:
                continue
            samples = node.get("samples") or {}
            xs = np.asarray([d for ds in samples.get("density", []) for d in ds], float)
            ys = np.asarray([m for ms in samples.get("ms", []) for m in ms], float)
            if len(xs) >= 2 and np.ptp(xs) > 1e-6:
                self._fits[name] = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(xs, ys)
            else:  # one density only (e.g. nothing ever changes): its mean time
                self._fits[name] = float(np.mean(ys)) if len(ys) else float(np.mean(node["delta_ms"]))

    def _interp(self, series, p: float) -> float:
        return float(np.interp(p, self.percentages, np.asarray(series, float)))

    def knows(self, node: str) -> bool:
        return node in self.profile.nodes

    def has_delta(self, node: str) -> bool:
        """Whether the profile measured `node` as delta."""
        return node in self._fits

    def knows_tensor(self, tensor: str) -> bool:
        return tensor in self.profile.tensors

    def dense_ms(self, node: str) -> float:
        """What `node` costs inside a dense segment (see the module docstring)."""
        return self._dense[node]

    def boundary_ms(self, tensor: str) -> float:
        """What `tensor` costs a dense segment that writes it for a delta step, or reads it
        from one: its values at the fitted cost per value (0 without the DAG)."""
        return self._values.get(tensor, 0) * self.value_ms

    def density(self, node: str, p: float) -> float | None:
        """Expected input density of `node` at p (None when the profile never saw it as delta)."""
        series = self.profile.nodes[node].get("in_density")
        return None if series is None else self._interp(series, p)

    def delta_ms(self, node: str, p: float | None = None, density: float | None = None) -> float:
        """Predicted delta ms at input `density` (or at the expected density for p); inf without one."""
        fit = self._fits.get(node)
        if fit is None:
            return math.inf
        if density is None:
            density = self.density(node, 0.0 if p is None else p)
            density = 1.0 if density is None else density
        if isinstance(fit, float):
            return fit
        return max(0.0, float(fit.predict([float(density)])[0]))

    def to_delta_ms(self, tensor: str, p: float) -> float:
        entry = self.profile.tensors.get(tensor)
        return 0.0 if entry is None else self._interp(entry["to_delta_ms"], p)

    def to_dense_ms(self, tensor: str, p: float) -> float:
        entry = self.profile.tensors.get(tensor)
        return 0.0 if entry is None else self._interp(entry["to_dense_ms"], p)


def _tensor_values(graph) -> dict[str, int]:
    """Every tensor's number of values, from the model's shapes (constants left out)."""
    model = graph.graph["model"]
    values = {}
    for _, data in graph.nodes(data=True):
        for t in [*data["inputs"], *data["outputs"]]:
            shape = model.shapes.get(t) if t and t not in model.constants else None
            if shape and all(isinstance(d, int) and d > 0 for d in shape):
                values[t] = math.prod(shape)
    return values


def _split_dense(profile, graph, values: dict[str, int], segment_ms: float) -> tuple[dict[str, float], float]:
    """({node: its cost inside a dense segment}, ms per value crossing a segment's boundary).

    A node alone costs its share of the whole model plus its values read and written at a
    session's boundary; the cost per value is the one that makes the shares add up to the
    whole model (shares clamped at 0, then scaled to the whole). Without a graph, or where
    alone costs no more than together, every node is scaled by one factor.
    """
    alone = {n: float(entry["dense_ms"]) for n, entry in profile.nodes.items()}
    whole = float(profile.dense_model_ms) - segment_ms
    total = sum(alone.values())
    node_values = {}
    if graph is not None:
        for n, data in graph.nodes(data=True):
            node_values[n] = sum(values.get(t, 0) for t in dict.fromkeys([*data["inputs"], *data["outputs"]]) if t)
    crossing = sum(node_values.get(n, 0) for n in alone)
    value_ms = (total - whole) / crossing if crossing and whole > 0 and total > whole else 0.0
    shares = {n: max(0.0, ms - value_ms * node_values.get(n, 0)) for n, ms in alone.items()}
    kept = sum(shares.values())
    scale = whole / kept if kept > 0 and whole > 0 else 1.0
    return {n: ms * scale for n, ms in shares.items()}, value_ms


def _error_pct(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured if measured > 0 else 0.0


def validate(profile, graph, measured: list[list[float]], measured_dense: float | None = None) -> dict:
    """Predicted vs measured ms per frame on held-out frames.

    Args:
        graph: the model's annotated DAG (its `delta_reason`s tell which nodes run delta).
        measured: per percentage, the held-out frames' wall ms per frame under the all-delta plan.
        measured_dense: mean ms per held-out frame of the whole model in onnxruntime (default:
            the profile's `dense_model_ms`, which the dense costs are scaled to, so then exact).

    Returns:
        {"all_delta": {"percentages", "measured_ms", "predicted_ms", "error_pct"},
         "all_dense": {"measured_ms", "predicted_ms", "error_pct"}, "mean_abs_error_pct": float}
    """
    from deluceva.planner.attach_costs import attach_costs
    from deluceva.planner.choose_variants import frame_cost

    costs = CostModel(profile, graph)
    # The all-delta plan as the profile measured it (kernels added since then stay dense).
    all_delta = {v: "delta" if profile.nodes.get(v, {}).get("delta_ms") is not None else "dense"
                 for v in graph.nodes}
    all_dense = {v: "dense" for v in graph.nodes}
    rows = {"percentages": [], "measured_ms": [], "predicted_ms": [], "error_pct": []}
    for p, times in zip(profile.percentages, measured):
        if not times:
            continue
        attach_costs(graph, costs, p)
        predicted, actual = frame_cost(graph, all_delta), float(np.mean(times))
        rows["percentages"].append(p)
        rows["measured_ms"].append(round(actual, 4))
        rows["predicted_ms"].append(round(predicted, 4))
        rows["error_pct"].append(round(_error_pct(predicted, actual), 2))
    attach_costs(graph, costs, 0.0)
    dense_predicted = frame_cost(graph, all_dense)
    actual = profile.dense_model_ms if measured_dense is None else round(measured_dense, 4)
    dense = {"measured_ms": actual, "predicted_ms": round(dense_predicted, 4),
             "error_pct": round(_error_pct(dense_predicted, actual), 2)}
    errors = [abs(e) for e in rows["error_pct"]] + [abs(dense["error_pct"])]
    return {"all_delta": rows, "all_dense": dense, "mean_abs_error_pct": round(float(np.mean(errors)), 2)}
