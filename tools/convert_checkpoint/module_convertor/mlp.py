"""Gated MLP: HF gate and up projections <-> Megatron ``linear_fc1`` = [gate; up].

The layout (Split.GATED_COLUMN) then gives TP rank t the rows [gate_t; up_t]."""
from __future__ import annotations

from collections.abc import Mapping

from .. import tensor_expr as te
from ..core.canonical import Split
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register


@register
class GatedMLP(ModuleConvertor):
    kind = "gated_mlp"
    help = "gate, up ↔ `linear_fc1` = `[gate; up]`, down ↔ `linear_fc2`; TP: each rank gets `[gate_t; up_t]`, fc2 by columns"
    options = ("hf", "mcore", "size", "dtype")
    required = ("hf", "mcore")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        hf = self.opt("hf")
        if not (isinstance(hf, list) and len(hf) == 2):
            raise ConversionError(f"{self.spec.origin}: 'hf' of convertor gated_mlp must list the gate and up weights")
        self._gate, self._up = (self.hf_name(n) for n in hf)
        self._fc1 = self.mcore_name(self.opt("mcore"))
        self._ffn = self.arch.size(self.opt("size", "ffn_hidden_size"))

    @property
    def _is_bias(self) -> bool:  # vision towers' MLPs carry gate/up biases: fc1's bias is [gate; up] too
        return self._fc1.endswith(".bias")

    def hf_shapes(self):
        shape = (self._ffn,) if self._is_bias else (self._ffn, self.arch.hidden_size)
        return {self._gate: shape, self._up: shape}

    def canonical(self):
        module = None if self._is_bias else self._fc1.rsplit(".", 1)[0]
        shape = (2 * self._ffn,) if self._is_bias else (2 * self._ffn, self.arch.hidden_size)
        return [CanonicalTensor(self._fc1, shape, Split.GATED_COLUMN, module)]

    def to_canonical(self, hf: Mapping[str, Expr]):
        return {self._fc1: te.cat([hf[self._gate], hf[self._up]], 0)}

    def to_hf(self, canonical: Mapping[str, Expr]):
        fc1 = canonical[self._fc1]
        return {self._gate: te.narrow(fc1, 0, 0, self._ffn), self._up: te.narrow(fc1, 0, self._ffn, self._ffn)}
