"""Plan Megatron-Core -> HF: rank files -> canonical (layout read off the files) -> HF shards."""
from __future__ import annotations

import argparse
import os
import re
from typing import Mapping

import torch

from . import tensor_expr as te
from .config.arch import ModelArch
from .config.family import FamilySpec, family_by_name, load_family
from .errors import ConversionError
from .formats import huggingface as hf_format
from .formats import mcore_legacy
from .layout.pipeline import PipelineLayout
from .layout.placement import MTP_INNER_LAYER, MTP_INNER_NAMES, ParallelLayout, place
from .layout.tensor_parallel import Split, shard_shape, unshard
from .module_convertor import CanonicalTensor
from .options import ConvertOptions
from .plan import (check_convert_to_fp8, FP8_BY_YAML, OutputFile, Plan, TensorJob, build_convertors, canonical_tensors,
                   check_target_dir, finish_fp8_plan, fp8_hf_names, fp8_policy, merge_arch_yaml, natural_key)
from .tensor_expr import Expr

def resolve_mcore_arch(opts: ConvertOptions, args: argparse.Namespace | None) -> tuple[ModelArch, FamilySpec]:
    saved = dict(getattr(args, "convert_checkpoint_arch", None) or {}) if args is not None else {}
    values = merge_arch_yaml(saved, opts)
    if opts.convert_file:
        family = load_family(opts.convert_file)
        values["family"] = family.name
    elif "family" in values:
        family = family_by_name(values["family"])
    else:
        raise ConversionError(
            "cannot tell the model family of this Megatron checkpoint (it was not written by convert_checkpoint); "
            "pass --config_file with a 'family' field or --convert_file"
        )
    if not saved and not opts.config_file:
        raise ConversionError("cannot tell the architecture of this Megatron checkpoint; pass --config_file")
    values.update(family.fixed_arch)  # facts of the family (e.g. Qwen2's qkv bias) hold for every model
    if opts.mtp_num_layers is not None:
        values["mtp_num_layers"] = opts.mtp_num_layers
    return ModelArch.from_dict(values, opts.config_file or "checkpoint args"), family


def _single_suffix_is_expert_rank(src: mcore_legacy.McoreSource, opts: ConvertOptions) -> bool:
    """``mp_rank_TT_XXX`` is ambiguous: Megatron drops PPP at PP=1 and EEE at EP=1.

    Decided by the flags if given, else by the saved args, else by content: pipeline stages
    hold different decoder layers, while EP ranks of one stage hold the same dense names."""
    if opts.expert_parallel_size is not None or opts.pipeline_model_parallel_size is not None:
        return (opts.expert_parallel_size or 1) > 1 and (opts.pipeline_model_parallel_size or 1) == 1
    args = src.args()
    if args is not None and hasattr(args, "pipeline_model_parallel_size"):
        # Megatron calls it expert_model_parallel_size, the incumbent expert_parallel_size.
        ep = getattr(args, "expert_model_parallel_size", None) or getattr(args, "expert_parallel_size", None) or 1
        return getattr(args, "pipeline_model_parallel_size", 1) == 1 and ep > 1
    dirs = src.rank_dirs()
    if not dirs or len(dirs[0].split("_")) != 4:
        return False

    def dense_names(d: str) -> set[str]:
        file = f"{d}/{mcore_legacy.FILE_NAME}"
        return {n for key in src.containers(file) for n in src.state_dict(file, key) if ".experts." not in n}

    return all(dense_names(d) == dense_names(dirs[0]) for d in dirs if d.startswith(dirs[0][:11]))


def infer_mcore_layout(src: mcore_legacy.McoreSource, opts: ConvertOptions, arch: ModelArch) -> ParallelLayout:
    """Read TP, PP, VPP, layers per chunk and naming off the rank files; flags must agree."""
    tp_ranks, pp_ranks, ep_ranks = set(), set(), set()
    single_suffix_is_ep = _single_suffix_is_expert_rank(src, opts)
    for d in src.rank_dirs():
        tp_rank, a, b = mcore_legacy.parse_rank_dir(d)
        pp_rank, ep_rank = (a, b) if b is not None else ((0, a) if single_suffix_is_ep else (a, 0))
        tp_ranks.add(tp_rank)
        pp_ranks.add(pp_rank or 0)
        ep_ranks.add(ep_rank or 0)
    tp, pp, ep = max(tp_ranks) + 1, max(pp_ranks) + 1, max(ep_ranks) + 1
    first = mcore_legacy.rank_dir_name(0, 0, pp, 0, ep) + "/" + mcore_legacy.FILE_NAME
    if first not in src.files:
        raise ConversionError(f"{src.root}: rank file {first} is missing")
    containers = src.containers(first)
    vpp = len(containers)
    if containers != (["model"] if vpp == 1 else [f"model{i}" for i in range(vpp)]):
        raise ConversionError(f"{first}: unexpected model entries {containers}")
    counts = [0] * (pp * vpp)
    for p in range(pp):
        file = mcore_legacy.rank_dir_name(0, p, pp, 0, ep) + "/" + mcore_legacy.FILE_NAME
        if file not in src.files:
            raise ConversionError(f"{src.root}: rank file {file} is missing")
        for chunk, key in enumerate(src.containers(file)):
            layers = {int(m.group(1)) for n in src.state_dict(file, key) if (m := re.match(r"decoder\.layers\.(\d+)\.", n))}
            counts[chunk * pp + p] = max(layers) + 1 if layers else 0
    for flag, given, found in (
        ("--tensor_model_parallel_size", opts.tensor_model_parallel_size, tp),
        ("--pipeline_model_parallel_size", opts.pipeline_model_parallel_size, pp),
        ("--num-virtual-stages-per-pipeline-rank", opts.virtual_stages, vpp),
    ):
        if given is not None and given != found:
            raise ConversionError(f"{flag} {given} disagrees with the checkpoint, whose rank files hold {found}")
    if opts.custom_pipeline_layers is not None and tuple(opts.custom_pipeline_layers) != tuple(counts):
        raise ConversionError(
            f"--custom_pipeline_layers {','.join(map(str, opts.custom_pipeline_layers))} disagrees with the checkpoint, "
            f"whose chunks hold {','.join(map(str, counts))} layers"
        )
    if sum(counts) != arch.num_layers:
        raise ConversionError(
            f"the checkpoint's model chunks hold {sum(counts)} decoder layers ({','.join(map(str, counts))}), "
            f"but the architecture has num_layers {arch.num_layers}"
        )
    pipe = PipelineLayout(pp, vpp, tuple(counts))
    te_named = any(
        n.endswith((".layer_norm_weight", ".layer_norm_bias"))
        for f in src.files
        for key in src.containers(f)
        for n in src.state_dict(f, key)
    )
    impl = "transformer_engine" if te_named else "local"
    if opts.transformer_impl is not None and opts.transformer_impl != impl:
        raise ConversionError(f"--transformer_impl {opts.transformer_impl} disagrees with the checkpoint's {impl} names")
    embed = src.state_dict(first, containers[0]).get("embedding.word_embeddings.weight")
    padded = tuple(embed.shape)[0] * tp if embed is not None else arch.vocab_size
    if padded < arch.vocab_size:
        raise ConversionError(f"embedding rows {padded} are fewer than vocab_size {arch.vocab_size}")
    stage_files = [mcore_legacy.rank_dir_name(0, p, pp, 0, ep) + "/" + mcore_legacy.FILE_NAME for p in range(pp)]
    etp, grouped = _infer_experts(src, stage_files, arch, tp, ep)
    for flag, given, found in (
        ("--expert_parallel_size", opts.expert_parallel_size, ep),
        ("--expert_tensor_parallel_size", opts.expert_tensor_parallel_size, etp or tp),
    ):
        if given is not None and given != found:
            raise ConversionError(f"{flag} {given} disagrees with the checkpoint, whose rank files hold {found}")
    if opts.moe_grouped_gemm and not grouped:
        raise ConversionError("--moe-grouped-gemm disagrees with the checkpoint, whose experts use local_experts names")
    return ParallelLayout(tp, pipe, impl, padded, arch.tied_embeddings, ep=ep, etp=etp,
                          num_experts=arch.num_experts or 0, grouped_gemm=grouped,
                          mtp_num_layers=arch.mtp_num_layers, mtp_inner_name=_infer_mtp_inner_name(src, opts, pipe, ep))


def _infer_mtp_inner_name(src: mcore_legacy.McoreSource, opts: ConvertOptions, pipe: PipelineLayout, ep: int) -> str:
    """megatron-core <= 0.16 names an MTP layer's decoder layer transformer_layer, 0.19 mtp_model_layer."""
    rank, chunk = pipe.rank_and_chunk(pipe.last_vstage)
    file = mcore_legacy.rank_dir_name(0, rank, pipe.pp, 0, ep) + "/" + mcore_legacy.FILE_NAME
    found = {m.group(1) for n in src.state_dict(file, pipe.container(chunk)) if (m := _MTP_INNER.match(n))}
    if len(found) > 1:
        raise ConversionError(f"{file}: MTP layers use both {' and '.join(sorted(found))} names")
    detected = found.pop() if found else None
    if opts.mtp_layer_name is not None and detected is not None and opts.mtp_layer_name != detected:
        raise ConversionError(f"--mtp_layer_name {opts.mtp_layer_name} disagrees with the checkpoint's {detected} names")
    return detected or opts.mtp_layer_name or MTP_INNER_LAYER


_MTP_INNER = re.compile(rf"^mtp\.layers\.\d+\.({'|'.join(MTP_INNER_NAMES)})\.")


_GROUPED_FC1 = re.compile(r"\.mlp\.experts\.linear_fc1\.weight\d+$")
_LOCAL_FC1 = re.compile(r"\.mlp\.experts\.local_experts\.\d+\.linear_fc1\.weight$")


_EXPERT_INDEX = re.compile(r"^\.mlp\.experts\.(?:local_experts\.(\d+)\.linear_fc1\.weight|linear_fc1\.weight(\d+))$")


def _infer_experts(src: mcore_legacy.McoreSource, files: list[str], arch: ModelArch, tp: int, ep: int) -> tuple[int | None, bool]:
    """(ETP size, or None when it equals TP; grouped-GEMM naming) from the first expert fc1 shard
    in the stages' files (a stage may hold only dense layers)."""
    if not arch.num_experts:
        return None, False
    for file, key in ((f, k) for f in files for k in src.containers(f)):
        state = src.state_dict(file, key)
        for name, value in state.items():
            grouped = bool(_GROUPED_FC1.search(name))
            if grouped or _LOCAL_FC1.search(name):
                rows = tuple(value.shape)[0]
                if rows == 0 or (2 * arch.moe_ffn_hidden_size) % rows:
                    raise ConversionError(f"{file}: expert tensor {name} has {rows} rows, which no ETP size gives")
                etp = 2 * arch.moe_ffn_hidden_size // rows
                layer = name[: name.index(".mlp.experts.")]
                local = {m.group(1) or m.group(2) for n in state
                         if n.startswith(layer) and (m := _EXPERT_INDEX.match(n[len(layer):]))}
                if len(local) * ep != arch.num_experts:
                    raise ConversionError(
                        f"{file}: MoE layer {layer} holds {len(local)} experts per expert-parallel rank x EP {ep} = "
                        f"{len(local) * ep} experts, but the architecture says num_experts {arch.num_experts}"
                    )
                return (None if etp == tp else etp), grouped
    raise ConversionError(f"{files[0]}: the architecture has {arch.num_experts} experts, but no stage holds expert weights")


def gather_mcore(
    src: mcore_legacy.McoreSource, tensors: list[CanonicalTensor], layout: ParallelLayout
) -> dict[str, Expr]:
    expected_files = set(layout.rank_files())
    present = set(src.files)
    if present != expected_files:
        extra = sorted(present - expected_files)
        missing = sorted(expected_files - present)
        raise ConversionError(
            f"{src.root}: rank files do not match TP={layout.tp} PP={layout.pipeline.pp}: "
            + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
        )
    placements, _ = place(tensors, layout)
    shards: dict[str, dict[int, Expr]] = {}
    splits: dict[str, Split] = {}
    consumed: set[tuple[str, str, str]] = set()
    for p in placements:
        sd = src.state_dict(p.file, p.container) if p.container in src.files[p.file] else None
        if sd is None or p.name not in sd:
            raise ConversionError(f"missing tensor {p.container}/{p.name} in {os.path.join(src.root, p.file)}")
        value = sd[p.name]
        want = shard_shape(p.canonical.shape, p.split, p.shard_count, layout.padded_vocab_size)
        if tuple(value.shape) != want:
            raise ConversionError(
                f"tensor {p.container}/{p.name} in {p.file} has shape {list(value.shape)}, expected {list(want)} "
                f"for TP={layout.tp} and the configured architecture"
            )
        consumed.add((p.file, p.container, p.name))
        splits[p.canonical.name] = p.split
        if not p.embedding_copy:
            shards.setdefault(p.canonical.name, {}).setdefault(p.shard_rank, src.leaf(p.file, p.container, p.name))
    for file in sorted(src.files):
        for key in src.containers(file):
            for name in src.state_dict(file, key):
                # _extra_state holds TE/FP8 metadata, never weights.
                if (file, key, name) not in consumed and not name.endswith("._extra_state"):
                    raise ConversionError(
                        f"unmapped tensor {key}/{name} in {os.path.join(src.root, file)}: "
                        "the family's convertors do not produce it"
                    )
    canonical = {}
    for t in tensors:
        per_rank = shards[t.name]
        canonical[t.name] = unshard([per_rank[r] for r in range(len(per_rank))], splits[t.name], t.shape[0])
    return canonical


def _hf_jobs(name: str, expr: Expr, fp8: bool) -> list[TensorJob]:
    """One tensor, or an FP8 weight's codes and block scales (DeepSeek's ``weight_scale_inv``)."""
    if not (te.is_fp8(expr) or fp8):
        return [TensorJob(name, expr)]
    if not name.endswith("weight"):
        raise ConversionError(f"block-FP8 tensor {name} is not a weight; HF FP8 stores only weights with block scales")
    q = te.to_fp8(expr, FP8_BY_YAML)
    return [TensorJob(name, te.fp8_part(q, "codes")), TensorJob(hf_format.fp8_scale_name(name), te.fp8_part(q, "scale"))]


def _hf_files(hf_exprs: Mapping[str, Expr], max_shard_size: int, fp8_names: set[str] = frozenset()) -> list[OutputFile]:
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for name in sorted(hf_exprs, key=natural_key):
        jobs = _hf_jobs(name, hf_exprs[name], name in fp8_names)
        n = sum(te.nbytes(j.expr) for j in jobs)  # a weight and its scales share a file
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].extend(jobs)
        size += n
    names = hf_format.shard_file_names(len(groups))
    return [OutputFile(fname, "safetensors", (("", tuple(jobs)),)) for fname, jobs in zip(names, groups)]


def plan_mcore_to_hf(opts: ConvertOptions) -> Plan:
    check_target_dir(opts)
    src = mcore_legacy.open_source(opts.load_ckpt_path)
    args = src.args()
    arch, family = resolve_mcore_arch(opts, args)
    layout = infer_mcore_layout(src, opts, arch)
    convertors = build_convertors(family, arch)
    check_convert_to_fp8(opts, family, convertors)
    tensors = canonical_tensors(convertors)
    canonical = gather_mcore(src, tensors, layout)
    hf_exprs: dict[str, Expr] = {}
    for conv in convertors:
        hf_exprs.update(conv.to_hf({name: canonical[name] for name in conv.reads()}))

    hf_config, notes = None, []
    fp8_names = fp8_hf_names(convertors) if (src.has_fp8 or opts.convert_to_fp8) else set()
    reference = opts.hf_config_path
    if reference:
        _check_reference_config(reference, family, arch)
    else:
        saved = getattr(args, "convert_checkpoint_hf_config", None) if args is not None else None
        if saved:
            hf_config = dict(saved)
            # An architecture YAML may have overridden fields on the way in; keep config.json true.
            for arch_field, hf_keys in family.config_fields.items():
                if hf_config.get(hf_keys[0]) is not None and getattr(arch, arch_field) is not None:
                    hf_config[hf_keys[0]] = getattr(arch, arch_field)
        else:
            hf_config = family.config_from_arch(arch)
            notes.append("config.json synthesized from the architecture; pass --hf_config_path to reuse the original one")
    plan = Plan(
        direction="mcore->hf",
        source_dir=src.root,
        target_dir=opts.save_ckpt_path,
        arch=arch,
        family=family,
        layout=layout,
        files=_hf_files(hf_exprs, opts.max_shard_size, fp8_names),
        source_tensor_count=sum(len(src.state_dict(f, k)) for f in src.files for k in src.containers(f)),
        hf_config=hf_config,
        hf_reference_dir=reference,
        notes=notes,
        source=src,
    )
    finish_fp8_plan(plan, fp8_policy(opts, src.fp8_nominal_dtype or torch.bfloat16))
    return plan


def _check_reference_config(reference: str, family: FamilySpec, arch: ModelArch) -> None:
    """The --hf_config_path config must describe the same model as the checkpoint."""
    ref_config = hf_format.read_config(reference)
    ref_arch = family.arch_from_config(ref_config)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
        if getattr(ref_arch, key) != getattr(arch, key):
            raise ConversionError(
                f"--hf_config_path {reference}: its config.json has {key} {getattr(ref_arch, key)}, "
                f"the checkpoint has {getattr(arch, key)}"
            )
