"""Symbolic tensors: "which rows (and columns) of which source tensor".

Every tensor the converter writes is described, at plan time, by a small expression tree over
source tensors. Building the expression reads no data; materialising it reads only the bytes
it needs. Four node kinds cover every layout:

* ``Leaf``   a rectangular window of one source tensor (``offsets`` + ``shape``);
* ``Cat``    concatenation of parts along one dimension;
* ``Repeat`` a part of size 1 along ``dim`` repeated ``count`` times (vocab padding rows);
* ``Cast``   a part converted to another dtype (only where the target format fixes the dtype,
  e.g. Megatron's fp32 router expert bias).

``narrow(expr, dim, start, length)`` pushes a slice down to the leaves, so composing the model
mapping (HF <-> canonical) with the layout mapping (canonical <-> shards) stays a tree of
windows on the source files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import torch


@dataclass(frozen=True)
class TensorRef:
    """One tensor in one source file.

    ``file`` is relative to the source root; ``container`` is the top-level key of a
    Megatron ``.pt`` file (``model``, ``model0`` ...) and ``None`` for safetensors.
    """

    file: str
    name: str
    container: str | None = None

    def describe(self) -> str:
        inner = f"{self.container}/{self.name}" if self.container else self.name
        return f"{self.file}:{inner}"


@dataclass(frozen=True)
class Leaf:
    ref: TensorRef
    dtype: torch.dtype
    source_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def is_whole(self) -> bool:
        return self.shape == self.source_shape


@dataclass(frozen=True)
class Cat:
    dim: int
    parts: tuple["Expr", ...]
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Repeat:
    part: "Expr"
    dim: int
    count: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Cast:
    part: "Expr"
    shape: tuple[int, ...]
    dtype: torch.dtype


Expr = Union[Leaf, Cat, Repeat, Cast]


def source(ref: TensorRef, dtype: torch.dtype, shape: Sequence[int]) -> Leaf:
    shape = tuple(int(s) for s in shape)
    return Leaf(ref, dtype, shape, (0,) * len(shape), shape)


def cat(parts: Sequence[Expr], dim: int = 0) -> Expr:
    parts = tuple(parts)
    if not parts:
        raise ValueError("cat of no parts")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if p.dtype != first.dtype:
            raise ValueError(f"cat of mixed dtypes {first.dtype} and {p.dtype}")
        if len(p.shape) != len(first.shape) or any(
            a != b for i, (a, b) in enumerate(zip(p.shape, first.shape)) if i != dim
        ):
            raise ValueError(f"cat along dim {dim} of shapes {first.shape} and {p.shape}")
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return Cat(dim, parts, tuple(shape), first.dtype)


def repeat(part: Expr, dim: int, count: int) -> Expr:
    if part.shape[dim] != 1:
        raise ValueError("repeat needs a part of size 1 along its dimension")
    shape = list(part.shape)
    shape[dim] = count
    return Repeat(part, dim, count, tuple(shape), part.dtype)


def cast(part: Expr, dtype: torch.dtype) -> Expr:
    if part.dtype == dtype:
        return part
    if isinstance(part, Cast):
        part = part.part
        if part.dtype == dtype:
            return part
    return Cast(part, part.shape, dtype)


def narrow(expr: Expr, dim: int, start: int, length: int) -> Expr:
    """The window ``[start, start + length)`` of ``expr`` along ``dim``."""
    size = expr.shape[dim]
    if start < 0 or length < 0 or start + length > size:
        raise ValueError(f"narrow [{start}, {start + length}) out of range {size} on dim {dim}")
    if start == 0 and length == size:
        return expr
    if isinstance(expr, Leaf):
        offsets = list(expr.offsets)
        shape = list(expr.shape)
        offsets[dim] += start
        shape[dim] = length
        return Leaf(expr.ref, expr.dtype, expr.source_shape, tuple(offsets), tuple(shape))
    if isinstance(expr, Repeat):
        if dim == expr.dim:
            return repeat(expr.part, dim, length)
        return repeat(narrow(expr.part, dim, start, length), expr.dim, expr.count)
    if isinstance(expr, Cast):
        return cast(narrow(expr.part, dim, start, length), expr.dtype)
    if dim != expr.dim:
        return cat([narrow(p, dim, start, length) for p in expr.parts], expr.dim)
    pieces = []
    pos = 0
    end = start + length
    for part in expr.parts:
        n = part.shape[dim]
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            pieces.append(narrow(part, dim, lo - pos, hi - lo))
        pos += n
    return cat(pieces, dim)


def split_even(expr: Expr, dim: int, parts: int, index: int) -> Expr:
    """Part ``index`` of ``parts`` equal chunks along ``dim`` (the size must divide)."""
    size = expr.shape[dim]
    if size % parts:
        raise ValueError(f"size {size} on dim {dim} is not divisible by {parts}")
    step = size // parts
    return narrow(expr, dim, index * step, step)


def leaves(expr: Expr):
    if isinstance(expr, Leaf):
        yield expr
    elif isinstance(expr, (Repeat, Cast)):
        yield from leaves(expr.part)
    else:
        for p in expr.parts:
            yield from leaves(p)


def nbytes(expr: Expr) -> int:
    n = 1
    for s in expr.shape:
        n *= s
    return n * expr.dtype.itemsize


def describe(expr: Expr) -> str:
    """A one-line human description for ``--dry_run``."""
    if isinstance(expr, Leaf):
        if expr.is_whole:
            return expr.ref.describe()
        window = ",".join(
            f"{o}:{o + s}" if (o, s) != (0, full) else ":"
            for o, s, full in zip(expr.offsets, expr.shape, expr.source_shape)
        )
        return f"{expr.ref.describe()}[{window}]"
    if isinstance(expr, Repeat):
        return f"repeat({describe(expr.part)}, x{expr.count})"
    if isinstance(expr, Cast):
        return f"{str(expr.dtype).replace('torch.', '')}({describe(expr.part)})"
    return f"cat{expr.dim}(" + ", ".join(describe(p) for p in expr.parts) + ")"


class LeafReader(Protocol):
    def read_into(self, leaf: Leaf, out: torch.Tensor) -> None:
        """Fill ``out`` (shape ``leaf.shape``, dtype ``leaf.dtype``) with the leaf's window."""


def materialize(expr: Expr, reader: LeafReader) -> torch.Tensor:
    out = torch.empty(expr.shape, dtype=expr.dtype)
    materialize_into(expr, reader, out)
    return out


def materialize_into(expr: Expr, reader: LeafReader, out: torch.Tensor) -> None:
    if isinstance(expr, Leaf):
        reader.read_into(expr, out)
        return
    if isinstance(expr, Repeat):
        one = torch.empty(expr.part.shape, dtype=expr.dtype)
        materialize_into(expr.part, reader, one)
        out.copy_(one.expand(expr.shape))
        return
    if isinstance(expr, Cast):
        out.copy_(materialize(expr.part, reader))  # copy_ converts the dtype
        return
    pos = 0
    for part in expr.parts:
        n = part.shape[expr.dim]
        target = out.narrow(expr.dim, pos, n)
        if target.is_contiguous():
            materialize_into(part, reader, target)
        else:  # column windows: read contiguously, then scatter
            target.copy_(materialize(part, reader))
        pos += n
