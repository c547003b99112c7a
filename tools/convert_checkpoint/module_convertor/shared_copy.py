"""HF tensors that duplicate another module's weight (DeepSeek MTP layers' embed_tokens and
shared_head.head). Megatron shares the original, so they have no canonical tensor: they are
checked for shape, compared with the original (they must be bit-identical) and dropped on the
way in, and written as copies on the way out."""
from __future__ import annotations

from collections.abc import Mapping

from ..core.canonical import OUTPUT_LAYER, WORD_EMBEDDINGS
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import ModuleConvertor, register


@register
class SharedCopy(ModuleConvertor):
    """YAML: ``{convertor: shared_copy, hf: embed_tokens.weight, of: embedding}`` (or ``of: output_layer``)."""

    kind = "shared_copy"
    help = ("an HF tensor that duplicates the embedding or LM head (MTP `embed_tokens`, `shared_head.head`) ↔ "
            "nothing: consumed only if bit-identical, written back as a copy")
    options = ("hf", "of")
    required = ("hf", "of")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if self.opt("of") not in ("embedding", "output_layer"):
            raise ConversionError(f"{self.spec.origin}: 'of' must be embedding or output_layer")

    def _source(self) -> str:
        # A tied LM head is the embedding itself.
        if self.opt("of") == "output_layer" and not self.arch.tied_embeddings:
            return OUTPUT_LAYER
        return WORD_EMBEDDINGS

    def hf_shapes(self):
        return {self.hf_name(self.opt("hf")): (self.arch.vocab_size, self.arch.hidden_size)}

    def canonical(self):
        return []

    def copies(self):
        return {self.hf_name(self.opt("hf")): self._source()}

    def reads(self):
        return [self._source()]

    def to_canonical(self, hf: Mapping[str, Expr]):
        return {}

    def to_hf(self, canonical: Mapping[str, Expr]):
        return {self.hf_name(self.opt("hf")): canonical[self._source()]}
