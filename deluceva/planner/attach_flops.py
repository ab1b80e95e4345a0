"""Annotate every DAG node with an estimate of its floating-point operations per frame."""

from __future__ import annotations

import math

import networkx as nx

__all__ = ["attach_flops", "node_flops"]


def node_flops(op_type: str, attrs: dict, input_shapes: list, output_shapes: list) -> int:
    """Multiply-adds count twice; elementwise and data-movement ops count one per output value."""
    out = output_shapes[0] if output_shapes and output_shapes[0] is not None else ()
    outputs = math.prod(out) if out else 0
    if op_type in ("Conv", "ConvTranspose") and len(input_shapes) > 1 and input_shapes[1]:
        weight = input_shapes[1]
        per_output = math.prod(weight[1:])  # (C/group) * kh * kw
        return 2 * per_output * outputs
    if op_type in ("Gemm", "MatMul") and input_shapes and input_shapes[0]:
        return 2 * input_shapes[0][-1] * outputs
    if op_type in ("MaxPool", "AveragePool"):
        return outputs * math.prod(attrs.get("kernel_shape", [1]))
    if op_type in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean") and input_shapes and input_shapes[0]:
        return math.prod(input_shapes[0])
    return outputs


def attach_flops(graph: nx.DiGraph) -> bool:
    changed = False
    for _, data in graph.nodes(data=True):
        flops = node_flops(data["op_type"], data["attrs"], data["input_shapes"], data["output_shapes"])
        if data.get("flops") != flops:
            data["flops"] = flops
            changed = True
    return changed
