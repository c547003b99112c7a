"""Which CUDA devices exist, asked without initializing CUDA in this process.

The planning process forks the workers that do the GPU math. ``torch.cuda.is_available()``
asks the CUDA runtime, which marks the process so that every forked child fails on its first
CUDA call ("Cannot re-initialize CUDA in forked subprocess"). Counting devices through NVML
(as ``torch.cuda.device_count()`` does first, and ``is_available()`` with
``PYTORCH_NVML_BASED_CUDA_CHECK=1``) leaves the runtime alone.
"""
from __future__ import annotations

import os

import torch


def cuda_device_count() -> int:
    """CUDA devices visible, through NVML where it answers (the runtime only as a fallback)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if not torch.backends.cuda.is_built():
        return 0
    return torch.cuda.device_count()
