"""Routed experts: per-expert HF gate/up/down <-> Megatron ``local_experts.<e>.linear_fc1/fc2``.

Canonical names use the global expert index; the layout maps it to its EP rank, the local
index there, the ETP split, and grouped-GEMM names when asked.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from .. import tensor_expr as te
from ..core.canonical import Split
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register


@register
class RoutedExperts(ModuleConvertor):
    """YAML: ``{convertor: experts, hf: "mlp.experts.{expert}.", gate: .., up: .., down: .., mcore: mlp.experts}``."""

    kind = "experts"
    help = "per-expert gate/up/down ↔ `mlp.experts.local_experts.<global e>.linear_fc1/fc2`; EP block, then ETP split like a gated MLP"
    options = ("hf", "gate", "up", "down", "mcore", "dtype")
    required = ("hf", "gate", "up", "down", "mcore")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        num_experts, ffn = self.arch.num_experts, self.arch.moe_ffn_hidden_size
        if not num_experts or not ffn:
            raise ConversionError(f"{self.spec.origin}: convertor 'experts' needs num_experts and moe_ffn_hidden_size")
        self._num_experts: int = num_experts
        self._ffn: int = ffn
        if "{expert}" not in self.opt("hf"):
            raise ConversionError(f"{self.spec.origin}: 'hf' of convertor experts must contain {{expert}}")

    def _hf(self, expert: int, which: str) -> str:
        return self.hf_name(self.opt("hf").format(expert=expert) + self.opt(which))

    def _mcore(self, expert: int, linear: str) -> str:
        return self.mcore_name(f"{self.opt('mcore')}.local_experts.{expert}.{linear}.weight")

    def experts_present(self, hf_names) -> int:
        """How many experts of this layer the checkpoint holds (by their gate weights)."""
        pattern = re.compile(re.escape(self.hf_name(self.opt("hf"))).replace(re.escape("{expert}"), r"(\d+)")
                             + re.escape(self.opt("gate")) + "$")
        return len({m.group(1) for n in hf_names if (m := pattern.match(n))})

    def hf_shapes(self):
        a = self.arch
        up_shape, down_shape = (self._ffn, a.hidden_size), (a.hidden_size, self._ffn)
        shapes = {}
        for e in range(self._num_experts):
            shapes[self._hf(e, "gate")] = up_shape
            shapes[self._hf(e, "up")] = up_shape
            shapes[self._hf(e, "down")] = down_shape
        return shapes

    def canonical(self):
        a = self.arch
        out = []
        for e in range(self._num_experts):
            fc1, fc2 = self._mcore(e, "linear_fc1"), self._mcore(e, "linear_fc2")
            out.append(CanonicalTensor(fc1, (2 * self._ffn, a.hidden_size), Split.GATED_COLUMN,
                                       fc1.rsplit(".", 1)[0], expert=e))
            out.append(CanonicalTensor(fc2, (a.hidden_size, self._ffn), Split.ROW,
                                       fc2.rsplit(".", 1)[0], expert=e))
        return out

    def to_canonical(self, hf: Mapping[str, Expr]):
        out = {}
        for e in range(self._num_experts):
            out[self._mcore(e, "linear_fc1")] = te.cat([hf[self._hf(e, "gate")], hf[self._hf(e, "up")]], 0)
            out[self._mcore(e, "linear_fc2")] = hf[self._hf(e, "down")]
        return out

    def to_hf(self, canonical: Mapping[str, Expr]):
        ffn = self._ffn
        out = {}
        for e in range(self._num_experts):
            fc1 = canonical[self._mcore(e, "linear_fc1")]
            out[self._hf(e, "gate")] = te.narrow(fc1, 0, 0, ffn)
            out[self._hf(e, "up")] = te.narrow(fc1, 0, ffn, ffn)
            out[self._hf(e, "down")] = canonical[self._mcore(e, "linear_fc2")]
        return out


@register
class StackedExperts(ModuleConvertor):
    """YAML: ``{convertor: stacked_experts, hf: mlp.experts., gate_up: gate_up_proj, down: down_proj, mcore: mlp.experts}``.

    Qwen publishes them ``[in, out]`` per expert (gate_up ``[E, hidden, 2·ffn]``, down ``[E, ffn, hidden]``);
    transformers 5 saves them ``[out, in]`` (its load transposes the published form). Both are read
    (told apart by down_proj's shape); the published form is written."""

    kind = "stacked_experts"
    help = ("all experts in two 3-D HF tensors `gate_up_proj` `[E, hidden, 2·ffn]` and `down_proj` `[E, ffn, hidden]` "
            "(Qwen3-VL-MoE; transformers 5's `[E, 2·ffn, hidden]` / `[E, hidden, ffn]` read too) ↔ "
            "`local_experts.<e>.linear_fc1/fc2`; EP block, then ETP split like a gated MLP")
    transposed = True  # [in, out] per expert, as published; False: transformers 5's [out, in]
    options = ("hf", "gate_up", "down", "mcore")
    required = ("hf", "gate_up", "down", "mcore")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        num_experts, ffn = self.arch.num_experts, self.arch.moe_ffn_hidden_size
        if not num_experts or not ffn:
            raise ConversionError(f"{self.spec.origin}: convertor 'stacked_experts' needs num_experts and moe_ffn_hidden_size")
        self._num_experts: int = num_experts
        self._ffn: int = ffn
        self._gate_up = self.hf_name(self.opt("hf") + self.opt("gate_up"))
        self._down = self.hf_name(self.opt("hf") + self.opt("down"))

    def _mcore(self, expert: int, linear: str) -> str:
        return self.mcore_name(f"{self.opt('mcore')}.local_experts.{expert}.{linear}.weight")

    def observe_hf(self, shapes):
        e, h, f = self._num_experts, self.arch.hidden_size, self._ffn
        found = (shapes.get(self._gate_up), shapes.get(self._down))
        published, saved = ((e, h, 2 * f), (e, f, h)), ((e, 2 * f, h), (e, h, f))
        # transformers 5's form only where the shapes say so (never where both forms fit, h == 2f == 2h)
        self.transposed = not (found == saved and found != published)

    def hf_shapes(self):
        e, h, f = self._num_experts, self.arch.hidden_size, self._ffn
        if not self.transposed:
            return {self._gate_up: (e, 2 * f, h), self._down: (e, h, f)}
        return {self._gate_up: (e, h, 2 * f), self._down: (e, f, h)}

    def _as_fc(self, expr: Expr) -> Expr:
        return te.transpose(expr) if self.transposed else expr

    def canonical(self):
        h, f = self.arch.hidden_size, self._ffn
        out = []
        for e in range(self._num_experts):
            fc1, fc2 = self._mcore(e, "linear_fc1"), self._mcore(e, "linear_fc2")
            out.append(CanonicalTensor(fc1, (2 * f, h), Split.GATED_COLUMN, fc1.rsplit(".", 1)[0], expert=e))
            out.append(CanonicalTensor(fc2, (h, f), Split.ROW, fc2.rsplit(".", 1)[0], expert=e))
        return out

    def to_canonical(self, hf: Mapping[str, Expr]):
        # gate_up_proj[e] is [hidden, gate | up]: its transpose is Megatron's fc1 rows [gate; up].
        out = {}
        for e in range(self._num_experts):
            out[self._mcore(e, "linear_fc1")] = self._as_fc(te.select(hf[self._gate_up], 0, e))
            out[self._mcore(e, "linear_fc2")] = self._as_fc(te.select(hf[self._down], 0, e))
        return out

    def to_hf(self, canonical: Mapping[str, Expr]):
        experts = range(self._num_experts)
        return {self._gate_up: te.stack([te.transpose(canonical[self._mcore(e, "linear_fc1")]) for e in experts]),
                self._down: te.stack([te.transpose(canonical[self._mcore(e, "linear_fc2")]) for e in experts])}
