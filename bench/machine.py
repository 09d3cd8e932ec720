"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """CPU model, usable cores and Python version, e.g. for a table's first row."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores, CPython {platform.python_version()}"
