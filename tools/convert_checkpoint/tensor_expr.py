"""Symbolic tensors: "which rows (and columns) of which source tensor".

Every tensor the converter writes is described, at plan time, by a small expression tree over
source tensors. Building the expression reads no data; materialising it reads only the bytes
it needs. Four node kinds cover every layout:

* ``Leaf``   a rectangular window of one source tensor (``offsets`` + ``shape``);
* ``Cat``    concatenation of parts along one dimension;
* ``Repeat`` a part of size 1 along ``dim`` repeated ``count`` times (vocab padding rows);
* ``Cast``   a part converted to another dtype (only where the target format fixes the dtype,
  e.g. Megatron's fp32 router expert bias).

Block-scaled FP8 weights (128x128 blocks, ``quant/fp8_block``) add four kinds:

* ``Fp8Blocks``  codes + scale grid kept as they are: windows and concatenations that fall on
  block boundaries move whole blocks, so codes and scales are copied bit for bit;
* ``Dequantize`` the fp32 values of a window of an ``Fp8Blocks`` that a cut splits inside a
  block (its ``reason`` says which cut); such a tensor is requantized when written;
* ``Quantize``   values quantized when the file is written (requantization, or ``dtype: fp8``);
* ``Fp8Part``    the codes or the scale grid of an FP8 expression (HF files store them as two
  tensors, ``weight`` and ``weight_scale_inv``).

``Encode`` is a part turned into a target's own encoding when its file is written (KTransformers'
AMX INT4/INT8 bytes and scales); only the target that planned it applies it.

``narrow(expr, dim, start, length)`` pushes a slice down to the leaves, so composing the model
mapping (HF <-> canonical) with the layout mapping (canonical <-> shards) stays a tree of
windows on the source files.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .quant import fp8_block


@dataclass(frozen=True)
class TensorRef:
    """One tensor in one source file.

    ``file`` is relative to the source root; ``container`` is the top-level key of a
    Megatron ``.pt`` file (``model``, ``model0`` ...) and ``None`` for safetensors.
    """

    file: str
    name: str
    container: str | None = None
    part: str | None = None  # "codes" / "scale" of a pickled TE FP8 tensor

    def describe(self) -> str:
        inner = f"{self.container}/{self.name}" if self.container else self.name
        return f"{self.file}:{inner}" + (f".{self.part}" if self.part else "")


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

    def window(self, t: torch.Tensor) -> torch.Tensor:
        """This leaf's window of ``t`` (the whole source tensor), as a view."""
        for dim, (start, length) in enumerate(zip(self.offsets, self.shape)):
            t = t.narrow(dim, start, length)
        return t


@dataclass(frozen=True)
class Cat:
    dim: int
    parts: tuple[Expr, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Repeat:
    part: Expr
    dim: int
    count: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Cast:
    part: Expr
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Fp8Blocks:
    data: Expr  # float8_e4m3fn codes
    scale: Expr  # float32 dequant multipliers, one per 128x128 block
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float8_e4m3fn


@dataclass(frozen=True)
class Dequantize:
    part: Fp8Blocks  # the smallest block-aligned window holding the crop
    offsets: tuple[int, ...]  # the crop, inside ``part``
    shape: tuple[int, ...]
    reason: str
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Quantize:
    part: Expr
    reason: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fp8Part:
    of: Fp8Blocks | Quantize
    which: str  # "codes" or "scale"
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Encode:
    part: Expr  # the values encoded
    codec: object  # what the target applies (frozen, printable: part of the plan's fingerprint)
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Select:
    """Entry ``index`` of ``part`` along dim 0, that dim dropped (one expert of a stacked 3-D tensor)."""

    part: Expr
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Transpose:
    """A 2-D ``part`` transposed (HF experts stored ``[in, out]``)."""

    part: Expr
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Stack:
    """``parts`` (equal shapes) stacked along a new dim 0: the inverse of ``Select``."""

    parts: tuple[Expr, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype


Expr = Leaf | Cat | Repeat | Cast | Fp8Blocks | Dequantize | Quantize | Fp8Part | Encode | Select | Transpose | Stack


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (messages, reports, recorded dtypes)."""
    return str(dtype).replace("torch.", "")


def source(ref: TensorRef, dtype: torch.dtype, shape: Sequence[int]) -> Leaf:
    shape = tuple(int(s) for s in shape)
    return Leaf(ref, dtype, shape, (0,) * len(shape), shape)


def cat(parts: Sequence[Expr], dim: int = 0) -> Expr:
    items = tuple(parts)
    if not items:
        raise ValueError("cat of no parts")
    if len(items) == 1:
        return items[0]
    if any(isinstance(p, (Fp8Blocks, Dequantize)) for p in items):
        joined = _fp8_cat_parts(items, dim)
        if isinstance(joined, Fp8Blocks):
            return joined
        items = joined
    first = items[0]
    for p in items[1:]:
        if p.dtype != first.dtype:
            raise ValueError(f"cat of mixed dtypes {first.dtype} and {p.dtype}")
        if len(p.shape) != len(first.shape) or any(
            a != b for i, (a, b) in enumerate(zip(p.shape, first.shape)) if i != dim
        ):
            raise ValueError(f"cat along dim {dim} of shapes {first.shape} and {p.shape}")
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in items)
    return Cat(dim, items, tuple(shape), first.dtype)


def select(part: Expr, index: int) -> Expr:
    if not 0 <= index < part.shape[0]:
        raise ValueError(f"select {index} out of range {part.shape[0]}")
    return Select(part, index, tuple(part.shape[1:]), part.dtype)


def transpose(part: Expr) -> Expr:
    if len(part.shape) != 2:
        raise ValueError(f"transpose of a {len(part.shape)}-D tensor")
    if isinstance(part, Transpose):
        return part.part
    return Transpose(part, (part.shape[1], part.shape[0]), part.dtype)


def stack(parts: Sequence[Expr]) -> Expr:
    items = tuple(parts)
    if not items or any(p.shape != items[0].shape or p.dtype != items[0].dtype for p in items):
        raise ValueError("stack needs parts of one shape and dtype")
    if all(isinstance(p, Select) for p in items):  # the experts of one stacked tensor, in order: itself
        first = items[0]
        assert isinstance(first, Select)
        if first.part.shape[0] == len(items) and all(
                isinstance(p, Select) and p.part == first.part and p.index == i for i, p in enumerate(items)):
            return first.part
    return Stack(items, (len(items), *items[0].shape), items[0].dtype)


def repeat(part: Expr, dim: int, count: int) -> Expr:
    if part.shape[dim] != 1:
        raise ValueError("repeat needs a part of size 1 along its dimension")
    shape = list(part.shape)
    shape[dim] = count
    return Repeat(part, dim, count, tuple(shape), part.dtype)


def cast(part: Expr, dtype: torch.dtype) -> Expr:
    if isinstance(part, Fp8Blocks):  # a cast of block FP8 is a cast of its values
        part = Dequantize(part, (0,) * len(part.shape), part.shape, f"cast to {dtype}")
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
    if isinstance(expr, Fp8Blocks):
        return _narrow_fp8(expr, dim, start, length)
    if isinstance(expr, Dequantize):
        offsets = list(expr.offsets)
        offsets[dim] += start
        shape = list(expr.shape)
        shape[dim] = length
        return _crop(expr.part, tuple(offsets), tuple(shape), expr.reason)
    if isinstance(expr, (Quantize, Fp8Part, Encode)):
        raise TypeError("a quantized output tensor cannot be cut further")
    if isinstance(expr, Select):
        return select(narrow(expr.part, dim + 1, start, length), expr.index)
    if isinstance(expr, Transpose):
        return transpose(narrow(expr.part, 1 - dim, start, length))
    if isinstance(expr, Stack):
        if dim == 0:
            return stack(expr.parts[start:start + length])
        return stack([narrow(p, dim - 1, start, length) for p in expr.parts])
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


def children(expr: Expr) -> tuple[Expr, ...]:
    if isinstance(expr, (Repeat, Cast, Dequantize, Quantize, Encode, Select, Transpose)):
        return (expr.part,)
    if isinstance(expr, Stack):
        return expr.parts
    if isinstance(expr, Fp8Part):
        return (expr.of,)
    if isinstance(expr, Fp8Blocks):
        return (expr.data, expr.scale)
    if isinstance(expr, Cat):
        return expr.parts
    return ()


def nodes(expr: Expr):
    """Every node of an expression, parents before their parts."""
    yield expr
    for part in children(expr):
        yield from nodes(part)


def leaves(expr: Expr):
    return (n for n in nodes(expr) if isinstance(n, Leaf))


def casts(expr: Expr):
    """The ``Cast`` nodes of an expression (dtype changes a recipe makes)."""
    return (n for n in nodes(expr) if isinstance(n, Cast))


def nbytes(expr: Expr) -> int:
    n = math.prod(expr.shape) * expr.dtype.itemsize
    if isinstance(expr, (Fp8Blocks, Quantize)):  # codes and their scale grid
        n += math.prod(fp8_block.scale_shape(expr.shape)) * 4
    return n


# --- block-scaled FP8 --------------------------------------------------------------------

def fp8_blocks(data: Expr, scale: Expr) -> Fp8Blocks:
    """A block-FP8 tensor from its codes and its scale grid (shapes checked)."""
    if data.dtype != torch.float8_e4m3fn or len(data.shape) != 2:
        raise ValueError(f"FP8 codes must be a 2-D float8_e4m3fn tensor, got {str(data.dtype)} {list(data.shape)}")
    want = fp8_block.scale_shape(data.shape)
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise ValueError(
            f"the scale grid must be float32 {list(want)} for FP8 codes {list(data.shape)} in 128x128 blocks, "
            f"got {str(scale.dtype).replace('torch.', '')} {list(scale.shape)}"
        )
    return Fp8Blocks(data, scale, tuple(data.shape))


def _source_names(expr: Expr) -> str:
    """The source weights behind ``expr`` (their scale grids left out), for messages."""
    if isinstance(expr, Dequantize):
        expr = expr.part
    if isinstance(expr, Fp8Blocks):
        expr = expr.data
    names = sorted({leaf.ref.name for leaf in leaves(expr)})
    return ", ".join(names[:2]) + (f" (+{len(names) - 2})" if len(names) > 2 else "")


def _narrow_fp8(expr: Fp8Blocks, dim: int, start: int, length: int) -> Expr:
    size = expr.shape[dim]
    if fp8_block.block_aligned(start, length, size):
        block = fp8_block.BLOCK
        first = start // block
        count = fp8_block.block_count(start + length) - first
        return Fp8Blocks(narrow(expr.data, dim, start, length), narrow(expr.scale, dim, first, count),
                         _with(expr.shape, dim, length))
    what = "row" if dim == 0 else "column"
    edge = start if start % fp8_block.BLOCK else start + length
    reason = (f"{_source_names(expr)}: the cut at {what} {edge} of {size} falls inside a 128-block")
    offsets = tuple(start if d == dim else 0 for d in range(len(expr.shape)))
    return _crop(expr, offsets, _with(expr.shape, dim, length), reason)


def _crop(part: Fp8Blocks, offsets: tuple[int, ...], shape: tuple[int, ...], reason: str) -> Expr:
    """The values ``part[offsets : offsets + shape]``, reading only the blocks that hold them."""
    block = fp8_block.BLOCK
    for dim, (o, n) in enumerate(zip(offsets, shape)):
        lo = o // block * block
        hi = min(-(-(o + n) // block) * block, part.shape[dim])
        if (lo, hi) != (0, part.shape[dim]):
            narrowed = _narrow_fp8(part, dim, lo, hi - lo)
            assert isinstance(narrowed, Fp8Blocks)  # block-aligned, so stays Fp8Blocks
            part = narrowed
            offsets = _with(offsets, dim, o - lo)
    if offsets == (0,) * len(shape) and tuple(shape) == part.shape:
        return part  # whole blocks after all (e.g. one shard of a misaligned concatenation)
    return Dequantize(part, tuple(offsets), tuple(shape), reason)


def _with(values: tuple[int, ...], dim: int, value: int) -> tuple[int, ...]:
    out = list(values)
    out[dim] = value
    return tuple(out)


def _fp8_cat_parts(parts: tuple[Expr, ...], dim: int) -> Fp8Blocks | tuple[Expr, ...]:
    """Concatenate block-FP8 parts: whole blocks (every part but the last a multiple of 128
    along ``dim``) stay FP8; otherwise every part is dequantized and the result requantized."""
    blocks = [p for p in parts if isinstance(p, Fp8Blocks)]
    if len(blocks) == len(parts) and all(p.shape[dim] % fp8_block.BLOCK == 0 for p in blocks[:-1]):
        for block in blocks[1:]:
            if any(a != b for i, (a, b) in enumerate(zip(block.shape, blocks[0].shape)) if i != dim):
                raise ValueError(f"cat along dim {dim} of shapes {blocks[0].shape} and {block.shape}")
        return Fp8Blocks(cat([p.data for p in blocks], dim), cat([p.scale for p in blocks], dim),
                         _with(blocks[0].shape, dim, sum(p.shape[dim] for p in blocks)))
    odd = next((p for p in parts[:-1] if p.shape[dim] % fp8_block.BLOCK), parts[0])
    reason = (f"{_source_names(odd)}: joined along dim {dim} after a part of {odd.shape[dim]} "
              f"{'rows' if dim == 0 else 'columns'}, not a multiple of 128")
    out = []
    for p in parts:
        if isinstance(p, Fp8Blocks):
            p = Dequantize(p, (0,) * len(p.shape), p.shape, reason)
        out.append(p)
    return tuple(out)


def is_fp8(expr: Expr) -> bool:
    """Whether ``expr`` holds block-FP8 values (kept, or dequantized on the way)."""
    if isinstance(expr, (Fp8Blocks, Dequantize, Quantize)):
        return True
    if isinstance(expr, Leaf):
        return expr.dtype == torch.float8_e4m3fn
    if isinstance(expr, Repeat):
        return is_fp8(expr.part)
    if isinstance(expr, Cat):
        return any(is_fp8(p) for p in expr.parts)
    return False


def requant_reasons(expr: Expr) -> list[str]:
    if isinstance(expr, Dequantize):
        return [expr.reason]
    if isinstance(expr, (Cat,)):
        return [r for p in expr.parts for r in requant_reasons(p)]
    if isinstance(expr, (Repeat, Cast)):
        return requant_reasons(expr.part)
    return []


def to_fp8(expr: Expr, reason: str) -> Fp8Blocks | Quantize:
    """An output tensor written as block FP8: kept blocks as they are, anything else quantized
    (``reason`` applies to values that were never FP8)."""
    if isinstance(expr, (Fp8Blocks, Quantize)):
        return expr
    if len(expr.shape) != 2:
        raise ValueError(f"only 2-D tensors can be stored as block FP8, got shape {list(expr.shape)}")
    found = requant_reasons(expr)
    return Quantize(expr, found[0] if found else reason, tuple(expr.shape))


def fp8_part(expr: Fp8Blocks | Quantize, which: str) -> Fp8Part:
    if which == "codes":
        return Fp8Part(expr, which, expr.shape, torch.float8_e4m3fn)
    if which == "scale":
        return Fp8Part(expr, which, fp8_block.scale_shape(expr.shape), torch.float32)
    raise ValueError(which)


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
    if isinstance(expr, Fp8Blocks):
        return f"fp8({describe(expr.data)}, scale {describe(expr.scale)})"
    if isinstance(expr, Dequantize):
        window = ",".join(f"{o}:{o + n}" for o, n in zip(expr.offsets, expr.shape))
        return f"dequant({describe(expr.part)})[{window}]"
    if isinstance(expr, Quantize):
        return f"quantize({describe(expr.part)}; {expr.reason})"
    if isinstance(expr, Fp8Part):
        return f"{expr.which} of {describe(expr.of)}"
    if isinstance(expr, Encode):
        return f"{expr.codec}({describe(expr.part)})"
    if isinstance(expr, Select):
        return f"{describe(expr.part)}[{expr.index}]"
    if isinstance(expr, Transpose):
        return f"transpose({describe(expr.part)})"
    if isinstance(expr, Stack):
        return "stack(" + ", ".join(describe(p) for p in expr.parts) + ")"
    return f"cat{expr.dim}(" + ", ".join(describe(p) for p in expr.parts) + ")"


class LeafReader(Protocol):
    """Reads leaf windows of one source; each output file gets its own, closed afterwards."""

    def read_into(self, leaf: Leaf, out: torch.Tensor) -> None:
        """Fill ``out`` (shape ``leaf.shape``, dtype ``leaf.dtype``) with the leaf's window."""

    def whole(self, leaf: Leaf) -> torch.Tensor | None:
        """The whole tensor as the source already holds it in memory (a converter's output),
        to write without a copy; None where it would have to be read."""

    def close(self) -> None:
        """Drop open files and memory maps."""


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
    if isinstance(expr, Dequantize):
        codes = materialize(expr.part.data, reader)
        scale = materialize(expr.part.scale, reader)
        values = fp8_block.dequantize_blocks(codes, scale)
        for dim, (o, n) in enumerate(zip(expr.offsets, expr.shape)):
            values = values.narrow(dim, o, n)
        out.copy_(values)
        return
    if isinstance(expr, (Fp8Blocks, Quantize, Fp8Part)):
        raise TypeError("block-FP8 expressions are materialized by quant.fp8_materialize")
    if isinstance(expr, Encode):
        raise TypeError(f"{expr.codec} is applied by the target that planned it")
    if isinstance(expr, Select):  # the one entry, read as a window of dim 0
        materialize_into(narrow(expr.part, 0, expr.index, 1), reader, out.unsqueeze(0))
        return
    if isinstance(expr, Transpose):
        out.copy_(materialize(expr.part, reader).t())
        return
    if isinstance(expr, Stack):
        for i, part in enumerate(expr.parts):
            materialize_into(part, reader, out[i])
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
