"""Find the groups of nodes that run as one fused delta step: each Conv's elementwise epilogue,
and chains of copies (YOLOX's SpaceToDepth then channel Gather).

A group is a delta-capable Conv plus the elementwise nodes (activations, SiLU's Mul, ...) that
read only the Conv's output, each other's outputs and constants, such that
exactly one tensor of the group leaves it. YOLOX's Conv -> Sigmoid -> Mul and P-Net's
Conv -> PRelu are such groups. A copy chain is a copy node (nearest Resize, SpaceToDepth,
Gather, Slice, ...) followed by copy nodes that each read only the previous one's output, which
nothing else reads: the chain's maps compose into one.

Annotations: on the Conv, `epilogue` (member nodes in model order) and `fused_output` (the
tensor that leaves the group); on each member, `fused_into` (the Conv). The planner gives a
group's nodes one variant (`choose_variants`), and `partition_dense` emits a group whose nodes
all run delta as one step.
"""

from __future__ import annotations

import networkx as nx

from deluceva.operators.program import ELEMENTWISE_OP_TYPES
from deluceva.operators.rearrange import COPY_OP_TYPES
from deluceva.planner.choose_variants import tensor_users

__all__ = ["mark_fusion"]


def _absorbable(data, conv_shape, inside: set[str], constants) -> bool:
    if data["op_type"] not in ELEMENTWISE_OP_TYPES or data["delta_reason"] is not None:
        return False
    if data["domain"] not in ("", "ai.onnx") or len(data["outputs"]) != 1:
        return False
    if tuple(data["output_shapes"][0]) != tuple(conv_shape):
        return False
    for tensor in data["inputs"]:
        if not tensor:
            continue
        if tensor not in constants and tensor not in inside:
            return False
    return True


def _group(graph: nx.DiGraph, conv: str, consumers, outputs: set[str]) -> tuple[list[str], str] | None:
    """(members, exit tensor) of `conv`'s epilogue, or None when it has none."""
    data = graph.nodes[conv]
    constants = graph.graph["model"].constants
    conv_output = data["outputs"][0]
    inside, members = {conv_output}, []
    grown = True
    while grown:
        grown = False
        for tensor in list(inside):
            for user in consumers.get(tensor, ()):
                if user not in members and _absorbable(graph.nodes[user], data["output_shapes"][0], inside, constants):
                    members.append(user)
                    inside.update(graph.nodes[user]["outputs"])
                    grown = True
    if not members:
        return None
    group = set(members)
    exits = [t for t in inside if t in outputs or set(consumers.get(t, ())) - group]
    if len(exits) != 1 or exits[0] == conv_output:
        return None
    order = {name: i for i, name in enumerate(graph.nodes)}
    return sorted(members, key=order.get), exits[0]


def _copy_chain(graph: nx.DiGraph, head: str, consumers, outputs: set[str]) -> tuple[list[str], str] | None:
    """(members, exit tensor) of the copies that follow copy node `head`, or None."""
    members, tensor = [], graph.nodes[head]["outputs"][0]
    while tensor not in outputs and len(consumers.get(tensor, ())) == 1:
        (user,) = consumers[tensor]
        data = graph.nodes[user]
        varying = [t for t in data["inputs"] if t and t not in graph.graph["model"].constants]
        if (data["op_type"] not in COPY_OP_TYPES or data["delta_reason"] is not None or len(data["outputs"]) != 1
                or varying != [tensor] or data["domain"] not in ("", "ai.onnx")):
            break
        members.append(user)
        tensor = data["outputs"][0]
    return (members, tensor) if members else None


def mark_fusion(graph: nx.DiGraph) -> bool:
    """Annotate fusable groups (see the module docstring); returns whether anything changed."""
    users = tensor_users(graph)
    consumers = {tensor: readers for tensor, (_, readers, _) in users.items()}
    outputs = {tensor for tensor, (_, _, is_output) in users.items() if is_output}
    before = {n: (d.get("epilogue"), d.get("fused_output"), d.get("fused_into")) for n, d in graph.nodes(data=True)}
    for _, data in graph.nodes(data=True):
        data["epilogue"], data["fused_output"], data["fused_into"] = None, None, None
    for name, data in graph.nodes(data=True):
        if data["delta_reason"] is not None or data["fused_into"] is not None:
            continue
        if data["op_type"] == "Conv":
            found = _group(graph, name, consumers, outputs)
        elif data["op_type"] in COPY_OP_TYPES and len(data["outputs"]) == 1:
            found = _copy_chain(graph, name, consumers, outputs)
        else:
            continue
        if found is None:
            continue
        members, exit_tensor = found
        if any(graph.nodes[m]["fused_into"] for m in members):  # already another group's
            continue
        data["epilogue"], data["fused_output"] = members, exit_tensor
        for member in members:
            graph.nodes[member]["fused_into"] = name
    after = {n: (d.get("epilogue"), d.get("fused_output"), d.get("fused_into")) for n, d in graph.nodes(data=True)}
    return before != after
