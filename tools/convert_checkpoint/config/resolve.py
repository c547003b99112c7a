"""Which model a checkpoint holds: its family (YAML) and architecture, from what the checkpoint
says plus ``--convert_file`` / ``--config_file`` / ``--mtp_num_layers``."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
else:
    pass

from .. import dtypes
from ..dtypes import DType
from ..errors import ConversionError
from ..requests import ModelRequest
from .arch import ModelArch, load_arch_yaml
from .family import FamilySpec, family_by_name, family_for_hf_config, load_family
from .loongforge import cross_check, is_model_yaml_file
from .loongforge.vision_yaml import language_family, vl_family_name


def param_dtype(hf_config: Mapping[str, Any]) -> DType:
    """The model's parameter dtype (what TE's FP8 tensors present as): config.json's, else bf16."""
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return {"float32": dtypes.FLOAT32, "float16": dtypes.FLOAT16}.get(str(name), dtypes.BFLOAT16)


def _with_arch_yaml(values: dict, request: ModelRequest) -> dict:
    if request.config_file:
        values = {**values, **load_arch_yaml(request.config_file)}
    return values


def _vl_family(request: ModelRequest) -> FamilySpec | None:
    """``--vision_patch_convert_file``: the vision-language family of that tower and language model."""
    if request.vision_convert_file is None:
        return None
    language = language_family(request.convert_file, lambda path: load_family(path).name)
    return family_by_name(vl_family_name(request.vision_convert_file, language))


def from_hf_config(config: Mapping[str, Any], request: ModelRequest) -> tuple[FamilySpec, ModelArch]:
    """A HuggingFace checkpoint: the family from ``model_type`` (or the convert YAML), the
    architecture from config.json (overridden by our architecture YAML; LoongForge's YAMLs are
    checked against it instead)."""
    family = _vl_family(request) or (load_family(request.convert_file) if request.convert_file
                                     else family_for_hf_config(config))
    derived = family.arch_from_config(config)
    cross_check(derived.to_dict(), family, request.config_file, None if family.vision else request.convert_file)
    values = derived.to_dict() if is_model_yaml_file(request.config_file) else _with_arch_yaml(derived.to_dict(), request)
    arch = ModelArch.from_dict(values, request.config_file or "config.json")
    if request.mtp_num_layers is not None:
        arch = arch.replace(mtp_num_layers=request.mtp_num_layers)
    return family, arch


def from_saved_arch(saved: Mapping[str, Any] | None, request: ModelRequest,
                    origin: str | None = None) -> tuple[FamilySpec, ModelArch]:
    """A Megatron checkpoint: the architecture saved in its args (ours, or the fields Megatron's
    own args state, see :func:`arch_from_megatron_args`), with the architecture YAML over it; the
    family named there (or the convert YAML)."""
    values = _with_arch_yaml(dict(saved or {}), request)
    vl_family = _vl_family(request)
    if vl_family is not None:
        family = vl_family
        values["family"] = family.name
    elif request.convert_file:
        family = load_family(request.convert_file)
        values["family"] = family.name
    elif "family" in values:
        family = family_by_name(values["family"])
    else:
        raise ConversionError(NO_ARCHITECTURE)
    values.update(family.fixed_arch)  # facts of the family (e.g. Qwen2's qkv bias) hold for every model
    if request.mtp_num_layers is not None:
        values["mtp_num_layers"] = request.mtp_num_layers
    if origin is None:
        origin = f"--config_file {request.config_file}" if request.config_file else "the checkpoint's saved args"
    return family, ModelArch.from_dict(values, origin)


# One line naming the three ways to say which model a foreign Megatron checkpoint holds.
NO_ARCHITECTURE = (
    "cannot tell the model family and architecture of this Megatron checkpoint (its args do not carry them: it was "
    "not written by convert_checkpoint); pass one of: --hf_config_path DIR (the model's HuggingFace directory, "
    "for its config.json), --config_file YAML (the model's architecture YAML, with --convert_file or a 'family' "
    "key), or --convert_file YAML (the family; the architecture then comes from the checkpoint's Megatron args)"
)


@dataclass(frozen=True)
class MegatronModel:
    """Which model a Megatron checkpoint holds, and where that was learned (for error messages)."""

    family: FamilySpec
    arch: ModelArch
    origin: str  # e.g. "--hf_config_path /models/x", "the checkpoint's saved architecture"
    hf_config: dict | None = None  # the reference config.json, when one gave the architecture


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def moe_pattern_from_freq(freq: Any, num_layers: int | None) -> tuple[int, ...] | None | bool:
    """Megatron's --moe-layer-freq (an int N: layer l is MoE when l % N == 0; or the per-layer
    list) as ModelArch.moe_layer_pattern (None: every layer is MoE); False when it says nothing."""
    if isinstance(freq, int) and not isinstance(freq, bool) and freq > 0 and num_layers:
        pattern: tuple[int, ...] = tuple(1 if layer % freq == 0 else 0 for layer in range(num_layers))
    elif isinstance(freq, (list, tuple)) and all(_int(x) in (0, 1) for x in freq):
        pattern = tuple(int(x) for x in freq)
    else:
        return False
    return None if all(pattern) else pattern


def arch_from_megatron_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture fields that Megatron's saved args state, under ModelArch's names.

    Megatron training checkpoints carry every one (``validate_args`` fills kv_channels,
    num_query_groups, moe_ffn_hidden_size); LoongForge's carry its model YAML's sizes. A None or
    absent arg says nothing. ``group_query_attention`` False means one query group per head
    (Megatron keeps its default ``num_query_groups`` 1 then); LoongForge says ``num_key_value_heads``."""
    out: dict[str, Any] = {}
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "vocab_size",
                 "max_position_embeddings"):
        if _int(args.get(name)):
            out[name] = args[name]
    heads = out.get("num_attention_heads")
    if args.get("group_query_attention") is False and heads:
        out["num_query_groups"] = heads
    elif _int(args.get("num_query_groups")):
        out["num_query_groups"] = args["num_query_groups"]
    elif _int(args.get("num_key_value_heads")):
        out["num_query_groups"] = args["num_key_value_heads"]
    if args.get("normalization") in ("RMSNorm", "LayerNorm"):
        out["normalization"] = args["normalization"]
    if isinstance(args.get("norm_epsilon"), float):
        out["norm_epsilon"] = args["norm_epsilon"]
    if isinstance(args.get("rotary_base"), (int, float)) and not isinstance(args.get("rotary_base"), bool):
        out["rotary_base"] = args["rotary_base"]
    for ours, theirs in (("add_qkv_bias", "add_qkv_bias"), ("qk_layernorm", "qk_layernorm"),
                         ("multi_latent_attention", "multi_latent_attention")):
        if isinstance(args.get(theirs), bool):
            out[ours] = args[theirs]
    if isinstance(args.get("untie_embeddings_and_output_weights"), bool):
        out["tied_embeddings"] = not args["untie_embeddings_and_output_weights"]
    experts = _int(args.get("num_experts"))
    if experts:
        out["num_experts"] = experts
        if _int(args.get("moe_ffn_hidden_size")):
            out["moe_ffn_hidden_size"] = args["moe_ffn_hidden_size"]
        if _int(args.get("moe_shared_expert_intermediate_size")):
            out["shared_expert_ffn_hidden_size"] = args["moe_shared_expert_intermediate_size"]
            # DeepSeek-style config.json states the count (n_shared_experts), not the size
            if out.get("moe_ffn_hidden_size") and out["shared_expert_ffn_hidden_size"] % out["moe_ffn_hidden_size"] == 0:
                out["num_shared_experts"] = out["shared_expert_ffn_hidden_size"] // out["moe_ffn_hidden_size"]
        for ours, theirs in (("shared_expert_gate", "moe_shared_expert_gate"),
                             ("router_expert_bias", "moe_router_enable_expert_bias")):
            if isinstance(args.get(theirs), bool):
                out[ours] = args[theirs]
        pattern = moe_pattern_from_freq(args.get("moe_layer_freq"), out.get("num_layers"))
        if pattern is not False:
            out["moe_layer_pattern"] = pattern
    if args.get("multi_latent_attention") is True:
        out["q_lora_rank"] = _int(args.get("q_lora_rank"))  # None: no q down-projection (DeepSeek-V2-Lite)
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if _int(args.get(name)):
                out[name] = args[name]
    if "mtp_num_layers" in args and (args["mtp_num_layers"] is None or _int(args["mtp_num_layers"]) is not None):
        out["mtp_num_layers"] = args["mtp_num_layers"] or 0
    percent = args.get("rotary_percent")  # partial RoPE (GLM-4.5): no weight depends on it
    if isinstance(percent, (int, float)) and not isinstance(percent, bool) and 0 < percent <= 1:
        out["rotary_percent"] = float(percent)
    for name in ("dsa_indexer_n_heads", "dsa_indexer_head_dim"):  # DeepSeek-V3.2's DSA indexer
        if _int(args.get(name)):
            out[name] = args[name]
    return out


# The sizes compared between the saved Megatron args and the architecture from elsewhere. Flags
# (qk_layernorm, tied embeddings, ...) are not: LoongForge's convert YAMLs fix some of them per
# family whatever the model, and a wrong one shows as a missing or unmapped tensor anyway.
_CHECKED_SIZES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "vocab_size", "num_experts", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size",
                  "moe_layer_pattern", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                  "v_head_dim", "mtp_num_layers", "dsa_indexer_n_heads", "dsa_indexer_head_dim")


def check_against_megatron_args(arch: ModelArch, stated: Mapping[str, Any], origin: str, request: ModelRequest) -> None:
    """The architecture (from ``origin``) must agree with every size the saved Megatron args state."""
    for name in _CHECKED_SIZES:
        if name not in stated:
            continue
        if name == "ffn_hidden_size" and arch.num_experts and arch.moe_layer_pattern is None:
            continue  # no dense layer: Megatron's default ffn_hidden_size (4 x hidden) is unused
        if name == "kv_channels" and arch.multi_latent_attention:
            continue  # MLA's head sizes are qk_head_dim / v_head_dim; kv_channels is not used for them
        if name == "mtp_num_layers" and request.mtp_num_layers is not None:
            continue  # --mtp_num_layers chose
        ours, theirs = getattr(arch, name), stated[name]
        if name == "moe_layer_pattern":
            ours = list(ours) if ours is not None else "MoE on every layer"
            theirs = list(theirs) if theirs is not None else "MoE on every layer"
        if ours != theirs:
            raise ConversionError(
                f"{origin} gives {name} {ours}, but the checkpoint's saved Megatron args say {theirs}"
            )


def read_reference_config(path: str) -> dict[str, Any]:
    """config.json of an --hf_config_path directory."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConversionError(f"--hf_config_path {path}: no config.json there")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--hf_config_path {path}: unreadable config.json ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"--hf_config_path {path}: config.json is not a JSON object")
    return config


def for_megatron_checkpoint(args: Mapping[str, Any] | None, request: ModelRequest,
                            hf_config_path: str | None = None) -> MegatronModel:
    """Which model a Megatron checkpoint holds.

    * Written by this tool: the architecture saved in ``convert_checkpoint_arch`` (the
      architecture YAML over it), as before.
    * Otherwise (LoongForge's rank files, Megatron training checkpoints), the first of:
      ``--hf_config_path`` (family from its config.json, or ``--convert_file``; architecture from
      config.json, the architecture YAML over it); ``--config_file`` / ``--convert_file`` (family
      from the convert YAML or the YAML's ``family``; architecture from the YAML over what the
      saved Megatron args state). Every size the saved args state must agree with the result.
    The tensor shapes in the rank files are checked against the architecture later (layout and
    gather), naming ``origin``."""
    args = dict(args or {})
    saved = args.get("convert_checkpoint_arch")
    if saved:
        family, arch = from_saved_arch(saved, request)
        origin = (f"--config_file {request.config_file} over the checkpoint's saved architecture" if request.config_file
                  else "the checkpoint's saved architecture")
        return MegatronModel(family, arch, origin)
    stated = arch_from_megatron_args(args)
    hf_config = None
    if hf_config_path:
        hf_config = read_reference_config(hf_config_path)
        family, arch = from_hf_config(hf_config, request)
        origin = f"--hf_config_path {hf_config_path}"
        if request.config_file:
            origin += f" with --config_file {request.config_file}"
    elif request.config_file:
        origin = f"--config_file {request.config_file}"
        family, arch = from_saved_arch(stated, request, f"{origin} (and the checkpoint's Megatron args)")
    elif request.convert_file:
        origin = f"the checkpoint's Megatron args (family from --convert_file {request.convert_file})"
        fixed = load_family(request.convert_file).fixed_arch
        missing = [f.name for f in fields(ModelArch)
                   if f.default is MISSING and f.name != "family" and f.name not in stated and f.name not in fixed]
        if missing:
            why = " (Megatron saves the padded size; the real one is the tokenizer's)" if "vocab_size" in missing else ""
            raise ConversionError(
                f"the checkpoint's Megatron args do not say {', '.join(missing)}{why}; pass --hf_config_path DIR, "
                "or a --config_file that gives it"
            )
        family, arch = from_saved_arch(stated, request, origin)
    else:
        raise ConversionError(NO_ARCHITECTURE)
    check_against_megatron_args(arch, stated, origin, request)
    return MegatronModel(family, arch, origin, hf_config)
