"""The onnxruntime session options every deluceva session uses."""

from __future__ import annotations

import onnxruntime as ort

__all__ = ["session_options"]


def session_options(threads: int) -> ort.SessionOptions:
    """`threads` intra-op threads, one inter-op thread, sequential execution, quiet logging."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options
