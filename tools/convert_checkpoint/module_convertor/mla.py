"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2): HF ``self_attn.*`` <-> Megatron MLA.

Every tensor maps one to one, in the same row order: HF and Megatron both lay ``q_b_proj``
and ``kv_b_proj`` out head by head ([nope, rope] and [nope, v]) and ``kv_a_proj_with_mqa`` as
[kv_lora, rope]. What differs is sharding, and it differs by transformer implementation:

- the up-projections and ``linear_q_proj`` are column-parallel (split by heads) and
  ``linear_proj`` row-parallel, in both specs;
- the down-projections are ``ColumnParallelLinear`` in the local spec (row chunks per TP rank)
  but ``TELinear(parallel_mode="duplicated")`` in the TE spec (full copy on every rank);
- the q/kv norms are ``q_layernorm``/``kv_layernorm`` in the local spec; the TE spec fuses them
  into the up-projections as ``layer_norm_weight`` (the layout does that rename).

Without q-LoRA (DeepSeek-V2-Lite, ``q_lora_rank`` null) queries come from one ``q_proj``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..core.canonical import Split
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register


@dataclass(frozen=True)
class _Row:
    hf: str
    mcore: str
    shape: tuple[int, int] | tuple[int]
    split: Split
    linear: bool
    te_split: Split | None = None


@register
class MultiLatentAttention(ModuleConvertor):
    """YAML: ``{convertor: mla, hf: self_attn., mcore: self_attention.}`` (module prefixes)."""

    kind = "mla"
    help = ("DeepSeek `self_attn.*` ↔ Megatron MLA, one to one (q-LoRA or not from the architecture); TP: up "
            "projections by heads, `linear_proj` by columns, down projections by rows (local) or replicated (TE)")
    options = ("hf", "mcore", "dtype")
    required = ("hf", "mcore")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if not self.arch.multi_latent_attention:
            raise ConversionError(f"{self.spec.origin}: convertor 'mla' needs an architecture with multi_latent_attention")

    def _rows(self) -> list[_Row]:
        a = self.arch
        h = a.hidden_size
        kv_lora_rank = a.kv_lora_rank
        assert kv_lora_rank is not None  # set for multi_latent_attention (ModelArch checks it; see __init__)
        rows = []
        if a.q_lora_rank:
            rows += [
                _Row("q_a_proj.weight", "linear_q_down_proj.weight", (a.q_lora_rank, h), Split.COLUMN, True, Split.REPLICATED),
                _Row("q_a_layernorm.weight", "q_layernorm.weight", (a.q_lora_rank,), Split.REPLICATED, False),
                _Row("q_b_proj.weight", "linear_q_up_proj.weight", (a.mla_q_dim, a.q_lora_rank), Split.COLUMN, True),
            ]
        else:
            rows.append(_Row("q_proj.weight", "linear_q_proj.weight", (a.mla_q_dim, h), Split.COLUMN, True))
        rows += [
            _Row("kv_a_proj_with_mqa.weight", "linear_kv_down_proj.weight", (a.mla_kv_down_dim, h), Split.COLUMN, True,
                 Split.REPLICATED),
            _Row("kv_a_layernorm.weight", "kv_layernorm.weight", (kv_lora_rank,), Split.REPLICATED, False),
            _Row("kv_b_proj.weight", "linear_kv_up_proj.weight", (a.mla_kv_up_dim, kv_lora_rank), Split.COLUMN, True),
            _Row("o_proj.weight", "linear_proj.weight", (h, a.mla_v_dim), Split.ROW, True),
        ]
        return rows

    def _hf(self, row: _Row) -> str:
        return self.hf_name(self.opt("hf") + row.hf)

    def _mcore(self, row: _Row) -> str:
        return self.mcore_name(self.opt("mcore") + row.mcore)

    def hf_shapes(self):
        return {self._hf(r): r.shape for r in self._rows()}

    def canonical(self):
        out = []
        for r in self._rows():
            name = self._mcore(r)
            module = name.rsplit(".", 1)[0] if r.linear else None
            out.append(CanonicalTensor(name, r.shape, r.split, module, te_split=r.te_split))
        return out

    def to_canonical(self, hf: Mapping[str, Expr]):
        return {self._mcore(r): hf[self._hf(r)] for r in self._rows()}

    def to_hf(self, canonical: Mapping[str, Expr]):
        return {self._hf(r): canonical[self._mcore(r)] for r in self._rows()}
