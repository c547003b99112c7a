"""Family convert YAMLs: which module convertors map which HF names to which MCore names.

The schema is ours and deliberately small (see README "Convert YAML schema"). A family is
picked by the HF ``model_type``/``architectures`` unless ``--convert_file`` names one.
"""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from importlib import resources
from typing import Any

from ..errors import ConversionError
from . import extends, loongforge
from .arch import ModelArch, arch_from_hf_config, hf_config_from_arch
from .yaml_file import load_mapping

# Shipped inside the package (package data), so a wheel or `pip install .` has them too; the
# repository's top-level `configs` is a symlink to tools/convert_checkpoint/configs. A regular
# install is a real directory, so the Traversable is a pathlib.Path and str() is a usable path.
CONFIG_ROOT = str(resources.files("convert_checkpoint") / "configs" / "models")


LAYER_KINDS = ("moe", "dense", "linear_attention", "full_attention")
# ``when: <field>`` also takes a yes/no architecture field: the module exists only where it is true
# (e.g. GLM-4.5's q/k norms, present when config.json's use_qk_norm is).
ARCH_SWITCHES = tuple(f.name for f in dataclass_fields(ModelArch) if f.type in ("bool", bool))


@dataclass(frozen=True)
class ModuleSpec:
    convertor: str
    options: Mapping[str, Any]
    origin: str  # "<file>: layer module 3" for error messages
    when: str | None = None  # "moe" / "dense": only in layers of that kind; or a yes/no ModelArch field


@dataclass(frozen=True)
class MtpSpec:
    """DeepSeek multi-token prediction: layer k is stored in HF as decoder layer num_layers + k."""

    layer_prefix: str  # HF, with {layer} = num_layers + k (or {mtp} = k)
    modules: tuple[ModuleSpec, ...]  # the MTP-specific tensors (norms, eh_proj, copies)
    # HF prefix of those tensors when it is not the layer's (Qwen3-Next: mtp.fc.weight beside mtp.layers.0.*)
    module_prefix: str | None = None


@dataclass(frozen=True)
class VisionSpec:
    """A vision-language model's vision tower (config/vision.py): its sizes from config.json's
    ``vision_config`` and its modules, mapped to canonical ``vision_model.*`` / ``adapter.*`` names."""

    fields: Mapping[str, tuple[str, ...]]  # VisionArch field: config.json keys (first found wins)
    defaults: Mapping[str, Any]
    fixed: Mapping[str, Any]  # facts of the tower (normalization, qkv bias)
    global_modules: tuple[ModuleSpec, ...]  # patch embedding, merger, deepstack mergers
    layer_prefix: str  # HF, with {layer}
    layer_modules: tuple[ModuleSpec, ...]
    # Qwen3-VL's deepstack mergers, one per deepstack_visual_indexes entry: HF prefix with {index}
    deepstack_prefix: str | None = None
    deepstack_modules: tuple[ModuleSpec, ...] = ()

    def values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        from .arch import _lookup

        values: dict[str, Any] = {}
        for name, keys in self.fields.items():
            found = next((v for v in (_lookup(config, k) for k in keys) if v is not None), None)
            if found is not None:
                values[name] = found
        return {**self.defaults, **values, **self.fixed}


@dataclass(frozen=True)
class FamilySpec:
    name: str
    path: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    hf_model_type: str
    hf_architectures: tuple[str, ...]
    config_fields: Mapping[str, tuple[str, ...]]
    config_defaults: Mapping[str, Any]
    fixed_arch: Mapping[str, Any]
    global_modules: tuple[ModuleSpec, ...]
    layer_prefix: str
    layer_modules: tuple[ModuleSpec, ...]
    ignore: tuple[re.Pattern, ...]
    moe_layers: Mapping[str, Any] | None = None  # rule for which layers are MoE (config.arch.moe_layer_pattern)
    mtp: MtpSpec | None = None
    # rule for which layers are gated delta-net layers (config.arch.linear_attention_pattern)
    attention_layers: Mapping[str, Any] | None = None
    vision: VisionSpec | None = None

    def is_ignored(self, hf_name: str) -> bool:
        return any(p.fullmatch(hf_name) for p in self.ignore)

    def arch_from_config(self, config: Mapping[str, Any]) -> ModelArch:
        arch = arch_from_hf_config(config, self.name, self.config_fields, self.config_defaults, self.fixed_arch,
                                   self.moe_layers, self.attention_layers)
        return arch.replace(vision=self.vision.values(config)) if self.vision is not None else arch

    def config_from_arch(self, arch: ModelArch) -> dict[str, Any]:
        """A config.json for an architecture whose original config is unknown (inverse of the above)."""
        return hf_config_from_arch(arch, self.hf_model_type, list(self.hf_architectures), self.config_fields,
                                   self.moe_layers, self.attention_layers)


_TOP_KEYS = {"family", "description", "match", "hf_config", "architecture", "weights", "vision"}  # after `extends` is applied


def _require(data: Mapping, key: str, path: str, kind: type) -> Any:
    if key not in data:
        raise ConversionError(f"convert YAML {path}: missing key '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise ConversionError(f"convert YAML {path}: '{key}' must be a {kind.__name__}")
    return value


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _modules(items: Any, path: str, where: str) -> tuple[ModuleSpec, ...]:
    if not isinstance(items, list):
        raise ConversionError(f"convert YAML {path}: weights.{where} must be a list")
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "convertor" not in item:
            raise ConversionError(f"convert YAML {path}: weights.{where}[{i}] needs a 'convertor' key")
        origin = f"{path}: weights.{where}[{i}]"
        when = item.get("when")
        if when is not None and when not in LAYER_KINDS and when not in ARCH_SWITCHES:
            raise ConversionError(
                f"{origin}: 'when' must be one of {', '.join(LAYER_KINDS)} or a yes/no architecture field "
                f"({', '.join(ARCH_SWITCHES)}), got {when!r}")
        options = {k: v for k, v in item.items() if k not in ("convertor", "when")}
        specs.append(ModuleSpec(item["convertor"], options, origin, when))
    return tuple(specs)


def _mtp(data: Any, path: str) -> MtpSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("layer_prefix"), str):
        raise ConversionError(f"convert YAML {path}: weights.mtp needs a 'layer_prefix' string and 'modules'")
    module_prefix = data.get("module_prefix")
    if module_prefix is not None and not isinstance(module_prefix, str):
        raise ConversionError(f"convert YAML {path}: weights.mtp.module_prefix must be a string")
    return MtpSpec(data["layer_prefix"], _modules(data.get("modules", []), path, "mtp.modules"), module_prefix)


def _vision(data: Any, path: str) -> VisionSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("layer_prefix"), str):
        raise ConversionError(f"convert YAML {path}: vision needs a 'layer_prefix' string, 'fields' and 'layer' modules")
    return VisionSpec(
        fields={k: _as_tuple(v) for k, v in (data.get("fields") or {}).items()},
        defaults=dict(data.get("defaults") or {}),
        fixed=dict(data.get("architecture") or {}),
        global_modules=_modules(data.get("global", []), path, "vision.global"),
        layer_prefix=data["layer_prefix"],
        layer_modules=_modules(data.get("layer", []), path, "vision.layer"),
        deepstack_prefix=(data.get("deepstack") or {}).get("hf_prefix"),
        deepstack_modules=_modules((data.get("deepstack") or {}).get("modules", []), path, "vision.deepstack.modules"),
    )


def load_family(path: str) -> FamilySpec:
    data = load_mapping(path, "convert YAML")
    if loongforge.is_convert_yaml(data):  # LoongForge's format names one of our families
        return family_by_name(loongforge.family_name(path))
    if loongforge.is_model_yaml(data):
        raise ConversionError(f"--convert_file {path} is a LoongForge model YAML; pass it as --config_file")
    data = extends.resolve(data, path, CONFIG_ROOT, lambda p: load_mapping(p, "convert YAML"))
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConversionError(f"convert YAML {path}: unknown key(s) {', '.join(unknown)}")
    name = _require(data, "family", path, str)
    match = data.get("match") or {}
    hf = _require(data, "hf_config", path, dict)
    weights = _require(data, "weights", path, dict)
    fields = {k: _as_tuple(v) for k, v in (hf.get("fields") or {}).items()}
    try:
        ignore = tuple(re.compile(p) for p in weights.get("ignore") or ())
    except re.error as e:
        raise ConversionError(f"convert YAML {path}: bad ignore pattern ({e})") from None
    return FamilySpec(
        name=name,
        path=path,
        model_types=_as_tuple(match.get("model_type")),
        architectures=_as_tuple(match.get("architectures")),
        hf_model_type=_require(hf, "model_type", path, str),
        hf_architectures=_as_tuple(hf.get("architectures")),
        config_fields=fields,
        config_defaults=dict(hf.get("defaults") or {}),
        fixed_arch=dict(data.get("architecture") or {}),
        global_modules=_modules(weights.get("global", []), path, "global"),
        layer_prefix=_require(weights, "layer_prefix", path, str),
        layer_modules=_modules(weights.get("layer", []), path, "layer"),
        ignore=ignore,
        moe_layers=dict(hf.get("moe_layers") or {}),
        mtp=_mtp(weights.get("mtp"), path),
        attention_layers=dict(hf.get("attention_layers") or {}),
        vision=_vision(data.get("vision"), path),
    )


def builtin_family_paths() -> list[str]:
    """Our family YAMLs; LoongForge-format convert YAMLs shipped at its paths (same glob) are not families."""
    paths = glob.glob(os.path.join(CONFIG_ROOT, "*", "ckpt_convert", "*_convert.yaml"))
    return sorted(p for p in paths if not loongforge.is_convert_yaml_file(p))


def builtin_families() -> dict[str, FamilySpec]:
    families = {}
    for path in builtin_family_paths():
        spec = load_family(path)
        families[spec.name] = spec
    return families


def family_by_name(name: str) -> FamilySpec:
    families = builtin_families()
    if name not in families:
        raise ConversionError(f"unknown model family {name!r}; known: {', '.join(sorted(families))}")
    return families[name]


def family_for_hf_config(config: Mapping[str, Any]) -> FamilySpec:
    """Pick the family whose ``match`` names this config's model_type (or architectures)."""
    model_type = config.get("model_type")
    archs = set(config.get("architectures") or ())
    families = builtin_families().values()
    for spec in families:
        if model_type in spec.model_types:
            return spec
    for spec in families:
        if archs & set(spec.architectures):
            return spec
    known = ", ".join(sorted(t for s in families for t in s.model_types))
    raise ConversionError(
        f"unknown model family: config.json has model_type {model_type!r} and architectures {sorted(archs)}; "
        f"supported model types: {known} (or pass --convert_file)"
    )
