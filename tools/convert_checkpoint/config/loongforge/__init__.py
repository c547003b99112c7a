"""LoongForge's own YAML files, read for what they say (no Hydra, no OmegaConf).

Two formats (``../shared/reference/incumbent_cli.md`` §3, §4):

- the **model YAML** (``--config_file``): flat Megatron argument names plus ``_target_`` and
  ``model_type``. :func:`arch_values` turns it into ModelArch field values.
- the **convert YAML** (``--convert_file``): ``hydra``, ``defaults`` (``<dir>@module``),
  ``args`` (``common``/``huggingface``/``mcore``), ``name_map`` and ``torch_dtype``. Its file
  name, ``defaults`` and ``name_map`` pick one of OUR families (:func:`family_name`); its
  ``args.common`` sizes are checked like the model YAML's.

Submodules:

- ``model_yaml``: detecting and reading the model YAML (its key tables: mapped, fixed,
  ignored, training words; our family from ``convert_file``/``_target_``/``model_type``);
- ``convert_yaml``: detecting and reading the convert YAML (LoongForge's file and directory
  names -> our families, ``name_map`` traits, ``args.common`` sizes);
- ``layer_freq``: the ``${moe_freq:...}`` list-expression parser and its compact form back;
- ``_common``: what both readers share (Megatron argument -> field table, field types,
  interpolations, a value's form in messages).

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
:func:`read_model_yaml`, :func:`read_convert_yaml`, :func:`parse_layer_freq`, :func:`freq_text`,
and the format tests :func:`is_model_yaml` / :func:`is_convert_yaml` (``..._file`` for a path).
This package imports nothing of the rest but the error type and the YAML reader, so ``arch.py``
and ``family.py`` can delegate to it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import ConversionError
from ..yaml_file import load_mapping
from ._common import _fmt
from .convert_yaml import ConvertYaml, _convert_family, is_convert_yaml, is_convert_yaml_file, read_convert_yaml
from .layer_freq import freq_text, parse_layer_freq
from .model_yaml import ModelYaml, _read_model, is_model_yaml, is_model_yaml_file, read_model_yaml

if TYPE_CHECKING:
    from ..family import FamilySpec

__all__ = [
    "ConvertYaml", "ModelYaml", "arch_values", "cross_check", "family_name", "freq_text", "is_convert_yaml",
    "is_convert_yaml_file", "is_model_yaml", "is_model_yaml_file", "parse_layer_freq", "read_convert_yaml",
    "read_model_yaml",
]

# Fields never compared with config.json: Megatron YAMLs often hold the training context here.
_NOT_CROSS_CHECKED = frozenset({"family", "max_position_embeddings"})
# Compared only when config.json states them (transformers has a default otherwise).
_CHECKED_IF_STATED = frozenset({"rotary_base"})


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
