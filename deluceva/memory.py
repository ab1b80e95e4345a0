"""Handing memory that set-up freed back to the operating system.

Set-up (profiling, calibration, the controller's first measurements) frees hundreds of MiB of
arrays and onnxruntime outputs. glibc keeps freed blocks under its mmap threshold (which grows
to 32 MiB as large blocks are freed) in its heap, and onnxruntime's arena takes its large regions
with fresh mmaps, which never reuse that heap: without a trim the run's peak was set-up's
leftovers plus the run's own (YuNet at 1280x736, `run --plan delta`: 326 MiB left by calibration
alone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

__all__ = ["release_freed_memory"]

_LIBC = []


def _malloc_trim():
    if not _LIBC:
        name = ctypes.util.find_library("c")
        try:
            _LIBC.append(getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def release_freed_memory() -> None:
    """Collect garbage, then return the C heap's free pages to the system (glibc's
    `malloc_trim`; nothing more where the C library has none, as on macOS or musl)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
