"""From an ONNX model to a physical plan: loading, the logical DAG, its passes, the plan."""

from deluceva.planner.load_model import Model, load_model
from deluceva.planner.physical import DeltaStep, DenseSegment, PhysicalPlan
from deluceva.planner.pipeline import build_dag, build_plan

__all__ = ["Model", "load_model", "build_dag", "build_plan", "PhysicalPlan", "DenseSegment", "DeltaStep"]
