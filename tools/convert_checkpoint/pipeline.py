"""Plan and validate a conversion; nothing here writes a byte.

    source endpoint -> [pre-stage converters] -> model mapping -> layout -> target endpoint -> validation

The source (chosen by ``--load_platform``) gives expressions over its files; the family's module
convertors map HF names to the canonical form and back (skipped when both sides share a
namespace: HF -> HF through converters); a Megatron target shards canonical tensors by the
layout the flags ask for, an HF target into safetensors shards. HF -> MCore, MCore -> HF,
MCore -> MCore and HF -> HF are pairs of endpoints, not code paths. Validation covers the whole
plan before anything is written: every source tensor consumed or explicitly ignored, every
target produced, shapes and divisibility, layer lists, FP8 feasibility, dropped copies equal.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
else:
    pass

from . import dtypes
from . import tensor_expr as tx
from .config.resolve import param_dtype
from .core.canonical import WORD_EMBEDDINGS
from .core.plan import ModelInfo, OutputFile, Plan
from .devices import cuda_device_count
from .dtypes import DType
from .endpoints import endpoint, source_format
from .endpoints.base import CanonicalSource, CanonicalTarget, HFSource, HFTarget, Source, Target
from .errors import ConversionError
from .mapping import build_convertors, canonical_tensors, check_convert_to_fp8, check_copies, fp8_hf_names, gather_hf, to_hf
from .quant import fp8_block
from .quant.fp8_materialize import Fp8Policy
from .requests import Fp8Request, LayoutRequest, ModelChecks, PlanRequest, TargetDir

if TYPE_CHECKING:
    from .layout.placement import ParallelLayout


def check_target_dir(target: TargetDir, source_path: str) -> None:
    path = os.path.abspath(target.path)
    src = os.path.abspath(source_path)
    if path == src or path.startswith(src + os.sep) or src.startswith(path + os.sep):
        raise ConversionError(f"--save_ckpt_path {target.path} overlaps --load_ckpt_path {source_path}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"--save_ckpt_path {target.path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not (target.overwrite or target.dry_run or target.resume):
        raise ConversionError(f"--save_ckpt_path {target.path} is not empty; pass --overwrite to replace its "
                              "contents, or --resume to finish an interrupted conversion")


def open_source(request: PlanRequest) -> Source:
    module = endpoint(source_format(request.load_format, request.source_path), "--load_platform")
    if not hasattr(module, "open_source"):
        raise ConversionError(f"--load_platform {request.load_format}: this format is written, not read")
    return module.open_source(request)


def build_plan(request: PlanRequest, options: Any = None) -> Plan:
    """The whole conversion, validated. ``options`` (the flags as given) is recorded in the plan
    for the report and the resume fingerprint."""
    check_target_dir(request.target, request.source_path)
    source = open_source(request)
    writer = endpoint(request.save_format, "--save_platform")
    if not hasattr(writer, "create_target"):
        raise ConversionError(f"--save_platform {request.save_format}: this format is read, not written")
    target: Target = writer.create_target(request)
    if request.converters and not isinstance(source, HFSource) and not isinstance(target, HFTarget):
        raise ConversionError("--converter runs on HuggingFace tensors: those of an HF source (before the model "
                              f"mapping) or of an HF target (after it); here both sides are {source.format}")
    if isinstance(source, HFSource) and isinstance(target, HFTarget):
        plan = _plan_same_namespace(request, source, target)
    else:
        plan = _plan_through_model(request, source, target)
    plan.options = options
    finish_fp8_plan(plan, fp8_policy(request.fp8, _nominal_dtype(plan)))
    target.check_plan(plan)
    return plan


def _plan_same_namespace(request: PlanRequest, source: HFSource, target: HFTarget) -> Plan:
    """HF -> HF through converters: no model, the source's shards and names are kept."""
    if not request.converters and target.needs_converter:
        raise ConversionError("convert-checkpoint hf needs at least one --converter")
    notes: list[str] = []
    files = target.plan_files_like(source, notes)
    notes += source.describe()
    return Plan(f"{source.short}->{target.short}", request.source_path, request.target.path, files,
                source.tensor_count, source, target, notes=notes)


def _plan_through_model(request: PlanRequest, source: Source, target: Target) -> Plan:
    model = source.model()
    convertors = build_convertors(model.family, model.arch)
    check_convert_to_fp8(request.fp8.convert_to_fp8, model.family, convertors)
    notes: list[str] = []
    copies = []
    source_layout = None
    if isinstance(source, HFSource):
        mapped = gather_hf(source, convertors, model.family, model.arch)
        tensors = canonical_tensors(convertors)
        canonical = mapped.canonical
        model = replace(model, hf_dtypes=mapped.hf_dtypes)
        copies = mapped.copies
        notes += [f"{line} (run on the HF tensors first)" for line in source.describe()]
        notes += _copy_notes(mapped.copies)
    elif isinstance(source, CanonicalSource):
        tensors = canonical_tensors(convertors)
        # Layout flags describe a Megatron target; only for another target are they checked against the source.
        flags = LayoutRequest() if isinstance(target, CanonicalTarget) else request.layout
        canonical, source_layout = source.canonical(tensors, model, flags)
        notes += source.describe()
    else:
        raise ConversionError(f"{source.format}: a source must be an HF or a canonical source")
    check_model(model, request.checks, canonical)
    fp8_output = source.has_fp8 or request.fp8.convert_to_fp8
    layout: ParallelLayout | None
    if isinstance(target, CanonicalTarget):
        files = target.plan_files(canonical, tensors, model, fp8_output)
        layout = target.layout
        if source_layout is not None:
            notes.append(f"source layout: TP={source_layout.tp} PP={source_layout.pipeline.pp} "
                         f"VPP={source_layout.pipeline.vpp} EP={source_layout.ep} ETP={source_layout.expert_tp} "
                         f"impl={source_layout.transformer_impl}")
    elif isinstance(target, HFTarget):
        target.use_model_config(model)
        # --convert_to_fp8 writes the published FP8 layout, whose dtypes the family YAML states.
        hf = to_hf(convertors, canonical, model, restore_dtypes=not request.fp8.convert_to_fp8)
        fp8_names = fp8_hf_names(convertors) if fp8_output else set()
        if request.converters and not isinstance(source, HFSource):
            source, files = _post_stage(request, source, target, hf, fp8_names, model, notes)
        else:
            files = target.plan_files(hf, fp8_names)
        layout = source_layout
        notes += target.notes
    else:
        raise ConversionError(f"{target.format}: a target must be an HF or a canonical target")
    if copies:
        check_copies(copies, source.reader())
    return Plan(f"{source.short}->{target.short}", request.source_path, request.target.path, files,
                source.tensor_count, source, target, model=model, layout=layout, notes=notes)


def _post_stage(request: PlanRequest, source: Source, target: HFTarget, hf: dict[str, tx.Expr], fp8_names: set[str],
                model: ModelInfo, notes: list[str]) -> tuple[Source, list[OutputFile]]:
    """``--converter`` on a Megatron source: the chain runs on the HF tensors before they are
    written (e.g. MCore -> quantized HF in one pass). The shards are those MCore -> HF writes,
    each receiving its tensors' converted outputs: the bytes of the two-step route."""
    from .converters.post_stage import PostStageSource, build_post_stage, chain_input

    inputs = {name: chain_input(expr) for name, expr in hf.items()}
    files = target.plan_files(inputs, set())
    shard_of = {job.name: f.relpath for f, _, job in _jobs(files)}
    stage = build_post_stage(inputs, shard_of, request.converters, source.root,
                             _unquantized(target.config or model.hf_config or {}))
    if stage is None:  # the chain has nothing to do: the plain plan
        return source, target.plan_files(hf, fp8_names)
    chain = stage.chain
    target.post_stage_config = lambda config: chain.hf_config(_unquantized(config))
    return PostStageSource(source, stage), target.plan_shards(stage.by_shard((f.relpath for f in files), shard_of), notes)


def _unquantized(config: dict) -> dict:
    """config.json of the chain's input: full-precision tensors (block FP8 is dequantized first)."""
    return {k: v for k, v in config.items() if k != "quantization_config"}


def _jobs(files: list[OutputFile]):
    return ((f, key, job) for f in files for key, job in f.jobs())


def check_model(model: ModelInfo, checks: ModelChecks, canonical: dict[str, tx.Expr]) -> None:
    """LoongForge's --num_experts, --vocab_size and --torch_dtype must agree with the model."""
    arch = model.arch
    if checks.num_experts is not None and checks.num_experts != (arch.num_experts or 0):
        raise ConversionError(f"--num_experts {checks.num_experts} disagrees with the model, which has "
                              f"{arch.num_experts or 0} routed experts per MoE layer")
    if checks.vocab_size is not None and checks.vocab_size != arch.vocab_size:
        raise ConversionError(f"--vocab_size {checks.vocab_size} disagrees with the model's vocabulary of {arch.vocab_size}")
    if checks.torch_dtype is not None:
        config = model.hf_config or {}
        own = str(config.get("torch_dtype") or config.get("dtype") or tx.dtype_name(canonical[WORD_EMBEDDINGS].dtype))
        if own != checks.torch_dtype:
            raise ConversionError(f"--torch_dtype {checks.torch_dtype}: the checkpoint holds {own}, and casting to "
                                  f"another dtype is not supported yet; drop the flag to keep {own}")


def canonical_view(source: Source) -> tuple[ModelInfo, dict[str, tx.Expr]]:
    """The model and full canonical expressions of a source (``verify``)."""
    model = source.model()
    convertors = build_convertors(model.family, model.arch)
    if isinstance(source, HFSource):
        return model, gather_hf(source, convertors, model.family, model.arch).canonical
    if isinstance(source, CanonicalSource):
        return model, source.canonical(canonical_tensors(convertors), model, LayoutRequest())[0]
    raise ConversionError(f"{source.format}: a source must be an HF or a canonical source")


def _copy_notes(copies: list) -> list[str]:
    notes = []
    tied = [c for c in copies if not c.in_mtp]
    mtp = [c for c in copies if c.in_mtp]
    if tied:
        notes.append(f"tied embeddings: the HF {tied[0].name} copy was checked equal to the embedding and dropped "
                     "(Megatron shares the embedding)")
    if mtp:
        notes.append(f"{len(mtp)} MTP copies of the embedding / LM head (e.g. {mtp[0].name}) were checked equal to "
                     "the main ones and dropped: Megatron's MTP layers share the main model's")
    return notes


def _nominal_dtype(plan: Plan) -> DType:
    """The dtype TE's FP8 parameters present as: the source's FP8 records say; else, for a
    Megatron target, the model's config.json dtype; bf16 otherwise."""
    found = plan.source.fp8_nominal_dtype
    if found is not None:
        return found
    if isinstance(plan.target, CanonicalTarget) and plan.model is not None:
        return param_dtype(plan.model.hf_config or {})
    return dtypes.BFLOAT16


def fp8_policy(request: Fp8Request, nominal: DType = dtypes.BFLOAT16) -> Fp8Policy:
    recipe = fp8_block.Fp8Recipe(pow2=request.force_pow_2_scales, amax_epsilon=request.amax_epsilon,
                                 method=request.quant_method, device=request.device)
    return Fp8Policy(recipe, request.force_no_requant, nominal)


def finish_fp8_plan(plan: Plan, policy: Fp8Policy) -> None:
    """Attach the FP8 policy when the plan writes FP8 tensors, and check it can be carried out:
    ``--fp8_force_no_requant`` refuses cuts through blocks, the quantizer must be able to run."""
    jobs = plan.fp8_jobs()
    if not jobs:
        return
    if policy.force_no_requant:
        for name, expr in jobs:
            if isinstance(expr, tx.Quantize) and tx.is_fp8(expr.part):
                raise ConversionError(f"--fp8_force_no_requant: {name} would need requantization: {expr.reason}")
    recipe = policy.recipe
    if recipe.method == "te":
        why = fp8_block.te_unavailable_reason()
        if why:
            recipe = replace(recipe, method="pt")
            plan.notes.append(f"--quant_method te: {why}; using the pt quantizer, which follows TE's rule byte for byte")
    if recipe.device == "cuda" and recipe.method == "pt" and cuda_device_count() == 0:
        raise ConversionError("--device cuda: no CUDA device is visible; leave --device at cpu")
    plan.fp8 = replace(policy, recipe=recipe)
    quantized = [(n, e) for n, e in jobs if isinstance(e, tx.Quantize)]
    requant = sum(1 for _, e in quantized if tx.is_fp8(e.part))
    plan.notes.append(
        f"FP8: {len(jobs)} block-FP8 tensors ({recipe.describe()}); {len(jobs) - len(quantized)} keep their codes and "
        f"scales unless their scale style differs, {requant} are requantized (cuts through 128-blocks), "
        f"{len(quantized) - requant} are quantized from bf16"
    )
    for name, expr in quantized[:5]:
        assert isinstance(expr, tx.Quantize)
        plan.notes.append(f"  {'requantize' if tx.is_fp8(expr.part) else 'quantize'} {name}: {expr.reason}")
    if len(quantized) > 5:
        plan.notes.append(f"  ... and {len(quantized) - 5} more (--dry_run --verbose lists every tensor's recipe)")
