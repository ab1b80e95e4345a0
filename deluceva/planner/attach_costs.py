"""Annotate every DAG node with its predicted dense and delta cost at one filtering percentage."""

from __future__ import annotations

import math
import warnings

import networkx as nx

__all__ = ["attach_costs"]


def attach_costs(graph: nx.DiGraph, cost_model, percentage: float) -> bool:
    """Set `cost_dense`, `cost_delta` (ms; inf without a delta variant) and `density` (expected
    input density) on each node, and `conversion` ({tensor: (to_delta ms, to_dense ms)}) and
    `segment_ms` on the graph, from `cost_model` at `percentage`; returns whether anything changed.

    A node the profile does not know (it should not happen: profiles are checked against the
    model) falls back to dense cost 0 and no delta, with one warning naming how many.

    Example:
        >>> attach_costs(graph, CostModel(load_profile("m.profile.json")), 0.9)   # doctest: +SKIP
        True
    """
    changed = False
    unknown = []
    for name, data in graph.nodes(data=True):
        if cost_model.knows(name):
            if data.get("delta_reason") is None and not cost_model.has_delta(name):
                data["delta_reason"] = "no delta time in the profile (profiled before this kernel existed?)"
            dense = cost_model.dense_ms(name)
            delta = cost_model.delta_ms(name, percentage) if data.get("delta_reason") is None else math.inf
            density = cost_model.density(name, percentage)
        else:
            unknown.append(name)
            dense, delta, density = 0.0, math.inf, None
            if data.get("delta_reason") is None:
                data["delta_reason"] = "not in the profile"
        values = {"cost_dense": dense, "cost_delta": delta, "density": density}
        if any(data.get(k) != v for k, v in values.items()):
            changed = True
            data.update(values)
    if unknown:
        warnings.warn(f"{len(unknown)} node(s) missing from the profile run dense (first: {unknown[0]})",
                      stacklevel=2)
    tensors = {t for _, d in graph.nodes(data=True) for t in d["inputs"] + d["outputs"] if t}
    tensors.add(graph.graph.get("input_name"))
    # A tensor crossing between a dense segment and a delta step is also a boundary of the
    # segment's session, which writes or reads it as a plain array of its own.
    conversion = {t: (cost_model.to_delta_ms(t, percentage) + cost_model.boundary_ms(t),
                      cost_model.to_dense_ms(t, percentage) + cost_model.boundary_ms(t))
                  for t in sorted(x for x in tensors if x) if cost_model.knows_tensor(t)}
    segment = cost_model.segment_ms
    if graph.graph.get("conversion") != conversion or graph.graph.get("segment_ms") != segment:
        changed = True
        graph.graph["conversion"], graph.graph["segment_ms"] = conversion, segment
    return changed
