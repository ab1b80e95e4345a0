"""Invariants checked between the planner's passes, on real and generated graphs.

After every pass: the DAG is acyclic and its edges carry tensors its nodes really exchange;
after `assign_variants` every node has a variant and a reason; the physical plan covers every
node once, runs each step after the steps producing its inputs, and each dense segment exports
exactly what later steps and the graph outputs read. Every pass also has an empty-graph and a
no-op case.
"""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from test_end_to_end import random_plan
from test_generated_graphs import build

from deluceva.planner import DeltaStep, DenseSegment, Model, load_model
from deluceva.planner.assign_variants import assign_variants
from deluceva.planner.attach_flops import attach_flops
from deluceva.planner.infer_shapes import infer_shapes
from deluceva.planner.lift_onnx import lift_onnx
from deluceva.planner.mark_delta_support import mark_delta_support
from deluceva.planner.partition_dense import partition_dense

LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"


def check_dag(graph: nx.DiGraph) -> None:
    """Structure, and whatever the passes so far have annotated."""
    assert nx.is_directed_acyclic_graph(graph)
    for source, target, data in graph.edges(data=True):
        assert data["tensors"], (source, target)
        for tensor in data["tensors"]:
            assert tensor in graph.nodes[source]["outputs"] and tensor in graph.nodes[target]["inputs"]
    producers: dict[str, str] = {}
    for name, data in graph.nodes(data=True):
        for tensor in data["outputs"]:
            assert tensor not in producers, f"{tensor} produced twice"
            producers[tensor] = name
    for name, data in graph.nodes(data=True):
        for tensor in data["inputs"]:
            if tensor in producers:
                assert graph.has_edge(producers[tensor], name), f"missing edge for {tensor}"
        if "output_shapes" in data:
            assert all(shape is not None for shape in data["output_shapes"]), name
        if "flops" in data:
            assert isinstance(data["flops"], int) and data["flops"] >= 0, name
        if "delta_reason" in data:
            reason = data["delta_reason"]
            assert reason is None or (isinstance(reason, str) and reason), name
            assert data["spec"].op_type == data["op_type"]
        if "variant" in data:
            assert data["variant"] in ("dense", "delta"), name
            assert data["reason"], f"{name} has no reason"
            if data["variant"] == "delta":
                assert data["delta_reason"] is None, f"{name} is delta without a delta kernel"


def check_plan(graph: nx.DiGraph, plan) -> None:
    """Every node in one step of its kind; steps in dependency order; segment boundaries exact."""
    model = graph.graph["model"]
    nodes_of = [step.nodes if isinstance(step, DenseSegment) else [step.node] for step in plan.steps]
    seen = [n for nodes in nodes_of for n in nodes]
    assert sorted(seen) == sorted(graph.nodes) and len(seen) == len(set(seen)), "a node is missing or repeated"
    step_of = {n: i for i, nodes in enumerate(nodes_of) for n in nodes}
    for i, (step, nodes) in enumerate(zip(plan.steps, nodes_of)):
        kind = "dense" if isinstance(step, DenseSegment) else "delta"
        assert isinstance(step, (DenseSegment, DeltaStep))
        for node in nodes:
            assert graph.nodes[node]["variant"] == kind == plan.variants[node]
            assert plan.reasons[node] == graph.nodes[node]["reason"]
    available = {model.input_name, *model.constants}
    for i, (step, nodes) in enumerate(zip(plan.steps, nodes_of)):
        # Every input of the step exists: the graph input, a constant, or an earlier step's output.
        needed = [t for t in step.inputs if t]
        missing = [t for t in needed if t not in available]
        assert not missing, f"{step.name} reads {missing} before any step produces them"
        if isinstance(step, DenseSegment):
            produced = [t for n in nodes for t in graph.nodes[n]["outputs"]]
            assert not set(step.inputs) & set(produced), f"{step.name} reads its own outputs as inputs"
            assert set(step.outputs) <= set(produced)
            inner = set(available)
            for node in nodes:  # within the segment, nodes are in order
                assert {t for t in graph.nodes[node]["inputs"] if t} <= inner, f"{node} out of order in {step.name}"
                inner.update(graph.nodes[node]["outputs"])
            later = {t for j, other in enumerate(nodes_of) if j > i for n in other for t in graph.nodes[n]["inputs"]}
            wanted = {t for t in produced if t in later or t in graph.graph["output_names"]}
            assert set(step.outputs) == wanted, f"{step.name} exports {step.outputs}, later steps need {sorted(wanted)}"
            available.update(step.outputs)
        else:
            assert step.inputs == graph.nodes[step.node]["inputs"]
            assert step.outputs == graph.nodes[step.node]["outputs"]
            available.update(step.outputs)
    for source, target in graph.edges:
        assert step_of[source] <= step_of[target], f"{source} runs after its consumer {target}"
    assert set(graph.graph["output_names"]) <= available, "a graph output is never produced"


def run_passes(model: Model, plans) -> None:
    graph = lift_onnx(model)
    check_dag(graph)
    for run_pass in (infer_shapes, attach_flops, mark_delta_support):
        assert run_pass(graph) is True
        check_dag(graph)
        assert run_pass(graph) is False, f"{run_pass.__name__} is not idempotent"
    for plan in plans:
        assign_variants(graph, plan)
        check_dag(graph)
        assert assign_variants(graph, plan) is False
        physical = partition_dense(graph)
        check_plan(graph, physical)
        assert [s.name for s in partition_dense(graph).steps] == [s.name for s in physical.steps]


def plans_for(model: Model) -> list:
    return ["dense", "delta", *(random_plan(model, seed) for seed in range(3)), random_plan(model, 7, share=0.9)]


# AlexNet, VGG and ZFNet hold ~100M Gemm weights: seconds to load, so they are left to the slow
# end-to-end tests; these four cover Concat, channel shuffles, LRN, Gemm, Reshape and Softmax.
@pytest.mark.parametrize("stem", ["light_squeezenet", "light_shufflenet", "light_inception_v1", "light_resnet50"])
def test_invariants_on_architecture_graphs(stem):
    model = load_model(onnx.load(str(LIGHT / f"{stem}.onnx")))
    run_passes(model, plans_for(model))


def test_invariants_on_shared_models(shared_data):
    for file, shape in [("yolox_nano_coco_416.onnx", None), ("yunet_face_dynamic.onnx", (1, 3, 96, 160)),
                        ("mtcnn_pnet_dynamic.onnx", (1, 3, 48, 64))]:
        model = load_model(shared_data / "models" / file, shape)
        run_passes(model, plans_for(model))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_invariants_on_generated_graphs(data):
    proto, _ = build(data)
    model = load_model(proto)
    run_passes(model, plans_for(model))


# -- empty graphs and no-op runs ---------------------------------------------------------------


def empty_model() -> Model:
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], [])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return Model(path="<memory>", sha256="", onnx=proto, input_name="x", input_shape=(1, 3, 8, 8), output_names=[],
                 shapes={"x": (1, 3, 8, 8)}, dtypes={"x": TensorProto.FLOAT})


def test_every_pass_on_an_empty_graph():
    graph = lift_onnx(empty_model())
    assert graph.number_of_nodes() == 0
    for run_pass in (infer_shapes, attach_flops, mark_delta_support):
        assert run_pass(graph) is False
    for plan in ("dense", "delta", {}):
        assert assign_variants(graph, plan) is False
        physical = partition_dense(graph)
        assert physical.steps == [] and physical.counts() == {"dense": 0, "delta": 0}
        assert physical.explain() == ""
        check_plan(graph, physical)


def test_assign_variants_reports_changes():
    model = load_model(build_small())
    graph = lift_onnx(model)
    for run_pass in (infer_shapes, attach_flops, mark_delta_support):
        run_pass(graph)
    assert assign_variants(graph, "dense") is True
    assert assign_variants(graph, "dense") is False
    assert assign_variants(graph, {"conv": "dense"}) is False  # same variants, reasons unchanged
    assert assign_variants(graph, "delta") is True
    assert graph.nodes["lrn"]["variant"] == "dense" and "LRN" in graph.nodes["lrn"]["reason"]
    assert graph.nodes["conv"]["variant"] == "delta"


def build_small() -> onnx.ModelProto:
    weight = onnx.numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("LRN", ["c"], ["l"], size=3, name="lrn"),
             helper.make_node("Relu", ["l"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model
