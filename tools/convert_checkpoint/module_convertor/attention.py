"""GQA/MHA attention: HF q, k, v projections <-> Megatron's fused ``linear_qkv``.

Megatron stores qkv per query group: for group g the rows are the g-th group's
``heads / groups`` query heads, then its key head, then its value head. Sharding by TP is then
a plain row chunk (``groups / tp`` groups per rank), so every shard reads only its own rows.
"""
from __future__ import annotations

from collections.abc import Mapping

from .. import tensor_expr as te
from ..core.canonical import Split
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register


@register
class FusedQKV(ModuleConvertor):
    kind = "qkv"
    help = "q, k, v (+ biases when `add_qkv_bias`) ↔ `linear_qkv`, rows per query group `[q heads; k; v]`; TP: rows, whole groups"
    options = ("hf", "mcore", "dtype")
    required = ("hf", "mcore")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        hf = self.opt("hf")
        if not (isinstance(hf, list) and len(hf) == 3):
            raise ConversionError(f"{self.spec.origin}: 'hf' of convertor qkv must list the q, k and v modules")
        self._q, self._k, self._v = (self.hf_name(m) for m in hf)
        self._fused = self.mcore_name(self.opt("mcore"))

    def _suffixes(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.arch.add_qkv_bias else ("weight",)

    def _rows(self) -> tuple[int, int, int]:
        a = self.arch
        return a.q_dim, a.kv_dim, a.q_dim + 2 * a.kv_dim

    def hf_shapes(self):
        q_rows, kv_rows, _ = self._rows()
        shapes = {}
        for suffix in self._suffixes():
            tail = (self.arch.hidden_size,) if suffix == "weight" else ()
            shapes[f"{self._q}.{suffix}"] = (q_rows,) + tail
            shapes[f"{self._k}.{suffix}"] = (kv_rows,) + tail
            shapes[f"{self._v}.{suffix}"] = (kv_rows,) + tail
        return shapes

    def canonical(self):
        _, _, rows = self._rows()
        out = [CanonicalTensor(f"{self._fused}.weight", (rows, self.arch.hidden_size), Split.COLUMN, self._fused)]
        if self.arch.add_qkv_bias:
            out.append(CanonicalTensor(f"{self._fused}.bias", (rows,), Split.COLUMN))
        return out

    def to_canonical(self, hf: Mapping[str, Expr]):
        a = self.arch
        groups, d = a.num_query_groups, a.kv_channels
        q_per_group = a.num_attention_heads // groups * d
        out = {}
        for suffix in self._suffixes():
            q, k, v = (hf[f"{m}.{suffix}"] for m in (self._q, self._k, self._v))
            parts = []
            for g in range(groups):
                parts += [te.narrow(q, 0, g * q_per_group, q_per_group), te.narrow(k, 0, g * d, d), te.narrow(v, 0, g * d, d)]
            out[f"{self._fused}.{suffix}"] = te.cat(parts, 0)
        return out

    def to_hf(self, canonical: Mapping[str, Expr]):
        a = self.arch
        groups, d = a.num_query_groups, a.kv_channels
        q_per_group = a.num_attention_heads // groups * d
        stride = q_per_group + 2 * d
        out = {}
        for suffix in self._suffixes():
            fused = canonical[f"{self._fused}.{suffix}"]
            out[f"{self._q}.{suffix}"] = te.cat([te.narrow(fused, 0, g * stride, q_per_group) for g in range(groups)], 0)
            out[f"{self._k}.{suffix}"] = te.cat([te.narrow(fused, 0, g * stride + q_per_group, d) for g in range(groups)], 0)
            out[f"{self._v}.{suffix}"] = te.cat([te.narrow(fused, 0, g * stride + q_per_group + d, d) for g in range(groups)], 0)
        return out


@register
class StackedQKV(FusedQKV):
    """One HF tensor holding ``[q; k; v]`` (vision towers' ``attn.qkv``): the same Megatron layout."""

    kind = "stacked_qkv"
    help = "one HF `[q; k; v]` tensor (+ bias when `add_qkv_bias`; vision `attn.qkv`) ↔ `linear_qkv`, rows per query group; TP: rows, whole groups"

    def __init__(self, *args, **kw):
        ModuleConvertor.__init__(self, *args, **kw)
        if not isinstance(self.opt("hf"), str):
            raise ConversionError(f"{self.spec.origin}: 'hf' of convertor stacked_qkv names one module")
        self._stacked = self.hf_name(self.opt("hf"))
        self._fused = self.mcore_name(self.opt("mcore"))

    def hf_shapes(self):
        _, _, rows = self._rows()
        return {f"{self._stacked}.{s}": (rows, self.arch.hidden_size) if s == "weight" else (rows,)
                for s in self._suffixes()}

    def to_canonical(self, hf: Mapping[str, Expr]):
        q_rows, kv_rows, _ = self._rows()
        parts: dict[str, Expr] = {}
        for suffix in self._suffixes():
            t = hf[f"{self._stacked}.{suffix}"]
            parts[f"q.{suffix}"] = te.narrow(t, 0, 0, q_rows)
            parts[f"k.{suffix}"] = te.narrow(t, 0, q_rows, kv_rows)
            parts[f"v.{suffix}"] = te.narrow(t, 0, q_rows + kv_rows, kv_rows)
        self._q, self._k, self._v = "q", "k", "v"
        return super().to_canonical(parts)

    def to_hf(self, canonical: Mapping[str, Expr]):
        self._q, self._k, self._v = "q", "k", "v"
        split = super().to_hf(canonical)
        return {f"{self._stacked}.{s}": te.cat([split[f"q.{s}"], split[f"k.{s}"], split[f"v.{s}"]], 0)
                for s in self._suffixes()}
