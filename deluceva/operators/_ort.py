"""Single-node onnxruntime sessions that the delta operators use as compute kernels."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = ["single_node_session", "session_options"]

_OPSET = 17


def session_options(threads: int) -> ort.SessionOptions:
    """The options deluceva gives every onnxruntime session: `threads` intra-op, one inter-op."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def single_node_session(
    op_type: str, constants: list[np.ndarray], attrs: dict, in_channels: int, threads: int = 1
) -> Callable[[np.ndarray], np.ndarray]:
    """A function x -> op(x, *constants) for x of shape (N, in_channels, H, W), N/H/W dynamic."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_channels, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    names = [f"c{i}" for i in range(len(constants))]
    inits = [numpy_helper.from_array(np.asarray(c, np.float32), name) for c, name in zip(constants, names)]
    node = helper.make_node(op_type, ["x", *names], ["y"], **attrs)
    graph = helper.make_graph([node], op_type.lower(), [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"x": np.ascontiguousarray(batch, np.float32)})[0]

    return run
