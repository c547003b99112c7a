"""``--max_workers auto``: how many worker processes a planned conversion gets.

Each worker builds one output file at a time, so more workers than files, than cores or than
the memory budget can hold files for only wait. Within those bounds, the kind of work decides:
a conversion that mostly moves bytes (``byteplan``) is bound by the disk and the page cache,
where a few streams saturate the device and more only make it seek (measured: see the
README's performance table), while one that computes (casts, FP8, quantizers) scales with cores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import tensor_expr as tx
from .byteplan import buffered_bytes
from .core.plan import Plan

# Streams a disk-bound conversion runs at once: on the 16-core host of the README's table, 8
# workers moved bytes no faster than 4 on one local disk, and on 2 cores 2 is the core limit.
IO_STREAMS = 8


@dataclass(frozen=True)
class WorkerChoice:
    count: int
    reason: str  # one line for the plan summary and the report
    io_threads: int = 1  # threads per worker copying the tensors that only move bytes
    io_reason: str = ""

    @property
    def summary(self) -> str:
        threads = f", {self.io_threads} copy thread{'s' if self.io_threads != 1 else ''} each ({self.io_reason})" \
            if self.io_reason else ""
        return f"{self.count} worker{'s' if self.count != 1 else ''} ({self.reason}){threads}"


def io_threads(workers: int, given: int | str = "auto") -> tuple[int, str]:
    """Copy threads per worker: ``IO_STREAMS`` streams in all, at least one per worker. A copy
    waits on the disk or the page cache, not on a core, so threads (which release the GIL in
    every copy) add streams where a file would otherwise be built by one."""
    if given != "auto":
        return int(given), "--io_threads"
    threads = max(1, IO_STREAMS // max(workers, 1))
    return threads, f"auto: {IO_STREAMS} streams over {workers} worker{'s' if workers != 1 else ''}"


def usable_cores() -> int:
    """Cores this process may run on, shared evenly by the processes of this machine (torchrun)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def choose(plan: Plan, files: int, budget: int | None, cores: int | None = None) -> WorkerChoice:
    """Workers for ``files`` output files of ``plan`` (this process's share) under ``budget``."""
    cores = usable_cores() if cores is None else cores
    limits = [(cores, f"{cores} cores"), (max(files, 1), f"{files} files")]
    if budget is not None and plan.files:
        largest = max(plan.memory_bytes(f) for f in plan.files)
        fit = max(1, budget // max(largest, 1))
        limits.append((fit, f"memory for {fit} of the largest files"))
    if moves_bytes(plan):
        limits.append((IO_STREAMS, f"{IO_STREAMS} streams for a conversion that only moves bytes"))
    count, why = min(limits, key=lambda limit: limit[0])
    return WorkerChoice(count, f"auto: bounded by {why}")


def moves_bytes(plan: Plan) -> bool:
    """Whether the conversion mostly moves bytes: at least 90% of the output bytes are windows and
    concatenations of source tensors that lie plainly in files (``Source.in_file``)."""
    total = moved = 0
    for _, _, job in plan.jobs():
        if job.expr is not None:
            n = tx.nbytes(job.expr)
            total += n
            moved += n - buffered_bytes(job.expr, plan.source.in_file)
    return total > 0 and moved >= 0.9 * total
