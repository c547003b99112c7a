"""The model architecture, in Megatron-Core terms, and its derivation from HF ``config.json``."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConversionError
from . import loongforge
from .yaml_file import load_mapping


@dataclass(frozen=True)
class ModelArch:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-6
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tied_embeddings: bool = False
    rotary_base: float | None = None
    rotary_percent: float = 1.0  # the share of each head's dims that RoPE rotates (GLM-4.5: 0.5)
    max_position_embeddings: int | None = None
    num_experts: int | None = None  # routed experts per MoE layer; None for dense models
    moe_ffn_hidden_size: int | None = None
    # Which decoder layers are MoE (1) or dense (0), Megatron's list form of --moe-layer-freq.
    # None: every layer of a MoE model is MoE.
    moe_layer_pattern: tuple[int, ...] | None = None
    num_shared_experts: int | None = None
    shared_expert_ffn_hidden_size: int | None = None  # default: num_shared_experts x moe_ffn
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert (gate_weight)
    router_expert_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    # Multi-latent attention (DeepSeek): q_lora_rank None means no q down-projection (V2-Lite).
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_head_dim: int | None = None  # the no-position part of each q/k head
    qk_pos_emb_head_dim: int | None = None  # the rotary part
    v_head_dim: int | None = None
    mtp_num_layers: int = 0  # DeepSeek multi-token-prediction layers after the decoder
    # DeepSeek-V3.2's sparse-attention indexer (Megatron's --dsa-indexer-n-heads / -head-dim).
    dsa_indexer_n_heads: int | None = None
    dsa_indexer_head_dim: int | None = None
    # Hybrid linear attention (Qwen3-Next, Qwen3.5): per layer 1 = gated delta-net, 0 = full attention
    # (Megatron's list form of --linear-attention-freq); None: every layer has full attention.
    linear_attention_pattern: tuple[int, ...] | None = None
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int | None = None
    attention_output_gate: bool = False  # q_proj carries a sigmoid gate per head (Megatron's attention_output_gate)
    layernorm_zero_centered_gamma: bool = False  # norms compute x * (1 + weight)

    # Vision-language models: the vision tower's sizes (config/vision.py's VisionArch fields) as
    # sorted (name, value) pairs, so the architecture stays hashable and survives the rank files.
    vision: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        self._check_linear_attention()
        if self.vision is not None:
            pairs = self.vision.items() if isinstance(self.vision, Mapping) else self.vision
            object.__setattr__(self, "vision", tuple(sorted((str(k), _frozen(v)) for k, v in pairs)))
        if self.moe_layer_pattern is not None:
            object.__setattr__(self, "moe_layer_pattern", tuple(int(x) for x in self.moe_layer_pattern))
            if len(self.moe_layer_pattern) != self.num_layers or set(self.moe_layer_pattern) - {0, 1}:
                raise ConversionError(
                    f"moe_layer_pattern must list 0 or 1 for each of the {self.num_layers} layers, got {list(self.moe_layer_pattern)}"
                )
        if self.shared_expert_ffn_hidden_size is None and self.num_shared_experts and self.moe_ffn_hidden_size:
            object.__setattr__(self, "shared_expert_ffn_hidden_size", self.num_shared_experts * self.moe_ffn_hidden_size)
        if not isinstance(self.mtp_num_layers, int) or self.mtp_num_layers < 0:
            raise ConversionError(f"mtp_num_layers must be a non-negative integer, got {self.mtp_num_layers!r}")
        if self.multi_latent_attention:
            for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
                value = getattr(self, name)
                if not isinstance(value, int) or value <= 0:
                    raise ConversionError(f"multi-latent attention needs a positive {name}, got {value!r}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConversionError(f"architecture field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConversionError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_query_groups {self.num_query_groups}"
            )
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ConversionError(f"normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")

    def _check_linear_attention(self) -> None:
        pattern = self.linear_attention_pattern
        if pattern is None:
            return
        object.__setattr__(self, "linear_attention_pattern", tuple(int(x) for x in pattern))
        if len(pattern) != self.num_layers or set(pattern) - {0, 1}:
            raise ConversionError(f"the linear/full attention pattern must list 0 or 1 for each of the {self.num_layers} "
                                  f"layers, got {list(pattern)}")
        for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_conv_kernel_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConversionError(f"gated delta-net layers need a positive integer {name}, got {value!r}")
        assert self.linear_num_value_heads is not None and self.linear_num_key_heads is not None
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConversionError(f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                                  f"linear_num_key_heads {self.linear_num_key_heads}")

    def is_linear_attention_layer(self, layer: int) -> bool:
        """Decoder layer ``layer`` is a gated delta-net layer (linear attention)."""
        if self.linear_attention_pattern is None:
            return False
        return bool(self.linear_attention_pattern[min(layer, self.num_layers - 1)])

    # Symbolic sizes that YAML shapes may name (e.g. ``shape: [hidden_size, q_dim]``).
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.kv_channels

    @property
    def gated_q_dim(self) -> int:  # q_proj rows with the output gate: [q_h; gate_h] per head
        return 2 * self.q_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Decoder layer ``layer`` (MTP layers: the last decoder layer's kind) has routed experts."""
        if not self.num_experts:
            return False
        if self.moe_layer_pattern is None:
            return True
        return bool(self.moe_layer_pattern[min(layer, self.num_layers - 1)])

    @property
    def moe_layer_freq(self) -> list[int] | int:
        """Megatron's --moe-layer-freq: 1 (every layer) or the per-layer list."""
        return list(self.moe_layer_pattern) if self.moe_layer_pattern is not None else 1

    # Multi-latent attention sizes (only for multi_latent_attention, whose sizes __post_init__ checks are set).
    @property
    def mla_q_head_dim(self) -> int:
        assert self.qk_head_dim is not None and self.qk_pos_emb_head_dim is not None, "not a multi-latent attention model"
        return self.qk_head_dim + self.qk_pos_emb_head_dim

    @property
    def mla_q_dim(self) -> int:
        return self.num_attention_heads * self.mla_q_head_dim

    @property
    def mla_kv_down_dim(self) -> int:
        assert self.kv_lora_rank is not None and self.qk_pos_emb_head_dim is not None, "not a multi-latent attention model"
        return self.kv_lora_rank + self.qk_pos_emb_head_dim

    @property
    def mla_kv_up_dim(self) -> int:
        assert self.qk_head_dim is not None and self.v_head_dim is not None, "not a multi-latent attention model"
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    @property
    def mla_v_dim(self) -> int:
        assert self.v_head_dim is not None, "not a multi-latent attention model"
        return self.num_attention_heads * self.v_head_dim

    @property
    def dsa_indexer_q_dim(self) -> int:  # the indexer's wq_b rows: heads x head dim
        if not self.dsa_indexer_n_heads or not self.dsa_indexer_head_dim:
            raise ConversionError("the sparse-attention indexer needs dsa_indexer_n_heads and dsa_indexer_head_dim "
                                  "(config.json's index_n_heads / index_head_dim)")
        return self.dsa_indexer_n_heads * self.dsa_indexer_head_dim

    @property
    def double_hidden_size(self) -> int:  # MTP eh_proj input: [embedding; hidden]
        return 2 * self.hidden_size

    def size(self, symbol: str | int) -> int:
        if isinstance(symbol, int):
            return symbol
        value = getattr(self, symbol, None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConversionError(f"unknown size symbol {symbol!r} in a convert YAML shape")
        return value

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Fields newer than the rank-file format are left out at their defaults, so the files of
        # families that do not use them stay byte-identical.
        for name, default in _LATER_FIELDS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str) -> ModelArch:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConversionError(f"{origin}: unknown architecture field(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConversionError(f"{origin}: missing architecture field(s) {', '.join(missing)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> ModelArch:
        return dataclasses.replace(self, **changes)


_LATER_FIELDS: dict[str, Any] = {"rotary_percent": 1.0, "dsa_indexer_n_heads": None, "dsa_indexer_head_dim": None,
                                 "linear_attention_pattern": None, "linear_num_key_heads": None,
                                 "linear_num_value_heads": None, "linear_key_head_dim": None,
                                 "linear_value_head_dim": None, "linear_conv_kernel_dim": None,
                                 "attention_output_gate": False, "layernorm_zero_centered_gamma": False,
                                 "vision": None}


def _frozen(value: Any) -> Any:
    """Lists (e.g. Qwen3-VL's deepstack layer indexes) as tuples, so the pairs stay hashable."""
    return tuple(value) if isinstance(value, list) else value


def load_arch_yaml(path: str) -> dict[str, Any]:
    """An architecture YAML (``--config_file``): a flat mapping of ModelArch fields, or
    LoongForge's model YAML, read for the fields it states (config/loongforge/)."""
    data = load_mapping(path, "--config_file")
    if loongforge.is_convert_yaml(data):
        raise ConversionError(f"--config_file {path} is a LoongForge convert YAML; pass it as --convert_file")
    if loongforge.is_model_yaml(data):
        return loongforge.arch_values(path)
    return data


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    """Dotted keys reach into nested dicts (transformers 5 keeps rope_theta in rope_parameters)."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def arch_from_hf_config(
    config: Mapping[str, Any],
    family: str,
    field_map: Mapping[str, tuple[str, ...]],
    defaults: Mapping[str, Any],
    fixed: Mapping[str, Any],
    moe_layers: Mapping[str, Any] | None = None,
    attention_layers: Mapping[str, Any] | None = None,
) -> ModelArch:
    values: dict[str, Any] = {"family": family}
    for arch_field, hf_keys in field_map.items():
        for key in hf_keys:
            found = _lookup(config, key)
            if found is not None:
                values[arch_field] = found
                break
    for key, value in defaults.items():
        values.setdefault(key, value)
    values.update(fixed)
    # Sizes the HF config may leave implicit.
    if "num_query_groups" not in values and "num_attention_heads" in values:
        values["num_query_groups"] = values["num_attention_heads"]
    if "kv_channels" not in values and "hidden_size" in values and "num_attention_heads" in values:
        values["kv_channels"] = values["hidden_size"] // values["num_attention_heads"]
    rotary_dim = config.get("rotary_dim")  # the legacy spelling of partial RoPE (published MiniMax-M2)
    if "rotary_percent" not in values and isinstance(rotary_dim, int) and values.get("kv_channels"):
        values["rotary_percent"] = rotary_dim / values["kv_channels"]
    if values.get("num_experts") and "num_layers" in values:
        values["moe_layer_pattern"] = moe_layer_pattern(config, moe_layers or {}, values["num_layers"])
    if attention_layers and "num_layers" in values:
        values["linear_attention_pattern"] = linear_attention_pattern(config, attention_layers, values["num_layers"])
    return ModelArch.from_dict(values, "config.json")


LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"


def linear_attention_pattern(config: Mapping[str, Any], rule: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
    """Which layers are gated delta-net layers, from the family's ``hf_config.attention_layers`` rule:
    ``types`` names config.json's per-layer list (Qwen3-Next's layer_types, "linear_attention" or
    "full_attention"), ``interval`` its fallback (full_attention_interval: layer l has full
    attention when (l + 1) % interval == 0), ``default_interval`` transformers' value when
    config.json has neither."""
    unknown = sorted(set(rule) - {"types", "interval", "default_interval"})
    if unknown:
        raise ConversionError(f"convert YAML hf_config.attention_layers: unknown key(s) {', '.join(unknown)}")
    types = _lookup(config, rule["types"]) if "types" in rule else None
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            count = len(types) if isinstance(types, list) else type(types).__name__
            raise ConversionError(f"config.json: {rule['types']} has {count} entries, but num_layers is {num_layers}")
        bad = sorted({t for t in types if t not in (LINEAR_ATTENTION, FULL_ATTENTION)}, key=str)
        if bad:
            raise ConversionError(f"config.json: {rule['types']} holds {bad}; each entry must be "
                                  f"{LINEAR_ATTENTION!r} or {FULL_ATTENTION!r}")
        return tuple(int(t == LINEAR_ATTENTION) for t in types)
    interval = _lookup(config, rule["interval"]) if "interval" in rule else None
    if interval is None:
        interval = rule.get("default_interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
        raise ConversionError(f"config.json: needs {rule.get('types', 'layer_types')} or a positive "
                              f"{rule.get('interval', 'full_attention_interval')}, got {interval!r}")
    return tuple(0 if (layer + 1) % interval == 0 else 1 for layer in range(num_layers))


def moe_layer_pattern(config: Mapping[str, Any], rule: Mapping[str, Any], num_layers: int) -> tuple[int, ...] | None:
    """Which layers are MoE, from the family's ``hf_config.moe_layers`` rule and config.json.

    Rule keys name config.json keys: ``first_dense`` (DeepSeek's first_k_dense_replace: layers
    below it are dense), ``dense_list`` (Qwen's mlp_only_layers) and ``step`` (Qwen's
    decoder_sparse_step: layer l is MoE when (l + 1) % step == 0). None when all are MoE."""
    if not rule:
        return None
    unknown = sorted(set(rule) - {"first_dense", "dense_list", "step"})
    if unknown:
        raise ConversionError(f"convert YAML hf_config.moe_layers: unknown key(s) {', '.join(unknown)}")
    first_dense = int(_lookup(config, rule["first_dense"]) or 0) if "first_dense" in rule else 0
    dense_list = set(_lookup(config, rule["dense_list"]) or ()) if "dense_list" in rule else set()
    step = int(_lookup(config, rule["step"]) or 1) if "step" in rule else 1
    pattern = tuple(
        0 if (layer < first_dense or layer in dense_list or (layer + 1) % step) else 1 for layer in range(num_layers)
    )
    return None if all(pattern) else pattern


def moe_layer_config(pattern: tuple[int, ...] | None, rule: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The config.json keys of ``rule`` that give back ``pattern`` (inverse of :func:`moe_layer_pattern`)."""
    pattern = pattern or (1,) * num_layers
    dense = [layer for layer, moe in enumerate(pattern) if not moe]
    config: dict[str, Any] = {}
    if "step" in rule:
        config[rule["step"]] = 1
    if "dense_list" in rule:
        config[rule["dense_list"]] = dense
        if "first_dense" in rule:
            config[rule["first_dense"]] = 0
    elif "first_dense" in rule and dense == list(range(len(dense))):
        config[rule["first_dense"]] = len(dense)
    elif dense:
        raise ConversionError(f"dense layers {dense} cannot be written into this family's config.json")
    return config


def hf_config_from_arch(
    arch: ModelArch,
    model_type: str,
    architectures: list[str],
    field_map: Mapping[str, tuple[str, ...]],
    moe_layers: Mapping[str, Any] | None = None,
    attention_layers: Mapping[str, Any] | None = None,
) -> dict:
    """A config.json for a checkpoint whose original HF config is unknown."""
    config: dict[str, Any] = {"architectures": list(architectures), "model_type": model_type}
    for arch_field, hf_keys in field_map.items():
        key = hf_keys[0]
        value = getattr(arch, arch_field)
        if value is None or "." in key:
            continue
        config[key] = value
    if arch.num_experts and moe_layers:
        config.update(moe_layer_config(arch.moe_layer_pattern, moe_layers, arch.num_layers))
    if arch.linear_attention_pattern is not None and attention_layers and "types" in attention_layers:
        config[attention_layers["types"]] = [LINEAR_ATTENTION if x else FULL_ATTENTION for x in arch.linear_attention_pattern]
    return config
