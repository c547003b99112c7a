"""Plan and validate a conversion; nothing here reads tensor data or writes a byte.

A plan is the list of output files and, for every tensor in each, the expression saying which
rows of which source tensors it is made of. Planning composes the model mapping (module
convertors: HF <-> canonical) with the layout mapping (canonical <-> TP/PP shards) and checks
the whole thing: every source tensor consumed or explicitly ignored, every target produced,
shapes and divisibility, layer lists.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from . import tensor_expr as te
from .config.arch import ModelArch, arch_from_hf_config, hf_config_from_arch, load_arch_yaml
from .config.family import FamilySpec, family_by_name, family_for_hf_config, load_family
from .errors import ConversionError
from .formats import huggingface as hf_format
from .formats import mcore_legacy
from .layout.pipeline import PipelineLayout, build_pipeline_layout
from .layout.placement import ParallelLayout, place, placement_sort_key
from .layout.tensor_parallel import divides, padded_vocab_size, shard, shard_shape, unshard
from .module_convertor import CanonicalTensor, ModuleConvertor, create
from .options import ConvertOptions
from .tensor_expr import Expr

CONVERTER_NAME = "convert_checkpoint"


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
    direction: str  # "hf->mcore" or "mcore->hf"
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

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)


# --- shared helpers -----------------------------------------------------------------------

def build_convertors(family: FamilySpec, arch: ModelArch) -> list[ModuleConvertor]:
    convertors = [create(spec, arch, "", "") for spec in family.global_modules]
    for layer in range(arch.num_layers):
        hf_prefix = family.layer_prefix.format(layer=layer)
        mcore_prefix = f"decoder.layers.{layer}."
        convertors += [create(spec, arch, hf_prefix, mcore_prefix) for spec in family.layer_modules]
    return convertors


def canonical_tensors(convertors: Iterable[ModuleConvertor]) -> list[CanonicalTensor]:
    out: list[CanonicalTensor] = []
    seen: set[str] = set()
    for c in convertors:
        for t in c.canonical():
            if t.name in seen:
                raise ConversionError(f"{c.spec.origin}: canonical tensor {t.name} is produced twice")
            seen.add(t.name)
            out.append(t)
    return out


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def validate_tensor_parallel(arch: ModelArch, tensors: list[CanonicalTensor], layout: ParallelLayout) -> None:
    tp = layout.tp
    for what, value in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_query_groups", arch.num_query_groups),
        ("ffn_hidden_size", arch.ffn_hidden_size),
        ("padded vocab size", layout.padded_vocab_size),
    ):
        if value % tp:
            raise ConversionError(f"--tensor_model_parallel_size {tp} does not divide {what} {value}")
    for t in tensors:
        if not divides(t.shape, t.split, tp, layout.padded_vocab_size):
            raise ConversionError(
                f"--tensor_model_parallel_size {tp} does not divide tensor {t.name} of shape {list(t.shape)} ({t.split.value} split)"
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
    if os.path.isdir(target) and os.listdir(target) and not opts.overwrite and not opts.dry_run:
        raise ConversionError(f"--save_ckpt_path {opts.save_ckpt_path} is not empty; pass --overwrite to replace its contents")


def _merge_arch_yaml(arch_values: dict, opts: ConvertOptions) -> dict:
    if opts.config_file:
        arch_values = {**arch_values, **load_arch_yaml(opts.config_file)}
    return arch_values


# --- HF -> MCore ------------------------------------------------------------------------

def _gather_hf(src: hf_format.HFSource, convertors: list[ModuleConvertor], family: FamilySpec) -> dict[str, Expr]:
    """Canonical expressions over the HF files; every HF tensor must be consumed or ignored."""
    canonical: dict[str, Expr] = {}
    consumed: set[str] = set()
    for conv in convertors:
        exprs: dict[str, Expr] = {}
        for name, shape in conv.hf_shapes().items():
            if name not in src.tensor_file:
                raise ConversionError(f"missing tensor {name} in {src.root} (expected by {conv.spec.origin})")
            leaf = src.leaf(name)
            if leaf.shape != shape:
                raise ConversionError(
                    f"tensor {name} has shape {list(leaf.shape)}, but the config implies {list(shape)}"
                )
            exprs[name] = leaf
            consumed.add(name)
        consumed |= {n for n in conv.optional_hf() if n in src.tensor_file}
        try:
            canonical.update(conv.to_canonical(exprs))
        except ValueError as e:  # mixed dtypes inside one fused tensor
            raise ConversionError(f"{conv.spec.origin}: cannot fuse {', '.join(exprs)}: {e}") from None
    unmapped = sorted((n for n in src.tensor_file if n not in consumed and not family.is_ignored(n)), key=_natural_key)
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise ConversionError(
            f"unmapped tensor {unmapped[0]} in {src.tensor_file[unmapped[0]]}{more}: no convertor of family "
            f"'{family.name}' ({family.path}) consumes it and it is not in its ignore list"
        )
    return canonical


def _mcore_args(arch: ModelArch, family: FamilySpec, layout: ParallelLayout, opts: ConvertOptions, hf_config: dict) -> argparse.Namespace:
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
        expert_model_parallel_size=1,
        transformer_impl=layout.transformer_impl,
        # Ours: enough to convert back without any flag.
        convert_checkpoint_family=family.name,
        convert_checkpoint_arch=arch.to_dict(),
        convert_checkpoint_pipeline_layers=list(pipe.layers_per_vstage),
        convert_checkpoint_hf_config=hf_config,
    )


def plan_hf_to_mcore(opts: ConvertOptions) -> Plan:
    check_target_dir(opts)
    src = hf_format.open_source(opts.load_ckpt_path)
    family = load_family(opts.convert_file) if opts.convert_file else family_for_hf_config(src.config)
    derived = arch_from_hf_config(src.config, family.name, family.config_fields, family.config_defaults, family.fixed_arch)
    arch = ModelArch.from_dict(_merge_arch_yaml(derived.to_dict(), opts), opts.config_file or "config.json")
    convertors = build_convertors(family, arch)
    canonical_exprs = _gather_hf(src, convertors, family)
    tensors = canonical_tensors(convertors)

    tp = opts.tensor_model_parallel_size or 1
    pipe = build_pipeline_layout(
        arch.num_layers,
        opts.pipeline_model_parallel_size or 1,
        opts.virtual_stages,
        opts.custom_pipeline_layers,
        opts.num_layers_per_virtual_pipeline_stage,
    )
    layout = ParallelLayout(
        tp=tp,
        pipeline=pipe,
        transformer_impl=opts.transformer_impl or "transformer_engine",
        padded_vocab_size=resolve_padded_vocab(opts, arch.vocab_size, tp),
        tied_embeddings=arch.tied_embeddings,
    )
    validate_tensor_parallel(arch, tensors, layout)
    placements, extras = place(tensors, layout)

    jobs: dict[tuple[str, str], list[TensorJob]] = {}
    for p in placements:
        expr = canonical_exprs[p.canonical.name if not p.tied_copy else "embedding.word_embeddings.weight"]
        sharded = shard(expr, p.canonical.split, layout.tp, p.tp_rank, layout.padded_vocab_size)
        jobs.setdefault((p.file, p.container), []).append(TensorJob(p.name, sharded))
    for x in extras:
        jobs.setdefault((x.file, x.container), []).append(TensorJob(x.name, None))
    files = _mcore_files(layout, jobs)
    notes = []
    if arch.tied_embeddings and any(n in src.tensor_file for c in convertors for n in c.optional_hf()):
        notes.append("tied embeddings: the HF lm_head copy was dropped (Megatron shares the embedding)")
    return Plan(
        direction="hf->mcore",
        source_dir=src.root,
        target_dir=opts.save_ckpt_path,
        arch=arch,
        family=family,
        layout=layout,
        files=files,
        source_tensor_count=len(src.tensor_file),
        mcore_args=_mcore_args(arch, family, layout, opts, src.config),
        notes=notes,
        source=src,
    )


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


# --- MCore -> HF ------------------------------------------------------------------------

def _resolve_mcore_arch(opts: ConvertOptions, args: argparse.Namespace | None) -> tuple[ModelArch, FamilySpec]:
    saved = dict(getattr(args, "convert_checkpoint_arch", None) or {}) if args is not None else {}
    values = _merge_arch_yaml(saved, opts)
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
    return ModelArch.from_dict(values, opts.config_file or "checkpoint args"), family


def _infer_mcore_layout(src: mcore_legacy.McoreSource, opts: ConvertOptions, arch: ModelArch) -> ParallelLayout:
    """Read TP, PP, VPP, layers per chunk and naming off the rank files; flags must agree."""
    tp_ranks, pp_ranks = set(), set()
    for d in src.rank_dirs():
        tp_rank, pp_rank, ep_rank = mcore_legacy.parse_rank_dir(d)
        if ep_rank is not None:
            raise ConversionError(f"{d}: expert-parallel checkpoints (mp_rank_TT_PPP_EEE) are not supported yet")
        tp_ranks.add(tp_rank)
        pp_ranks.add(pp_rank if pp_rank is not None else 0)
    tp, pp = max(tp_ranks) + 1, max(pp_ranks) + 1
    first = mcore_legacy.rank_dir_name(0, 0, pp) + "/" + mcore_legacy.FILE_NAME
    if first not in src.files:
        raise ConversionError(f"{src.root}: rank file {first} is missing")
    containers = src.containers(first)
    vpp = len(containers)
    if containers != (["model"] if vpp == 1 else [f"model{i}" for i in range(vpp)]):
        raise ConversionError(f"{first}: unexpected model entries {containers}")
    counts = [0] * (pp * vpp)
    for p in range(pp):
        file = mcore_legacy.rank_dir_name(0, p, pp) + "/" + mcore_legacy.FILE_NAME
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
    return ParallelLayout(tp, pipe, impl, padded, arch.tied_embeddings)


def _gather_mcore(
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
    consumed: set[tuple[str, str, str]] = set()
    for p in placements:
        sd = src.state_dict(p.file, p.container) if p.container in src.files[p.file] else None
        if sd is None or p.name not in sd:
            raise ConversionError(f"missing tensor {p.container}/{p.name} in {os.path.join(src.root, p.file)}")
        value = sd[p.name]
        want = shard_shape(p.canonical.shape, p.canonical.split, layout.tp, layout.padded_vocab_size)
        if tuple(value.shape) != want:
            raise ConversionError(
                f"tensor {p.container}/{p.name} in {p.file} has shape {list(value.shape)}, expected {list(want)} "
                f"for TP={layout.tp} and the configured architecture"
            )
        consumed.add((p.file, p.container, p.name))
        if not p.tied_copy:
            shards.setdefault(p.canonical.name, {})[p.tp_rank] = src.leaf(p.file, p.container, p.name)
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
        canonical[t.name] = unshard([per_rank[r] for r in range(layout.tp)], t.split, t.shape[0])
    return canonical


def _hf_files(hf_exprs: Mapping[str, Expr], max_shard_size: int) -> list[OutputFile]:
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for name in sorted(hf_exprs, key=_natural_key):
        n = te.nbytes(hf_exprs[name])
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(TensorJob(name, hf_exprs[name]))
        size += n
    names = hf_format.shard_file_names(len(groups))
    return [OutputFile(fname, "safetensors", (("", tuple(jobs)),)) for fname, jobs in zip(names, groups)]


def plan_mcore_to_hf(opts: ConvertOptions) -> Plan:
    check_target_dir(opts)
    src = mcore_legacy.open_source(opts.load_ckpt_path)
    args = src.args()
    arch, family = _resolve_mcore_arch(opts, args)
    layout = _infer_mcore_layout(src, opts, arch)
    convertors = build_convertors(family, arch)
    tensors = canonical_tensors(convertors)
    canonical = _gather_mcore(src, tensors, layout)
    hf_exprs: dict[str, Expr] = {}
    for conv in convertors:
        hf_exprs.update(conv.to_hf({t.name: canonical[t.name] for t in conv.canonical()}))

    hf_config, notes = None, []
    reference = opts.hf_config_path
    if reference:
        _check_reference_config(reference, family, arch)
    else:
        saved = getattr(args, "convert_checkpoint_hf_config", None) if args is not None else None
        if saved:
            hf_config = dict(saved)
            # An architecture YAML may have overridden fields on the way in; keep config.json true.
            for arch_field, hf_keys in family.config_fields.items():
                if hf_keys[0] in hf_config and getattr(arch, arch_field) is not None:
                    hf_config[hf_keys[0]] = getattr(arch, arch_field)
        else:
            hf_config = hf_config_from_arch(arch, family.hf_model_type, list(family.hf_architectures), family.config_fields)
            notes.append("config.json synthesized from the architecture; pass --hf_config_path to reuse the original one")
    return Plan(
        direction="mcore->hf",
        source_dir=src.root,
        target_dir=opts.save_ckpt_path,
        arch=arch,
        family=family,
        layout=layout,
        files=_hf_files(hf_exprs, opts.max_shard_size),
        source_tensor_count=sum(len(src.state_dict(f, k)) for f in src.files for k in src.containers(f)),
        hf_config=hf_config,
        hf_reference_dir=reference,
        notes=notes,
        source=src,
    )


def _check_reference_config(reference: str, family: FamilySpec, arch: ModelArch) -> None:
    """The --hf_config_path config must describe the same model as the checkpoint."""
    ref_config = hf_format.read_config(reference)
    ref_arch = arch_from_hf_config(ref_config, family.name, family.config_fields, family.config_defaults, family.fixed_arch)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
        if getattr(ref_arch, key) != getattr(arch, key):
            raise ConversionError(
                f"--hf_config_path {reference}: its config.json has {key} {getattr(ref_arch, key)}, "
                f"the checkpoint has {getattr(arch, key)}"
            )


def build_plan(opts: ConvertOptions) -> Plan:
    if opts.load_platform == "huggingface" and opts.save_platform == "mcore":
        return plan_hf_to_mcore(opts)
    if opts.load_platform == "mcore" and opts.save_platform == "huggingface":
        return plan_mcore_to_hf(opts)
    raise ConversionError(f"unsupported direction {opts.load_platform} -> {opts.save_platform}")


def describe_plan(plan: Plan, verbose: bool = False) -> str:
    lay = plan.layout
    pipe = lay.pipeline
    lines = [
        f"plan: {plan.direction}  family={plan.family.name}  layers={plan.arch.num_layers}  "
        f"TP={lay.tp} PP={pipe.pp} VPP={pipe.vpp} layers/stage={','.join(map(str, pipe.layers_per_vstage))}  "
        f"impl={lay.transformer_impl}  vocab={plan.arch.vocab_size} padded={lay.padded_vocab_size}  "
        f"tied={plan.arch.tied_embeddings}",
        f"source: {plan.source_dir} ({plan.source_tensor_count} tensors)",
        f"target: {plan.target_dir} ({len(plan.files)} files, {plan.total_bytes / 1e9:.3f} GB)",
    ]
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


def hf_config_json(plan: Plan) -> str | None:
    return None if plan.hf_config is None else json.dumps(plan.hf_config, indent=2, sort_keys=True) + "\n"
