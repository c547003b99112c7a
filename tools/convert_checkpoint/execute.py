"""Execute a plan: each output file is built independently from lazily read slices.

The executor knows no format and no direction: the plan's target endpoint writes each file
(``write_file``) and, last, the metadata (``finish``). Files go to a pool of ``--max_workers``
processes (forked, so they share the source index and memory maps); a worker holds about one
output file at a time. Every file is written under a temporary name and renamed into place;
the target's markers (tracker file, index, config) are written last, so a directory that has
them is complete.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from .torch_import import torch

from . import torch_import
from .core.plan import OutputFile, Plan
from .devices import DeviceLoad
from .distributed import SINGLE, World
from .errors import ConversionError
from .manifest import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    file_sha256,
    plan_fingerprint,
    rank_manifest_name,
)
from .materialize import ARENA, FileContext
from .quant.fp8_materialize import Fp8Event, Fp8Policy
from .report import REPORT_NAME, FileResult, conversion_report
from .requests import RunOptions
from .textfile import fsync_file, tmp_path, write_text

# Set in the parent before forking workers; read-only afterwards.
_PLAN: Plan | None = None


def _fault(kind: str) -> int | None:
    """Test hook: ``CONVERT_CHECKPOINT_FAULT=kill_after=N`` (SIGKILL the run once N files are
    done) or ``enospc_after=N`` (the (N+1)-th file fails mid-write with ENOSPC), to prove resume."""
    m = re.fullmatch(rf"{kind}=(\d+)", os.environ.get("CONVERT_CHECKPOINT_FAULT", ""))
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class BuildSettings:
    """What every file build of one run shares."""

    root: str  # where the planned relative paths start
    fp8: Fp8Policy | None
    keep_arena: bool = True  # reuse the worker's buffer across files (not under a binding budget)
    strict_values: bool = False  # NaN/Inf in a tensor is an error, not a warning
    io_threads: int = 1  # threads per file copying the tensors that only move bytes


def _build_file(out: OutputFile, settings: BuildSettings, index: int = 0, gpu: int | None = None) -> FileResult:
    assert _PLAN is not None
    start = time.perf_counter()
    if gpu is not None:  # the file's math (FP8, quantizers asking for "cuda") runs on this device
        torch.cuda.set_device(gpu)
    ctx = FileContext(out.relpath, _PLAN.source.reader(), settings.fp8, settings.strict_values, settings.io_threads)
    path = os.path.join(settings.root, out.relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tmp_path(path)
    try:
        if _fault("enospc_after") == index:
            with open(tmp, "wb") as partial:
                partial.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device (simulated by CONVERT_CHECKPOINT_FAULT)", tmp)
        sha256 = _PLAN.target.write_file(out, tmp, ctx)
        if sha256 is None:  # hashed while still in the page cache
            sha256 = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        ctx.close()
        if not settings.keep_arena:  # under a binding memory budget an idle worker must not hold a file's worth
            ARENA.release()
    return FileResult(out.relpath, out.nbytes, time.perf_counter() - start, tuple(ctx.fp8_events),
                      os.path.getsize(path), sha256, nonfinite=tuple(ctx.nonfinite))


def plan_computes(plan: Plan) -> bool:
    """Whether some output file builds tensors (with torch): every file that holds memory while it
    is written does; one that holds none only moves bytes of the source's files."""
    return any(plan.memory_bytes(f) for f in plan.files)


def _worker_init() -> None:
    """A worker runs torch on one thread (N workers share the cores) and dies with its parent
    (Linux): a killed conversion leaves no orphans holding its files and pipes."""
    if torch_import.imported():
        torch.set_num_threads(1)
    else:  # read by torch's thread pools if a file of this worker imports it after all
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _prepare_target(target: str, overwrite: bool) -> None:
    if os.path.isdir(target) and os.listdir(target) and overwrite:
        for name in os.listdir(target):
            p = os.path.join(target, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    os.makedirs(target, exist_ok=True)


def progress_bar(total: int, enabled: bool, desc: str):
    """A byte progress bar on stderr (None when disabled)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers/huggingface_hub
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)


def _clear_unfinished(target: str, markers: tuple[str, ...]) -> None:
    """Before a resumed run: drop temporary files of the killed run, and the markers, so the
    directory is never taken for a finished checkpoint while the rest is rebuilt."""
    for dirpath, _, names in os.walk(target):
        for name in names:
            if re.fullmatch(r"\..+\.tmp-\d+", name) or re.fullmatch(r"conversion_manifest.*\.json\.tmp", name):
                os.remove(os.path.join(dirpath, name))
    for name in (*markers, REPORT_NAME):
        if os.path.isfile(os.path.join(target, name)):
            os.remove(os.path.join(target, name))


def _reused(f: OutputFile, manifest: Manifest) -> FileResult:
    record = manifest.files[f.relpath]
    assert record.bytes is not None and record.sha256 is not None  # a done record, checked on disk by Manifest.for_resume
    events = tuple(Fp8Event(*e) for e in record.fp8_events)
    return FileResult(f.relpath, f.nbytes, 0.0, events, record.bytes, record.sha256, reused=True)


def seconds_since_process_start() -> float | None:
    """How long this process has run (Linux ``/proc``): at the start of ``execute``, the time
    imports and planning took before the first byte moved."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def default_memory_budget() -> int | None:
    """Half of the memory available now (Linux ``MemAvailable``); None where it is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):  # shared by the processes of this machine (torchrun)
                    return int(line.split()[1]) * 1024 // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except OSError:
        pass
    return None


def check_memory_budget(plan: Plan, budget: int | None) -> None:
    """Each worker holds about one output file: a file larger than the budget cannot be built."""
    if budget is None or not plan.files:
        return
    largest = max(plan.files, key=plan.memory_bytes)
    if plan.memory_bytes(largest) > budget:
        raise ConversionError(
            f"--max_memory {budget / 2**30:.2f} GiB is smaller than output file {largest.relpath} "
            f"({plan.memory_bytes(largest) / 2**30:.2f} GiB held while it is written): raise --max_memory, or split the "
            "model further (more TP/PP/EP ranks, a smaller --max_shard_size)"
        )


def _run_pool(todo: list[OutputFile], max_workers: int, budget: int | None, submit, finished,
              memory=lambda f: f.nbytes, gpus: tuple[int, ...] = ()) -> int:
    """Build files in worker processes, admitting them largest first while the memory the files
    in flight hold (``memory(f)``) fits in ``budget``; with GPUs, each file goes to the GPU with
    the least of that memory in flight. Returns the largest in-flight total seen."""
    queue = sorted(todo, key=memory, reverse=True)
    in_flight: dict = {}
    load = DeviceLoad(gpus)
    held = peak = 0
    while queue or in_flight:
        while queue and len(in_flight) < max_workers and (
                not in_flight or budget is None or held + memory(queue[0]) <= budget):
            f = queue.pop(0)
            gpu = load.take(memory(f)) if gpus else None
            in_flight[submit(f, gpu)] = (f, gpu)
            held += memory(f)
            peak = max(peak, held)
        done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
        for fut in done:
            f, gpu = in_flight.pop(fut)
            held -= memory(f)
            if gpu is not None:
                load.release(gpu, memory(f))
            finished(fut.result())
    return peak


def execute(plan: Plan, run: RunOptions, max_memory: int | None = None, world: World = SINGLE) -> list[FileResult]:
    """Build the plan's files (this process's share of them under several processes), then
    the report, the merged manifest and the target's metadata (rank 0, once every rank is done).
    ``max_memory`` is the budget in bytes already resolved (None: unbounded)."""
    start = time.perf_counter()
    startup = seconds_since_process_start()
    target = plan.target_dir
    root = plan.target.data_dir
    fingerprint = plan_fingerprint(plan)
    mine = world.share(plan.files)
    name = MANIFEST_NAME if world.size == 1 else rank_manifest_name(world.rank)
    if run.resume:
        manifest = Manifest.for_resume(target, mine, fingerprint, root, name)  # before anything is removed
        world.barrier()
        if world.leader:
            _clear_unfinished(target, plan.target.markers)
    else:
        if world.leader:
            _prepare_target(target, run.overwrite)
        world.barrier()
        manifest = Manifest.fresh(target, mine, fingerprint, name)
    world.barrier()
    manifest.save()
    error = None
    try:
        if not isinstance(run.io_threads, int):
            raise TypeError("io_threads must be resolved to a count before execute (api.resolve_workers)")
        settings = BuildSettings(root, plan.fp8, strict_values=run.strict_values, io_threads=run.io_threads)
        gpus = run.gpus[world.rank % len(run.gpus):] + run.gpus[:world.rank % len(run.gpus)] if run.gpus else ()
        if not isinstance(run.max_workers, int):
            raise TypeError("max_workers must be resolved to a count before execute (api.resolve_workers)")
        results, peak_in_flight = _build_share(plan, mine, manifest, settings, run.max_workers, max_memory,
                                               run.progress and world.leader, gpus)
        # Make every file durable before the markers that declare the checkpoint complete. Done
        # here rather than per file so a worker never blocks on the disk between files.
        built = time.perf_counter()
        for f in mine:
            fsync_file(os.path.join(root, f.relpath))
        fsync_seconds = time.perf_counter() - built
    except (OSError, ConversionError) as e:
        if world.size == 1:
            raise
        error, results, peak_in_flight, fsync_seconds = e, [], 0, 0.0
    gathered = world.all_gather((None if error is None else f"rank {world.rank}: {error}", results, peak_in_flight))
    if error is not None:
        raise error
    failed = [msg for msg, _, _ in gathered if msg]
    if failed:
        raise ConversionError(f"{failed[0]} (the other ranks' finished files are kept: re-run with --resume)")
    results = [r for _, rs, _ in gathered for r in rs]
    if world.leader:
        if world.size > 1:
            _merge_manifests(target, plan, fingerprint, results, world)
        report = conversion_report(plan, results, time.perf_counter() - start)
        report["memory"] = {"budget_bytes": max_memory, "max_in_flight_planned_bytes": max(p for _, _, p in gathered)}
        report["processes"] = world.size
        report["workers"] = run.max_workers  # per process, as chosen (--max_workers auto) or given
        report["io_threads"] = run.io_threads  # per worker, as chosen (--io_threads auto) or given
        report["startup_seconds"] = startup  # process start to the first byte moved: imports and planning
        report["fsync_seconds"] = fsync_seconds  # waiting for the disk after the last file was built (this rank)
        write_text(os.path.join(target, REPORT_NAME), json.dumps(report, indent=2) + "\n")
        plan.target.finish(plan, results)
    world.barrier()  # the other ranks return once the checkpoint is complete
    return results


def _merge_manifests(target: str, plan: Plan, fingerprint: str, results: list[FileResult], world: World) -> None:
    merged = Manifest.fresh(target, plan.files, fingerprint)
    for r in results:
        merged.files[r.relpath] = FileRecord(r.nbytes, True, r.file_bytes, r.sha256,
                                             [list(vars(e).values()) for e in r.fp8_events])
    merged.save()
    for rank in range(world.size):
        part = os.path.join(target, rank_manifest_name(rank))
        if os.path.exists(part):
            os.remove(part)


def _build_share(plan: Plan, files: list[OutputFile], manifest: Manifest, settings: BuildSettings, max_workers: int,
                 max_memory: int | None, progress: bool, gpus: tuple[int, ...] = ()) -> tuple[list[FileResult], int]:
    """Build ``files`` not already done (verified) in ``manifest``, recording each as it lands
    (spread over ``gpus``, the first of them when building in this process; under torchrun each
    rank starts the rotation at its own rank)."""
    global _PLAN
    _PLAN = plan
    done_before = manifest.done
    results: list[FileResult] = [_reused(f, manifest) for f in files if f.relpath in done_before]
    todo = [f for f in files if f.relpath not in done_before]
    bar = progress_bar(sum(f.nbytes for f in todo), progress, "convert")
    kill_after = _fault("kill_after")

    def finished(r: FileResult) -> None:
        results.append(r)
        manifest.mark_done(r.relpath, r.file_bytes, r.sha256, [list(vars(e).values()) for e in r.fp8_events])
        if bar:
            bar.update(r.nbytes)
        if kill_after is not None and len(results) - len(done_before) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    memory = plan.memory_bytes
    peak_in_flight = max((memory(f) for f in todo), default=0)
    try:
        if max_workers <= 1 or len(todo) <= 1:
            for index, f in enumerate(todo):
                finished(_build_file(f, settings, index, gpus[0] if gpus else None))
        else:
            position = {f.relpath: i for i, f in enumerate(todo)}
            # Reusing a worker's buffer saves page faults, but parks a file's worth of memory in
            # every worker: only when the budget could hold every worker's largest file.
            largest = max(memory(f) for f in todo)
            settings = replace(settings, keep_arena=max_memory is None or max_workers * largest <= max_memory)
            if gpus and torch.cuda.is_initialized():
                raise ConversionError("this process has already used CUDA, so the forked workers cannot: run the "
                                      "conversion in a fresh process, or with max_workers=1")
            if plan_computes(plan):  # imported once here rather than in every forked worker
                torch_import.load()
            # torch's intra-op threads would oversubscribe the cores next to N workers.
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=max_workers, mp_context=ctx, initializer=_worker_init) as pool:
                peak_in_flight = _run_pool(
                    todo, max_workers, max_memory,
                    lambda f, gpu: pool.submit(_build_file, f, settings, position[f.relpath], gpu),
                    finished, memory, gpus)
    except OSError as e:
        manifest.save()  # every file finished so far, recorded for --resume
        done = len(manifest.done)
        raise OSError(e.errno, f"{e.strerror}; {done} of {len(files)} files are finished and kept: "
                               "fix the cause and re-run the same command with --resume", e.filename) from None
    finally:
        if bar:
            bar.close()
        _PLAN = None
        ARENA.release()
    manifest.save()  # the records not yet saved (see Manifest.SAVE_EVERY_FRACTION)
    return results, peak_in_flight
