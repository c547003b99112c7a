"""Plan Megatron-Core -> Megatron-Core: re-layout (TP, PP, VPP, EP, ETP, naming) through the
canonical form. The source layout is read off its rank files; the flags describe the target."""
from __future__ import annotations

import dataclasses

from .formats import mcore_legacy
from .options import ConvertOptions
from .plan import Plan, check_convert_to_fp8, build_convertors, canonical_tensors, check_target_dir, finish_fp8_plan, fp8_policy
from .plan_hf_to_mcore import mcore_args, mcore_output_files, nominal_dtype, record_fp8_args, target_layout
from .plan_mcore_to_hf import gather_mcore, infer_mcore_layout, resolve_mcore_arch

# Flags that describe the target layout; the source layout comes from its files alone.
_TARGET_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_stages",
                 "num_layers_per_virtual_pipeline_stage", "custom_pipeline_layers", "transformer_impl",
                 "expert_parallel_size", "expert_tensor_parallel_size", "moe_grouped_gemm", "mtp_layer_name")


def plan_mcore_to_mcore(opts: ConvertOptions) -> Plan:
    check_target_dir(opts)
    src = mcore_legacy.open_source(opts.load_ckpt_path)
    args = src.args()
    arch, family = resolve_mcore_arch(opts, args)
    source_opts = dataclasses.replace(opts, **{f: (False if f == "moe_grouped_gemm" else None) for f in _TARGET_FLAGS})
    source_layout = infer_mcore_layout(src, source_opts, arch)
    convertors = build_convertors(family, arch)
    check_convert_to_fp8(opts, family, convertors)
    tensors = canonical_tensors(convertors)
    canonical = gather_mcore(src, tensors, source_layout)

    layout = target_layout(opts, arch)
    hf_config = getattr(args, "convert_checkpoint_hf_config", None) if args is not None else None
    plan = Plan(
        direction="mcore->mcore",
        source_dir=src.root,
        target_dir=opts.save_ckpt_path,
        arch=arch,
        family=family,
        layout=layout,
        files=mcore_output_files(canonical, tensors, arch, layout, fp8_output=src.has_fp8 or opts.convert_to_fp8),
        source_tensor_count=sum(len(src.state_dict(f, k)) for f in src.files for k in src.containers(f)),
        mcore_args=mcore_args(arch, family, layout, opts, hf_config or {}),
        notes=[f"source layout: TP={source_layout.tp} PP={source_layout.pipeline.pp} VPP={source_layout.pipeline.vpp} "
               f"EP={source_layout.ep} ETP={source_layout.expert_tp} impl={source_layout.transformer_impl}"],
        source=src,
    )
    finish_fp8_plan(plan, fp8_policy(opts, src.fp8_nominal_dtype or nominal_dtype(hf_config or {})))
    record_fp8_args(plan)
    return plan
