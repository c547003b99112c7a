"""The one run sequence (plan -> memory budget -> execute -> report), shared by the command line
and the Python API, and the public ``convert_checkpoint()`` function."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from . import workers
from .core.plan import Plan
from .describe import describe_plan
from .distributed import SINGLE, World, join, leave, world_from
from .execute import check_memory_budget, default_memory_budget, execute
from .options import ConvertOptions
from .pipeline import build_plan
from .report import FileResult, fp8_summary, value_warnings
from .requests import RunOptions
from .workers import WorkerChoice


@dataclass
class RunOutcome:
    plan: Plan
    results: list[FileResult] = field(default_factory=list)  # empty for --dry_run and on ranks > 0
    seconds: float = 0.0


def run(opts: ConvertOptions, converters: tuple[Any, ...] | None = None, world: World | None = None,
        echo: bool = True, out: TextIO | None = None, log: TextIO | None = None) -> RunOutcome:
    """Plan and validate, then execute (or, with ``--dry_run``, print the plan to ``out``).

    ``converters`` replaces ``opts.converters`` with objects (Python API); ``echo`` prints the
    plan and the summary to ``log`` (stderr). Raises ``ConversionError`` (one line) on bad input.
    """
    out = out or sys.stdout
    log = log or sys.stderr
    world = world or world_from(opts.world_size, opts.rank)
    run_options = opts.run_options()
    start = time.perf_counter()
    plan = build_plan(opts.plan_request(converters), opts)
    budget = run_options.max_memory if run_options.max_memory is not None else default_memory_budget()
    check_memory_budget(plan, budget)
    run_options, workers_used = resolve_workers(run_options, plan, budget, world)
    plan.notes.append(f"workers: {workers_used.summary}")
    if run_options.dry_run:
        print(describe_plan(plan, workers_used.count, verbose=run_options.verbose), file=out)
        if budget is not None:
            print(f"memory budget: {budget / 2**30:.2f} GiB of output files in flight "
                  f"({'--max_memory' if run_options.max_memory is not None else 'half of the available memory'})",
                  file=out)
        return RunOutcome(plan)
    if echo and world.leader:
        print(describe_plan(plan, workers_used.count), file=log)
    join(world)
    try:
        results = execute(plan, run_options, budget, world)
    finally:
        leave(world)
    outcome = RunOutcome(plan, results if world.leader else [], time.perf_counter() - start)
    if echo and world.leader:
        for line in _summary(outcome, verbose=run_options.verbose):
            print(line, file=log)
    return outcome


def resolve_workers(run: RunOptions, plan: Plan, budget: int | None, world: World) -> tuple[RunOptions, WorkerChoice]:
    """``max_workers`` as a count: ``auto`` is decided from this process's share of the plan."""
    files = len(world.share(plan.files))
    if run.max_workers == "auto":
        choice = workers.choose(plan, files, budget)
    else:
        choice = WorkerChoice(int(run.max_workers), "--max_workers")
    threads, why = workers.io_threads(max(1, min(choice.count, files)), run.io_threads)  # workers that get a file
    choice = replace(choice, io_threads=threads, io_reason=why)
    return replace(run, max_workers=choice.count, io_threads=threads), choice


def _summary(outcome: RunOutcome, verbose: bool) -> list[str]:
    results = outcome.results
    gb = sum(r.nbytes for r in results if not r.reused) / 1e9
    lines = fp8_summary(results, limit=1000 if verbose else 10) + value_warnings(results)
    reused = sum(1 for r in results if r.reused)
    kept = f" ({reused} finished earlier, verified and kept)" if reused else ""
    lines.append(f"done: {len(results)} files{kept}, {gb:.3f} GB in {outcome.seconds:.1f} s -> {outcome.plan.target_dir}")
    return lines


def convert_checkpoint(model_stub: str | os.PathLike, save_directory: str | os.PathLike, converter: Any,
                       max_workers: int = 1, *, resume: bool = False, overwrite: bool = False,
                       max_memory: int | None = None, progress: bool = True,
                       strict_values: bool = False) -> list[FileResult]:
    """Rewrite the safetensors checkpoint in ``model_stub`` (a local directory) into
    ``save_directory`` through ``converter``: one Converter, a spec string such as
    ``"fp8_block_dequantizer:dtype=bfloat16"``, or a list of them applied in order.

    Returns the per-file results; raises ``ConversionError`` (one line) on bad input.

    Example::

        from convert_checkpoint import convert_checkpoint
        convert_checkpoint("DeepSeek-V3", "DeepSeek-V3-bf16", "dequantize", max_workers=8)
    """
    from .converters.protocol import converter_label

    items = tuple(converter if isinstance(converter, (list, tuple)) else [converter])
    labels = tuple(c if isinstance(c, str) else converter_label(c) for c in items)
    opts = ConvertOptions("huggingface", "huggingface", os.fspath(model_stub), os.fspath(save_directory),
                          converters=labels, max_workers=max_workers, max_memory=max_memory, overwrite=overwrite,
                          resume=resume, strict_values=strict_values, progress=progress)
    return run(opts, converters=items, world=SINGLE, echo=False).results


def model_free_ptq(model_stub: str | os.PathLike, save_directory: str | os.PathLike, scheme: Any = None,
                   config: Any = None, ignore: Any = (), max_workers: int = 1, device: str = "cpu",
                   converter: Any = None, *, targets: Any = (), rounding: str = "fp32",
                   format: str = "compressed-tensors", resume: bool = False, overwrite: bool = False,
                   max_memory: int | None = None, progress: bool = True, dry_run: bool = False) -> list[FileResult]:
    """Quantize the safetensors checkpoint in ``model_stub`` into ``save_directory`` without loading
    the model, as llm-compressor's ``model_free_ptq``: ``scheme`` (a preset name such as
    ``"NVFP4A16"``, or a ``QuantizationScheme``) or ``config`` (a ``QuantizationConfig`` or a dict
    with ``config_groups``); ``converter``: pre-stages run first (specs or Converter objects).

    Example::

        from convert_checkpoint import model_free_ptq
        model_free_ptq("Qwen3-8B", "Qwen3-8B-NVFP4A16", scheme="NVFP4A16", ignore=["lm_head"], max_workers=4)
    """
    from .converters.protocol import converter_label
    from .converters.quantize_ct import quantize_spec

    pre = () if converter is None else tuple(converter if isinstance(converter, (list, tuple)) else [converter])
    items = (*pre, quantize_spec(scheme, config, targets, ignore, rounding, str(device), format))
    labels = tuple(c if isinstance(c, str) else converter_label(c) for c in items)
    opts = ConvertOptions("huggingface", "huggingface", os.fspath(model_stub), os.fspath(save_directory),
                          converters=labels, device=str(device), max_workers=max_workers, max_memory=max_memory,
                          overwrite=overwrite, resume=resume, progress=progress, dry_run=dry_run)
    return run(opts, converters=items, world=SINGLE, echo=False).results
