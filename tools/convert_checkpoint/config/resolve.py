"""Which model a checkpoint holds: its family (YAML) and architecture, from what the checkpoint
says plus ``--convert_file`` / ``--config_file`` / ``--mtp_num_layers``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConversionError
from ..requests import ModelRequest
from .arch import ModelArch, load_arch_yaml
from .family import FamilySpec, family_by_name, family_for_hf_config, load_family
from .loongforge_yaml import cross_check, is_model_yaml_file


def param_dtype(hf_config: Mapping[str, Any]) -> torch.dtype:
    """The model's parameter dtype (what TE's FP8 tensors present as): config.json's, else bf16."""
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return {"float32": torch.float32, "float16": torch.float16}.get(str(name), torch.bfloat16)


def _with_arch_yaml(values: dict, request: ModelRequest) -> dict:
    if request.config_file:
        values = {**values, **load_arch_yaml(request.config_file)}
    return values


def from_hf_config(config: Mapping[str, Any], request: ModelRequest) -> tuple[FamilySpec, ModelArch]:
    """A HuggingFace checkpoint: the family from ``model_type`` (or the convert YAML), the
    architecture from config.json (overridden by our architecture YAML; LoongForge's YAMLs are
    checked against it instead)."""
    family = load_family(request.convert_file) if request.convert_file else family_for_hf_config(config)
    derived = family.arch_from_config(config)
    cross_check(derived.to_dict(), family, request.config_file, request.convert_file)
    values = derived.to_dict() if is_model_yaml_file(request.config_file) else _with_arch_yaml(derived.to_dict(), request)
    arch = ModelArch.from_dict(values, request.config_file or "config.json")
    if request.mtp_num_layers is not None:
        arch = arch.replace(mtp_num_layers=request.mtp_num_layers)
    return family, arch


def from_saved_arch(saved: Mapping[str, Any] | None, request: ModelRequest) -> tuple[FamilySpec, ModelArch]:
    """A Megatron checkpoint: the architecture we saved in its args (or the architecture YAML),
    the family named there (or the convert YAML)."""
    values = _with_arch_yaml(dict(saved or {}), request)
    if request.convert_file:
        family = load_family(request.convert_file)
        values["family"] = family.name
    elif "family" in values:
        family = family_by_name(values["family"])
    else:
        raise ConversionError(
            "cannot tell the model family of this Megatron checkpoint (it was not written by convert_checkpoint); "
            "pass --config_file with a 'family' field or --convert_file"
        )
    if not saved and not request.config_file:
        raise ConversionError("cannot tell the architecture of this Megatron checkpoint; pass --config_file")
    values.update(family.fixed_arch)  # facts of the family (e.g. Qwen2's qkv bias) hold for every model
    if request.mtp_num_layers is not None:
        values["mtp_num_layers"] = request.mtp_num_layers
    return family, ModelArch.from_dict(values, request.config_file or "checkpoint args")
