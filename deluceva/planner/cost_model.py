"""The cost model: predicted ms per node and variant at a filtering percentage, from a profile.

- dense cost of a node: measured (the profile's `dense_ms`, the node alone in its own session),
  scaled by one factor per profile so that all nodes together cost what the whole model costs
  in one session (`dense_model_ms`): alone, a node pays for output allocation and misses the
  fusions onnxruntime makes across nodes, which inflates the sum (2.7x on YOLOX-nano);
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

    def __init__(self, profile):  # a deluceva.profiles.Profile (the planner does not import profiles)
        from sklearn.isotonic import IsotonicRegression

        self.profile = profile
        self.percentages = np.asarray(profile.percentages, float)
        self.segment_ms = float(profile.segment_overhead_ms)
        alone = sum(float(n["dense_ms"]) for n in profile.nodes.values())
        whole = float(profile.dense_model_ms) - self.segment_ms
        self.dense_scale = whole / alone if alone > 0 and whole > 0 else 1.0
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
        return float(self.profile.nodes[node]["dense_ms"]) * self.dense_scale

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

    costs = CostModel(profile)
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
