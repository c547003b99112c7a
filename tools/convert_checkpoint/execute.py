"""Execute a plan: each output file is built independently from lazily read slices.

Files go to a pool of ``--max_workers`` processes (forked, so they share the source index and
memory maps); a worker holds about one output file at a time. Every file is written under a
temporary name and renamed into place; the top-level markers (tracker file, index, config)
are written last, so a directory that has them is complete.
"""
from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace

import torch

from . import tensor_expr as te
from .distributed import SINGLE, World
from .errors import ConversionError
from .formats import huggingface as hf_format
from .formats import mcore_legacy
from .formats.safetensors_io import PlannedTensor, write_streaming
from .manifest import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    file_sha256,
    plan_fingerprint,
    rank_manifest_name,
)
from .plan import OutputFile, Plan
from .quant import te_pickle
from .quant.fp8_block import scales_are_pow2
from .quant.fp8_materialize import Fp8Event, Fp8Materializer, Fp8Policy
from .report import REPORT_NAME, FileResult, conversion_report

# Set in the parent before forking workers; read-only afterwards.
_SOURCE = None


def _tmp_path(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}")


class _Arena:
    """Per-process buffer that output tensors are carved from, reused across files.

    Allocating and freeing a fresh buffer per file makes every file pay first-touch page
    faults again (costly on VMs that hand freed memory back to the host). Each carved tensor
    has its own storage (``torch.frombuffer``), so ``torch.save`` writes only its bytes.
    """

    _ALIGN = 64

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def carve(self, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        sizes = [dtype.itemsize * math.prod(shape) for dtype, shape in specs]
        total = sum(-(-n // self._ALIGN) * self._ALIGN for n in sizes)
        if self._buffer is None or self._buffer.numel() < total:
            self._buffer = None  # free the old one first
            self._buffer = torch.empty(max(total, 1), dtype=torch.uint8)
        view = memoryview(self._buffer.numpy())
        out, offset = [], 0
        for (dtype, shape), n in zip(specs, sizes):
            if n == 0:
                out.append(torch.empty(shape, dtype=dtype))
                continue
            out.append(torch.frombuffer(view, dtype=dtype, count=n // dtype.itemsize, offset=offset).view(shape))
            offset += -(-n // self._ALIGN) * self._ALIGN
        return out

    def release(self) -> None:
        self._buffer = None


_ARENA = _Arena()


def _is_fp8_job(expr) -> bool:
    return isinstance(expr, (te.Fp8Blocks, te.Quantize))


def _fault(kind: str) -> int | None:
    """Test hook: ``CONVERT_CHECKPOINT_FAULT=kill_after=N`` (SIGKILL the run once N files are
    done) or ``enospc_after=N`` (the (N+1)-th file fails mid-write with ENOSPC), to prove resume."""
    m = re.fullmatch(rf"{kind}=(\d+)", os.environ.get("CONVERT_CHECKPOINT_FAULT", ""))
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class BuildSettings:
    """What every file build of one run shares."""

    root: str  # where rank files / shards go
    args: object  # Megatron args Namespace for rank files
    iteration: int | None
    fp8: Fp8Policy | None
    keep_arena: bool = True  # reuse the worker's buffer across files (not under a binding budget)
    strict_values: bool = False  # NaN/Inf in a tensor is an error, not a warning


def nonfinite_count(t: torch.Tensor) -> int:
    """NaN/Inf elements of ``t``. A sum is NaN/Inf when any element is (fast path: one vectorized
    reduction); only then are they counted. FP8 e4m3 has NaN codes only (0x7F/0xFF)."""
    if t.numel() == 0:
        return 0
    if t.dtype == torch.float8_e4m3fn:
        low = t.view(torch.uint8) & 0x7F
        return int((low == 0x7F).sum()) if int(low.max()) == 0x7F else 0
    if not t.dtype.is_floating_point or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def _check_values(name: str, relpath: str, tensors, settings: BuildSettings, found: list) -> None:
    bad = sum(nonfinite_count(t) for t in tensors)
    if not bad:
        return
    if settings.strict_values:
        raise ConversionError(f"tensor {name} for {relpath} holds {bad} NaN/Inf values (from the source); "
                              "--strict_values makes that an error")
    found.append((name, bad))


def _build_file(out: OutputFile, settings: BuildSettings, index: int = 0) -> FileResult:
    start = time.perf_counter()
    reader = _SOURCE.reader()
    fp8 = settings.fp8
    quantized = Fp8Materializer(reader, fp8 or Fp8Policy())
    nonfinite: list[tuple[str, int]] = []
    path = os.path.join(settings.root, out.relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_path(path)
    try:
        if _fault("enospc_after") == index:
            with open(tmp, "wb") as partial:
                partial.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device (simulated by CONVERT_CHECKPOINT_FAULT)", tmp)
        if out.fmt == "mcore":
            all_jobs = [j for _, jobs in out.containers for j in jobs if j.expr is not None]
            tensor_jobs = [j for j in all_jobs if not _is_fp8_job(j.expr)]
            buffers = _ARENA.carve([(j.expr.dtype, j.expr.shape) for j in tensor_jobs])
            values = {}
            for job, buf in zip(tensor_jobs, buffers):
                te.materialize_into(job.expr, reader, buf)
                _check_values(job.name, out.relpath, [buf], settings, nonfinite)
                values[id(job)] = buf
            for job in all_jobs:
                if _is_fp8_job(job.expr):  # pickled as TE's Float8BlockwiseQTensor
                    codes, scale = quantized.pair(job.expr, job.name)
                    _check_values(job.name, out.relpath, [codes, scale], settings, nonfinite)
                    values[id(job)] = te_pickle.blockwise_param(  # the quantizer says what the scales are
                        codes, scale, fp8.nominal_dtype, scales_are_pow2(scale), fp8.recipe.amax_epsilon)
            containers = {key: {j.name: values.get(id(j)) for j in jobs} for key, jobs in out.containers}
            mcore_legacy.save_rank_file(tmp, containers, settings.args, settings.iteration)
            del containers, values, buffers
        else:
            (_, jobs), = out.containers
            by_name = {j.name: j.expr for j in jobs}
            planned = [PlannedTensor(j.name, j.expr.dtype, j.expr.shape) for j in jobs]

            def produce(t: PlannedTensor) -> torch.Tensor:
                expr = by_name[t.name]
                if isinstance(expr, te.Fp8Part):  # a weight's codes, then its scales (cached)
                    value = quantized.part(expr, t.name)
                elif isinstance(expr, te.Leaf) and expr.is_whole and hasattr(reader, "whole"):
                    value = reader.whole(expr)  # a converter's output, written as it is (no copy)
                else:  # tensors are written one at a time, so each reuses the arena's first bytes
                    (value,) = _ARENA.carve([(t.dtype, t.shape)])
                    te.materialize_into(expr, reader, value)
                _check_values(t.name, out.relpath, [value], settings, nonfinite)
                return value

            write_streaming(tmp, planned, produce, {"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        reader.close()
        if not settings.keep_arena:  # under a binding memory budget an idle worker must not hold a file's worth
            _ARENA.release()
    return FileResult(out.relpath, out.nbytes, time.perf_counter() - start, tuple(quantized.events),
                      os.path.getsize(path), file_sha256(path),  # hashed while still in the page cache
                      nonfinite=tuple(nonfinite))


def _prepare_target(target: str, overwrite: bool) -> None:
    if os.path.isdir(target) and os.listdir(target) and overwrite:
        for name in os.listdir(target):
            p = os.path.join(target, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    os.makedirs(target, exist_ok=True)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers/huggingface_hub
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not enabled or None, file=sys.stderr)


_MARKERS = (mcore_legacy.TRACKER_NAME, hf_format.INDEX_NAME, "config.json", REPORT_NAME)


def _clear_unfinished(target: str, root: str) -> None:
    """Before a resumed run: drop temporary files of the killed run, and the markers, so the
    directory is never taken for a finished checkpoint while the rest is rebuilt."""
    for dirpath, _, names in os.walk(target):
        for name in names:
            if re.fullmatch(r"\..+\.tmp-\d+", name) or re.fullmatch(r"conversion_manifest.*\.json\.tmp", name):
                os.remove(os.path.join(dirpath, name))
    for name in _MARKERS:
        if os.path.isfile(os.path.join(target, name)):
            os.remove(os.path.join(target, name))


def _reused(f: OutputFile, manifest: Manifest) -> FileResult:
    record = manifest.files[f.relpath]
    events = tuple(Fp8Event(*e) for e in record.fp8_events)
    return FileResult(f.relpath, f.nbytes, 0.0, events, record.bytes, record.sha256, reused=True)


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
    largest = max(plan.files, key=lambda f: f.nbytes)
    if largest.nbytes > budget:
        raise ConversionError(
            f"--max_memory {budget / 2**30:.2f} GiB is smaller than output file {largest.relpath} "
            f"({largest.nbytes / 2**30:.2f} GiB), which a worker holds whole: raise --max_memory, or split the "
            "model further (more TP/PP/EP ranks, a smaller --max_shard_size)"
        )


def _run_pool(todo: list[OutputFile], max_workers: int, budget: int | None, submit, finished) -> int:
    """Build files in worker processes, admitting them largest first while the planned sizes of
    the files in flight fit in ``budget``. Returns the largest in-flight total seen."""
    queue = sorted(todo, key=lambda f: f.nbytes, reverse=True)
    in_flight: dict = {}
    held = peak = 0
    while queue or in_flight:
        while queue and len(in_flight) < max_workers and (
                not in_flight or budget is None or held + queue[0].nbytes <= budget):
            f = queue.pop(0)
            in_flight[submit(f)] = f
            held += f.nbytes
            peak = max(peak, held)
        done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
        for fut in done:
            held -= in_flight.pop(fut).nbytes
            finished(fut.result())
    return peak


def execute(plan: Plan, max_workers: int = 1, overwrite: bool = False, progress: bool = True,
            resume: bool = False, max_memory: int | None = None, world: World = SINGLE,
            strict_values: bool = False) -> list[FileResult]:
    """Build the plan's files (this process's share of them under several processes), then
    the report, the merged manifest and the markers (rank 0, once every rank is done)."""
    start = time.perf_counter()
    target = plan.target_dir
    # Megatron output is a "release" checkpoint (iteration None), as the incumbent writes.
    iteration = None
    root = os.path.join(target, mcore_legacy.iteration_dir_name(iteration)) if plan.direction.endswith("->mcore") else target
    check_memory_budget(plan, max_memory)
    fingerprint = plan_fingerprint(plan)
    mine = world.share(plan.files)
    name = MANIFEST_NAME if world.size == 1 else rank_manifest_name(world.rank)
    if resume:
        manifest = Manifest.for_resume(target, mine, fingerprint, root, name)  # before anything is removed
        world.barrier()
        if world.leader:
            _clear_unfinished(target, root)
    else:
        if world.leader:
            _prepare_target(target, overwrite)
        world.barrier()
        manifest = Manifest.fresh(target, mine, fingerprint, name)
    world.barrier()
    manifest.save()
    error = None
    try:
        settings = BuildSettings(root, plan.mcore_args, iteration, plan.fp8, strict_values=strict_values)
        results, peak_in_flight = _build_share(plan, mine, manifest, settings, max_workers, max_memory, progress)
        # Make every file durable before the markers that declare the checkpoint complete. Done
        # here rather than per file so a worker never blocks on the disk between files.
        for f in mine:
            _fsync(os.path.join(root, f.relpath))
    except (OSError, ConversionError) as e:
        if world.size == 1:
            raise
        error, results, peak_in_flight = e, [], 0
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
        _write_text(os.path.join(target, REPORT_NAME), json.dumps(report, indent=2) + "\n")
        _write_markers(plan, target, results)
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
                 max_memory: int | None, progress: bool) -> tuple[list[FileResult], int]:
    """Build ``files`` not already done (verified) in ``manifest``, recording each as it lands."""
    global _SOURCE
    _SOURCE = plan.source
    done_before = manifest.done
    results: list[FileResult] = [_reused(f, manifest) for f in files if f.relpath in done_before]
    todo = [f for f in files if f.relpath not in done_before]
    bar = _progress(sum(f.nbytes for f in todo), progress)
    kill_after = _fault("kill_after")

    def finished(r: FileResult) -> None:
        results.append(r)
        manifest.mark_done(r.relpath, r.file_bytes, r.sha256, [list(vars(e).values()) for e in r.fp8_events])
        if bar:
            bar.update(r.nbytes)
        if kill_after is not None and len(results) - len(done_before) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    peak_in_flight = max((f.nbytes for f in todo), default=0)
    try:
        if max_workers <= 1 or len(todo) <= 1:
            for index, f in enumerate(todo):
                finished(_build_file(f, settings, index))
        else:
            index = {f.relpath: i for i, f in enumerate(todo)}
            # Reusing a worker's buffer saves page faults, but parks a file's worth of memory in
            # every worker: only when the budget could hold every worker's largest file.
            largest = max(f.nbytes for f in todo)
            settings = replace(settings, keep_arena=max_memory is None or max_workers * largest <= max_memory)
            # torch's intra-op threads would oversubscribe the cores next to N workers.
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=max_workers, mp_context=ctx, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                peak_in_flight = _run_pool(
                    todo, max_workers, max_memory,
                    lambda f: pool.submit(_build_file, f, settings, index[f.relpath]),
                    finished)
    except OSError as e:
        done = len(manifest.done)
        raise OSError(e.errno, f"{e.strerror}; {done} of {len(files)} files are finished and kept: "
                               "fix the cause and re-run the same command with --resume", e.filename) from None
    finally:
        if bar:
            bar.close()
        _SOURCE = None
        _ARENA.release()
    return results, peak_in_flight


def _with_quantization(config: dict, results: list[FileResult]) -> dict:
    """config.json's ``quantization_config`` as the written tensors are: DeepSeek's FP8 block
    (``scale_fmt: ue8m0`` when every scale is a power of two), or none for an unquantized output."""
    config = dict(config)
    events = [e for r in results for e in r.fp8_events]
    previous = config.get("quantization_config")
    if events:
        base = previous if isinstance(previous, dict) and previous.get("quant_method") == "fp8" else None
        config["quantization_config"] = hf_format.fp8_quantization_block(all(e.pow2 for e in events), base)
    else:
        config.pop("quantization_config", None)
    return config


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: str, text: str) -> None:
    tmp = _tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_markers(plan: Plan, target: str, results: list[FileResult]) -> None:
    if plan.direction.endswith("->mcore"):
        _write_text(os.path.join(target, mcore_legacy.TRACKER_NAME), "release")
        return
    config = plan.hf_config
    if plan.direction == "hf->hf":  # config.json as the converters left it; every other file as it was
        hf_format.copy_other_files(plan.source_dir, target, skip={"config.json", *_MARKERS, MANIFEST_NAME})
        written = config
    elif plan.hf_reference_dir:
        hf_format.copy_reference_files(plan.hf_reference_dir, target)
        config = hf_format.read_config(plan.hf_reference_dir)
        written = _with_quantization(config, results)
    else:
        written = _with_quantization(config, results)
    if written != config or not plan.hf_reference_dir:  # a copied config.json stays byte for byte when true
        _write_text(os.path.join(target, "config.json"), json.dumps(written, indent=2, sort_keys=True) + "\n")
    weight_map = {j.name: f.relpath for f in plan.files for _, jobs in f.containers for j in jobs}
    index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    _write_text(os.path.join(target, hf_format.INDEX_NAME), json.dumps(index, indent=2) + "\n")
