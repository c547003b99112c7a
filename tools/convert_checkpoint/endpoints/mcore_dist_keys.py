"""Megatron-Core's ``torch_dist`` sharded keys for GPTModel, and back to canonical names.

A torch_dist key names a global tensor, independent of the parallel layout. Leading axes may
index it (checked against megatron-core 0.16):

* stacked layers ``decoder.layers.<rest>``: a leading ``[num_layers]`` axis (the global layer
  index), used unless the layer kinds vary (``--moe-layer-freq`` a list), when every layer has
  its own keys ``decoder.layers.<i>.<rest>``;
* routed experts ``...mlp.experts.experts.linear_fc<n>.weight``: an ``[num_experts]`` axis
  after the layer axis, whatever the expert module (sequential, grouped GEMM);
* MTP layers always have their own keys ``mtp.layers.<k>.…``;
* hybrid models (linear_attention_freq) have per-layer keys, and a GatedDeltaNet saves its
  ``in_proj.weight`` and ``conv1d.weight`` one block per key, ``<name>.<block>`` (the
  canonical tensor's ``Sections``; read back with :func:`section_of`).

Norm names follow the layer spec: Transformer Engine fuses a norm into the linear after it
where that linear exists (``placement.TE_FUSED_NORMS``); the local spec of a non-MLA layer maps
``input_layernorm.`` and ``pre_mlp_layernorm.`` to the same fused names, on MoE layers too
(its ``sharded_state_dict_keys_map``), and an MLA layer keeps local names.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from ..layout.placement import EXPERT_RE, MTP_INNER_LAYER, MTP_INNER_NAMES, TE_FUSED_NORMS

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP = re.compile(rf"^(mtp\.layers\.\d+\.)(?:({'|'.join(MTP_INNER_NAMES)})\.)?(.+)$")
_DIST_EXPERT = re.compile(r"^mlp\.experts\.experts\.(linear_fc[12])\.(weight|bias)$")
_LOCAL_SPEC_MAP = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                   ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
# GatedDeltaNet's blocks, in row order (megatron-core 0.16 GatedDeltaNet.sharded_state_dict)
SECTION_KEYS = {"self_attention.in_proj.weight": ("query", "key", "value", "z", "beta", "alpha"),
                "self_attention.conv1d.weight": ("query", "key", "value")}


@dataclass(frozen=True)
class Slot:
    """Where a canonical tensor lives in a torch_dist checkpoint: the key, and its index along
    the key's leading axes (layer, expert) out of ``grid``."""

    key: str
    index: tuple[int, ...] = ()
    grid: tuple[int, ...] = ()

    def extra_state_key(self, module_key: str) -> str:
        """Megatron's ShardedObject key of the module's ``_extra_state`` at this slot."""
        index, grid = (self.index, self.grid) if self.grid else ((0,), (1,))
        return f"{module_key}._extra_state/shard_{'.'.join(map(str, index))}_{'.'.join(map(str, grid))}"


@dataclass(frozen=True)
class KeyRules:
    transformer_impl: str  # transformer_engine or local
    stacked: bool  # decoder layers share keys with a layer axis
    num_layers: int
    num_experts: int
    mtp_inner_name: str = MTP_INNER_LAYER


def _fused(prefix: str, rest: str, rules: KeyRules, names: Collection[str]) -> str:
    """A layer tensor's name under the spec (``prefix`` + ``rest`` is the canonical name)."""
    if rules.transformer_impl == "transformer_engine":
        for norm, fused, linear in TE_FUSED_NORMS:
            if rest.startswith(norm) and prefix + linear in names:
                return fused + rest[len(norm):]
        return rest
    if prefix + "self_attention.linear_qkv.weight" in names:  # not MLA: the local spec's keys map
        for norm, fused in _LOCAL_SPEC_MAP:
            if rest.startswith(norm):
                return fused + rest[len(norm):]
    if prefix + "self_attention.in_proj.weight" in names and rest.startswith("input_layernorm."):
        return "self_attention.in_proj.layer_norm_" + rest[len("input_layernorm."):]  # a delta-net layer
    return rest


def section_of(name: str) -> tuple[str, tuple[str, ...], int] | None:
    """(canonical name, its block names, this block's index) of a GatedDeltaNet block key's name."""
    for tail, blocks in SECTION_KEYS.items():
        for i, block in enumerate(blocks):
            if name.endswith(f".{tail}.{block}"):
                return name[: -len(block) - 1], blocks, i
    return None


def _expert(rest: str) -> tuple[str, int | None]:
    m = EXPERT_RE.match("." + rest)
    if m is None:
        return rest, None
    _, expert, linear, suffix = m.groups()
    return f"mlp.experts.experts.{linear}.{suffix}", int(expert)


def slot(name: str, rules: KeyRules, names: Collection[str]) -> Slot:
    """The torch_dist slot of canonical tensor ``name`` (``names``: every canonical name)."""
    m = _LAYER.match(name)
    if m:
        layer, prefix = int(m.group(1)), f"decoder.layers.{m.group(1)}."
        rest, expert = _expert(_fused(prefix, m.group(2), rules, names))
        inner = ((expert,), (rules.num_experts,)) if expert is not None else ((), ())
        if rules.stacked:
            return Slot(f"decoder.layers.{rest}", (layer, *inner[0]), (rules.num_layers, *inner[1]))
        return Slot(f"decoder.layers.{layer}.{rest}", *inner)
    m = _MTP.match(name)
    if m and m.group(2):
        head = m.group(1)
        rest, expert = _expert(_fused(f"{head}{m.group(2)}.", m.group(3), rules, names))
        key = f"{head}{rules.mtp_inner_name}.{rest}"
        return Slot(key, (expert,), (rules.num_experts,)) if expert is not None else Slot(key)
    return Slot(name)


# --- back to canonical names --------------------------------------------------------------

_UNFUSE = tuple((fused, norm) for norm, fused, _ in TE_FUSED_NORMS)
_STACKED = re.compile(r"^decoder\.layers\.(?!\d+\.)(.+)$")


@dataclass(frozen=True)
class ParsedKey:
    """A torch_dist key read back: how many leading axes index layers/experts, and the
    canonical name for given indices along them."""

    key: str
    axes: tuple[str, ...]  # "layer" / "expert", in order
    head: str  # canonical name up to the layer number, or the whole name
    rest: str  # canonical name after the layer number ("" when not a layer tensor)
    expert_rest: bool  # rest has an expert number to insert

    def canonical(self, index: tuple[int, ...], layer: int | None = None) -> str:
        values = dict(zip(self.axes, index))
        rest = self.rest
        if self.expert_rest:
            m = _DIST_EXPERT.match(rest)
            assert m is not None
            rest = f"mlp.experts.local_experts.{values['expert']}.{m.group(1)}.{m.group(2)}"
        if "layer" in values:
            return f"decoder.layers.{values['layer']}.{rest}"
        return f"{self.head}{rest}" if self.rest else self.head


def _unfuse(rest: str) -> str:
    for fused, norm in _UNFUSE:
        if rest.startswith(fused):
            return norm + rest[len(fused):]
    return rest


def parse_key(key: str) -> ParsedKey | None:
    """A model tensor key, or None for keys of other kinds (optimizer, RNG, ...)."""
    m = _STACKED.match(key)
    if m:
        rest = _unfuse(m.group(1))
        expert = bool(_DIST_EXPERT.match(rest))
        return ParsedKey(key, ("layer", "expert") if expert else ("layer",), "", rest, expert)
    m = _LAYER.match(key)
    if m:
        rest = _unfuse(m.group(2))
        expert = bool(_DIST_EXPERT.match(rest))
        return ParsedKey(key, ("expert",) if expert else (), f"decoder.layers.{m.group(1)}.", rest, expert)
    m = _MTP.match(key)
    if m and m.group(2):
        rest = _unfuse(m.group(3))
        expert = bool(_DIST_EXPERT.match(rest))
        return ParsedKey(key, ("expert",) if expert else (), f"{m.group(1)}{MTP_INNER_LAYER}.", rest, expert)
    if key.startswith(("embedding.", "decoder.", "output_layer.", "mtp.")):
        return ParsedKey(key, (), key, "", False)
    return None


def mtp_inner_name(key: str) -> str | None:
    m = _MTP.match(key)
    return m.group(2) if m else None
