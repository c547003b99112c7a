"""LoongForge's model YAML (``--config_file``): flat Megatron argument names plus ``_target_``
and ``model_type``, read as ModelArch field values (:func:`read_model_yaml`), with our family
when the file tells it.

Rules for the model YAML's keys:

- a key in ``_MAPPED`` (or ``group_query_attention``, ``moe_layer_freq``,
  ``untie_embeddings_and_output_weights``) gives an architecture field;
- a key in ``_FIXED`` states a structural fact every supported family has (SwiGLU, no linear
  biases, RoPE ...): any other value is an error;
- ``_target_``, ``model_type`` and ``convert_file`` only help to name the family;
- a key in ``_IGNORED`` cannot change a tensor (training, numerics, inference-time routing and
  RoPE scaling, parallelism): accepted and ignored. So is any key one of whose ``_``-separated
  words is in ``_TRAINING_WORDS`` (``hidden_dropout``, ``bias_swiglu_fusion``,
  ``recompute_granularity`` ...);
- any other key is an error naming it: a model fact we do not understand must not be dropped.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConversionError
from ..yaml_file import load_mapping
from ._common import _MAPPED, _fmt, _plain, _typed
from .convert_yaml import _CONVERT_DIRS, _CONVERT_FILES, _UNSUPPORTED, _fit_traits
from .layer_freq import parse_layer_freq

# --------------------------------------------------------------------------------------------
# Model YAML keys

# Read, but computed into fields (see _model_values).
_COMPUTED = ("num_query_groups", "group_query_attention", "moe_layer_freq", "untie_embeddings_and_output_weights")

# Structural facts shared by every family we convert: the YAML may state them, with these values.
_FIXED: dict[str, Any] = {
    "swiglu": True,
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "position_embedding_type": "rope",
    "add_position_embedding": False,
    "rotary_interleaved": False,
    "apply_layernorm_1p": False,
    "layernorm_zero_centered_gamma": False,
    "apply_residual_connection_post_layernorm": False,
}

# Only name the family.
_FAMILY_KEYS = ("_target_", "model_type", "convert_file")

# Accepted and ignored: they cannot change any tensor's name, shape or value.
_IGNORED = frozenset({
    # attention / numerics at run time
    "attention_softmax_in_fp32", "apply_query_key_layer_scaling", "persist_layer_norm", "attention_backend",
    "use_flash_attn", "transformer_impl", "softmax_scale", "qk_clip", "qk_l2_norm",
    # RoPE details that live in no weight (percent, scaling, YaRN)
    "rotary_emb_func", "rotary_percent", "rotary_seq_len_interpolation_factor", "rotary_scaling_factor",
    "use_rope_scaling", "rope_scaling", "rope_scaling_factor", "rope_type", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "no_rope_freq", "mrope_section",
    # MoE routing at run time (the router weight and bias are tensors; how they are used is not)
    "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_load_balancing_type", "moe_router_bias_update_rate",
    "moe_token_dispatcher_type", "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity",
    "moe_grouped_gemm",  # the MCore layout comes from --moe-grouped-gemm
    "moe_per_layer_logging", "moe_use_legacy_grouped_gemm", "moe_router_force_load_balancing",
    "moe_shared_expert_overlap", "moe_apply_probs_on_input", "moe_layer_recompute", "num_experts_per_tok",
    "mtp_loss_scaling_factor",
    # vocab padding and sequence length: the converter's flags govern them
    "make_vocab_size_divisible_by", "padded_vocab_size", "seq_length", "variable_seq_lengths", "max_sequence_length",
    "use_cpu_initialization", "init_method_std", "params_dtype",
})

# A key with one of these `_`-separated words is about training or the runtime, never a tensor.
_TRAINING_WORDS = frozenset({
    "dropout", "fusion", "fused", "recompute", "recomputation", "init", "initialization", "seed", "loss", "aux",
    "overlap", "flash", "graph", "graphs", "checkpoint", "checkpointing", "distributed", "parallel", "batch",
    "lr", "optimizer", "grad", "gradient", "logging", "log", "wandb", "tensorboard", "profile", "tokenizer", "data",
    "train", "training", "eval", "fp8", "fp16", "bf16", "fp32", "offload", "jitter", "capacity", "dispatcher",
    "deepep", "deterministic", "nccl", "timers", "jit", "cpu", "dtype", "pipeline", "drop",
})

# null means a value for these (no q down-projection; no experts); for the others, "not stated".
_NULL_IS_VALUE = frozenset({"q_lora_rank", "num_experts"})

# The model YAML's _target_ class (lower case) / model_type -> family, when nothing better says.
_TARGETS = {"llamaconfig": "llama", "qwen2config": "qwen2", "qwen2_5config": "qwen2", "qwen3config": "qwen3",
            "mixtralconfig": "mixtral"}
_MODEL_TYPES = {"llama": "llama", "mixtral": "mixtral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
                "qwen2_moe": "qwen2_moe", "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3",
                "kimi_k2": "deepseek_v3"}


# --------------------------------------------------------------------------------------------
# Detection


def _is_model_keys(keys: Iterable[str]) -> bool:
    keys = set(keys)
    if "family" in keys:
        return False  # ours
    return bool(keys & {"_target_", "model_type"}) or bool(
        keys & (set(_COMPUTED) | set(_FIXED) | _IGNORED | {"convert_file", "vocab_size_in_config_file",
                                                           "moe_shared_expert_intermediate_size", "layernorm_epsilon"}))


def is_model_yaml(data: Mapping[str, Any]) -> bool:
    """LoongForge's model YAML (``_target_``/``model_type`` or Megatron names not in our schema),
    as opposed to our architecture YAML (ModelArch fields, optionally ``family``)."""
    return isinstance(data, Mapping) and _is_model_keys(data)


def is_model_yaml_file(path: str | None) -> bool:
    if not path:
        return False
    return is_model_yaml(load_mapping(path, "--config_file"))


# --------------------------------------------------------------------------------------------
# Reading


def _is_training_only(key: str) -> bool:
    return key in _IGNORED or bool(set(key.lower().split("_")) & _TRAINING_WORDS)


@dataclass
class ModelYaml:
    """What a LoongForge model YAML says, as ModelArch field values."""

    path: str
    values: dict[str, Any]
    keys: dict[str, str]  # field -> the YAML key it came from (for messages)
    shown: dict[str, Any]  # field -> the value as the YAML has it (e.g. untie... for tied_embeddings)
    family: str | None
    raw: dict[str, Any] = field(repr=False)


def _read_model(path: str, data: Mapping[str, Any]) -> ModelYaml:
    where = f"--config_file {path}"
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    shown: dict[str, Any] = {}

    def put(arch_field: str, value: Any, key: str, as_shown: Any = None) -> None:
        if arch_field in values and values[arch_field] != value:
            raise ConversionError(f"{where}: {key} {_fmt(value)} disagrees with {keys[arch_field]} {_fmt(shown[arch_field])}")
        values[arch_field], keys[arch_field] = value, key
        shown[arch_field] = value if as_shown is None else as_shown

    for key, raw in data.items():
        if not isinstance(key, str):
            raise ConversionError(f"{where}: key {key!r} is not a name")
        if key in _MAPPED:
            arch_field = _MAPPED[key]
            value = _plain(where, key, raw)
            if value is None:
                if arch_field in _NULL_IS_VALUE:
                    put(arch_field, None, key)
                elif arch_field == "mtp_num_layers":
                    put(arch_field, 0, key, None)
                continue
            put(arch_field, _typed(where, key, arch_field, value), key)
        elif key in _FIXED:
            value = _plain(where, key, raw)
            if value != _FIXED[key]:
                raise ConversionError(f"{where}: {key} {_fmt(value)} is not supported (every family we convert has {_fmt(_FIXED[key])})")
        elif key in _COMPUTED or key in _FAMILY_KEYS:
            continue
        elif _is_training_only(key):
            continue
        else:
            raise ConversionError(
                f"{where}: unknown key {key!r} (not an architecture value we read, and not one we know to be training-only)")

    # group_query_attention false => Megatron ignores num_query_groups: one group per head.
    gqa = _plain(where, "group_query_attention", data.get("group_query_attention"))
    if gqa is not None and not isinstance(gqa, bool):
        raise ConversionError(f"{where}: group_query_attention must be true or false, got {gqa!r}")
    groups = _plain(where, "num_query_groups", data.get("num_query_groups"))
    if gqa is False or (gqa is None and groups is None):
        if "num_attention_heads" in values:
            put("num_query_groups", values["num_attention_heads"],
                "num_attention_heads (group_query_attention false)" if gqa is False else "num_attention_heads (no num_query_groups)")
    elif groups is None:
        raise ConversionError(f"{where}: group_query_attention is true but num_query_groups is not given")
    else:
        put("num_query_groups", _typed(where, "num_query_groups", "num_query_groups", groups), "num_query_groups")

    untie = _plain(where, "untie_embeddings_and_output_weights", data.get("untie_embeddings_and_output_weights"))
    if untie is not None:
        if not isinstance(untie, bool):
            raise ConversionError(f"{where}: untie_embeddings_and_output_weights must be true or false, got {untie!r}")
        put("tied_embeddings", not untie, "untie_embeddings_and_output_weights", untie)

    if values.get("multi_latent_attention"):
        # Megatron's MLA ignores kv_channels; our families take it as v_head_dim.
        if values.get("v_head_dim"):
            values["kv_channels"], keys["kv_channels"], shown["kv_channels"] = values["v_head_dim"], "v_head_dim", values["v_head_dim"]
        # DeepSeek's config.json counts shared experts (n_shared_experts); Megatron gives their total size.
        shared, size = values.get("shared_expert_ffn_hidden_size"), values.get("moe_ffn_hidden_size")
        if shared and size and shared % size == 0:
            put("num_shared_experts", shared // size, "moe_shared_expert_intermediate_size / moe_ffn_hidden_size")
    elif "kv_channels" not in values and values.get("hidden_size") and values.get("num_attention_heads"):
        put("kv_channels", values["hidden_size"] // values["num_attention_heads"], "hidden_size / num_attention_heads (no kv_channels)")

    freq = _plain(where, "moe_layer_freq", data.get("moe_layer_freq"), allow_moe_freq=True)
    if freq is not None and values.get("num_experts"):
        pattern = _layer_pattern(where, freq, values.get("num_layers"))
        put("moe_layer_pattern", None if all(pattern) else tuple(pattern), "moe_layer_freq", list(pattern))

    return ModelYaml(path, values, keys, shown, _model_family(where, data, values), dict(data))


def _layer_pattern(where: str, freq: Any, num_layers: int | None) -> list[int]:
    if isinstance(freq, str):  # Megatron's command-line form, unquoted
        try:
            freq = parse_layer_freq(freq)
        except ValueError as e:
            raise ConversionError(f"{where}: moe_layer_freq {freq!r} is not a list expression of the form [0]*3+[1]*58 ({e})") from None
    if num_layers is None:
        raise ConversionError(f"{where}: moe_layer_freq needs num_layers")
    if isinstance(freq, int) and not isinstance(freq, bool) and freq > 0:
        return [1 if layer % freq == 0 else 0 for layer in range(num_layers)]  # Megatron: every freq-th layer
    if isinstance(freq, list) and all(isinstance(v, int) and not isinstance(v, bool) and v in (0, 1) for v in freq):
        if len(freq) != num_layers:
            raise ConversionError(f"{where}: moe_layer_freq lists {len(freq)} layers, but num_layers is {num_layers}")
        return list(freq)
    raise ConversionError(f"{where}: moe_layer_freq must be a positive integer or a list of 0/1, got {freq!r}")


def _model_family(where: str, data: Mapping[str, Any], values: Mapping[str, Any]) -> str | None:
    """Our family from the model YAML: its convert_file's name, else _target_/model_type."""
    moe = bool(values.get("num_experts"))
    mla = bool(values.get("multi_latent_attention"))
    convert_file = data.get("convert_file")
    if isinstance(convert_file, str) and convert_file.strip():
        tail = convert_file.replace("\\", "/").rstrip("/")
        stem = os.path.splitext(os.path.basename(tail))[0]
        parent = os.path.basename(os.path.dirname(os.path.dirname(tail)))
        name = _CONVERT_FILES.get(stem) or (None if stem in _UNSUPPORTED else _CONVERT_DIRS.get(parent))
        if name:
            return _fit_or_none(where, name, moe, mla)
    target = str(data.get("_target_") or "").rsplit(".", 1)[-1].lower()
    model_type = str(data.get("model_type") or "").lower()
    name = _TARGETS.get(target) or _MODEL_TYPES.get(model_type)
    if name is None and (mla or "deepseek" in target or model_type == "deepseek"):
        # DeepSeek-V3 (and Kimi-K2) has the router bias and MTP; V2 has neither.
        if values.get("router_expert_bias") or values.get("mtp_num_layers"):
            name = "deepseek_v3"
        elif values.get("router_expert_bias") is False:
            name = "deepseek_v2"
    if name is None:
        return None
    return _fit_or_none(where, name, moe, mla)


def _fit_or_none(where: str, name: str, moe: bool, mla: bool) -> str | None:
    """A model YAML's family is a hint: one that does not fit its sizes is no family."""
    try:
        return _fit_traits(where, name, moe, mla, "its sizes")
    except ConversionError:
        return None


def read_model_yaml(path: str) -> ModelYaml:
    data = load_mapping(path, "--config_file")
    if not is_model_yaml(data):
        raise ConversionError(f"--config_file {path}: not a LoongForge model YAML (no _target_/model_type or Megatron argument names)")
    return _read_model(path, data)
