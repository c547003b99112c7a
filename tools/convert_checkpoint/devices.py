"""Which CUDA devices exist, asked without initializing CUDA in this process.

The planning process forks the workers that do the GPU math. ``torch.cuda.is_available()``
asks the CUDA runtime, which marks the process so that every forked child fails on its first
CUDA call ("Cannot re-initialize CUDA in forked subprocess"). Counting devices through NVML
(as ``torch.cuda.device_count()`` does first, and ``is_available()`` with
``PYTORCH_NVML_BASED_CUDA_CHECK=1``) leaves the runtime alone.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from .torch_import import torch


def cuda_device_count() -> int:
    """CUDA devices visible, through NVML where it answers (the runtime only as a fallback)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if not torch.backends.cuda.is_built():
        return 0
    return torch.cuda.device_count()


def parse_device(spec: str, require: bool = True) -> tuple[int, ...]:
    """The CUDA devices a ``--device`` value names: ``cpu`` none; ``cuda`` every visible one;
    ``cuda:N`` one; ``cuda:0,1`` or ``cuda:0,cuda:1`` several (jobs are spread over them).
    A device that does not exist is an error naming it; so is a machine without CUDA, unless
    ``require`` is false (then none: whoever needs the GPU reports it)."""
    from .errors import ConversionError

    text = str(spec).strip()
    if text == "cpu":
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not text.startswith("cuda") or not all(parts):
        raise ConversionError(f"--device {spec!r} is not cpu, cuda, cuda:N or cuda:N,M,...")
    indices: list[int] = []
    for i, part in enumerate(parts):
        name = part[len("cuda"):] if part.startswith("cuda") else (":" + part if i else part)
        if name and not (name.startswith(":") and name[1:].isdigit()):
            raise ConversionError(f"--device {spec!r} is not cpu, cuda, cuda:N or cuda:N,M,...")
        indices.append(int(name[1:]) if name else -1)
    count = cuda_device_count()
    if count == 0 and not require:
        return ()
    if count == 0:
        raise ConversionError(f"--device {spec}: CUDA is not available on this machine")
    if indices == [-1]:
        return tuple(range(count))
    if -1 in indices or len(set(indices)) != len(indices):
        raise ConversionError(f"--device {spec!r}: name each CUDA device once, as cuda:N,M,...")
    missing = [i for i in indices if i >= count]
    if missing:
        raise ConversionError(f"--device {spec}: cuda:{missing[0]} does not exist ({count} CUDA devices)")
    return tuple(indices)


def math_device(spec: str) -> str:
    """Where a worker's math runs for a ``--device`` value: ``cpu``, or ``cuda`` (the device the
    executor makes current for each file)."""
    return "cpu" if str(spec).strip() == "cpu" else "cuda"


class DeviceLoad:
    """Estimated bytes in flight per device: the next job goes where the least is placed (ties
    to the lowest index), and its bytes leave when it finishes."""

    def __init__(self, devices: tuple[int, ...]):
        self.held = {d: 0 for d in devices}

    def take(self, size: int) -> int:
        device = min(self.held, key=lambda d: (self.held[d], d))
        self.held[device] += size
        return device

    def release(self, device: int, size: int) -> None:
        self.held[device] -= size
