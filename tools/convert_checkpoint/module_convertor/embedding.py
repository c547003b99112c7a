"""Word embeddings and the output layer (vocab-padded, tied or untied)."""
from __future__ import annotations

from collections.abc import Mapping

from ..core.canonical import OUTPUT_LAYER, WORD_EMBEDDINGS, Split
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register


@register
class WordEmbedding(ModuleConvertor):
    kind = "word_embedding"
    help = "`embed_tokens` ↔ `embedding.word_embeddings.weight`; TP: vocab (pad, then rows)"
    options = ("hf",)
    required = ("hf",)

    def hf_shapes(self):
        return {self.opt("hf"): (self.arch.vocab_size, self.arch.hidden_size)}

    def canonical(self):
        return [CanonicalTensor(WORD_EMBEDDINGS, (self.arch.vocab_size, self.arch.hidden_size), Split.VOCAB)]

    def to_canonical(self, hf: Mapping[str, Expr]):
        return {WORD_EMBEDDINGS: hf[self.opt("hf")]}

    def to_hf(self, canonical: Mapping[str, Expr]):
        return {self.opt("hf"): canonical[WORD_EMBEDDINGS]}


@register
class OutputLayer(ModuleConvertor):
    """The LM head. With tied embeddings it has no canonical tensor of its own: the layout
    writes the embedding copy Megatron expects on the last stage (PP > 1) and nothing at PP = 1,
    and an HF ``lm_head`` that merely duplicates the embedding is accepted and dropped."""

    kind = "output_layer"
    help = ("`lm_head` ↔ `output_layer.weight`; none when tied (the layout places Megatron's copy; an HF copy "
            "must equal the embedding); TP: vocab")
    options = ("hf",)
    required = ("hf",)

    def hf_shapes(self):
        if self.arch.tied_embeddings:
            return {}
        return {self.opt("hf"): (self.arch.vocab_size, self.arch.hidden_size)}

    def optional_hf(self):
        return {self.opt("hf")} if self.arch.tied_embeddings else set()

    def copies(self):
        return {self.opt("hf"): WORD_EMBEDDINGS} if self.arch.tied_embeddings else {}

    def canonical(self):
        if self.arch.tied_embeddings:
            return []
        return [CanonicalTensor(OUTPUT_LAYER, (self.arch.vocab_size, self.arch.hidden_size), Split.VOCAB, "output_layer")]

    def to_canonical(self, hf: Mapping[str, Expr]):
        return {} if self.arch.tied_embeddings else {OUTPUT_LAYER: hf[self.opt("hf")]}

    def to_hf(self, canonical: Mapping[str, Expr]):
        return {} if self.arch.tied_embeddings else {self.opt("hf"): canonical[OUTPUT_LAYER]}
