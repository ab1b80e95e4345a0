"""Lift a normalised ONNX model into the logical DAG: one networkx node per operator."""

from __future__ import annotations

import networkx as nx
from onnx import helper

from deluceva.planner.load_model import Model

__all__ = ["lift_onnx"]


def lift_onnx(model: Model) -> nx.DiGraph:
    """One node per ONNX operator (keyed by node name), one edge per producer/consumer pair.

    Node attributes: op_type, attrs (plain Python values), inputs and outputs (tensor names, ""
    for an omitted optional input). Edge attribute: tensors (the names it carries). Graph
    attributes: model, input_name, output_names.

    Example:
        >>> graph = lift_onnx(load_model("model.onnx"))      # doctest: +SKIP
        >>> graph.nodes["Conv_0"]["op_type"]
        'Conv'
    """
    graph = nx.DiGraph(model=model, input_name=model.input_name, output_names=list(model.output_names))
    producer: dict[str, str] = {}
    for node in model.onnx.graph.node:
        attrs = {}
        for attribute in node.attribute:
            value = helper.get_attribute_value(attribute)
            attrs[attribute.name] = value.decode() if isinstance(value, bytes) else value
        graph.add_node(
            node.name, op_type=node.op_type, domain=node.domain, attrs=attrs,
            inputs=list(node.input), outputs=list(node.output),
        )
        for tensor in node.output:
            producer[tensor] = node.name
    for name, data in graph.nodes(data=True):
        for tensor in data["inputs"]:
            source = producer.get(tensor)
            if source is None:
                continue
            if graph.has_edge(source, name):
                graph.edges[source, name]["tensors"].append(tensor)
            else:
                graph.add_edge(source, name, tensors=[tensor])
    return graph
