"""A HuggingFace checkpoint seen through a converter chain (the pre-stage, and ``hf`` HF -> HF).

``convert_index`` validates every tensor group on meta tensors and indexes what the chain will
produce: names, dtypes and shapes, each attributed to the shard of its module's weight in the
source (else of its group's home). The HuggingFace
source endpoint presents that index like its own. Reading a converted tensor loads its group's
source tensors (wherever they are stored), runs the chain once, and keeps the result for the
next tensors of the same group; so a worker holds one output file plus one tensor group.
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
from ..dtypes import DType
from ..errors import ConversionError
from ..formats.safetensors_io import SafetensorsReader, TensorEntry
from ..tensor_expr import Leaf, TensorRef, dtype_name, source
from .groups import TensorGroup, plan_groups
from .protocol import ConverterChain
from .registry import CheckpointInfo, build_chain


@dataclass
class ConvertedIndex:
    """``entries``/``tensor_file`` index the chain's output (entries carry no file offsets: the
    tensors exist only once converted); ``inputs``/``input_file`` the files on disk."""

    root: str
    config: dict  # config.json as the chain leaves it
    entries: dict[str, dict[str, TensorEntry]]  # home file -> output name -> entry
    tensor_file: dict[str, str]  # output name -> home file
    chain: ConverterChain
    inputs: dict[str, dict[str, TensorEntry]]  # file -> name -> entry of the source files
    input_file: dict[str, str]  # source tensor name -> file
    groups: list[TensorGroup] = field(default_factory=list)
    group_of: dict[str, int] = field(default_factory=dict)  # output tensor name -> index into groups
    outputs: list[tuple[str, ...]] = field(default_factory=list)  # per group: the output tensor names

    def reader(self) -> ConvertedReader:
        return ConvertedReader(self)

    def output_order(self) -> dict[str, list[str]]:
        """Per output file, its tensors in group order (how HF -> HF writes them)."""
        order: dict[str, list[str]] = {}
        for names in self.outputs:
            for name in names:
                order.setdefault(self.tensor_file[name], []).append(name)
        return order

    def group_bytes(self, index: int) -> int:
        """Source bytes in and converted bytes out of one group (what a worker holds for it)."""
        inputs = sum(_nbytes(self.inputs[self.input_file[n]][n]) for n in self.groups[index].members)
        return inputs + sum(_nbytes(self.entries[self.tensor_file[n]][n]) for n in self.outputs[index])

    @property
    def largest_group_bytes(self) -> int:
        return max((self.group_bytes(i) for i in range(len(self.groups))), default=0)

    def bytes_read_for(self, leaves) -> int:
        """Source bytes read to build one output file from ``leaves`` (each group read once)."""
        touched = {self.group_of[leaf.ref.name] for leaf in leaves}
        return sum(_nbytes(self.inputs[self.input_file[n]][n]) for i in touched for n in self.groups[i].members)


def output_file(name: str, group: TensorGroup, src_tensor_file: Mapping[str, str]) -> str:
    """The shard an output tensor goes to: that of its module's weight in the source (so a fused
    partner read as a dependency keeps its own shard), else the group's home."""
    module = name.rpartition(".")[0]
    same = [m for m in group.members if m.rpartition(".")[0] == module]
    for param in _MAIN_PARAMS:
        if f"{module}.{param}" in same:
            return src_tensor_file[f"{module}.{param}"]
    return src_tensor_file[same[0]] if same else group.home


_MAIN_PARAMS = ("weight", "weight_packed", "qweight")


def _nbytes(entry: TensorEntry) -> int:
    return math.prod(entry.shape) * entry.dtype.itemsize


def convert_index(root: str, config: dict, entries: dict[str, dict[str, TensorEntry]], tensor_file: dict[str, str],
                  converters: Iterable[Any]) -> ConvertedIndex | None:
    """Build the chain for this checkpoint (specs or objects) and index what it will produce;
    None when the chain turns out empty (nothing to convert)."""
    chain = build_chain(CheckpointInfo(root, config, frozenset(tensor_file)), converters)
    return None if chain is None else _apply_chain(root, config, entries, tensor_file, chain)


def _apply_chain(root: str, config: dict, src_entries: dict[str, dict[str, TensorEntry]],
                 src_tensor_file: dict[str, str], chain: ConverterChain) -> ConvertedIndex:
    groups = plan_groups(src_tensor_file, chain)
    entries: dict[str, dict[str, TensorEntry]] = {f: {} for f in src_entries}
    tensor_file: dict[str, str] = {}
    group_of: dict[str, int] = {}
    outputs: list[tuple[str, ...]] = []
    for index, group in enumerate(groups):
        meta = {}
        for name in group.members:
            e = src_entries[src_tensor_file[name]][name]
            meta[name] = torch.empty(e.shape, dtype=e.dtype.torch, device="meta")
        produced = chain.validate(meta, group.label)
        outputs.append(tuple(produced))
        for name, t in produced.items():
            if name in group_of:
                other = groups[group_of[name]].label
                raise ConversionError(f"the converters produce tensor {name} twice: from {other} and from {group.label}")
            file = output_file(name, group, src_tensor_file)
            entries[file][name] = TensorEntry(dtypes.of(t.dtype), tuple(t.shape), 0)
            tensor_file[name] = file
            group_of[name] = index
    return ConvertedIndex(root, chain.hf_config(config), entries, tensor_file, chain, inputs=src_entries,
                          input_file=dict(src_tensor_file), groups=groups, group_of=group_of, outputs=outputs)


class GroupReader:
    """Reads converted tensors (``tensor_expr.LeafReader``): a group's inputs are read and
    converted on first use, checked against what ``validate`` announced, and kept for the
    group's other outputs. Subclasses say where groups, inputs and planned outputs come from."""

    def __init__(self, chain: ConverterChain) -> None:
        self._chain = chain
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    # --- what a subclass provides ---------------------------------------------------------
    def _group(self, index: int) -> TensorGroup:
        raise NotImplementedError

    def _group_index(self, output: str) -> int:
        raise NotImplementedError

    def _read_inputs(self, group: TensorGroup) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _planned(self, index: int) -> dict[str, tuple[DType, tuple[int, ...]]]:
        """Output name -> (dtype, shape) that ``validate`` announced for group ``index``."""
        raise NotImplementedError

    def _close_inputs(self) -> None:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    def _outputs(self, index: int) -> dict[str, torch.Tensor]:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        self._cached = None  # drop the previous group before loading the next
        group = self._group(index)
        out = self._chain.process(self._read_inputs(group), group.label)
        planned = self._planned(index)
        if set(out) != set(planned):
            extra = sorted(set(out) - set(planned)) or sorted(set(planned) - set(out))
            raise ConversionError(f"the converters' process() and validate() disagree for {group.label}: "
                                  f"{'unexpected' if set(out) - set(planned) else 'missing'} tensor {extra[0]}")
        for name, t in out.items():
            dtype, shape = planned[name]
            if dtypes.of(t.dtype) != dtype or tuple(t.shape) != shape:
                raise ConversionError(f"converter output {name} is {dtype_name(t.dtype)} {list(t.shape)}, but "
                                      f"validate() promised {dtype_name(dtype)} {list(shape)}")
        self._cached = (index, out)
        return out

    def whole(self, leaf: Leaf) -> torch.Tensor | None:
        """A whole converted tensor, as the chain produced it (written without a copy)."""
        return self._outputs(self._group_index(leaf.ref.name))[leaf.ref.name]

    def read_into(self, leaf: Leaf, out: torch.Tensor) -> None:
        out.copy_(leaf.window(self._outputs(self._group_index(leaf.ref.name))[leaf.ref.name]))

    def close(self) -> None:
        self._cached = None
        self._close_inputs()


class ConvertedReader(GroupReader):
    """Converted tensors of an HF checkpoint: group inputs read from its safetensors files."""

    def __init__(self, src: ConvertedIndex):
        super().__init__(src.chain)
        self._src = src
        self._files = SafetensorsReader(src.root, src.inputs)

    def _group(self, index: int) -> TensorGroup:
        return self._src.groups[index]

    def _group_index(self, output: str) -> int:
        return self._src.group_of[output]

    def _read_inputs(self, group: TensorGroup) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in group.members:
            file = self._src.input_file[name]
            e = self._src.inputs[file][name]
            value = torch.empty(e.shape, dtype=e.dtype.torch)
            self._files.read_into(source(TensorRef(file, name), e.dtype, e.shape), value)
            tensors[name] = value
        return tensors

    def _planned(self, index: int) -> dict[str, tuple[DType, tuple[int, ...]]]:
        return {n: (e.dtype, tuple(e.shape)) for n in self._src.outputs[index]
                for e in (self._src.entries[self._src.tensor_file[n]][n],)}

    def _close_inputs(self) -> None:
        self._files.close()
