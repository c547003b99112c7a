"""Tensor groups: which tensors a converter must see together.

A tensor and everything it depends on (``Converter.get_dependencies``, transitively, through
every converter of the chain) form one group; groups that share a dependency merge. Each
source tensor belongs to exactly one group, so it is read once per use, wherever its shard is.
A group's results are written to the shard of their module's weight in the source (a fused
partner read as a dependency stays in its own shard); any other output goes to the shard of
the group's first primary tensor (its *home*).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConversionError
from .protocol import ConverterChain


@dataclass(frozen=True)
class TensorGroup:
    members: tuple[str, ...]  # primary tensors first, then their dependencies
    home: str  # the source shard whose output file receives this group's tensors

    @property
    def label(self) -> str:
        more = f" (+{len(self.members) - 1} dependencies)" if len(self.members) > 1 else ""
        return f"{self.members[0]}{more}"


def plan_groups(tensor_file: Mapping[str, str], chain: ConverterChain) -> list[TensorGroup]:
    deps = {name: chain.dependencies(name) for name in tensor_file}
    for name, needed in deps.items():
        missing = sorted(needed - tensor_file.keys())
        if missing:
            raise ConversionError(
                f"tensor {name} in {tensor_file[name]} needs {missing[0]}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which is not in the checkpoint"
            )
    is_dependency = set().union(*deps.values()) if deps else set()
    parent = {name: name for name in tensor_file}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name, needed in deps.items():
        for dep in needed:
            a, b = root(name), root(dep)
            if a != b:
                parent[b] = a
    members: dict[str, list[str]] = {}
    for name in tensor_file:  # checkpoint order: each group keeps its tensors' order
        members.setdefault(root(name), []).append(name)
    groups = []
    for names in members.values():
        primaries = [n for n in names if n not in is_dependency] or names[:1]
        ordered = primaries + [n for n in names if n not in primaries]
        groups.append(TensorGroup(tuple(ordered), tensor_file[ordered[0]]))
    return groups
