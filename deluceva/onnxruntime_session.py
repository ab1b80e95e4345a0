"""How deluceva configures every onnxruntime session: the dense segments, the reference and
keyframe sessions, the profiler's and the probes' all come from `inference_session`, so that they
run as the baseline does (same threads, inter-op 1, default graph optimisation)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

__all__ = ["session_options", "inference_session"]


def session_options(threads: int, log_level: int = 3) -> ort.SessionOptions:
    """`threads` intra-op threads, one inter-op thread, sequential execution, quiet logging
    (`log_level` 3: errors only; 4: nothing, for a probe whose failure deluceva reports itself)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = log_level
    return options


def inference_session(model, threads: int = 1, *, arena: bool = True, log_level: int = 3,
                      options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session on `model` (a path, serialised bytes or an onnx.ModelProto).

    Args:
        arena: keep onnxruntime's memory arena; without it a session returns its outputs'
            memory after each run (for sessions that run rarely and output much).
        options: session options to use as they are (instead of `session_options(threads)`).
    """
    if options is None:
        options = session_options(threads, log_level)
        options.enable_cpu_mem_arena = arena
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
