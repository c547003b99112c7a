"""Plan and validate a conversion; nothing here reads tensor data or writes a byte.

A plan is the list of output files and, for every tensor in each, the expression saying which
rows of which source tensors it is made of. Planning composes the model mapping (module
convertors: HF <-> canonical) with the layout mapping (canonical <-> TP/PP shards) and checks
the whole thing: every source tensor consumed or explicitly ignored, every target produced,
shapes and divisibility, layer lists.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch

from . import tensor_expr as te
from .config.arch import ModelArch, load_arch_yaml
from .config.family import FamilySpec
from .errors import ConversionError
from .layout.placement import MTP_INNER_LAYER, ParallelLayout
from .layout.table import placement_table
from .layout.tensor_parallel import divides, padded_vocab_size
from .module_convertor import CanonicalTensor, ModuleConvertor, create
from .options import ConvertOptions
from .quant import fp8_block
from .quant.fp8_materialize import Fp8Policy
from .tensor_expr import Expr

@dataclass(frozen=True)
class TensorJob:
    name: str
    expr: Expr | None  # None: an ``_extra_state`` entry, saved as None like Megatron's own


@dataclass(frozen=True)
class OutputFile:
    relpath: str
    fmt: str  # "mcore" or "safetensors"
    containers: tuple[tuple[str, tuple[TensorJob, ...]], ...]

    @property
    def nbytes(self) -> int:
        return sum(te.nbytes(j.expr) for _, jobs in self.containers for j in jobs if j.expr is not None)

    @property
    def tensor_count(self) -> int:
        return sum(1 for _, jobs in self.containers for j in jobs if j.expr is not None)


@dataclass
class Plan:
    direction: str  # "hf->mcore", "mcore->hf" or "mcore->mcore"
    source_dir: str
    target_dir: str
    arch: ModelArch
    family: FamilySpec
    layout: ParallelLayout
    files: list[OutputFile]
    source_tensor_count: int
    mcore_args: argparse.Namespace | None = None
    hf_config: dict | None = None  # config.json to write (MCore->HF)
    hf_reference_dir: str | None = None  # copy config/tokenizer files from here (MCore->HF)
    notes: list[str] = field(default_factory=list)
    source: object = None  # HFSource or McoreSource: the lazy index the executor reads through
    fp8: Fp8Policy | None = None  # set when some output tensor is block FP8
    options: ConvertOptions | None = None  # the flags, recorded in conversion_report.json

    def fp8_jobs(self) -> list[tuple[str, Expr]]:
        """(output tensor, FP8 expression) for every block-FP8 tensor written."""
        out = []
        for f in self.files:
            for _, jobs in f.containers:
                for j in jobs:
                    if isinstance(j.expr, (te.Fp8Blocks, te.Quantize)):
                        out.append((j.name, j.expr))
                    elif isinstance(j.expr, te.Fp8Part) and j.expr.which == "codes":
                        out.append((j.name, j.expr.of))
        return out

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)


# --- helpers shared by both directions ---------------------------------------------------

def _layer_convertors(family: FamilySpec, arch: ModelArch, layer: int, hf_prefix: str, mcore_prefix: str) -> list[ModuleConvertor]:
    kind = "moe" if arch.is_moe_layer(layer) else "dense"
    return [create(spec, arch, hf_prefix, mcore_prefix) for spec in family.layer_modules if spec.when in (None, kind)]


def build_convertors(family: FamilySpec, arch: ModelArch) -> list[ModuleConvertor]:
    convertors = [create(spec, arch, "", "") for spec in family.global_modules]
    for layer in range(arch.num_layers):
        hf_prefix = family.layer_prefix.format(layer=layer)
        convertors += _layer_convertors(family, arch, layer, hf_prefix, f"decoder.layers.{layer}.")
    if arch.mtp_num_layers and family.mtp is None:
        raise ConversionError(f"model family {family.name} has no multi-token-prediction layers (mtp_num_layers {arch.mtp_num_layers})")
    for k in range(arch.mtp_num_layers):
        # HF stores MTP layer k as decoder layer num_layers + k; it is as MoE as the last layer.
        layer = arch.num_layers + k
        hf_prefix = family.mtp.layer_prefix.format(layer=layer)
        mcore_prefix = f"mtp.layers.{k}."
        convertors += [create(spec, arch, hf_prefix, mcore_prefix) for spec in family.mtp.modules]
        convertors += _layer_convertors(family, arch, layer, hf_prefix, f"{mcore_prefix}{MTP_INNER_LAYER}.")
    return convertors


def canonical_tensors(convertors: Iterable[ModuleConvertor]) -> list[CanonicalTensor]:
    out: list[CanonicalTensor] = []
    seen: set[str] = set()
    for c in convertors:
        for t in c.canonical():
            if t.name in seen:
                raise ConversionError(f"{c.spec.origin}: canonical tensor {t.name} is produced twice")
            seen.add(t.name)
            out.append(replace(t, fp8=True) if c.fp8_weights and len(t.shape) == 2 else t)
    return out


def check_convert_to_fp8(opts: ConvertOptions, family: FamilySpec, convertors: Iterable[ModuleConvertor]) -> None:
    if opts.convert_to_fp8 and not any(c.fp8_weights for c in convertors):
        raise ConversionError(
            f"--convert_to_fp8: the {family.name} family ({family.path}) marks no tensor dtype: fp8, so nothing would be quantized"
        )


def fp8_hf_names(convertors: Iterable[ModuleConvertor]) -> set[str]:
    """HF tensors the family YAML marks ``dtype: fp8`` (the modules' weight matrices)."""
    return {n for c in convertors if c.fp8_weights for n, shape in c.hf_shapes().items() if len(shape) == 2}


FP8_BY_YAML = "marked dtype: fp8 in the family YAML (--convert_to_fp8 or an FP8 source)"


def fp8_policy(opts: ConvertOptions, nominal_dtype: torch.dtype = torch.bfloat16) -> Fp8Policy:
    recipe = fp8_block.Fp8Recipe(
        pow2=opts.force_pow_2_scales, amax_epsilon=opts.amax_epsilon, method=opts.quant_method, device=opts.device
    )
    return Fp8Policy(recipe, opts.fp8_force_no_requant, nominal_dtype)


def finish_fp8_plan(plan: Plan, policy: Fp8Policy) -> None:
    """Attach the FP8 policy when the plan writes FP8 tensors, and check it can be carried out:
    ``--fp8_force_no_requant`` refuses cuts through blocks, the quantizer must be able to run."""
    jobs = plan.fp8_jobs()
    if not jobs:
        return
    if policy.force_no_requant:
        for name, expr in jobs:
            if isinstance(expr, te.Quantize) and te.is_fp8(expr.part):
                raise ConversionError(f"--fp8_force_no_requant: {name} would need requantization: {expr.reason}")
    recipe = policy.recipe
    if recipe.method == "te":
        why = fp8_block.te_unavailable_reason()
        if why:
            recipe = replace(recipe, method="pt")
            plan.notes.append(f"--quant_method te: {why}; using the pt quantizer, which follows TE's rule byte for byte")
    if recipe.device == "cuda" and recipe.method == "pt" and not torch.cuda.is_available():
        raise ConversionError("--device cuda: no CUDA device is visible; leave --device at cpu")
    plan.fp8 = replace(policy, recipe=recipe)
    quantized = [(n, e) for n, e in jobs if isinstance(e, te.Quantize)]
    requant = sum(1 for _, e in quantized if te.is_fp8(e.part))
    plan.notes.append(
        f"FP8: {len(jobs)} block-FP8 tensors ({recipe.describe()}); {len(jobs) - len(quantized)} keep their codes and "
        f"scales unless their scale style differs, {requant} are requantized (cuts through 128-blocks), "
        f"{len(quantized) - requant} are quantized from bf16"
    )
    for name, expr in quantized[:5]:
        plan.notes.append(f"  {'requantize' if te.is_fp8(expr.part) else 'quantize'} {name}: {expr.reason}")
    if len(quantized) > 5:
        plan.notes.append(f"  ... and {len(quantized) - 5} more (--dry_run --verbose lists every tensor's recipe)")


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def validate_tensor_parallel(arch: ModelArch, tensors: list[CanonicalTensor], layout: ParallelLayout) -> None:
    tp, etp = layout.tp, layout.expert_tp
    for what, value in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_query_groups", arch.num_query_groups),
        ("ffn_hidden_size", arch.ffn_hidden_size),
        ("padded vocab size", layout.padded_vocab_size),
    ):
        if value % tp:
            raise ConversionError(f"--tensor_model_parallel_size {tp} does not divide {what} {value}")
    if arch.num_experts:
        if arch.num_experts % layout.ep:
            raise ConversionError(f"--expert_parallel_size {layout.ep} does not divide num_experts {arch.num_experts}")
        if arch.moe_ffn_hidden_size % etp:
            flag = "--expert_tensor_parallel_size" if layout.etp is not None else "--tensor_model_parallel_size"
            raise ConversionError(f"{flag} {etp} does not divide moe_ffn_hidden_size {arch.moe_ffn_hidden_size}")
    elif layout.ep > 1 or layout.etp is not None or layout.grouped_gemm:
        raise ConversionError(
            "--expert_parallel_size, --expert_tensor_parallel_size and --moe-grouped-gemm apply to "
            f"mixture-of-experts models; this {arch.family} model has no routed experts"
        )
    layout.expert_files()  # raises on an EP/ETP/TP combination a legacy checkpoint cannot hold
    for t in tensors:
        parts, flag = (etp, "--expert_tensor_parallel_size") if t.expert is not None else (tp, "--tensor_model_parallel_size")
        if not divides(t.shape, t.split, parts, layout.padded_vocab_size):
            raise ConversionError(
                f"{flag} {parts} does not divide tensor {t.name} of shape {list(t.shape)} ({t.split.value} split)"
            )


def resolve_padded_vocab(opts: ConvertOptions, vocab: int, tp: int) -> int:
    if opts.pad_vocab_size_to is not None:
        if opts.pad_vocab_size_to < vocab:
            raise ConversionError(f"--pad_vocab_size_to {opts.pad_vocab_size_to} is smaller than the vocabulary ({vocab})")
        return opts.pad_vocab_size_to
    if not opts.add_embedding_padding:
        return vocab
    return padded_vocab_size(vocab, opts.make_vocab_size_divisible_by, tp)


def check_target_dir(opts: ConvertOptions) -> None:
    target = os.path.abspath(opts.save_ckpt_path)
    src = os.path.abspath(opts.load_ckpt_path)
    if target == src or target.startswith(src + os.sep) or src.startswith(target + os.sep):
        raise ConversionError(f"--save_ckpt_path {opts.save_ckpt_path} overlaps --load_ckpt_path {opts.load_ckpt_path}")
    if os.path.exists(target) and not os.path.isdir(target):
        raise ConversionError(f"--save_ckpt_path {opts.save_ckpt_path} exists and is not a directory")
    if os.path.isdir(target) and os.listdir(target) and not (opts.overwrite or opts.dry_run or opts.resume):
        raise ConversionError(f"--save_ckpt_path {opts.save_ckpt_path} is not empty; pass --overwrite to replace its "
                              "contents, or --resume to finish an interrupted conversion")


def merge_arch_yaml(arch_values: dict, opts: ConvertOptions) -> dict:
    if opts.config_file:
        arch_values = {**arch_values, **load_arch_yaml(opts.config_file)}
    return arch_values


def build_plan(opts: ConvertOptions) -> Plan:
    # Imported here: both planners build on the helpers above.
    from .plan_hf_to_mcore import plan_hf_to_mcore
    from .plan_mcore_to_hf import plan_mcore_to_hf
    from .plan_mcore_to_mcore import plan_mcore_to_mcore

    from .hf_to_hf import plan_hf_to_hf

    planners = {("huggingface", "mcore"): plan_hf_to_mcore, ("mcore", "huggingface"): plan_mcore_to_hf,
                ("mcore", "mcore"): plan_mcore_to_mcore, ("huggingface", "huggingface"): plan_hf_to_hf}
    planner = planners.get((opts.load_platform, opts.save_platform))
    if planner is None:
        raise ConversionError(f"unsupported direction {opts.load_platform} -> {opts.save_platform}")
    plan = planner(opts)
    plan.options = opts
    return plan


def bytes_to_read(plan: Plan) -> int:
    """Source bytes the recipes read (a window read by several files counts each time)."""
    read_for = getattr(plan.source, "bytes_read_for", None)  # converted sources read whole tensor groups
    if read_for is not None:
        return sum(read_for([leaf for _, jobs in f.containers for j in jobs if j.expr is not None
                             for leaf in te.leaves(j.expr)]) for f in plan.files)
    return sum(te.nbytes(leaf) for f in plan.files for _, jobs in f.containers for j in jobs
               if j.expr is not None for leaf in te.leaves(j.expr))


def predicted_memory(plan: Plan) -> str:
    """Each worker holds about one output file (its tensors are carved from a reused buffer),
    plus, behind converters, one tensor group in and out."""
    largest = max((f.nbytes for f in plan.files), default=0)
    group = getattr(plan.source, "largest_group_bytes", 0)
    workers = min(plan.options.max_workers if plan.options else 1, max(len(plan.files), 1))
    held = f"the largest file, {largest / 1e9:.3f} GB" + (f", and converter group, {group / 1e9:.3f} GB" if group else "")
    return (f"predicted peak memory: about {(workers * (largest + group) + 2**30) / 2**30:.2f} GiB "
            f"({workers} worker{'s' if workers > 1 else ''} x {held}, + ~1 GiB)")


def describe_plan(plan: Plan, verbose: bool = False) -> str:
    lay = plan.layout
    lines = _plan_header(plan) + [
        f"source: {plan.source_dir} ({plan.source_tensor_count} tensors)",
        f"target: {plan.target_dir} ({len(plan.files)} files, {plan.total_bytes / 1e9:.3f} GB to write, "
        f"{bytes_to_read(plan) / 1e9:.3f} GB to read)",
        predicted_memory(plan),
    ]
    if plan.direction.endswith("->mcore"):
        lines += placement_table(lay, plan.arch)
    for f in plan.files:
        lines.append(f"  {f.relpath}: {f.tensor_count} tensors, {f.nbytes / 1e6:.1f} MB")
        if verbose:
            for key, jobs in f.containers:
                for j in jobs:
                    where = f"{key}/{j.name}" if key else j.name
                    recipe = "None (_extra_state)" if j.expr is None else f"{list(j.expr.shape)} {str(j.expr.dtype).replace('torch.', '')} <- {te.describe(j.expr)}"
                    lines.append(f"    {where}: {recipe}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _plan_header(plan: Plan) -> list[str]:
    if plan.arch is None:  # HF -> HF through converters: no model, no layout
        return [f"plan: {plan.direction}  converters: {' -> '.join(plan.source.chain.labels)}"]
    lay = plan.layout
    pipe = lay.pipeline
    return [
        f"plan: {plan.direction}  family={plan.family.name}  layers={plan.arch.num_layers}  "
        f"TP={lay.tp} PP={pipe.pp} VPP={pipe.vpp} layers/stage={','.join(map(str, pipe.layers_per_vstage))}  "
        f"impl={lay.transformer_impl}  vocab={plan.arch.vocab_size} padded={lay.padded_vocab_size}  "
        f"tied={plan.arch.tied_embeddings}"
        + (f"  experts={plan.arch.num_experts} EP={lay.ep} ETP={lay.expert_tp} grouped={lay.grouped_gemm}"
           if plan.arch.num_experts else "")
        + (f"  MTP={plan.arch.mtp_num_layers} ({lay.mtp_inner_name})" if plan.arch.mtp_num_layers else ""),
    ]
