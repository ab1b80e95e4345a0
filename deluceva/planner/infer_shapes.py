"""Annotate every DAG node with its input and output shapes (from the normalised model)."""

from __future__ import annotations

import networkx as nx

__all__ = ["infer_shapes"]


def infer_shapes(graph: nx.DiGraph) -> bool:
    """Set input_shapes and output_shapes on each node; returns whether anything changed.

    Shapes were bound and inferred when the model was loaded (`load_model`), so this pass only
    copies them onto the nodes. An omitted optional input gets the shape None.
    """
    shapes = graph.graph["model"].shapes
    changed = False
    for _, data in graph.nodes(data=True):
        inputs = [shapes.get(t) if t else None for t in data["inputs"]]
        outputs = [shapes.get(t) for t in data["outputs"]]
        if data.get("input_shapes") != inputs or data.get("output_shapes") != outputs:
            data["input_shapes"], data["output_shapes"] = inputs, outputs
            changed = True
    return changed
