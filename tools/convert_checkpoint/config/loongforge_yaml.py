"""LoongForge's own YAML files, read for what they say (no Hydra, no OmegaConf).

Two formats (``../shared/reference/incumbent_cli.md`` §3, §4):

- the **model YAML** (``--config_file``): flat Megatron argument names plus ``_target_`` and
  ``model_type``. :func:`arch_values` turns it into ModelArch field values.
- the **convert YAML** (``--convert_file``): ``hydra``, ``defaults`` (``<dir>@module``),
  ``args`` (``common``/``huggingface``/``mcore``), ``name_map`` and ``torch_dtype``. Its file
  name, ``defaults`` and ``name_map`` pick one of OUR families (:func:`family_name`); its
  ``args.common`` sizes are checked like the model YAML's.

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

Interpolations (``${...}``) are not evaluated, with two exceptions: ``${moe_freq:"<list
expression>"}`` in ``moe_layer_freq`` (a tiny parser for ``[a, b]*n + [c]*m``, never ``eval``)
and, in the convert YAML's ``args``, ``${module.<key>}`` (the model YAML's key). ``${oc.env:...}``
appears only in path-valued keys (``convert_file``, ``hydra.searchpath``), which are never
resolved. Anywhere else an interpolation in a key we read is an error naming the key; in a key
we ignore it is never looked at.

What is done with them: ``family.load_family`` returns our family for a LoongForge convert
YAML; ``arch.load_arch_yaml`` returns :func:`arch_values` for a model YAML (Megatron sources
take them like our architecture YAML). On a HuggingFace source they never override config.json:
:func:`cross_check` compares every value they state with it (``max_position_embeddings``, often
the training context, excepted) and stops at a disagreement with one line naming both values.

Entry points: :func:`arch_values`, :func:`family_name`, :func:`cross_check`,
:func:`read_model_yaml`, :func:`read_convert_yaml`, :func:`parse_layer_freq`, and the format
tests :func:`is_model_yaml` / :func:`is_convert_yaml` (``..._file`` for a path). This module
imports nothing of the package but the error type and the YAML reader, so ``arch.py`` and
``family.py`` can delegate to it.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConversionError
from .yaml_file import load_mapping

if TYPE_CHECKING:
    from .family import FamilySpec

# --------------------------------------------------------------------------------------------
# Model YAML keys

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

_INT_FIELDS = frozenset({
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "vocab_size", "max_position_embeddings", "num_experts", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size",
    "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "mtp_num_layers",
})
_FLOAT_FIELDS = frozenset({"norm_epsilon", "rotary_base"})
_BOOL_FIELDS = frozenset({"qk_layernorm", "add_qkv_bias", "multi_latent_attention", "router_expert_bias", "shared_expert_gate"})
# null means a value for these (no q down-projection; no experts); for the others, "not stated".
_NULL_IS_VALUE = frozenset({"q_lora_rank", "num_experts"})

# Fields never compared with config.json: Megatron YAMLs often hold the training context here.
_NOT_CROSS_CHECKED = frozenset({"family", "max_position_embeddings"})
# Compared only when config.json states them (transformers has a default otherwise).
_CHECKED_IF_STATED = frozenset({"rotary_base"})

# --------------------------------------------------------------------------------------------
# Convert YAML -> our family

_CONVERT_TOP_KEYS = frozenset({"hydra", "defaults", "args", "name_map", "torch_dtype"})
_CONVERT_MARKERS = frozenset({"defaults", "args", "name_map", "hydra"})

# LoongForge convert YAML file name (stem) -> our family (incumbent_cli.md §2).
_CONVERT_FILES: dict[str, str] = {
    "llama2_convert": "llama",
    "llama3_convert": "llama",
    "llama3_1_convert": "llama",
    "qwen1_5_convert": "qwen2",  # Qwen1.5 is Qwen2ForCausalLM
    "qwen2_convert": "qwen2",
    "qwen2_5_convert": "qwen2",
    "qwen3_convert": "qwen3",
    "qwen3_moe_convert": "qwen3_moe",
    "deepseek_v2_convert": "deepseek_v2",
    "deepseek_v2_lite_convert": "deepseek_v2",
    "deepseek_v3_convert": "deepseek_v3",
    "kimi_k2_convert": "deepseek_v3",  # Kimi-K2 has DeepSeek-V3's layout
    "kimi_k2_convert_bf16": "deepseek_v3",
    # our family names, for incumbent-format files written for them
    "llama_convert": "llama",
    "mixtral_convert": "mixtral",
    "qwen2_moe_convert": "qwen2_moe",
}
# Its directory names (``defaults: [<dir>@module: ...]``, the folder above ckpt_convert/).
_CONVERT_DIRS: dict[str, str] = {
    "llama2": "llama", "llama3": "llama", "llama": "llama",
    "qwen2": "qwen2", "qwen2.5": "qwen2", "qwen3": "qwen3",
    "deepseek2": "deepseek_v2", "deepseek3": "deepseek_v3", "kimi_k2": "deepseek_v3",
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
    "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3",
}
# Its convert YAMLs (and directories) for models we do not convert.
_UNSUPPORTED: dict[str, str] = {
    "qwen_convert": "Qwen (v1)",
    "deepseek_v3_2_convert": "DeepSeek-V3.2 (sparse attention)",
    "deepseek_v4_convert": "DeepSeek-V4",
    "glm5_convert": "GLM-5", "glm5_2_convert": "GLM-5.2",
    "internlm2_5_convert": "InternLM2.5",
    "mimo_convert": "MiMo",
    "minimax_convert": "MiniMax",
    "minicpm_v_4_6_llm_convert": "MiniCPM-V 4.6",
    "ernie4_5_vl_llm_convert": "ERNIE 4.5 VL",
    "qwen2_5_convert_intern": "Qwen2.5 inside InternVL", "qwen2_5_convert_llm": "Qwen2.5-VL's language model",
    "qwen3_convert_intern": "Qwen3 inside InternVL", "qwen3_convert_llava": "Qwen3 inside LLaVA",
    "qwen3_moe_convert_intern": "Qwen3-MoE inside InternVL", "qwen3_moe_convert_qwen3vl": "Qwen3-VL's language model",
    "qwen3_5_dense_convert": "Qwen3.5", "qwen3_5_moe_convert": "Qwen3.5-MoE",
    "qwen3_6_dense_convert": "Qwen3.6", "qwen3_6_moe_convert": "Qwen3.6-MoE",
    "qwen3_next_moe_convert": "Qwen3-Next",
    "deepseek4": "DeepSeek-V4", "glm5": "GLM-5", "glm5.2": "GLM-5.2", "internlm2.5": "InternLM2.5", "mimo": "MiMo",
    "minimax": "MiniMax", "minicpm_v_4_6": "MiniCPM-V 4.6", "ernie4_5_vl": "ERNIE 4.5 VL",
    "image_encoder": "vision encoders", "image_projector": "vision adapters", "qwen3.5": "Qwen3.5",
    "qwen3.6": "Qwen3.6", "qwen3_next": "Qwen3-Next", "qwen3_vl": "Qwen3-VL", "qwen2.5vl": "Qwen2.5-VL",
}
# What our families have: routed experts, multi-latent attention; the MoE/dense sibling.
_MOE_FAMILIES = frozenset({"qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"})
_MLA_FAMILIES = frozenset({"deepseek_v2", "deepseek_v3"})
_SIBLING = {"qwen3": "qwen3_moe", "qwen3_moe": "qwen3", "qwen2": "qwen2_moe", "qwen2_moe": "qwen2"}

# The model YAML's _target_ class (lower case) / model_type -> family, when nothing better says.
_TARGETS = {"llamaconfig": "llama", "qwen2config": "qwen2", "qwen2_5config": "qwen2", "qwen3config": "qwen3",
            "mixtralconfig": "mixtral"}
_MODEL_TYPES = {"llama": "llama", "mixtral": "mixtral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
                "qwen2_moe": "qwen2_moe", "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3",
                "kimi_k2": "deepseek_v3"}

# args.common key -> ModelArch field (other args.common keys and all of args.huggingface/mcore
# are the incumbent's switches for its own code; our family YAML does that work).
_CONVERT_ARGS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_query_groups",
    "num_query_groups": "num_query_groups", "kv_channels": "kv_channels", "vocab_size": "vocab_size",
    "num_experts": "num_experts", "moe_ffn_hidden_size": "moe_ffn_hidden_size", "mtp_num_layers": "mtp_num_layers",
}

_INTERPOLATION = re.compile(r"\$\{")
_MOE_FREQ = re.compile(r"\$\{\s*moe_freq\s*:\s*(?:\"([^\"]*)\"|'([^']*)'|([^}]*))\s*\}")
_MODULE_REF = re.compile(r"\$\{\s*module\.([A-Za-z_][A-Za-z0-9_]*)\s*\}")


# --------------------------------------------------------------------------------------------
# The moe_freq list expression

_MAX_EXPR_CHARS = 1000
_MAX_LIST_LEN = 100_000
_TOKEN = re.compile(r"[ \t]*(?:([0-9]+)|([\[\],*+]))")  # ASCII digits only


def parse_layer_freq(text: str) -> list[int]:
    """Megatron's ``--moe-layer-freq`` list expression, e.g. ``[0]*3+[1]*58``.

    Grammar (nothing else: no names, calls, attributes, parentheses or other operators)::

        expr := term ('+' term)*
        term := list ('*' INT)? | INT '*' list
        list := '[' [INT (',' INT)* [',']] ']'

    Raises ValueError for anything outside it, or for a list longer than 100000."""
    if not isinstance(text, str) or len(text) > _MAX_EXPR_CHARS:
        raise ValueError("not a list expression")
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"unexpected {text[pos:pos + 10]!r}")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take(expected: str | None = None) -> str:
        nonlocal i
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'more'}, got {tok!r}")
        i += 1
        return tok

    def integer() -> int:
        tok = take()
        if not re.fullmatch(r"[0-9]+", tok):
            raise ValueError(f"expected an integer, got {tok!r}")
        return int(tok)

    def plain_list() -> list[int]:
        take("[")
        items: list[int] = []
        while peek() != "]":
            items.append(integer())
            if peek() == ",":
                take(",")
            elif peek() != "]":
                raise ValueError(f"expected ',' or ']', got {peek()!r}")
        take("]")
        return items

    def repeat(items: list[int], count: int, total: int) -> list[int]:
        if total + len(items) * count > _MAX_LIST_LEN:
            raise ValueError(f"list longer than {_MAX_LIST_LEN}")
        return items * count

    out: list[int] = []
    while True:
        if peek() == "[":
            items = plain_list()
            if peek() == "*":
                take("*")
                items = repeat(items, integer(), len(out))
        else:
            count = integer()
            take("*")
            items = repeat(plain_list(), count, len(out))
        if len(out) + len(items) > _MAX_LIST_LEN:
            raise ValueError(f"list longer than {_MAX_LIST_LEN}")
        out.extend(items)
        if peek() is None:
            return out
        take("+")


def freq_text(pattern: Iterable[int]) -> str:
    """A 0/1 list in the compact form Megatron users write, e.g. ``[0]*3+[1]*58``."""
    runs: list[list[int]] = []
    for value in pattern:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return "+".join(f"[{v}]*{n}" for v, n in runs) or "[]"


# --------------------------------------------------------------------------------------------
# Detection


def _is_model_keys(keys: Iterable[str]) -> bool:
    keys = set(keys)
    if "family" in keys:
        return False  # ours
    return bool(keys & {"_target_", "model_type"}) or bool(
        keys & (set(_COMPUTED) | set(_FIXED) | _IGNORED | {"convert_file", "vocab_size_in_config_file",
                                                           "moe_shared_expert_intermediate_size", "layernorm_epsilon"}))


def _is_convert_keys(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return "family" not in keys and bool(keys & _CONVERT_MARKERS)


def is_model_yaml(data: Mapping[str, Any]) -> bool:
    """LoongForge's model YAML (``_target_``/``model_type`` or Megatron names not in our schema),
    as opposed to our architecture YAML (ModelArch fields, optionally ``family``)."""
    return isinstance(data, Mapping) and _is_model_keys(data)


def is_convert_yaml(data: Mapping[str, Any]) -> bool:
    """LoongForge's convert YAML (``defaults``/``args``/``name_map``/``hydra``), not our family YAML."""
    return isinstance(data, Mapping) and _is_convert_keys(data)


def is_model_yaml_file(path: str | None) -> bool:
    if not path:
        return False
    return is_model_yaml(load_mapping(path, "--config_file"))


_TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][\w.]*)\s*:", re.MULTILINE)


def is_convert_yaml_file(path: str) -> bool:
    """The same test on the file's text (its unindented keys), cheap enough for a directory glob."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    return _is_convert_keys(_TOP_LEVEL_KEY.findall(text))


# --------------------------------------------------------------------------------------------
# Values


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


def _fit_traits(where: str, family: str, moe: bool | None, mla: bool | None, what: str) -> str:
    """The family, or its MoE/dense sibling, that has the traits ``what`` shows (None: unknown)."""
    def fits(name: str) -> bool:
        return (moe is None or (name in _MOE_FAMILIES) == moe) and (mla is None or (name in _MLA_FAMILIES) == mla)

    if fits(family):
        return family
    sibling = _SIBLING.get(family)
    if sibling and fits(sibling):
        return sibling
    traits = ", ".join(t for t, on in (("MoE", moe), ("dense", moe is False), ("multi-latent attention", mla)) if on)
    raise ConversionError(f"{where}: {what} shows a {traits} model, but it names our {family} family, which is not")


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


@dataclass
class ConvertYaml:
    """What a LoongForge convert YAML says: our family, and the sizes in its ``args.common``."""

    path: str
    family: str
    values: dict[str, Any]
    keys: dict[str, str]


def _module_dir(defaults: Any) -> str | None:
    """``llama3`` from ``defaults: [{llama3@module: ???}, _self_]``."""
    for entry in defaults if isinstance(defaults, list) else []:
        names = list(entry) if isinstance(entry, dict) else [entry] if isinstance(entry, str) else []
        for name in names:
            if isinstance(name, str) and name.endswith("@module"):
                return name[: -len("@module")].split("/")[-1]
    return None


def _name_map_traits(name_map: Any) -> tuple[bool | None, bool | None]:
    if not isinstance(name_map, dict):
        return None, None
    names = [k for side in name_map.values() if isinstance(side, dict) for k in side if isinstance(k, str)]
    if not names:
        return None, None
    moe = any(k.startswith("moe.") for k in names)
    mla = any(k.startswith(("attention.q_down", "attention.kv_down", "attention.kv_up")) for k in names)
    return moe, mla


def _convert_family(path: str, data: Mapping[str, Any]) -> str:
    where = f"convert YAML {path}"
    stem = os.path.splitext(os.path.basename(path))[0]
    module_dir = _module_dir(data.get("defaults"))
    parent = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    if stem in _CONVERT_FILES:
        name = _CONVERT_FILES[stem]
    elif stem in _UNSUPPORTED:
        raise ConversionError(f"{where}: LoongForge's {stem} is for {_UNSUPPORTED[stem]}, which we do not convert; "
                              f"supported families: {', '.join(sorted(set(_CONVERT_FILES.values())))}")
    else:
        for d in (module_dir, parent):
            if d in _UNSUPPORTED:
                raise ConversionError(f"{where}: LoongForge's {d} is for {_UNSUPPORTED[d]}, which we do not convert; "
                                      f"supported families: {', '.join(sorted(set(_CONVERT_FILES.values())))}")
        found = _CONVERT_DIRS.get(module_dir or "") or _CONVERT_DIRS.get(parent)
        if found is None:
            raise ConversionError(
                f"{where}: cannot tell which family it is for (file {stem}.yaml, defaults {module_dir or 'none'}@module); "
                f"supported LoongForge convert YAMLs: {', '.join(sorted(_CONVERT_FILES))}")
        name = found
    moe, mla = _name_map_traits(data.get("name_map"))
    return _fit_traits(where, name, moe, mla, "its name_map")


def _read_convert(path: str, data: Mapping[str, Any], model: ModelYaml | None) -> ConvertYaml:
    where = f"--convert_file {path}"
    unknown = sorted(str(k) for k in data if k not in _CONVERT_TOP_KEYS)
    if unknown:
        raise ConversionError(f"{where}: unknown key(s) {', '.join(unknown)} (a LoongForge convert YAML has "
                              f"{', '.join(sorted(_CONVERT_TOP_KEYS))})")
    family = _convert_family(path, data)
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    args = data.get("args")
    common = args.get("common") if isinstance(args, dict) else None
    if common is not None and not isinstance(common, dict):
        raise ConversionError(f"{where}: args.common must be a mapping")
    for key, raw in (common or {}).items():
        if key not in _CONVERT_ARGS:
            continue
        arch_field = _CONVERT_ARGS[key]
        name = f"args.common.{key}"
        ref = _MODULE_REF.fullmatch(raw.strip()) if isinstance(raw, str) else None
        if ref:
            # ${module.X}: the model YAML's X (as read there). Without a model YAML, or without X
            # in it, this file states nothing about the key.
            ref_key = ref.group(1)
            if model is None or ref_key not in model.raw:
                continue
            if arch_field in model.values and (_MAPPED.get(ref_key) == arch_field or ref_key == arch_field):
                value = model.values[arch_field]
            else:
                value = _plain(f"--config_file {model.path}", ref_key, model.raw[ref_key])
        else:
            value = _plain(where, name, raw)
        if value is None:
            continue
        values[arch_field] = _typed(where, name, arch_field, value)
        keys[arch_field] = name
    return ConvertYaml(path, family, values, keys)


def read_convert_yaml(path: str, model: ModelYaml | None = None) -> ConvertYaml:
    data = load_mapping(path, "--convert_file")
    if not is_convert_yaml(data):
        raise ConversionError(f"--convert_file {path}: not a LoongForge convert YAML (no defaults/args/name_map/hydra)")
    return _read_convert(path, data, model)


# --------------------------------------------------------------------------------------------
# Public entry points


def family_name(path: str) -> str:
    """Our family name for a LoongForge convert YAML (file name, ``defaults``, ``name_map``) or
    model YAML (its ``convert_file`` name, else ``_target_``/``model_type`` and its sizes).
    ``family.family_by_name(family_name(path))`` gives the FamilySpec."""
    data = load_mapping(path, "LoongForge YAML")
    if is_convert_yaml(data):
        return _convert_family(path, data)
    if is_model_yaml(data):
        model = _read_model(path, data)
        if model.family is None:
            raise ConversionError(f"--config_file {path}: cannot tell the model family from _target_/model_type; pass --convert_file")
        return model.family
    raise ConversionError(f"{path}: not a LoongForge model or convert YAML")


def arch_values(path: str, convert_file: str | None = None) -> dict[str, Any]:
    """ModelArch field values a LoongForge model YAML states (or that Megatron derives from what
    it states: one query group per head without GQA, kv_channels = hidden / heads), with
    ``family`` when the file tells it. With ``convert_file`` (LoongForge format) its
    ``args.common`` sizes are added (they must agree) and its family is the family."""
    model = read_model_yaml(path)
    values = dict(model.values)
    if model.family is not None:
        values["family"] = model.family
    if convert_file is not None and is_convert_yaml(load_mapping(convert_file, "--convert_file")):
        convert = read_convert_yaml(convert_file, model)
        for arch_field, value in convert.values.items():
            if arch_field in values and values[arch_field] != value:
                raise ConversionError(f"--convert_file {convert_file}: {convert.keys[arch_field]} {_fmt(value)}, "
                                      f"but --config_file {path} has {model.keys[arch_field]} {_fmt(model.shown[arch_field])}")
            values[arch_field] = value
        values["family"] = convert.family
    return values


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return bool(a == b)


def cross_check(derived: Mapping[str, Any], family: FamilySpec, config_file: str | None, convert_file: str | None) -> None:
    """HF source: what LoongForge YAMLs say must agree with the architecture config.json gives
    (``derived``); they never override it. One error line naming the key and both values."""
    model = read_model_yaml(config_file) if config_file and is_model_yaml_file(config_file) else None
    checks: list[tuple[str, dict[str, Any], dict[str, str], dict[str, Any]]] = []
    if model is not None:
        checks.append((f"--config_file {config_file}", model.values, model.keys, model.shown))
    if convert_file and is_convert_yaml(load_mapping(convert_file, "--convert_file")):
        convert = read_convert_yaml(convert_file, model)
        checks.append((f"--convert_file {convert_file}", convert.values, convert.keys, convert.values))
    for where, values, keys, shown in checks:
        problems = []
        for arch_field, value in values.items():
            if arch_field in _NOT_CROSS_CHECKED or arch_field not in derived:
                continue
            own = derived[arch_field]
            if own is None and arch_field in _CHECKED_IF_STATED:
                continue
            if not _same(value, own):
                problems.append((arch_field, value, own))
        if not problems:
            continue
        # A key the file states comes before one derived from it ("hidden_size / num_attention_heads ...").
        problems.sort(key=lambda p: "(" in keys[p[0]])
        arch_field, value, own = problems[0]
        yaml_value = shown.get(arch_field, value)
        if arch_field == "moe_layer_pattern":
            layers = int(derived["num_layers"])
            yaml_text = _fmt(yaml_value if yaml_value is not None else [1] * layers)
            theirs = f"config.json implies {_fmt(own if own is not None else [1] * layers)}"
        elif arch_field in family.fixed_arch:
            yaml_text, theirs = _fmt(yaml_value), f"the {family.name} family has {_fmt(own)}"
        else:
            yaml_text = _fmt(yaml_value)
            hf_key = (family.config_fields.get(arch_field) or ("",))[0]
            yaml_key = keys[arch_field]
            if own is None:
                theirs = f"config.json has no {hf_key or arch_field}"
            elif hf_key and hf_key != yaml_key:
                theirs = f"config.json has {hf_key} {_fmt(own)}"
            else:
                theirs = f"config.json has {_fmt(own)}"
        others = [keys[f] for f, _, _ in problems[1:] if "(" not in keys[f]]
        more = f" (also differ: {', '.join(others)})" if others else ""
        raise ConversionError(f"{where}: {keys[arch_field]} {yaml_text}, but {theirs}{more}")
