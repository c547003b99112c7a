"""``extends:`` in a family convert YAML: reuse another family's YAML and state only the differences.

The child is applied to its base as a JSON merge patch (RFC 7396): mappings merge key by key,
``null`` deletes the key, and any other value (lists included) replaces the base's. A list may
splice the base's list in with the item ``"@base"`` (e.g. the base's layer modules plus a few),
which RFC 7396 has no way to say. ``extends`` names a family directory under ``configs/models``
(``extends: deepseek_v3`` is ``deepseek_v3/ckpt_convert/deepseek_v3_convert.yaml``); bases may
extend further bases.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConversionError

BASE_ITEM = "@base"


def merge_patch(base: Any, patch: Any, where: str = "") -> Any:
    """RFC 7396 merge of ``patch`` over ``base``, plus the ``"@base"`` list splice."""
    if isinstance(patch, Mapping):
        merged = dict(base) if isinstance(base, Mapping) else {}
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = merge_patch(merged.get(key), value, f"{where}.{key}" if where else str(key))
        return merged
    if isinstance(patch, list) and BASE_ITEM in patch:
        if not isinstance(base, list):
            raise ConversionError(f"'{where}': \"{BASE_ITEM}\" splices the base's list, but the base has no list there")
        out: list[Any] = []
        for item in patch:
            out.extend(base if item == BASE_ITEM else [item])
        return out
    return patch


def base_path(name: Any, root: str, origin: str) -> str:
    if not isinstance(name, str) or not name or os.sep in name or name.startswith("."):
        raise ConversionError(f"convert YAML {origin}: 'extends' must name a family directory, got {name!r}")
    path = os.path.join(root, name, "ckpt_convert", f"{name}_convert.yaml")
    if not os.path.isfile(path):
        raise ConversionError(f"convert YAML {origin}: extends {name!r}, but there is no {path}")
    return path


def resolve(data: Mapping[str, Any], origin: str, root: str,
            load: Callable[[str], dict[str, Any]], chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` with its ``extends`` chain applied (``load`` reads a YAML mapping)."""
    if "extends" not in data:
        return dict(data)
    path = base_path(data["extends"], root, origin)
    if path in chain or os.path.abspath(path) == os.path.abspath(origin):
        raise ConversionError(f"convert YAML {origin}: 'extends' forms a cycle through {path}")
    base = resolve(load(path), path, root, load, (*chain, os.path.abspath(origin)))
    patch = {k: v for k, v in data.items() if k != "extends"}
    try:
        merged = merge_patch(base, patch)
    except ConversionError as e:
        raise ConversionError(f"convert YAML {origin}: {e}") from None
    assert isinstance(merged, dict)
    return merged
