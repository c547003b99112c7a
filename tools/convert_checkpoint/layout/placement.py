"""Where each canonical tensor lands: rank (TP, PP, EP), model chunk, local name and TP shard.

Megatron's naming (TE-fused norms, MTP inner layers, grouped experts) lives here; file names do
not: an endpoint turns a ``RankKey`` into its own files (legacy rank files, torch_dist shards).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from ..core.canonical import OUTPUT_LAYER, WORD_EMBEDDINGS, CanonicalTensor, Split, TPSplit
from .expert_parallel import expert_rank_files
from .pipeline import PipelineLayout

LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# MTP layer k: its own tensors and a full decoder layer under an inner name (canonical:
# megatron-core 0.16's and the incumbent's ``transformer_layer``; 0.19 renamed it).
MTP_INNER_NAMES = ("transformer_layer", "mtp_model_layer")
MTP_INNER_LAYER = MTP_INNER_NAMES[0]  # the canonical (and default) inner name
MTP_RE = re.compile(rf"^(mtp\.layers\.\d+\.)(?:({MTP_INNER_LAYER})\.)?(.+)$")
TRANSFORMER_IMPLS = ("transformer_engine", "local")

# Vision-language models, laid out as LoongForge's single-pass VLM conversion writes them (its
# convert YAMLs' prefix_mapping): the language model under ``foundation_model.``, the vision tower
# (canonical ``vision_model.*``) under ``encoder_model.image_encoder.``, its merger (canonical
# ``adapter.*``) under ``encoder_model.image_projector.``, and a copy of the word embedding for
# the encoder stage. The tower lives in the first pipeline stage, split by the encoder's TP size.
VISION_LAYER_PREFIX = "vision_model.decoder.layers."
VISION_DEEPSTACK_PREFIX = "vision_model.deepstack_merger_list."  # Qwen3-VL, as LoongForge's qwen3_vit YAML names them
VISION_PREFIXES = (("vision_model.", "encoder_model.image_encoder."), ("adapter.", "encoder_model.image_projector."))
LANGUAGE_PREFIX = "foundation_model."
TEXT_ENCODER_EMBEDDING = "encoder_model.text_encoder.word_embeddings.weight"
VISION_LAYER_RE = re.compile(r"^vision_model\.decoder\.layers\.(\d+)\.(.+)$")


def is_vision(canonical_name: str) -> bool:
    return canonical_name.startswith(tuple(c for c, _ in VISION_PREFIXES))

# Megatron-Core's own local->TE name map (``sharded_state_dict_keys_map`` of the local layer
# spec): TE fuses these norms into the following linear. Applied only when that linear exists.
# For multi-latent attention with q/k norms the TE spec fuses q/kv norms into the up-projections.
TE_FUSED_NORMS = (
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_", "self_attention.linear_qkv.weight"),
    ("input_layernorm.", "self_attention.in_proj.layer_norm_", "self_attention.in_proj.weight"),  # gated delta-net
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_", "mlp.linear_fc1.weight"),
    ("self_attention.q_layernorm.", "self_attention.linear_q_up_proj.layer_norm_", "self_attention.linear_q_up_proj.weight"),
    ("self_attention.kv_layernorm.", "self_attention.linear_kv_up_proj.layer_norm_", "self_attention.linear_kv_up_proj.weight"),
)


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    pipeline: PipelineLayout
    transformer_impl: str
    padded_vocab_size: int
    tied_embeddings: bool
    ep: int = 1
    etp: int | None = None  # None: experts split like dense layers, by TP
    num_experts: int = 0
    grouped_gemm: bool = False
    mtp_num_layers: int = 0
    mtp_inner_name: str = MTP_INNER_LAYER  # megatron-core >= 0.19: mtp_model_layer
    encoder_tp: int | None = None  # vision-language models: the vision tower's TP size (None: no tower)

    @property
    def language_prefix(self) -> str:
        return LANGUAGE_PREFIX if self.encoder_tp is not None else ""

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def expert_files(self) -> dict[tuple[int, int], int]:
        """(TP rank, EP rank) of each file of a stage -> ETP rank of the experts it holds."""
        return expert_rank_files(self.tp, self.ep, self.expert_tp)

    def ranks(self) -> list[RankKey]:
        """Every model-parallel rank, in the order its files are planned."""
        return [RankKey(t, p, e) for (t, e) in sorted(self.expert_files()) for p in range(self.pipeline.pp)]


class RankKey(NamedTuple):
    tp: int
    pp: int
    ep: int = 0


@dataclass(frozen=True)
class Placement:
    rank: RankKey
    container: str
    name: str  # name inside the container
    shard_rank: int  # TP rank (ETP rank for experts)
    shard_count: int  # TP size (ETP size for experts)
    canonical: CanonicalTensor
    split: TPSplit  # how this transformer implementation splits it (canonical.split or te_split)
    # A copy of the word embedding (tied output layer, MTP stage): written from it, skipped on read.
    embedding_copy: bool = False


@dataclass(frozen=True)
class ExtraState:
    rank: RankKey
    container: str
    name: str  # <module>._extra_state


EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")


def _expert_local_name(local: str, expert: int, layout: ParallelLayout) -> tuple[str, str]:
    """(weight name, module name) of a routed expert with its EP-local index."""
    m = EXPERT_RE.match(local)
    if m is None:
        raise ValueError(f"expert tensor {local} does not follow mlp.experts.local_experts.<e>.linear_fc<n>")
    head, _, linear, suffix = m.groups()
    index = expert % (layout.num_experts // layout.ep)
    if layout.grouped_gemm:  # TE GroupedLinear: one module, one weight<i> per local expert
        return f"{head}{linear}.{suffix}{index}", f"{head}{linear}"
    return f"{head}local_experts.{index}.{linear}.{suffix}", f"{head}local_experts.{index}.{linear}"


def _te_name(layer_prefix: str, rest: str, layout: ParallelLayout, names: set[str]) -> str:
    """A layer tensor's name under the chosen spec: TE fuses some norms into the next linear."""
    if layout.transformer_impl == "transformer_engine":
        for norm_prefix, fused_prefix, fused_weight in TE_FUSED_NORMS:
            if rest.startswith(norm_prefix) and layer_prefix + fused_weight in names:
                return fused_prefix + rest[len(norm_prefix):]
    return rest


def _local_name(canonical_name: str, layout: ParallelLayout, layer_names: set[str]) -> tuple[int, int, str]:
    """(pipeline rank, chunk, name inside the chunk) for a canonical tensor name."""
    pipe = layout.pipeline
    if is_vision(canonical_name):  # the vision tower and its merger: first stage, first chunk
        rank, chunk = pipe.rank_and_chunk(0)
        m = VISION_LAYER_RE.match(canonical_name)
        name = canonical_name
        if m:
            layer_prefix = f"{VISION_LAYER_PREFIX}{m.group(1)}."
            name = layer_prefix + _te_name(layer_prefix, m.group(2), layout, layer_names)
        for ours, theirs in VISION_PREFIXES:
            if name.startswith(ours):
                return rank, chunk, theirs + name[len(ours):]
    rank, chunk, local = _language_name(canonical_name, layout, layer_names)
    return rank, chunk, layout.language_prefix + local


def _language_name(canonical_name: str, layout: ParallelLayout, layer_names: set[str]) -> tuple[int, int, str]:
    pipe = layout.pipeline
    m = LAYER_RE.match(canonical_name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        rank, chunk, local = pipe.locate(layer)
        return rank, chunk, f"decoder.layers.{local}.{_te_name(f'decoder.layers.{layer}.', rest, layout, layer_names)}"
    m = MTP_RE.match(canonical_name)
    if m:  # MTP layers live with the last decoder layer
        head, inner, rest = m.groups()
        rank, chunk = pipe.rank_and_chunk(pipe.last_vstage)
        if inner is None:
            return rank, chunk, canonical_name
        rest = _te_name(f"{head}{inner}.", rest, layout, layer_names)
        return rank, chunk, f"{head}{layout.mtp_inner_name}.{rest}"
    if canonical_name.startswith("embedding."):
        rank, chunk = pipe.rank_and_chunk(0)
    else:  # final norm, output layer: with the last decoder layer
        rank, chunk = pipe.rank_and_chunk(pipe.last_vstage)
    return rank, chunk, canonical_name


def place(tensors: Iterable[CanonicalTensor], layout: ParallelLayout) -> tuple[list[Placement], list[ExtraState]]:
    tensors = list(tensors)
    names = {t.name for t in tensors}
    pipe = layout.pipeline
    placements: list[Placement] = []
    extras: list[ExtraState] = []

    files = layout.expert_files()
    experts_per_rank = layout.num_experts // layout.ep if layout.num_experts else 0
    seen_extras: set[ExtraState] = set()

    def add(t: CanonicalTensor, rank: int, chunk: int, local: str, embedding_copy: bool = False) -> None:
        container = pipe.container(chunk)
        module = None
        if t.extra_state_module is not None:
            # The module path carries the same local renumbering as the weight name.
            module = local[: -(len(t.name) - len(t.extra_state_module))]
        if t.expert is not None:
            local, module = _expert_local_name(local, t.expert, layout)
        split = t.te_split if (t.te_split is not None and layout.transformer_impl == "transformer_engine") else t.split
        for (tp_rank, ep_rank), etp_rank in sorted(files.items()):
            if t.expert is not None and t.expert // experts_per_rank != ep_rank:
                continue
            shard_rank, count = (etp_rank, layout.expert_tp) if t.expert is not None else (tp_rank, layout.tp)
            if layout.encoder_tp is not None and is_vision(t.name):  # file t holds encoder shard t mod encoder TP
                shard_rank, count = tp_rank % layout.encoder_tp, layout.encoder_tp
            key = RankKey(tp_rank, rank, ep_rank)
            placements.append(Placement(key, container, local, shard_rank, count, t, split, embedding_copy))
            if module is not None:
                extra = ExtraState(key, container, f"{module}._extra_state")
                if extra not in seen_extras:  # grouped experts share one module
                    seen_extras.add(extra)
                    extras.append(extra)

    for t in tensors:
        rank, chunk, local = _local_name(t.name, layout, names)
        add(t, rank, chunk, local)
        last_rank, last_chunk = pipe.rank_and_chunk(pipe.last_vstage)
        lang = layout.language_prefix
        if t.name == WORD_EMBEDDINGS and layout.tied_embeddings and pipe.pp > 1:
            # Megatron keeps its own output-layer copy of tied embeddings on the last stage.
            copy = CanonicalTensor(OUTPUT_LAYER, t.shape, Split.VOCAB, "output_layer")
            add(copy, last_rank, last_chunk, lang + OUTPUT_LAYER, embedding_copy=True)
        if t.name == WORD_EMBEDDINGS and layout.mtp_num_layers and (last_rank, last_chunk) != (rank, chunk):
            # MTP layers embed the shifted tokens themselves: the last stage holds an embedding copy.
            add(t, last_rank, last_chunk, lang + WORD_EMBEDDINGS, embedding_copy=True)
        if t.name == WORD_EMBEDDINGS and layout.encoder_tp is not None:
            # LoongForge's multimodal model embeds text for the encoder stage with its own copy.
            add(t, rank, chunk, TEXT_ENCODER_EMBEDDING, embedding_copy=True)
    return placements, extras


def placement_sort_key(name: str) -> tuple:
    """Model order inside a chunk: (vision tower,) embedding, layers in order, final norm, output layer, MTP."""
    if name.startswith("encoder_model."):
        m = re.match(r"^encoder_model\.image_encoder\.decoder\.layers\.(\d+)\.", name)
        return (-1, int(m.group(1)) if m else 0)
    name = name[len(LANGUAGE_PREFIX):] if name.startswith(LANGUAGE_PREFIX) else name
    m = re.match(r"^decoder\.layers\.(\d+)\.", name)
    if name.startswith("embedding."):
        return (0, 0)
    if m:
        return (1, int(m.group(1)))
    if name.startswith("decoder."):
        return (2, 0)
    m = re.match(r"^mtp\.layers\.(\d+)\.", name)
    if m:
        return (4, int(m.group(1)))
    return (3, 0)
