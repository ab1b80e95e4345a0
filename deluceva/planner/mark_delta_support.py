"""Decide, per node, whether a delta variant exists, and record why not where it does not."""

from __future__ import annotations

import networkx as nx
import onnx

from deluceva.operators import Layout, OpSpec, delta_support

__all__ = ["mark_delta_support", "tensor_layout"]


def tensor_layout(graph: nx.DiGraph, tensor: str) -> Layout | None:
    """The layout of a float32 (1, C, H, W) tensor, or None for any other tensor."""
    model = graph.graph["model"]
    shape = model.shapes.get(tensor)
    if shape is None or len(shape) != 4 or shape[0] != 1 or model.dtypes.get(tensor) != onnx.TensorProto.FLOAT:
        return None
    _, channels, height, width = shape
    return Layout(channels, height, width)


def mark_delta_support(graph: nx.DiGraph) -> bool:
    """Attach an OpSpec to each node and set delta_reason (None where a delta variant exists)."""
    model = graph.graph["model"]
    changed = False
    for name, data in graph.nodes(data=True):
        constants = {i: model.constants[t] for i, t in enumerate(data["inputs"]) if t in model.constants}
        spec = OpSpec(
            name=name,
            op_type=data["op_type"],
            attrs=data["attrs"],
            input_shapes=data["input_shapes"],
            output_shapes=data["output_shapes"],
            constants=constants,
            input_layouts=[tensor_layout(graph, t) if t and i not in constants else None
                           for i, t in enumerate(data["inputs"])],
            output_layouts=[tensor_layout(graph, t) for t in data["outputs"]],
            opset=model.opset,
        )
        if data["domain"] not in ("", "ai.onnx"):
            reason = f"no delta kernel for {data['domain']}.{data['op_type']}"
        else:
            reason = delta_support(spec)
        if data.get("delta_reason", 0) != reason:
            changed = True
        data["spec"], data["delta_reason"] = spec, reason
    return changed
