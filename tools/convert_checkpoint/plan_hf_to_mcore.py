"""Plan HF -> Megatron-Core: HF tensors -> canonical -> per-rank TP/PP/VPP shards."""
from __future__ import annotations

import argparse
from typing import Mapping

import torch

from .config.arch import ModelArch
from .config.family import FamilySpec, family_for_hf_config, load_family
from .errors import ConversionError
from .formats import huggingface as hf_format
from .layout.pipeline import build_pipeline_layout
from .layout.placement import MTP_INNER_LAYER, ParallelLayout, place, placement_sort_key
from .layout.tensor_parallel import shard
from .module_convertor import CanonicalTensor, ModuleConvertor
from .module_convertor.embedding import WORD_EMBEDDINGS
from .module_convertor.moe import RoutedExperts
from .module_convertor.shared_copy import SharedCopy
from .options import ConvertOptions
from . import tensor_expr as te
from .plan import (check_convert_to_fp8, FP8_BY_YAML, OutputFile, Plan, TensorJob, build_convertors, canonical_tensors, check_target_dir,
                   finish_fp8_plan, fp8_policy, merge_arch_yaml, natural_key, resolve_padded_vocab,
                   validate_tensor_parallel)
from .tensor_expr import Expr

def _check_expert_count(src: hf_format.HFSource, convertors: list[ModuleConvertor], arch: ModelArch) -> None:
    """A MoE checkpoint must hold exactly the configured number of experts per MoE layer."""
    for conv in convertors:
        if isinstance(conv, RoutedExperts):
            found = conv.experts_present(src.tensor_file)
            if found != arch.num_experts:
                raise ConversionError(
                    f"{src.root}: MoE layer {conv.hf_prefix or conv.mcore_prefix} holds {found} routed experts, "
                    f"but the config says num_experts {arch.num_experts}"
                )
            return  # one layer is enough: a layer with a hole fails as a missing tensor below


def gather_hf(src: hf_format.HFSource, convertors: list[ModuleConvertor], family: FamilySpec, arch: ModelArch) -> dict[str, Expr]:
    """Canonical expressions over the HF files; every HF tensor must be consumed or ignored."""
    canonical: dict[str, Expr] = {}
    consumed: set[str] = set()
    _check_expert_count(src, convertors, arch)
    for conv in convertors:
        exprs: dict[str, Expr] = {}
        for name, shape in conv.hf_shapes().items():
            if name not in src.tensor_file:
                hint = ""
                if conv.mcore_prefix.startswith("mtp."):
                    hint = "; this is a multi-token-prediction layer: pass --mtp_num_layers 0 if the checkpoint has none"
                raise ConversionError(f"missing tensor {name} in {src.root} (expected by {conv.spec.origin}){hint}")
            leaf = src.leaf(name)
            if leaf.shape != shape:
                raise ConversionError(
                    f"tensor {name} has shape {list(leaf.shape)}, but the config implies {list(shape)}"
                )
            exprs[name] = leaf
            consumed.add(name)
            consumed.update(src.companions(name))
        consumed |= {n for n in conv.optional_hf() if n in src.tensor_file}
        # (A shared copy, e.g. an MTP layer's embed_tokens, is consumed and has no canonical tensor.)
        try:
            canonical.update(conv.to_canonical(exprs))
        except ValueError as e:  # mixed dtypes inside one fused tensor
            raise ConversionError(f"{conv.spec.origin}: cannot fuse {', '.join(exprs)}: {e}") from None
    unmapped = sorted((n for n in src.tensor_file if n not in consumed and not family.is_ignored(n)), key=natural_key)
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise ConversionError(
            f"unmapped tensor {unmapped[0]} in {src.tensor_file[unmapped[0]]}{more}: no convertor of family "
            f"'{family.name}' ({family.path}) consumes it and it is not in its ignore list"
        )
    return canonical


def mcore_args(arch: ModelArch, family: FamilySpec, layout: ParallelLayout, opts: ConvertOptions, hf_config: dict) -> argparse.Namespace:
    pipe = layout.pipeline
    return argparse.Namespace(
        # Megatron's own argument names, so Megatron tooling can read them.
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        kv_channels=arch.kv_channels,
        vocab_size=arch.vocab_size,
        padded_vocab_size=layout.padded_vocab_size,
        make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by,
        normalization=arch.normalization,
        norm_epsilon=arch.norm_epsilon,
        add_qkv_bias=arch.add_qkv_bias,
        add_bias_linear=False,
        qk_layernorm=arch.qk_layernorm,
        swiglu=True,
        untie_embeddings_and_output_weights=not arch.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        max_position_embeddings=arch.max_position_embeddings,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=pipe.pp,
        virtual_pipeline_model_parallel_size=pipe.vpp if pipe.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        num_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_grouped_gemm=layout.grouped_gemm,
        moe_layer_freq=arch.moe_layer_freq,
        moe_shared_expert_intermediate_size=arch.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=arch.shared_expert_gate,
        moe_router_enable_expert_bias=arch.router_expert_bias,
        multi_latent_attention=arch.multi_latent_attention,
        q_lora_rank=arch.q_lora_rank,
        kv_lora_rank=arch.kv_lora_rank,
        qk_head_dim=arch.qk_head_dim,
        qk_pos_emb_head_dim=arch.qk_pos_emb_head_dim,
        v_head_dim=arch.v_head_dim,
        mtp_num_layers=arch.mtp_num_layers or None,
        transformer_impl=layout.transformer_impl,
        # Ours: enough to convert back without any flag.
        convert_checkpoint_family=family.name,
        convert_checkpoint_arch=arch.to_dict(),
        convert_checkpoint_pipeline_layers=list(pipe.layers_per_vstage),
        convert_checkpoint_hf_config=hf_config,
    )


def open_hf_source(opts: ConvertOptions) -> hf_format.HFSource:
    """The HF checkpoint, seen through the ``--converter`` pre-stage when there is one."""
    if not opts.converters:
        return hf_format.open_source(opts.load_ckpt_path)
    from .hf_to_hf import open_converted

    src = open_converted(opts.load_ckpt_path, opts.converters)
    hf_format.fp8_quantization_config(src.config, f"after --converter {' --converter '.join(opts.converters)}")
    return src


def plan_hf_to_mcore(opts: ConvertOptions) -> Plan:
    check_target_dir(opts)
    src = open_hf_source(opts)
    family = load_family(opts.convert_file) if opts.convert_file else family_for_hf_config(src.config)
    derived = family.arch_from_config(src.config)
    arch = ModelArch.from_dict(merge_arch_yaml(derived.to_dict(), opts), opts.config_file or "config.json")
    if opts.mtp_num_layers is not None:
        arch = arch.replace(mtp_num_layers=opts.mtp_num_layers)
    convertors = build_convertors(family, arch)
    check_convert_to_fp8(opts, family, convertors)
    canonical_exprs = gather_hf(src, convertors, family, arch)
    tensors = canonical_tensors(convertors)

    layout = target_layout(opts, arch)
    files = mcore_output_files(canonical_exprs, tensors, arch, layout, fp8_output=src.has_fp8 or opts.convert_to_fp8)
    notes = [f"converters: {' -> '.join(src.chain.labels)} (run on the HF tensors first)"] if opts.converters else []
    if arch.tied_embeddings and any(n in src.tensor_file for c in convertors for n in c.optional_hf()):
        notes.append("tied embeddings: the HF lm_head copy was dropped (Megatron shares the embedding)")
    copies = [n for c in convertors if isinstance(c, SharedCopy) for n in c.hf_shapes()]
    if copies:
        notes.append(f"{len(copies)} MTP copies of the embedding / LM head (e.g. {copies[0]}) were dropped: "
                     "Megatron's MTP layers share the main model's")
    plan = Plan(
        direction="hf->mcore",
        source_dir=src.root,
        target_dir=opts.save_ckpt_path,
        arch=arch,
        family=family,
        layout=layout,
        files=files,
        source_tensor_count=len(src.tensor_file),
        mcore_args=mcore_args(arch, family, layout, opts, src.config),
        notes=notes,
        source=src,
    )
    finish_fp8_plan(plan, fp8_policy(opts, nominal_dtype(src.config)))
    record_fp8_args(plan)
    return plan


def nominal_dtype(hf_config: Mapping) -> torch.dtype:
    """The model's parameter dtype (what TE's FP8 tensors present as): config.json's, else bf16."""
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)


def record_fp8_args(plan: Plan) -> None:
    """Megatron's FP8 flags in the saved args, as training with these parameters would set them."""
    if plan.fp8 is None or plan.mcore_args is None:
        return
    recipe = plan.fp8.recipe
    plan.mcore_args.fp8 = "e4m3"
    plan.mcore_args.fp8_recipe = "blockwise"
    plan.mcore_args.fp8_param_gather = True
    plan.mcore_args.convert_checkpoint_fp8 = {"force_pow_2_scales": recipe.pow2, "amax_epsilon": recipe.amax_epsilon}


def target_layout(opts: ConvertOptions, arch: ModelArch) -> ParallelLayout:
    """The Megatron layout the flags ask for (HF->MCore and MCore->MCore)."""
    tp = opts.tensor_model_parallel_size or 1
    pipe = build_pipeline_layout(
        arch.num_layers,
        opts.pipeline_model_parallel_size or 1,
        opts.virtual_stages,
        opts.custom_pipeline_layers,
        opts.num_layers_per_virtual_pipeline_stage,
    )
    return ParallelLayout(
        tp=tp,
        pipeline=pipe,
        transformer_impl=opts.transformer_impl or "transformer_engine",
        padded_vocab_size=resolve_padded_vocab(opts, arch.vocab_size, tp),
        tied_embeddings=arch.tied_embeddings,
        # A MoE model without --expert_parallel_size keeps every expert (EP=1), never skips them.
        ep=opts.expert_parallel_size or 1,
        etp=opts.expert_tensor_parallel_size,
        num_experts=arch.num_experts or 0,
        grouped_gemm=opts.moe_grouped_gemm,
        mtp_num_layers=arch.mtp_num_layers,
        mtp_inner_name=opts.mtp_layer_name or MTP_INNER_LAYER,
    )


def mcore_output_files(
    canonical_exprs: Mapping[str, Expr], tensors: list[CanonicalTensor], arch: ModelArch, layout: ParallelLayout,
    fp8_output: bool = False,
) -> list[OutputFile]:
    """Validate the layout, then shard every canonical tensor into its rank files.

    A shard of an FP8 tensor stays FP8 (whole blocks kept, a cut block requantized: TE quantizes
    each rank's shard on its own); with ``fp8_output`` the YAML's ``dtype: fp8`` tensors are
    quantized per shard too."""
    validate_tensor_parallel(arch, tensors, layout)
    placements, extras = place(tensors, layout)
    jobs: dict[tuple[str, str], list[TensorJob]] = {}
    for p in placements:
        expr = canonical_exprs[WORD_EMBEDDINGS if p.embedding_copy else p.canonical.name]
        sharded = shard(expr, p.split, p.shard_count, p.shard_rank, layout.padded_vocab_size)
        if te.is_fp8(sharded) or (fp8_output and p.canonical.fp8 and not p.embedding_copy):
            sharded = te.to_fp8(sharded, FP8_BY_YAML)
        jobs.setdefault((p.file, p.container), []).append(TensorJob(p.name, sharded))
    for x in extras:
        jobs.setdefault((x.file, x.container), []).append(TensorJob(x.name, None))
    return _mcore_files(layout, jobs)


def _mcore_files(layout: ParallelLayout, jobs: Mapping[tuple[str, str], list[TensorJob]]) -> list[OutputFile]:
    files = []
    for relpath in layout.rank_files():
        containers = []
        for chunk in range(layout.pipeline.vpp):
            key = layout.pipeline.container(chunk)
            # Stable sort keeps each layer's module order and puts extra states after their weights.
            ordered = sorted(jobs.get((relpath, key), []), key=lambda j: placement_sort_key(j.name))
            containers.append((key, tuple(ordered)))
        files.append(OutputFile(relpath, "mcore", tuple(containers)))
    return files
