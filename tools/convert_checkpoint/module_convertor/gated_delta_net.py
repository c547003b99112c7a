"""Gated delta-net (linear attention of Qwen3-Next / Qwen3.5) <-> Megatron-Core ``GatedDeltaNet``.

Megatron's ``in_proj`` is one column-parallel linear whose rows, on each TP rank, are that
rank's ``[q; k; v; z; b; a]`` (q, k: its key heads; v, z: its value heads; b, a: one row per
value head). The canonical (TP = 1) tensor is ``[q; k; v; z; b; a]`` over all heads and TP
splits every block apart (``Sections``). ``conv1d.weight`` is ``[q; k; v]`` in both, split the
same way. ``A_log`` and ``dt_bias`` (one per value head) split by rows, ``out_proj`` by columns,
``out_norm`` is whole on every rank.

HF stores the projections in one of two ways (option ``layout``):

- ``fused`` (Qwen3-Next): ``in_proj_qkvz`` grouped by key head, each group
  ``[q (dk); k (dk); v (r*dv); z (r*dv)]`` with r = value heads per key head, and ``in_proj_ba``
  grouped likewise, ``[b (r); a (r)]``;
- ``split`` (Qwen3.5): ``in_proj_qkv`` = ``[q; k; v]``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``.

HF's gated output norm is a plain RMSNorm (``x * weight``) while Megatron builds it like every
other norm of the model: in a zero-centered model (``layernorm_zero_centered_gamma``, all of
this family) ``x * (1 + weight)``, so ``out_norm`` holds HF's weight minus 1
(``tensor_expr.Offset``; exact both ways for weights in [0.5, 2]).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .. import tensor_expr as te
from ..core.canonical import Sections, Split
from ..errors import ConversionError
from ..tensor_expr import Expr
from .base import CanonicalTensor, ModuleConvertor, register

LAYOUTS = ("fused", "split")
# The blocks' names in megatron's torch_dist keys (GatedDeltaNet.sharded_state_dict)
IN_PROJ_BLOCKS = ("query", "key", "value", "z", "beta", "alpha")
CONV_BLOCKS = ("query", "key", "value")


@dataclass(frozen=True)
class _Sizes:
    nk: int  # key heads
    nv: int  # value heads
    dk: int
    dv: int
    kernel: int

    @property
    def r(self) -> int:  # value heads per key head
        return self.nv // self.nk

    @property
    def qk(self) -> int:
        return self.nk * self.dk

    @property
    def v(self) -> int:
        return self.nv * self.dv

    @property
    def in_proj(self) -> tuple[int, ...]:  # Megatron's [q; k; v; z; b; a] blocks
        return (self.qk, self.qk, self.v, self.v, self.nv, self.nv)


@register
class GatedDeltaNet(ModuleConvertor):
    """YAML: ``{convertor: gated_delta_net, hf: linear_attn., mcore: self_attention., layout: fused|split}``."""

    kind = "gated_delta_net"
    help = ("HF `linear_attn.*` (`in_proj_qkvz`+`in_proj_ba`, or `in_proj_qkv/z/b/a`) ↔ Megatron `GatedDeltaNet` "
            "(`in_proj` = `[q;k;v;z;b;a]`, `conv1d`, `A_log`, `dt_bias`, `out_norm` = HF norm − 1, `out_proj`); "
            "TP: every in_proj/conv1d block by heads, A_log/dt_bias by value heads, out_proj by columns")
    options = ("hf", "mcore", "layout")
    required = ("hf", "mcore", "layout")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if self.opt("layout") not in LAYOUTS:
            raise ConversionError(f"{self.spec.origin}: 'layout' of convertor gated_delta_net must be one of "
                                  f"{', '.join(LAYOUTS)}, got {self.opt('layout')!r}")
        a = self.arch
        if a.linear_attention_pattern is None:
            raise ConversionError(f"{self.spec.origin}: convertor 'gated_delta_net' needs an architecture with "
                                  "linear attention layers (linear_attention_pattern)")
        assert (a.linear_num_key_heads and a.linear_num_value_heads and a.linear_key_head_dim
                and a.linear_value_head_dim and a.linear_conv_kernel_dim)  # ModelArch checks them with the pattern
        self._s = _Sizes(a.linear_num_key_heads, a.linear_num_value_heads, a.linear_key_head_dim,
                         a.linear_value_head_dim, a.linear_conv_kernel_dim)

    def _hf(self, name: str) -> str:
        return self.hf_name(self.opt("hf") + name)

    def _mc(self, name: str) -> str:
        return self.mcore_name(self.opt("mcore") + name)

    def _hf_projections(self) -> dict[str, tuple[int, ...]]:
        s, h = self._s, self.arch.hidden_size
        if self.opt("layout") == "fused":
            return {"in_proj_qkvz.weight": (2 * s.qk + 2 * s.v, h), "in_proj_ba.weight": (2 * s.nv, h)}
        return {"in_proj_qkv.weight": (2 * s.qk + s.v, h), "in_proj_z.weight": (s.v, h),
                "in_proj_b.weight": (s.nv, h), "in_proj_a.weight": (s.nv, h)}

    def _one_to_one(self) -> list[tuple[str, str, tuple[int, ...]]]:
        s = self._s
        return [("conv1d.weight", "conv1d.weight", (2 * s.qk + s.v, 1, s.kernel)),
                ("A_log", "A_log", (s.nv,)),
                ("dt_bias", "dt_bias", (s.nv,)),
                ("out_proj.weight", "out_proj.weight", (self.arch.hidden_size, s.v))]

    def hf_shapes(self):
        shapes: dict[str, tuple[int, ...]] = {self._hf(n): shape for n, shape in self._hf_projections().items()}
        shapes.update({self._hf(hf): shape for hf, _, shape in self._one_to_one()})
        shapes[self._hf("norm.weight")] = (self._s.dv,)
        return shapes

    def canonical(self):
        s, h = self._s, self.arch.hidden_size
        in_proj, conv, out_proj = self._mc("in_proj.weight"), self._mc("conv1d.weight"), self._mc("out_proj.weight")
        return [
            CanonicalTensor(in_proj, (sum(s.in_proj), h), Sections(s.in_proj, IN_PROJ_BLOCKS), in_proj.rsplit(".", 1)[0]),
            CanonicalTensor(conv, (2 * s.qk + s.v, 1, s.kernel), Sections((s.qk, s.qk, s.v), CONV_BLOCKS)),
            CanonicalTensor(self._mc("A_log"), (s.nv,), Split.COLUMN),
            CanonicalTensor(self._mc("dt_bias"), (s.nv,), Split.COLUMN),
            CanonicalTensor(self._mc("out_norm.weight"), (s.dv,), Split.REPLICATED),
            CanonicalTensor(out_proj, (h, s.v), Split.ROW, out_proj.rsplit(".", 1)[0]),
        ]

    # --- in_proj ------------------------------------------------------------------------
    def _fused_group_rows(self) -> list[tuple[str, int]]:
        """(block, rows) of one key-head group of ``in_proj_qkvz``, then of ``in_proj_ba``."""
        s = self._s
        return [("q", s.dk), ("k", s.dk), ("v", s.r * s.dv), ("z", s.r * s.dv)]

    def _blocks_from_hf(self, hf: Mapping[str, Expr]) -> list[Expr]:
        """Megatron's six in_proj blocks (all heads each) from the HF projections."""
        s = self._s
        if self.opt("layout") == "split":
            qkv = hf[self._hf("in_proj_qkv.weight")]
            return [te.narrow(qkv, 0, 0, s.qk), te.narrow(qkv, 0, s.qk, s.qk), te.narrow(qkv, 0, 2 * s.qk, s.v),
                    hf[self._hf("in_proj_z.weight")], hf[self._hf("in_proj_b.weight")], hf[self._hf("in_proj_a.weight")]]
        qkvz, ba = hf[self._hf("in_proj_qkvz.weight")], hf[self._hf("in_proj_ba.weight")]
        rows = self._fused_group_rows()
        group = sum(n for _, n in rows)
        blocks: dict[str, list[Expr]] = {name: [] for name in ("q", "k", "v", "z", "b", "a")}
        for g in range(s.nk):
            start = g * group
            for name, n in rows:
                blocks[name].append(te.narrow(qkvz, 0, start, n))
                start += n
            blocks["b"].append(te.narrow(ba, 0, g * 2 * s.r, s.r))
            blocks["a"].append(te.narrow(ba, 0, g * 2 * s.r + s.r, s.r))
        return [te.cat(parts, 0) for parts in blocks.values()]

    def _hf_from_blocks(self, in_proj: Expr) -> dict[str, Expr]:
        s = self._s
        starts = [sum(s.in_proj[:i]) for i in range(len(s.in_proj))]
        q, k, v, z, b, a = (te.narrow(in_proj, 0, st, n) for st, n in zip(starts, s.in_proj))
        if self.opt("layout") == "split":
            return {self._hf("in_proj_qkv.weight"): te.cat([q, k, v], 0), self._hf("in_proj_z.weight"): z,
                    self._hf("in_proj_b.weight"): b, self._hf("in_proj_a.weight"): a}
        qkvz: list[Expr] = []
        ba: list[Expr] = []
        for g in range(s.nk):
            qkvz += [te.narrow(q, 0, g * s.dk, s.dk), te.narrow(k, 0, g * s.dk, s.dk),
                     te.narrow(v, 0, g * s.r * s.dv, s.r * s.dv), te.narrow(z, 0, g * s.r * s.dv, s.r * s.dv)]
            ba += [te.narrow(b, 0, g * s.r, s.r), te.narrow(a, 0, g * s.r, s.r)]
        return {self._hf("in_proj_qkvz.weight"): te.cat(qkvz, 0), self._hf("in_proj_ba.weight"): te.cat(ba, 0)}

    def _norm_shift(self) -> float:
        return 1.0 if self.arch.layernorm_zero_centered_gamma else 0.0

    # --- the contract ---------------------------------------------------------------------
    def to_canonical(self, hf: Mapping[str, Expr]):
        out = {self._mc("in_proj.weight"): te.cat(self._blocks_from_hf(hf), 0)}
        out.update({self._mc(mc): hf[self._hf(name)] for name, mc, _ in self._one_to_one()})
        out[self._mc("out_norm.weight")] = te.offset(hf[self._hf("norm.weight")], -self._norm_shift())
        return out

    def to_hf(self, canonical: Mapping[str, Expr]):
        out = self._hf_from_blocks(canonical[self._mc("in_proj.weight")])
        out.update({self._hf(name): canonical[self._mc(mc)] for name, mc, _ in self._one_to_one()})
        out[self._hf("norm.weight")] = te.offset(canonical[self._mc("out_norm.weight")], self._norm_shift())
        return out
