"""Converters after the model mapping: Megatron-Core -> HF tensors -> a converter chain -> HF files.

With ``--converter`` on a Megatron source, the HF-named expressions the model mapping gives are
the chain's input, the way an HF checkpoint's tensors are for the pre-stage. Each tensor group
(a tensor and its dependencies) is materialized from the Megatron rank files, converted once,
and kept for the group's other outputs; so MCore -> quantized HF is one pass and writes the same
bytes as MCore -> HF followed by ``convert-checkpoint hf`` (or ``quantize``) with the same chain.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

from .. import dtypes
from .. import tensor_expr as tx
from ..core.plan import ModelInfo
from ..dtypes import DType
from ..endpoints.base import Source
from ..errors import ConversionError
from ..tensor_expr import Expr, Leaf, LeafReader, TensorRef, source
from .groups import TensorGroup, plan_groups
from .protocol import ConverterChain
from .registry import CheckpointInfo, build_chain
from .source import GroupReader, output_file

STAGE_FILE = "<post-stage>"  # the TensorRef file of converted tensors (they exist only in memory)


def chain_input(expr: Expr) -> Expr:
    """What the chain receives: block-FP8 expressions as their values in bf16."""
    return tx.cast(expr, dtypes.BFLOAT16) if tx.is_fp8(expr) else expr


@dataclass
class PostStage:
    chain: ConverterChain
    inputs: dict[str, Expr]  # HF name -> expression over the Megatron source
    groups: list[TensorGroup]
    outputs: list[tuple[str, ...]]  # per group: its output names
    output_meta: dict[str, tuple[DType, tuple[int, ...]]] = field(default_factory=dict)
    group_of: dict[str, int] = field(default_factory=dict)  # output name -> group index

    def by_shard(self, shards: Iterable[str], shard_of: Mapping[str, str]) -> dict[str, list[tuple[str, Expr]]]:
        """Per output file (in ``shards`` order), the outputs as whole leaves over the stage, each
        in the shard of its module's weight (``convert-checkpoint hf``'s rule)."""
        out: dict[str, list[tuple[str, Expr]]] = {shard: [] for shard in shards}
        for group, names in zip(self.groups, self.outputs):
            for n in names:
                out[output_file(n, group, shard_of)].append((n, source(TensorRef(STAGE_FILE, n), *self.output_meta[n])))
        return out

    def group_bytes(self, index: int) -> int:
        inputs = sum(tx.nbytes(self.inputs[n]) for n in self.groups[index].members)
        return inputs + sum(math.prod(s) * d.itemsize for n in self.outputs[index] for d, s in (self.output_meta[n],))


def build_post_stage(exprs: Mapping[str, Expr], shard_of: Mapping[str, str], converters: Iterable[Any], root: str,
                     config: Mapping[str, Any]) -> PostStage | None:
    """Validate the chain on meta tensors for every group; None when it has nothing to do.
    ``shard_of`` is the file each input tensor would be written to: a group's outputs go to
    its first tensor's file, as ``convert-checkpoint hf`` keeps them."""
    # In file order, as a reader of the written checkpoint would list them: groups keep that order.
    inputs = {name: chain_input(exprs[name]) for name in shard_of}
    chain = build_chain(CheckpointInfo(root, dict(config), frozenset(inputs)), converters)
    if chain is None:
        return None
    groups = plan_groups(dict(shard_of), chain)
    stage = PostStage(chain, inputs, groups, [])
    for index, group in enumerate(groups):
        meta = {n: torch.empty(inputs[n].shape, dtype=inputs[n].dtype.torch, device="meta") for n in group.members}
        produced = chain.validate(meta, group.label)
        stage.outputs.append(tuple(produced))
        for name, t in produced.items():
            if name in stage.group_of:
                raise ConversionError(f"the converters produce tensor {name} twice: from "
                                      f"{groups[stage.group_of[name]].label} and from {group.label}")
            stage.output_meta[name] = (dtypes.of(t.dtype), tuple(t.shape))
            stage.group_of[name] = index
    return stage


class PostStageReader(GroupReader):
    """Converted tensors after the model mapping: group inputs materialized from the Megatron
    source's expressions."""

    def __init__(self, stage: PostStage, inner: LeafReader):
        super().__init__(stage.chain)
        self._stage = stage
        self._inner = inner

    def _group(self, index: int) -> TensorGroup:
        return self._stage.groups[index]

    def _group_index(self, output: str) -> int:
        return self._stage.group_of[output]

    def _read_inputs(self, group: TensorGroup) -> dict[str, torch.Tensor]:
        return {n: tx.materialize(self._stage.inputs[n], self._inner) for n in group.members}

    def _planned(self, index: int) -> dict[str, tuple[DType, tuple[int, ...]]]:
        return {n: self._stage.output_meta[n] for n in self._stage.outputs[index]}

    def _close_inputs(self) -> None:
        self._inner.close()


class PostStageSource(Source):
    """A source seen through a post-stage: the plan's source for the executor, which reads the
    converted tensors through it; everything else is the wrapped source's."""

    def __init__(self, inner: Source, stage: PostStage):
        self.inner = inner
        self.stage = stage
        self.root = inner.root
        self.format = inner.format  # the plan names the real source format
        self.short = inner.short

    def model(self) -> ModelInfo:
        return self.inner.model()

    @property
    def tensor_count(self) -> int:
        return self.inner.tensor_count

    @property
    def has_fp8(self) -> bool:
        return self.inner.has_fp8

    @property
    def fp8_nominal_dtype(self) -> DType | None:
        return self.inner.fp8_nominal_dtype

    def reader(self) -> LeafReader:
        return PostStageReader(self.stage, self.inner.reader())

    def bytes_read_for(self, leaves: Iterable[Leaf]) -> int:
        touched = {self.stage.group_of[leaf.ref.name] for leaf in leaves}
        return sum(self.inner.bytes_read_for(src for n in self.stage.groups[i].members
                                             for src in tx.leaves(self.stage.inputs[n]))
                   for i in touched)

    @property
    def largest_group_bytes(self) -> int:
        return max((self.stage.group_bytes(i) for i in range(len(self.stage.groups))), default=0)

    def describe(self) -> list[str]:
        return self.inner.describe() + [f"converters after the model mapping: {' -> '.join(self.stage.chain.labels)}"]
