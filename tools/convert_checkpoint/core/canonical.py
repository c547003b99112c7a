"""The canonical form: full, unsharded tensors in Megatron-Core local-spec naming with global
layer and expert indices (what a TP=PP=EP=1 model holds). Module convertors produce it from HF
names; the layout shards it into ranks."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


class Split(enum.Enum):
    """How tensor parallelism splits a canonical tensor."""

    REPLICATED = "replicated"  # norms, q/k norms, row-parallel biases
    COLUMN = "column"  # dim 0 chunk (qkv after the per-group interleave)
    ROW = "row"  # dim 1 chunk (linear_proj, linear_fc2)
    GATED_COLUMN = "gated_column"  # [gate; up] -> rank t gets [gate_t; up_t]
    VOCAB = "vocab"  # pad rows to the padded vocab, then dim 0 chunk


@dataclass(frozen=True)
class Sections:
    """Dim 0 made of blocks of these sizes, each split over TP: rank t gets [block0_t; block1_t; ...]
    (the gated delta-net's in_proj [q; k; v; z; b; a] and conv1d [q; k; v])."""

    sizes: tuple[int, ...]
    # Megatron's torch_dist saves each block under its own key: <name>.<block name>
    names: tuple[str, ...] = ()
    value: ClassVar[str] = "sections"  # like Split.value, for messages


TPSplit = Split | Sections


@dataclass(frozen=True)
class CanonicalTensor:
    name: str  # e.g. decoder.layers.7.self_attention.linear_qkv.weight
    shape: tuple[int, ...]
    split: TPSplit
    # The Megatron module owning this weight when it is a linear layer: its ``_extra_state``
    # entry is written next to it (TE and local specs both declare one per linear).
    extra_state_module: str | None = None
    # Global index of a routed expert: the layout puts it on its EP rank and splits it by ETP.
    expert: int | None = None
    # The split under the TE spec when it differs (MLA down-projections are replicated there).
    te_split: TPSplit | None = None
    # Marked ``dtype: fp8`` in the family YAML: stored as block FP8 in FP8 checkpoints.
    fp8: bool = False
