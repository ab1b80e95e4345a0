"""Set each node's variant from a plan the user gives: all dense, all delta, or per node."""

from __future__ import annotations

from typing import Mapping

import networkx as nx

from deluceva.errors import DelucevaError

__all__ = ["assign_variants"]


def assign_variants(graph: nx.DiGraph, plan: str | Mapping[str, str]) -> bool:
    """Set `variant` and `reason` on every node.

    Args:
        plan: "dense", "delta" (delta wherever a delta kernel exists), or a mapping from node
            name to "dense"/"delta"; nodes the mapping leaves out run dense.
    """
    if isinstance(plan, str):
        if plan not in ("dense", "delta"):
            raise DelucevaError(f"unknown plan {plan!r}: use 'dense', 'delta' or a mapping of node to variant")
        wanted = {name: plan for name in graph.nodes}
    else:
        unknown = sorted(set(plan) - set(graph.nodes))
        if unknown:
            raise DelucevaError(f"plan names nodes the model does not have: {', '.join(unknown[:5])}")
        bad = sorted({v for v in plan.values() if v not in ("dense", "delta")})
        if bad:
            raise DelucevaError(f"plan variants must be 'dense' or 'delta', not {', '.join(bad)}")
        wanted = {name: plan.get(name, "dense") for name in graph.nodes}
    changed = False
    for name, data in graph.nodes(data=True):
        reason = data["delta_reason"]
        if wanted[name] == "delta" and reason is None:
            variant, why = "delta", "requested"
        elif wanted[name] == "delta":
            variant, why = "dense", reason
        else:
            variant, why = "dense", "requested"
        if data.get("variant") != variant:
            changed = True
        data["variant"] = variant
        data["reason"] = why
    return changed
