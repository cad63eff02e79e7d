"""The CUDA GPUs this machine has: what a worker offers to jobs, and what GPU formats require."""

from __future__ import annotations

from functools import cache


@cache
def cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
