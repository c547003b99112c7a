"""What the model YAML and the convert YAML readers share: the Megatron argument -> ModelArch
field table, the field types, a value's form in messages (:func:`_fmt`), interpolations
(:func:`_plain`: ``${moe_freq:...}`` parsed where allowed, any other ``${...}`` an error) and
type checks (:func:`_typed`).
"""
from __future__ import annotations

import math
import re
from typing import Any

from ...errors import ConversionError
from .layer_freq import freq_text, parse_layer_freq

# Megatron argument -> ModelArch field, value taken as is (after a type check).
_MAPPED: dict[str, str] = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "kv_channels": "kv_channels",
    "vocab_size_in_config_file": "vocab_size",
    "vocab_size": "vocab_size",
    "normalization": "normalization",
    "norm_epsilon": "norm_epsilon",
    "layernorm_epsilon": "norm_epsilon",  # Megatron's older name
    "add_qkv_bias": "add_qkv_bias",
    "qk_layernorm": "qk_layernorm",
    "rotary_base": "rotary_base",
    "max_position_embeddings": "max_position_embeddings",
    "num_experts": "num_experts",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size": "shared_expert_ffn_hidden_size",
    "moe_shared_expert_gate": "shared_expert_gate",
    "moe_router_enable_expert_bias": "router_expert_bias",
    "multi_latent_attention": "multi_latent_attention",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_head_dim": "qk_head_dim",
    "qk_pos_emb_head_dim": "qk_pos_emb_head_dim",
    "v_head_dim": "v_head_dim",
    "mtp_num_layers": "mtp_num_layers",
}

_INT_FIELDS = frozenset({
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "vocab_size", "max_position_embeddings", "num_experts", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size",
    "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "mtp_num_layers",
})
_FLOAT_FIELDS = frozenset({"norm_epsilon", "rotary_base"})
_BOOL_FIELDS = frozenset({"qk_layernorm", "add_qkv_bias", "multi_latent_attention", "router_expert_bias", "shared_expert_gate"})

_INTERPOLATION = re.compile(r"\$\{")
_MOE_FREQ = re.compile(r"\$\{\s*moe_freq\s*:\s*(?:\"([^\"]*)\"|'([^']*)'|([^}]*))\s*\}")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return freq_text(value)
    return str(value)


def _plain(where: str, key: str, value: Any, allow_moe_freq: bool = False) -> Any:
    """The value itself; ``${moe_freq:...}`` parsed where allowed; any other ``${...}`` an error."""
    if not isinstance(value, str) or not _INTERPOLATION.search(value):
        return value
    m = _MOE_FREQ.fullmatch(value.strip())
    if m and allow_moe_freq:
        expr = next(g for g in m.groups() if g is not None)
        try:
            return parse_layer_freq(expr)
        except ValueError as e:
            raise ConversionError(f"{where}: {key}: {value!r} is not a list expression of the form [0]*3+[1]*58 ({e})") from None
    raise ConversionError(f"{where}: {key}: {value!r} is an OmegaConf interpolation we do not evaluate; write the value itself")


def _typed(where: str, key: str, arch_field: str, value: Any) -> Any:
    if arch_field in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConversionError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if arch_field in _FLOAT_FIELDS:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConversionError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if arch_field in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ConversionError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConversionError(f"{where}: {key} must be a string, got {value!r}")
    return value
