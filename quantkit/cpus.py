"""How many CPU threads a step's tools get when the command is not told (`--threads 0`, the default)."""

from __future__ import annotations

import os

from .errors import QuantkitError

THREADS_ENV = "QUANTKIT_THREADS"


def usable_cpus() -> int:
    """$QUANTKIT_THREADS (to share a machine between builds: each then asks its tools for that many threads), else
    the CPUs this process may run on. That is its affinity mask (taskset, a container's cpuset), not os.cpu_count(),
    which counts the machine's: llama.cpp's threads spin at every barrier, so more threads than cores slows a step
    many times over instead of sharing them."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise QuantkitError(f"{THREADS_ENV}={value!r} is not a number of threads", f"set {THREADS_ENV} to 1 or more, "
                                "or unset it to use every CPU this process may run on")
        return int(value)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
