"""The physical plan: an ordered list of steps, each a dense segment or one delta operator."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DenseSegment", "DeltaStep", "PhysicalPlan"]


@dataclass
class DenseSegment:
    """Consecutive dense nodes, run as one onnxruntime session."""

    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    kind = "dense"

    @property
    def name(self) -> str:
        return f"dense[{self.nodes[0]}..{self.nodes[-1]}]" if len(self.nodes) > 1 else f"dense[{self.nodes[0]}]"


@dataclass
class DeltaStep:
    """One node run by its delta operator, or a Conv fused with its epilogue (`fused`)."""

    node: str
    inputs: list[str]  # "" for an omitted optional input
    outputs: list[str]
    fused: list[str] = field(default_factory=list)  # epilogue nodes run inside this step
    kind = "delta"

    @property
    def nodes(self) -> list[str]:
        return [self.node, *self.fused]

    @property
    def name(self) -> str:
        return f"delta[{self.node}]"


@dataclass
class PhysicalPlan:
    """Steps in execution order, plus each node's variant and the reason it was chosen."""

    steps: list[DenseSegment | DeltaStep]
    variants: dict[str, str]
    reasons: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        values = list(self.variants.values())
        return {"dense": values.count("dense"), "delta": values.count("delta")}

    def explain(self) -> str:
        """One line per step: its kind, its nodes, and why each node has its variant."""
        lines = []
        for step in self.steps:
            nodes = step.nodes
            lines.append(f"{step.name}  ({len(nodes)} node{'s' if len(nodes) != 1 else ''})")
            for node in nodes:
                lines.append(f"    {node}: {self.variants[node]} ({self.reasons.get(node, '')})")
        return "\n".join(lines)
