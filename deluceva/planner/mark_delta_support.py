"""Decide, per node, whether a delta variant exists, and record why not where it does not."""

from __future__ import annotations

import networkx as nx
import onnx

from deluceva.operators import Grid, OpSpec, delta_support
from deluceva.operators._common import tile_size_for

__all__ = ["mark_delta_support", "DEFAULT_TILE"]

# Tile edge at the input's resolution. 8x8 tiles keep a conv's halo overhead small (a 3x3
# kernel reads 10x10 per 8x8 tile) while static-camera changes stay sparse at this size.
DEFAULT_TILE = 8


def tensor_grid(graph: nx.DiGraph, tensor: str, base_tile: int) -> Grid | None:
    """The tile grid of a float32 (1, C, H, W) tensor, or None for any other tensor."""
    model = graph.graph["model"]
    shape = model.shapes.get(tensor)
    if shape is None or len(shape) != 4 or shape[0] != 1 or model.dtypes.get(tensor) != onnx.TensorProto.FLOAT:
        return None
    _, channels, height, width = shape
    tile = tile_size_for(height, width, model.input_shape[2:], base_tile)
    return Grid(channels, height, width, tile)


def mark_delta_support(graph: nx.DiGraph, base_tile: int = DEFAULT_TILE, threads: int = 1) -> bool:
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
            input_grids=[tensor_grid(graph, t, base_tile) if t and i not in constants else None
                         for i, t in enumerate(data["inputs"])],
            output_grids=[tensor_grid(graph, t, base_tile) for t in data["outputs"]],
            threads=threads,
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
