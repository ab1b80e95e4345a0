"""Order the nodes and group consecutive dense nodes into segments (one onnxruntime session each)."""

from __future__ import annotations

import networkx as nx

from deluceva.planner.physical import DeltaStep, DenseSegment, PhysicalPlan

__all__ = ["partition_dense"]


def _grouped_order(graph: nx.DiGraph) -> list[str]:
    """A topological order that keeps nodes of one variant together where the DAG allows.

    Kahn's algorithm that, among the ready nodes, prefers the variant of the node just taken;
    ties go to the model's own node order, so the result is deterministic.
    """
    position = {name: i for i, name in enumerate(graph.nodes)}
    waiting = {name: graph.in_degree(name) for name in graph.nodes}
    ready = sorted((n for n, d in waiting.items() if d == 0), key=position.get)
    order: list[str] = []
    current = None
    while ready:
        same = [n for n in ready if graph.nodes[n]["variant"] == current]
        pick = same[0] if same else ready[0]
        ready.remove(pick)
        order.append(pick)
        current = graph.nodes[pick]["variant"]
        for succ in graph.successors(pick):
            waiting[succ] -= 1
            if waiting[succ] == 0:
                ready.append(succ)
        ready.sort(key=position.get)
    return order


def partition_dense(graph: nx.DiGraph) -> PhysicalPlan:
    """Build the physical plan from the variants on the DAG.

    Each segment is a maximal run of dense nodes in a topological order, so every segment's
    inputs are ready before it runs and merging never creates a cycle. A fused group (see
    `mark_fusion`) whose nodes all run delta becomes one step at its Conv's place.
    """
    model = graph.graph["model"]
    outputs = set(graph.graph["output_names"])
    consumers: dict[str, set[str]] = {}
    for name, data in graph.nodes(data=True):
        for tensor in data["inputs"]:
            if tensor:
                consumers.setdefault(tensor, set()).add(name)
    steps: list[DenseSegment | DeltaStep] = []
    run: list[str] = []

    def close_run() -> None:
        if not run:
            return
        members = set(run)
        produced = [t for n in run for t in graph.nodes[n]["outputs"] if t]
        consumed = []
        for n in run:
            for t in graph.nodes[n]["inputs"]:
                if t and t not in produced and t not in model.constants and t not in consumed:
                    consumed.append(t)
        exported = [t for t in produced if t in outputs or consumers.get(t, set()) - members]
        steps.append(DenseSegment(list(run), consumed, exported))
        run.clear()

    fused = {}  # Conv -> its epilogue, for groups whose nodes all run delta
    for name, data in graph.nodes(data=True):
        members = data.get("epilogue")
        if members and all(graph.nodes[n]["variant"] == "delta" for n in [name, *members]):
            fused[name] = members
    inside = {m for members in fused.values() for m in members}
    for name in _grouped_order(graph):
        data = graph.nodes[name]
        if data["variant"] == "dense":
            run.append(name)
        elif name in fused:
            # The group's members read only its own tensors, so it can run where the Conv does.
            close_run()
            steps.append(DeltaStep(name, list(data["inputs"]), [data["fused_output"]], list(fused[name])))
        elif name not in inside:
            close_run()
            steps.append(DeltaStep(name, list(data["inputs"]), list(data["outputs"])))
    close_run()
    variants = {n: d["variant"] for n, d in graph.nodes(data=True)}
    reasons = {n: d.get("reason", "") for n, d in graph.nodes(data=True)}
    return PhysicalPlan(steps, variants, reasons)
