"""Module-name patterns as compressed-tensors writes them: an exact name, or ``re:<regex>``
matched from the start of the name."""
from __future__ import annotations

import re
from collections.abc import Iterable


def matches(module: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern


def matches_any(module: str, patterns: Iterable[str]) -> bool:
    return any(matches(module, p) for p in patterns)


def split_param(name: str) -> tuple[str, str]:
    """``model.layers.0.mlp.up_proj.weight`` -> (``model.layers.0.mlp.up_proj``, ``weight``)."""
    module, _, param = name.rpartition(".")
    return module, param
