"""The baseline every figure is measured against: plain onnxruntime running the whole model,
densely, on every frame, with the same threads; and the peak memory of a pass.

`run_onnxruntime` times the baseline frame by frame and keeps its outputs on disk;
`plain_onnxruntime` runs it beside deluceva, in blocks of frames (interleaved timing, see
`deluceva bench`); `PeakMemory` measures a pass's memory.

Peak memory of each pass: the process's peak resident set (VmHWM in /proc/self/status) is reset
before the pass (`echo 5 > /proc/self/clear_refs`, Linux 4.0+), and the pass's peak is VmHWM at
its end minus the resident set at its start, so it counts the sessions, their buffers and the
decoder. tracemalloc would miss onnxruntime's native allocations. Where /proc cannot be reset,
ru_maxrss deltas are used instead, which read 0 when the second pass peaks lower than the first.
"""

from __future__ import annotations

import gc
import re
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from deluceva.onnxruntime_session import inference_session

__all__ = ["PeakMemory", "OnnxruntimeRun", "run_onnxruntime", "plain_onnxruntime"]


# -- memory ----------------------------------------------------------------------------------


def _status_kib(name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


class PeakMemory:
    """Peak resident memory added while the `with` block runs, in MiB (see the module docstring)."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.method = "ru_maxrss"
        self.start = _status_kib("VmRSS") if self.method == "VmHWM" else None
        if self.start is None:
            self.method = "ru_maxrss"
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = None
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            end = _status_kib("VmHWM") or self.start
        else:
            end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = max(0, end - self.start) / 1024


# -- the baseline, timed -----------------------------------------------------------------------


@dataclass
class OnnxruntimeRun:
    """Plain onnxruntime's per-frame times and outputs (kept on disk, read back one frame at a time)."""

    ms: list[float]
    store: dict  # output name -> GrowingNpy
    names: list[str]
    memory_mib: float | None
    folder: tempfile.TemporaryDirectory

    def outputs(self, index: int) -> list[np.ndarray]:
        return [self.store[name].read(index) for name in self.names]

    def close(self) -> None:
        for part in self.store.values():
            part.close()
        self.folder.cleanup()


def run_onnxruntime(model: str | bytes, tensors: Iterable[np.ndarray], threads: int,
                    progress=None) -> OnnxruntimeRun:
    """Time plain onnxruntime on each (preprocessed) frame; keep its outputs on disk."""
    from deluceva.files import GrowingNpy

    folder = tempfile.TemporaryDirectory(prefix="deluceva-bench-")
    store: dict = {}
    ms: list[float] = []
    with PeakMemory() as memory:
        # intra-op = threads, inter-op 1, default optimisation, onnxruntime's default spinning
        session = inference_session(model, threads, spinning=True)
        input_name = session.get_inputs()[0].name
        names = [o.name for o in session.get_outputs()]
        for tensor in tensors:
            start = time.perf_counter()
            outputs = session.run(None, {input_name: tensor})
            ms.append((time.perf_counter() - start) * 1000)
            for index, (name, value) in enumerate(zip(names, outputs)):
                if name not in store:
                    store[name] = GrowingNpy(Path(folder.name) / f"{index}.npy", value.shape, value.dtype)
                store[name].append(value)
            if progress is not None:
                progress.update(1)
        del session
    return OnnxruntimeRun(ms, store, names, memory.mib, folder)


def plain_onnxruntime(model: str | bytes, threads: int) -> Callable[[np.ndarray], list]:
    """tensor -> outputs through plain onnxruntime, configured as the baseline is, for timing it
    beside deluceva (in blocks of frames: `deluceva.bench.compare.run_deluceva`)."""
    session = inference_session(model, threads, spinning=True)
    input_name = session.get_inputs()[0].name
    return lambda tensor: session.run(None, {input_name: tensor})
