"""The machine figures are measured on: a profile's fingerprint (a plan compiled from a profile
of another machine is refused or warned about), and what `deluceva bench` records."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["MACHINE_KEYS", "machine_fingerprint", "compare_machines", "machine_info", "cpu_model"]

# A profile measured where any of these differ describes another machine.
MACHINE_KEYS = ("cpu_model", "cores", "threads", "onnxruntime", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_fingerprint(threads: int) -> dict:
    """What identifies the machine and software a profile was measured on."""
    import numpy
    import onnxruntime

    import deluceva

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count() or 0,
        "threads": int(threads),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "deluceva": deluceva.__version__,
        "platform": platform.platform(),
    }


def compare_machines(recorded: dict, current: dict) -> list[str]:
    """The machine fields that differ, as "field: recorded != current" strings."""
    return [f"{key}: {recorded.get(key)!r} != {current.get(key)!r}" for key in MACHINE_KEYS
            if recorded.get(key) != current.get(key)]


def machine_info() -> dict:
    """Where benchmark figures were measured: CPU, cores, versions, and deluceva's git commit."""
    import numpy
    import onnxruntime

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "commit": commit,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }
