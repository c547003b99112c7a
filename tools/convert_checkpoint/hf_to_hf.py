"""``convert-checkpoint hf``: rewrite a HuggingFace checkpoint through converters, model-free.

resolve (open the index) -> plan (tensor groups with their cross-shard dependencies, one output
shard per source shard) -> validate every group on meta tensors -> convert with the main
engine's executor (worker pool, memory budget, manifest, --resume, report). config.json gets
the converters' ``quantization_config``; every other non-safetensors file is copied unchanged.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from .converters.protocol import converter_label
from .converters.registry import CheckpointInfo, build_chain
from .converters.source import ConvertedSource, apply_chain
from .errors import ConversionError
from .formats import huggingface as hf_format
from .options import ConvertOptions
from .plan import OutputFile, Plan, TensorJob, check_target_dir
from .tensor_expr import TensorRef, source


def open_converted(root: str, converters: Iterable[Any]) -> ConvertedSource:
    src = hf_format.open_source(root, check_quantization=False)
    chain = build_chain(CheckpointInfo(root, src.config, frozenset(src.tensor_file)), converters)
    return apply_chain(src, chain)


def plan_hf_to_hf(opts: ConvertOptions, converters: Iterable[Any] | None = None) -> Plan:
    """``converters``: objects (Python API) or spec strings; default ``opts.converters``."""
    converters = list(opts.converters if converters is None else converters)
    if not converters:
        raise ConversionError("convert-checkpoint hf needs at least one --converter")
    check_target_dir(opts)
    src = open_converted(opts.load_ckpt_path, converters)
    files = []
    notes = []
    for shard in sorted(src.entries):
        jobs = tuple(TensorJob(name, source(TensorRef(shard, name), e.dtype, e.shape))
                     for index, names in enumerate(src.outputs) if src.groups[index].home == shard
                     for name in names for e in (src.entries[shard][name],))
        if jobs:
            files.append(OutputFile(shard, "safetensors", (("", jobs),)))
        else:
            notes.append(f"{shard} receives no tensors: all of them were converted together with tensors of other shards")
    notes += [f"{f} is copied unchanged: only safetensors files are converted" for f in _other_weight_files(opts.load_ckpt_path)]
    notes.append("converters: " + " -> ".join(src.chain.labels))
    return Plan("hf->hf", opts.load_ckpt_path, opts.save_ckpt_path, None, None, None, files,
                len(src.input_file), hf_config=src.config, notes=notes, source=src)


def _other_weight_files(root: str) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            if name.endswith(hf_format.WEIGHT_SUFFIXES) and not name.endswith(".safetensors"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def convert_checkpoint(model_stub: str | os.PathLike, save_directory: str | os.PathLike, converter: Any,
                       max_workers: int = 1, *, resume: bool = False, overwrite: bool = False,
                       max_memory: int | None = None, progress: bool = True, strict_values: bool = False):
    """Rewrite the safetensors checkpoint in ``model_stub`` (a local directory) into
    ``save_directory`` through ``converter``: one Converter, a spec string such as
    ``"fp8_block_dequantizer:dtype=bfloat16"``, or a list of them applied in order.
    Returns the per-file results; raises ``ConversionError`` (one line) on bad input."""
    from .execute import check_memory_budget, default_memory_budget, execute

    items = converter if isinstance(converter, (list, tuple)) else [converter]
    labels = tuple(c if isinstance(c, str) else converter_label(c) for c in items)
    opts = ConvertOptions("huggingface", "huggingface", os.fspath(model_stub), os.fspath(save_directory),
                          converters=labels, max_workers=max_workers, max_memory=max_memory, overwrite=overwrite,
                          resume=resume, strict_values=strict_values, progress=progress)
    plan = plan_hf_to_hf(opts, items)
    plan.options = opts
    budget = max_memory if max_memory is not None else default_memory_budget()
    check_memory_budget(plan, budget)
    return execute(plan, max_workers, overwrite, progress, resume, budget, strict_values=strict_values)

