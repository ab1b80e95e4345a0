"""Choose dense or delta per node, minimising the predicted time per frame, exactly (s-t min cut).

The cost of an assignment x (x_v = dense or delta) is, with every term read off the DAG's
annotations (`attach_costs`):

    sum_v  cost_dense[v] if dense else cost_delta[v]                       (per node)
  + sum_t  to_delta[t] * [producer(t) dense and some consumer of t delta]   (per tensor)
  + sum_t  to_dense[t] * [producer(t) delta and (some consumer dense or t is a model output)]
  + segment_ms * ([some node dense] + sum_v [v dense and some predecessor of v delta])

The model input's producer counts as dense. A tensor is converted once however many consumers
need it (the executor caches it), hence the "some consumer" terms. The last line models that
adjacent dense nodes share one onnxruntime session: each dense node that follows a delta one
starts a new session and pays one call's fixed overhead. (partition_dense may merge or split a
little differently on branching graphs; this is the cost the optimum is exact for.)

A fused group (`mark_fusion`: a Conv and its elementwise epilogue) is profiled and run as one
step, so its nodes are tied to one variant by infinite edges both ways; the optimum is then
over the assignments that respect the ties.

Every "some" term is made pairwise with one auxiliary label per tensor or node, bounded by
infinite edges; every pairwise term then costs only when its two labels differ in one
direction, which is submodular, so the s-t minimum cut is the exact minimum. Nodes without a
delta variant get an infinite delta cost. Tests check the result against brute force.
"""

from __future__ import annotations

import math
from typing import Mapping

import networkx as nx
from networkx.algorithms.flow import preflow_push

__all__ = ["all_delta_variants", "choose_variants", "frame_cost", "tensor_users"]

_SOURCE, _SINK = ("source",), ("sink",)  # tuples never collide with node names (strings)


def tensor_users(graph: nx.DiGraph) -> dict[str, tuple[str | None, list[str], bool]]:
    """tensor -> (producer node or None for the model input, consumer nodes, is a model output)."""
    model = graph.graph.get("model")
    constants = model.constants if model is not None else {}
    producer: dict[str, str | None] = {}
    consumers: dict[str, list[str]] = {}
    input_name = graph.graph.get("input_name")
    if input_name:
        producer[input_name] = None
    for name, data in graph.nodes(data=True):
        for t in data["outputs"]:
            if t:
                producer[t] = name
    for name, data in graph.nodes(data=True):
        for t in data["inputs"]:
            if t and t in producer and t not in constants:
                users = consumers.setdefault(t, [])
                if name not in users:
                    users.append(name)
    outputs = set(graph.graph.get("output_names", []))
    return {t: (u, consumers.get(t, []), t in outputs) for t, u in producer.items()}


def _delta_cost(data) -> float:
    return math.inf if data.get("delta_reason") is not None else float(data["cost_delta"])


def all_delta_variants(graph: nx.DiGraph) -> dict[str, str]:
    """The all-delta plan: every node that has a delta variant delta, the rest dense."""
    return {v: "dense" if d.get("delta_reason") is not None else "delta" for v, d in graph.nodes(data=True)}


def frame_cost(graph: nx.DiGraph, variants: Mapping[str, str]) -> float:
    """Predicted ms per frame of running `graph` with `variants` (see the module docstring)."""
    if not graph.number_of_nodes():
        return 0.0
    total = 0.0
    for name, data in graph.nodes(data=True):
        total += float(data["cost_dense"]) if variants[name] == "dense" else _delta_cost(data)
    conversion = graph.graph.get("conversion", {})
    for t, (u, users, is_output) in tensor_users(graph).items():
        to_delta, to_dense = conversion.get(t, (0.0, 0.0))
        u_delta = u is not None and variants[u] == "delta"
        if not u_delta and any(variants[c] == "delta" for c in users):
            total += to_delta
        if u_delta and (is_output or any(variants[c] == "dense" for c in users)):
            total += to_dense
    segment = float(graph.graph.get("segment_ms", 0.0))
    starts = sum(1 for v in graph.nodes if variants[v] == "dense"
                 and any(variants[u] == "delta" for u in graph.predecessors(v)))
    total += segment * (starts + (1 if any(variants[v] == "dense" for v in graph.nodes) else 0))
    return total


class _Network:
    """Capacities summed per edge; an infinite capacity is left out (networkx reads that as inf)."""

    def __init__(self):
        self.capacity: dict[tuple, float] = {}

    def add(self, a, b, cost: float) -> None:
        if cost <= 0:
            return
        self.capacity[(a, b)] = self.capacity.get((a, b), 0.0) + cost

    def build(self, nodes) -> nx.DiGraph:
        flow = nx.DiGraph()
        flow.add_nodes_from([_SOURCE, _SINK, *nodes])
        for (a, b), cost in self.capacity.items():
            if math.isinf(cost):
                flow.add_edge(a, b)
            else:
                flow.add_edge(a, b, capacity=cost)
        return flow


def _optimal(graph: nx.DiGraph) -> dict[str, str]:
    """The minimising assignment. Source side = dense, sink side = delta.

    An edge a -> b of capacity c is cut exactly when a is dense (source side) and b delta, so
    it adds c * [a dense and b delta]: a unary dense cost is v -> sink, a delta cost source -> v.
    """
    net = _Network()
    for v, data in graph.nodes(data=True):
        net.add(v, _SINK, float(data["cost_dense"]))
        net.add(_SOURCE, v, _delta_cost(data))
    conversion = graph.graph.get("conversion", {})
    for t, (u, users, is_output) in tensor_users(graph).items():
        to_delta, to_dense = conversion.get(t, (0.0, 0.0))
        if users and to_delta > 0:
            # z = "t is needed as a delta": forced by any delta consumer; costs when u is dense.
            z = ("needs_delta", t)
            net.add(_SOURCE if u is None else u, z, to_delta)
            for c in users:
                net.add(z, c, math.inf)
        if u is not None and to_dense > 0:
            if is_output:
                net.add(_SOURCE, u, to_dense)  # always read densely: costs whenever u is delta
            elif users:
                # w on the source side = "t is needed dense": forced by any dense consumer.
                w = ("needs_dense", t)
                net.add(w, u, to_dense)
                for c in users:
                    net.add(c, w, math.inf)
    for v, data in graph.nodes(data=True):
        head = data.get("fused_into")
        if head is not None:  # a fused group takes one variant (mark_fusion)
            net.add(v, head, math.inf)
            net.add(head, v, math.inf)
    segment = float(graph.graph.get("segment_ms", 0.0))
    if segment > 0:
        for v in graph.nodes:
            predecessors = list(graph.predecessors(v))
            if predecessors:
                y = ("segment_start", v)  # y delta-side when some predecessor is delta
                net.add(v, y, segment)
                for u in predecessors:
                    net.add(y, u, math.inf)
        q = ("any_dense",)  # q dense-side when any node is dense; costs one session
        net.add(q, _SINK, segment)
        for v in graph.nodes:
            net.add(v, q, math.inf)
    flow = net.build(graph.nodes)
    residual = preflow_push(flow, _SOURCE, _SINK)
    # The largest source side of a minimum cut: every node that cannot reach the sink through
    # unsaturated edges. Taking the largest (not networkx's smallest) sends ties to dense.
    scale = max([1.0, *(c for c in net.capacity.values() if not math.isinf(c))])
    reach, stack = {_SINK}, [_SINK]
    while stack:
        v = stack.pop()
        for u in residual.predecessors(v):
            edge = residual[u][v]
            if u not in reach and edge["capacity"] - edge["flow"] > 1e-12 * scale:
                reach.add(u)
                stack.append(u)
    return {v: "delta" if v in reach else "dense" for v in graph.nodes}


def _reason(graph: nx.DiGraph, data, variant: str) -> str:
    if data.get("delta_reason") is not None:
        return data["delta_reason"]
    if data.get("fused_into") is not None:
        return f"fused with {data['fused_into']}: takes its variant ({variant})"
    dense, delta, density = float(data["cost_dense"]), float(data["cost_delta"]), data.get("density")
    members = data.get("epilogue") or []
    # A fused group's delta time is its whole step's: compare it with the whole group dense.
    dense += sum(float(graph.nodes[m]["cost_dense"]) for m in members)
    group = f" with its {len(members)}-node epilogue" if members else ""
    at = f" at density {density:.2f}" if density is not None else ""
    numbers = f"({delta:.3f} ms vs dense {dense:.3f} ms{group})"
    if variant == "delta":
        if delta <= dense:
            return f"delta faster{at} {numbers}"
        return f"delta slower{at} {numbers} but cheaper than converting around it"
    if delta >= dense:
        return f"delta slower{at} {numbers}"
    return f"delta faster{at} {numbers} but conversions and session splits cost more"


def choose_variants(graph: nx.DiGraph, min_gain: float = 0.0, segment_factor: float = 1.0) -> bool:
    """Set `variant`, `reason` and `predicted_ms` on every node; returns whether any variant changed.

    Needs `cost_dense`, `cost_delta` and `density` on the nodes and `conversion`/`segment_ms` on
    the graph (`attach_costs`). Ties go to dense (exact at any percentage).

    Args:
        min_gain: keep the optimum only when it is predicted to save at least this share of the
            all-dense time; otherwise run all dense. A prediction has an error, and a plan that
            is predicted 3% faster is as likely to be slower; all dense is never slower than
            onnxruntime.
        segment_factor: a mixed optimum is weighed against the all-delta plan (every node that
            has a delta variant) with its dense nodes that could be delta counted at this
            multiple of their predicted time; where the all-delta plan is then no dearer, it
            runs instead. Dense segments cut out of a mixed plan run at 1.3-2x their nodes'
            times (lost fusions, one session call each, values that come in and leave cold),
            which the per-node sum does not see: on YOLOX-nano the compiled plans for p >= 0.6,
            all delta but for the input's SpaceToDepth and a MaxPool, ran 4-17% slower than the
            all-delta plan at the same p.

    Example:
        >>> attach_costs(graph, cost_model, percentage=0.9)     # doctest: +SKIP
        >>> choose_variants(graph)
        True
    """
    if not graph.number_of_nodes():
        return False
    chosen = _optimal(graph)
    all_dense = {v: "dense" for v in graph.nodes}
    all_delta = all_delta_variants(graph)
    dense_ms, chosen_ms = frame_cost(graph, all_dense), frame_cost(graph, chosen)
    instead_of = None  # the mixed optimum the all-delta plan replaced: (predicted ms, with its segments' factor)
    if chosen not in (all_dense, all_delta):
        could_be_delta = [d for v, d in graph.nodes(data=True) if chosen[v] == "dense" and all_delta[v] == "delta"]
        weighed = chosen_ms + (segment_factor - 1.0) * sum(float(d["cost_dense"]) for d in could_be_delta)
        delta_ms = frame_cost(graph, all_delta)
        if delta_ms <= weighed:
            instead_of = (chosen_ms, weighed)
            chosen, chosen_ms = all_delta, delta_ms
    too_small = chosen != all_dense and chosen_ms > (1.0 - min_gain) * dense_ms
    if too_small:
        chosen = all_dense
    changed = False
    for v, data in graph.nodes(data=True):
        variant = chosen[v]
        if data.get("variant") != variant:
            changed = True
        data["variant"] = variant
        data["reason"] = _reason(graph, data, variant)
        if too_small and data.get("delta_reason") is None:
            data["reason"] = (f"all dense: the best mixed plan ({chosen_ms:.2f} ms) saves under {min_gain:.0%} "
                              f"of all dense ({dense_ms:.2f} ms); " + data["reason"])
        elif instead_of is not None and data.get("delta_reason") is None:
            data["reason"] = (f"all delta ({chosen_ms:.2f} ms): the best mixed plan ({instead_of[0]:.2f} ms, "
                              f"{instead_of[1]:.2f} with its dense segments at {segment_factor:g}x) is not cheaper; "
                              + data["reason"])
        data["predicted_ms"] = float(data["cost_dense"]) if variant == "dense" else _delta_cost(data)
    return changed
