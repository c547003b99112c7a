"""Routed experts stored as fused 3-D tensors, input-major, gate/up interleaved (GPT-OSS).

HF: ``gate_up_proj`` ``[E, hidden, 2*inter]`` whose columns alternate gate, up (even columns gate,
odd up), ``gate_up_proj_bias`` ``[E, 2*inter]`` alike, ``down_proj`` ``[E, inter, hidden]`` and
``down_proj_bias`` ``[E, hidden]``. Megatron: per expert ``linear_fc1`` ``[2*inter, hidden]`` =
``[gate; up]`` rows (out x in) and ``linear_fc2`` ``[hidden, inter]``, each with its bias. Both ways
are symbolic (select, transpose, strided / interleave, stack), so MCore -> HF rebuilds the
interleaved layout bit for bit and a shard reads only its expert's window.
"""
from __future__ import annotations

from collections.abc import Mapping

from .. import tensor_expr as te
from ..core.canonical import Split
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register


@register
class FusedInterleavedExperts(ModuleConvertor):
    """YAML: ``{convertor: fused_experts, hf: mlp.experts., mcore: mlp.experts}`` (GPT-OSS)."""

    kind = "fused_experts"
    help = ("fused `[E, in, out]` gate_up_proj (gate/up interleaved) / down_proj + biases ↔ "
            "`mlp.experts.local_experts.<global e>.linear_fc1/fc2` weight and bias; EP block, then ETP like a gated MLP")
    options = ("hf", "mcore")
    required = ("hf", "mcore")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        num_experts, ffn = self.arch.num_experts, self.arch.moe_ffn_hidden_size
        if not num_experts or not ffn:
            raise ConversionError(f"{self.spec.origin}: convertor 'fused_experts' needs num_experts and moe_ffn_hidden_size")
        self._num_experts: int = num_experts
        self._ffn: int = ffn

    def _hf(self, param: str) -> str:
        return self.hf_name(self.opt("hf") + param)

    def _mcore(self, expert: int, linear: str, suffix: str) -> str:
        return self.mcore_name(f"{self.opt('mcore')}.local_experts.{expert}.{linear}.{suffix}")

    def hf_shapes(self):
        e, h, f = self._num_experts, self.arch.hidden_size, self._ffn
        return {self._hf("gate_up_proj"): (e, h, 2 * f), self._hf("gate_up_proj_bias"): (e, 2 * f),
                self._hf("down_proj"): (e, f, h), self._hf("down_proj_bias"): (e, h)}

    def canonical(self):
        h, f = self.arch.hidden_size, self._ffn
        out = []
        for e in range(self._num_experts):
            fc1, fc2 = (self._mcore(e, linear, "weight") for linear in ("linear_fc1", "linear_fc2"))
            out += [CanonicalTensor(fc1, (2 * f, h), Split.GATED_COLUMN, fc1.rsplit(".", 1)[0], expert=e),
                    CanonicalTensor(self._mcore(e, "linear_fc1", "bias"), (2 * f,), Split.GATED_COLUMN, expert=e),
                    CanonicalTensor(fc2, (h, f), Split.ROW, fc2.rsplit(".", 1)[0], expert=e),
                    # a row-parallel bias is added once, after the reduction: whole on every rank
                    CanonicalTensor(self._mcore(e, "linear_fc2", "bias"), (h,), Split.REPLICATED, expert=e)]
        return out

    def to_canonical(self, hf: Mapping[str, Expr]):
        gate_up, gate_up_bias = hf[self._hf("gate_up_proj")], hf[self._hf("gate_up_proj_bias")]
        down, down_bias = hf[self._hf("down_proj")], hf[self._hf("down_proj_bias")]
        out = {}
        for e in range(self._num_experts):
            w, b = te.select(gate_up, 0, e), te.select(gate_up_bias, 0, e)  # [hidden, 2I] (in x out), [2I]
            out[self._mcore(e, "linear_fc1", "weight")] = te.cat(
                [te.transpose(te.strided(w, 1, 0, 2)), te.transpose(te.strided(w, 1, 1, 2))], 0)
            out[self._mcore(e, "linear_fc1", "bias")] = te.cat([te.strided(b, 0, 0, 2), te.strided(b, 0, 1, 2)], 0)
            out[self._mcore(e, "linear_fc2", "weight")] = te.transpose(te.select(down, 0, e))
            out[self._mcore(e, "linear_fc2", "bias")] = te.select(down_bias, 0, e)
        return out

    def to_hf(self, canonical: Mapping[str, Expr]):
        f = self._ffn
        gate_up, gate_up_bias, down, down_bias = [], [], [], []
        for e in range(self._num_experts):
            w, b = canonical[self._mcore(e, "linear_fc1", "weight")], canonical[self._mcore(e, "linear_fc1", "bias")]
            gate_up.append(te.interleave([te.transpose(te.narrow(w, 0, 0, f)), te.transpose(te.narrow(w, 0, f, f))], 1))
            gate_up_bias.append(te.interleave([te.narrow(b, 0, 0, f), te.narrow(b, 0, f, f)], 0))
            down.append(te.transpose(canonical[self._mcore(e, "linear_fc2", "weight")]))
            down_bias.append(canonical[self._mcore(e, "linear_fc2", "bias")])
        return {self._hf("gate_up_proj"): te.stack(gate_up, 0), self._hf("gate_up_proj_bias"): te.stack(gate_up_bias, 0),
                self._hf("down_proj"): te.stack(down, 0), self._hf("down_proj_bias"): te.stack(down_bias, 0)}
