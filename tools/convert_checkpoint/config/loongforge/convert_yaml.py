"""LoongForge's convert YAML (``--convert_file``): ``hydra``, ``defaults`` (``<dir>@module``),
``args`` (``common``/``huggingface``/``mcore``), ``name_map`` and ``torch_dtype``. Its file name,
``defaults`` and ``name_map`` pick one of OUR families; its ``args.common`` sizes are read like
the model YAML's, ``${module.<key>}`` standing for the model YAML's key.

Also the family tables the model YAML's ``convert_file`` is looked up in, and
:func:`_fit_traits` (a family, or its MoE/dense sibling, that fits what a file shows).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import ConversionError
from ..yaml_file import load_mapping
from ._common import _MAPPED, _plain, _typed

if TYPE_CHECKING:
    from .model_yaml import ModelYaml

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
    "deepseek_v3_2_convert": "deepseek_v32",  # DeepSeek-V3.2: V3 plus the DSA indexer
    "minimax_convert": "minimax_m2",  # MiniMax-M2 (its minimax_m2_1/_5/_7 model YAMLs)
    # our family names, for incumbent-format files written for them
    "llama_convert": "llama",
    "mixtral_convert": "mixtral",
    "qwen2_moe_convert": "qwen2_moe",
    "glm4_moe_convert": "glm4_moe",
    "deepseek_v32_convert": "deepseek_v32",
    "minimax_m2_convert": "minimax_m2",
}
# Its directory names (``defaults: [<dir>@module: ...]``, the folder above ckpt_convert/).
_CONVERT_DIRS: dict[str, str] = {
    "llama2": "llama", "llama3": "llama", "llama": "llama",
    "qwen2": "qwen2", "qwen2.5": "qwen2", "qwen3": "qwen3",
    "deepseek2": "deepseek_v2", "deepseek3": "deepseek_v3", "kimi_k2": "deepseek_v3",
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
    "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3",
    "minimax": "minimax_m2", "glm4_moe": "glm4_moe", "deepseek_v32": "deepseek_v32", "minimax_m2": "minimax_m2",
}
# Its convert YAMLs (and directories) for models we do not convert.
_UNSUPPORTED: dict[str, str] = {
    "qwen_convert": "Qwen (v1)",
    "deepseek_v4_convert": "DeepSeek-V4",
    "glm5_convert": "GLM-5", "glm5_2_convert": "GLM-5.2",
    "internlm2_5_convert": "InternLM2.5",
    "mimo_convert": "MiMo",
    "minicpm_v_4_6_llm_convert": "MiniCPM-V 4.6",
    "ernie4_5_vl_llm_convert": "ERNIE 4.5 VL",
    "qwen2_5_convert_intern": "Qwen2.5 inside InternVL", "qwen2_5_convert_llm": "Qwen2.5-VL's language model",
    "qwen3_convert_intern": "Qwen3 inside InternVL", "qwen3_convert_llava": "Qwen3 inside LLaVA",
    "qwen3_moe_convert_intern": "Qwen3-MoE inside InternVL", "qwen3_moe_convert_qwen3vl": "Qwen3-VL's language model",
    "qwen3_5_dense_convert": "Qwen3.5", "qwen3_5_moe_convert": "Qwen3.5-MoE",
    "qwen3_6_dense_convert": "Qwen3.6", "qwen3_6_moe_convert": "Qwen3.6-MoE",
    "qwen3_next_moe_convert": "Qwen3-Next",
    "deepseek4": "DeepSeek-V4", "glm5": "GLM-5", "glm5.2": "GLM-5.2", "internlm2.5": "InternLM2.5", "mimo": "MiMo",
    "minicpm_v_4_6": "MiniCPM-V 4.6", "ernie4_5_vl": "ERNIE 4.5 VL",
    "image_encoder": "vision encoders", "image_projector": "vision adapters", "qwen3.5": "Qwen3.5",
    "qwen3.6": "Qwen3.6", "qwen3_next": "Qwen3-Next", "qwen3_vl": "Qwen3-VL", "qwen2.5vl": "Qwen2.5-VL",
}
# What our families have: routed experts, multi-latent attention; the MoE/dense sibling.
_MOE_FAMILIES = frozenset({"qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe",
                           "minimax_m2"})
_MLA_FAMILIES = frozenset({"deepseek_v2", "deepseek_v3", "deepseek_v32"})
_SIBLING = {"qwen3": "qwen3_moe", "qwen3_moe": "qwen3", "qwen2": "qwen2_moe", "qwen2_moe": "qwen2"}

# args.common key -> ModelArch field (other args.common keys and all of args.huggingface/mcore
# are the incumbent's switches for its own code; our family YAML does that work).
_CONVERT_ARGS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_query_groups",
    "num_query_groups": "num_query_groups", "kv_channels": "kv_channels", "vocab_size": "vocab_size",
    "num_experts": "num_experts", "moe_ffn_hidden_size": "moe_ffn_hidden_size", "mtp_num_layers": "mtp_num_layers",
}

_MODULE_REF = re.compile(r"\$\{\s*module\.([A-Za-z_][A-Za-z0-9_]*)\s*\}")


# --------------------------------------------------------------------------------------------
# Detection


def _is_convert_keys(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return "family" not in keys and bool(keys & _CONVERT_MARKERS)


def is_convert_yaml(data: Mapping[str, Any]) -> bool:
    """LoongForge's convert YAML (``defaults``/``args``/``name_map``/``hydra``), not our family YAML."""
    return isinstance(data, Mapping) and _is_convert_keys(data)


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
# Reading


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
