"""Attention with an output gate (Qwen3-Next, Qwen3.5): HF ``q_proj`` holds, per head, the
query then its gate ``[q_h; gate_h]``; Megatron's ``linear_qkv`` with ``attention_output_gate``
holds, per query group, ``[q heads; their gates; k; v]``. TP splits whole groups (rows)."""
from __future__ import annotations

from collections.abc import Mapping

from .. import tensor_expr as te
from ..core.canonical import Split
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register


@register
class GatedQKV(ModuleConvertor):
    """YAML: ``{convertor: gated_qkv, hf: [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj], mcore: self_attention.linear_qkv}``."""

    kind = "gated_qkv"
    help = ("q (`[q_h; gate_h]` per head), k, v ↔ `linear_qkv` with the output gate, rows per query group "
            "`[q heads; gates; k; v]`; TP: rows, whole groups")
    options = ("hf", "mcore")
    required = ("hf", "mcore")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        hf = self.opt("hf")
        if not (isinstance(hf, list) and len(hf) == 3):
            raise ConversionError(f"{self.spec.origin}: 'hf' of convertor gated_qkv must list the q, k and v modules")
        if self.arch.add_qkv_bias:
            raise ConversionError(f"{self.spec.origin}: convertor gated_qkv does not take q/k/v biases")
        self._q, self._k, self._v = (self.hf_name(m + ".weight") for m in hf)
        self._fused = self.mcore_name(self.opt("mcore") + ".weight")

    def hf_shapes(self):
        a = self.arch
        return {self._q: (a.gated_q_dim, a.hidden_size), self._k: (a.kv_dim, a.hidden_size),
                self._v: (a.kv_dim, a.hidden_size)}

    def canonical(self):
        a = self.arch
        rows = a.gated_q_dim + 2 * a.kv_dim
        return [CanonicalTensor(self._fused, (rows, a.hidden_size), Split.COLUMN, self._fused.rsplit(".", 1)[0])]

    def _sizes(self) -> tuple[int, int, int]:
        a = self.arch
        return a.num_query_groups, a.num_attention_heads // a.num_query_groups, a.kv_channels

    def to_canonical(self, hf: Mapping[str, Expr]):
        groups, heads, d = self._sizes()
        q, k, v = hf[self._q], hf[self._k], hf[self._v]
        parts = []
        for g in range(groups):
            first = g * heads
            parts += [te.narrow(q, 0, (first + h) * 2 * d, d) for h in range(heads)]  # queries
            parts += [te.narrow(q, 0, (first + h) * 2 * d + d, d) for h in range(heads)]  # their gates
            parts += [te.narrow(k, 0, g * d, d), te.narrow(v, 0, g * d, d)]
        return {self._fused: te.cat(parts, 0)}

    def to_hf(self, canonical: Mapping[str, Expr]):
        groups, heads, d = self._sizes()
        fused = canonical[self._fused]
        stride = (2 * heads + 2) * d
        q, k, v = [], [], []
        for g in range(groups):
            base = g * stride
            for h in range(heads):
                q += [te.narrow(fused, 0, base + h * d, d), te.narrow(fused, 0, base + (heads + h) * d, d)]
            k.append(te.narrow(fused, 0, base + 2 * heads * d, d))
            v.append(te.narrow(fused, 0, base + (2 * heads + 1) * d, d))
        return {self._q: te.cat(q, 0), self._k: te.cat(k, 0), self._v: te.cat(v, 0)}
