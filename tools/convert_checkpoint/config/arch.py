"""The model architecture, in Megatron-Core terms, and its derivation from HF ``config.json``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..errors import ConversionError
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
    max_position_embeddings: int | None = None
    num_experts: int | None = None  # routed experts per MoE layer; None for dense models
    moe_ffn_hidden_size: int | None = None

    def __post_init__(self) -> None:
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

    # Symbolic sizes that YAML shapes may name (e.g. ``shape: [hidden_size, q_dim]``).
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.kv_channels

    def size(self, symbol: str | int) -> int:
        if isinstance(symbol, int):
            return symbol
        value = getattr(self, symbol, None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConversionError(f"unknown size symbol {symbol!r} in a convert YAML shape")
        return value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str) -> "ModelArch":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConversionError(f"{origin}: unknown architecture field(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConversionError(f"{origin}: missing architecture field(s) {', '.join(missing)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "ModelArch":
        return dataclasses.replace(self, **changes)


def load_arch_yaml(path: str) -> dict[str, Any]:
    """An architecture YAML (``--config_file``): a flat mapping of ModelArch fields."""
    return load_mapping(path, "--config_file")


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
    return ModelArch.from_dict(values, "config.json")


def hf_config_from_arch(arch: ModelArch, model_type: str, architectures: list[str], field_map: Mapping[str, tuple[str, ...]]) -> dict:
    """A config.json for a checkpoint whose original HF config is unknown."""
    config: dict[str, Any] = {"architectures": list(architectures), "model_type": model_type}
    for arch_field, hf_keys in field_map.items():
        key = hf_keys[0]
        value = getattr(arch, arch_field)
        if value is None or "." in key:
            continue
        config[key] = value
    return config
