"""The planner's passes, in order: from an ONNX model to a physical plan."""

from __future__ import annotations

from typing import Mapping

import networkx as nx

from deluceva.planner.assign_variants import assign_variants
from deluceva.planner.attach_flops import attach_flops
from deluceva.planner.infer_shapes import infer_shapes
from deluceva.planner.lift_onnx import lift_onnx
from deluceva.planner.load_model import Model
from deluceva.planner.mark_delta_support import mark_delta_support
from deluceva.planner.mark_fusion import mark_fusion
from deluceva.planner.partition_dense import partition_dense
from deluceva.planner.physical import PhysicalPlan

__all__ = ["build_dag", "build_plan", "LOGICAL_PASSES"]

# Each pass annotates the DAG in place and returns whether it changed anything.
LOGICAL_PASSES = [infer_shapes, attach_flops, mark_delta_support, mark_fusion]


def build_dag(model: Model) -> nx.DiGraph:
    """The logical DAG of `model`, annotated with shapes, FLOPs, delta support and fusable groups."""
    graph = lift_onnx(model)
    for annotate in LOGICAL_PASSES:
        annotate(graph)
    return graph


def build_plan(graph: nx.DiGraph, plan: str | Mapping[str, str]) -> PhysicalPlan:
    """Assign variants as given ("dense", "delta" or per node) and partition into steps."""
    assign_variants(graph, plan)
    return partition_dense(graph)
