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

``Offset`` is a part plus a constant, computed in float32 and rounded back to the part's dtype
(Megatron's zero-centered norm weight of a norm HF stores as plain ``weight``: w - 1). For
values in [0.5, 2] the sum is exact both ways (Sterbenz), so a round trip gives back w bit for bit.

``Encode`` is a part turned into a target's own encoding when its file is written (KTransformers'
AMX INT4/INT8 bytes and scales); only the target that planned it applies it.

Fused 3-D expert tensors stored input-major with interleaved gate/up columns (GPT-OSS's
``gate_up_proj`` ``[experts, hidden, 2*inter]``) add five kinds, each the exact inverse of another:

* ``Select``     one index along a dimension, that dimension dropped (``x[e]``); inverse ``Stack``;
* ``Stack``      parts of one shape stacked along a new dimension;
* ``Transpose``  two dimensions swapped (its own inverse);
* ``Strided``    every ``step``-th element along a dimension (``x[start::step]``, its part already
  cut to the span it reads); inverse ``Interleave``;
* ``Interleave`` parts woven along a dimension: element ``i * k + j`` is ``parts[j][i]``.

``narrow(expr, dim, start, length)`` pushes a slice down to the leaves, so composing the model
mapping (HF <-> canonical) with the layout mapping (canonical <-> shards) stays a tree of
windows on the source files.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import dtypes
from .dtypes import DType
from .quant import fp8_block

if TYPE_CHECKING:
    import torch
else:
    from .torch_import import torch


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
    dtype: DType
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
    dtype: DType


@dataclass(frozen=True)
class Repeat:
    part: Expr
    dim: int
    count: int
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Cast:
    part: Expr
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Fp8Blocks:
    data: Expr  # float8_e4m3fn codes
    scale: Expr  # float32 dequant multipliers, one per 128x128 block
    shape: tuple[int, ...]
    dtype: DType = dtypes.FLOAT8_E4M3FN


@dataclass(frozen=True)
class Dequantize:
    part: Fp8Blocks  # the smallest block-aligned window holding the crop
    offsets: tuple[int, ...]  # the crop, inside ``part``
    shape: tuple[int, ...]
    reason: str
    dtype: DType = dtypes.FLOAT32


@dataclass(frozen=True)
class Quantize:
    part: Expr
    reason: str
    shape: tuple[int, ...]
    dtype: DType = dtypes.FLOAT8_E4M3FN


@dataclass(frozen=True)
class Fp8Part:
    of: Fp8Blocks | Quantize
    which: str  # "codes" or "scale"
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Encode:
    part: Expr  # the values encoded
    codec: object  # what the target applies (frozen, printable: part of the plan's fingerprint)
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Select:
    part: Expr  # size 1 along ``dim``
    dim: int
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Stack:
    parts: tuple[Expr, ...]
    dim: int
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Transpose:
    part: Expr
    dims: tuple[int, int]
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Offset:
    part: Expr
    value: float
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Strided:
    part: Expr  # cut to the span read: element 0 is the first taken, the last element the last
    dim: int
    step: int
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Interleave:
    parts: tuple[Expr, ...]
    dim: int
    shape: tuple[int, ...]
    dtype: DType


Expr = (Leaf | Cat | Repeat | Cast | Fp8Blocks | Dequantize | Quantize | Fp8Part | Encode
        | Select | Stack | Transpose | Strided | Interleave | Offset)


def dtype_name(dtype: DType | torch.dtype) -> str:
    """``bfloat16`` for a DType or ``torch.bfloat16`` (messages, reports, recorded dtypes)."""
    return str(dtype).replace("torch.", "")


def source(ref: TensorRef, dtype: DType | torch.dtype, shape: Sequence[int]) -> Leaf:
    """The whole of one source tensor (a torch dtype is accepted and recorded as its DType)."""
    shape = tuple(map(int, shape))
    return Leaf(ref, dtypes.of(dtype), shape, (0,) * len(shape), shape)


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
        if len(p.shape) != len(first.shape) or p.shape[:dim] != first.shape[:dim] \
                or p.shape[dim + 1:] != first.shape[dim + 1:]:
            raise ValueError(f"cat along dim {dim} of shapes {first.shape} and {p.shape}")
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in items)
    return Cat(dim, items, tuple(shape), first.dtype)


def repeat(part: Expr, dim: int, count: int) -> Expr:
    if part.shape[dim] != 1:
        raise ValueError("repeat needs a part of size 1 along its dimension")
    shape = list(part.shape)
    shape[dim] = count
    return Repeat(part, dim, count, tuple(shape), part.dtype)


def cast(part: Expr, dtype: DType | torch.dtype) -> Expr:
    dtype = dtypes.of(dtype)
    if isinstance(part, Fp8Blocks):  # a cast of block FP8 is a cast of its values
        part = Dequantize(part, (0,) * len(part.shape), part.shape, f"cast to {dtype}")
    if part.dtype == dtype:
        return part
    if isinstance(part, Cast):
        part = part.part
        if part.dtype == dtype:
            return part
    return Cast(part, part.shape, dtype)


def offset(part: Expr, value: float) -> Expr:
    """``part + value`` (see ``Offset``); two offsets fold into one, a zero sum drops out."""
    if isinstance(part, (Fp8Blocks, Quantize, Fp8Part, Encode)):
        raise TypeError("an offset of a quantized or encoded tensor is not supported")
    if isinstance(part, Offset):
        value, part = part.value + value, part.part
    if value == 0:
        return part
    return Offset(part, value, part.shape, part.dtype)


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
    if isinstance(expr, Offset):
        return offset(narrow(expr.part, dim, start, length), expr.value)
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
    if isinstance(expr, (Select, Stack, Transpose, Strided, Interleave)):
        return _narrow_layout(expr, dim, start, length)
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
    if isinstance(expr, (Repeat, Cast, Dequantize, Quantize, Encode, Select, Transpose, Strided, Offset)):
        return (expr.part,)
    if isinstance(expr, (Stack, Interleave)):
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
    if data.dtype != dtypes.FLOAT8_E4M3FN or len(data.shape) != 2:
        raise ValueError(f"FP8 codes must be a 2-D float8_e4m3fn tensor, got {str(data.dtype)} {list(data.shape)}")
    want = fp8_block.scale_shape(data.shape)
    if scale.dtype != dtypes.FLOAT32 or tuple(scale.shape) != want:
        raise ValueError(
            f"the scale grid must be float32 {list(want)} for FP8 codes {list(data.shape)} in 128x128 blocks, "
            f"got {scale.dtype} {list(scale.shape)}"
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
        return expr.dtype == dtypes.FLOAT8_E4M3FN
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
        return Fp8Part(expr, which, expr.shape, dtypes.FLOAT8_E4M3FN)
    if which == "scale":
        return Fp8Part(expr, which, fp8_block.scale_shape(expr.shape), dtypes.FLOAT32)
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
        return f"{expr.dtype}({describe(expr.part)})"
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
        return f"{describe(expr.part)}.squeeze({expr.dim})"
    if isinstance(expr, Transpose):
        return f"{describe(expr.part)}.T{expr.dims}"
    if isinstance(expr, Strided):
        return f"{describe(expr.part)}[dim {expr.dim} ::{expr.step}]"
    if isinstance(expr, (Stack, Interleave)):
        kind = "stack" if isinstance(expr, Stack) else "interleave"
        return f"{kind}{expr.dim}(" + ", ".join(describe(p) for p in expr.parts) + ")"
    if isinstance(expr, Offset):
        return f"({describe(expr.part)} {'+' if expr.value >= 0 else '-'} {abs(expr.value):g})"
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
    out = torch.empty(expr.shape, dtype=expr.dtype.torch)
    materialize_into(expr, reader, out)
    return out


def materialize_into(expr: Expr, reader: LeafReader, out: torch.Tensor) -> None:
    if isinstance(expr, Leaf):
        reader.read_into(expr, out)
        return
    if isinstance(expr, Repeat):
        one = torch.empty(expr.part.shape, dtype=expr.dtype.torch)
        materialize_into(expr.part, reader, one)
        out.copy_(one.expand(expr.shape))
        return
    if isinstance(expr, Cast):
        out.copy_(materialize(expr.part, reader))  # copy_ converts the dtype
        return
    if isinstance(expr, Offset):
        values = materialize(expr.part, reader)
        out.copy_(values.to(torch.promote_types(values.dtype, torch.float32)) + expr.value)
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
    if isinstance(expr, (Select, Stack, Transpose, Strided, Interleave)):
        _materialize_layout(expr, reader, out)
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


# --- fused expert layouts: select / stack, transpose, strided / interleave ------------------

def select(expr: Expr, dim: int, index: int) -> Expr:
    """``expr[index]`` along ``dim``, that dimension dropped (reads only that slice)."""
    part = narrow(expr, dim, index, 1)
    if isinstance(part, Stack) and part.dim == dim:
        return part.parts[0]
    shape = part.shape[:dim] + part.shape[dim + 1:]
    return Select(part, dim, shape, part.dtype)


def stack(parts: Sequence[Expr], dim: int = 0) -> Expr:
    """Parts of one shape and dtype stacked along a new dimension ``dim``."""
    items = tuple(parts)
    if not items:
        raise ValueError("stack of no parts")
    first = items[0]
    for p in items[1:]:
        if p.shape != first.shape or p.dtype != first.dtype:
            raise ValueError(f"stack of {str(first.dtype)} {list(first.shape)} and {str(p.dtype)} {list(p.shape)}")
    if all(isinstance(p, Select) and p.dim == dim for p in items):  # slices put back: their concatenation
        return cat([p.part for p in items], dim)  # type: ignore[union-attr]
    shape = first.shape[:dim] + (len(items),) + first.shape[dim:]
    return Stack(items, dim, shape, first.dtype)


def transpose(expr: Expr, dim0: int = 0, dim1: int = 1) -> Expr:
    """``expr`` with dimensions ``dim0`` and ``dim1`` swapped."""
    if isinstance(expr, (Fp8Blocks, Dequantize, Quantize, Fp8Part, Encode)):
        raise TypeError("block-FP8 and encoded tensors cannot be transposed")
    dims = (min(dim0, dim1), max(dim0, dim1))
    if dims[0] == dims[1]:
        return expr
    if isinstance(expr, Transpose) and expr.dims == dims:
        return expr.part
    shape = list(expr.shape)
    shape[dims[0]], shape[dims[1]] = shape[dims[1]], shape[dims[0]]
    return Transpose(expr, dims, tuple(shape), expr.dtype)


def strided(expr: Expr, dim: int, start: int, step: int, length: int | None = None) -> Expr:
    """``length`` elements ``expr[start::step]`` along ``dim`` (default: as many as there are)."""
    size = expr.shape[dim]
    if step < 1 or start < 0 or start >= size:
        raise ValueError(f"strided start {start} step {step} out of range {size} on dim {dim}")
    if length is None:
        length = -(-(size - start) // step)
    if length < 1 or start + (length - 1) * step >= size:
        raise ValueError(f"strided {length} elements from {start} by {step} out of range {size} on dim {dim}")
    if step == 1 or length == 1:
        return narrow(expr, dim, start, length)
    if isinstance(expr, Interleave) and expr.dim == dim and len(expr.parts) == step:
        # element start + i*k of a weave of k parts is element start//k + i of part start % k
        return narrow(expr.parts[start % step], dim, start // step, length)
    part = narrow(expr, dim, start, (length - 1) * step + 1)
    return Strided(part, dim, step, _with(part.shape, dim, length), part.dtype)


def interleave(parts: Sequence[Expr], dim: int) -> Expr:
    """Parts of one shape woven along ``dim``: out[i*k + j] = parts[j][i] (k = len(parts))."""
    items = tuple(parts)
    if len(items) < 2:
        raise ValueError("interleave needs two parts or more")
    first = items[0]
    for p in items[1:]:
        if p.shape != first.shape or p.dtype != first.dtype:
            raise ValueError(f"interleave of {str(first.dtype)} {list(first.shape)} and {str(p.dtype)} {list(p.shape)}")
    return Interleave(items, dim, _with(first.shape, dim, first.shape[dim] * len(items)), first.dtype)


def _narrow_layout(expr: Expr, dim: int, start: int, length: int) -> Expr:
    if isinstance(expr, Select):
        inner = dim + (dim >= expr.dim)
        return select(narrow(expr.part, inner, start, length), expr.dim, 0)
    if isinstance(expr, Stack):
        if dim == expr.dim:
            return stack(expr.parts[start:start + length], dim)
        inner = dim - (dim > expr.dim)
        return stack([narrow(p, inner, start, length) for p in expr.parts], expr.dim)
    if isinstance(expr, Transpose):
        a, b = expr.dims
        inner = b if dim == a else a if dim == b else dim
        return transpose(narrow(expr.part, inner, start, length), a, b)
    if isinstance(expr, Strided):
        if dim == expr.dim:
            return strided(expr.part, dim, start * expr.step, expr.step, length)
        return strided(narrow(expr.part, dim, start, length), expr.dim, 0, expr.step)
    assert isinstance(expr, Interleave)
    if dim != expr.dim:
        return interleave([narrow(p, dim, start, length) for p in expr.parts], expr.dim)
    k = len(expr.parts)
    end = start + length
    lo, hi = -(-start // k) * k, end // k * k  # the whole rounds of k inside the window
    if lo >= hi:  # less than one whole round: single elements
        return cat([narrow(expr.parts[i % k], dim, i // k, 1) for i in range(start, end)], dim)
    head = [narrow(expr.parts[i % k], dim, i // k, 1) for i in range(start, lo)]
    body = interleave([narrow(p, dim, lo // k, (hi - lo) // k) for p in expr.parts], dim)
    tail = [narrow(expr.parts[i % k], dim, i // k, 1) for i in range(hi, end)]
    return cat([*head, body, *tail], dim)


def _materialize_layout(expr: Expr, reader: LeafReader, out: torch.Tensor) -> None:
    if isinstance(expr, Select):
        target = out.unsqueeze(expr.dim)
        if target.is_contiguous():
            materialize_into(expr.part, reader, target)
        else:
            target.copy_(materialize(expr.part, reader))
        return
    if isinstance(expr, Transpose):
        out.copy_(materialize(expr.part, reader).transpose(*expr.dims))
        return
    if isinstance(expr, Strided):
        values = materialize(expr.part, reader)
        index = [slice(None)] * len(expr.shape)
        index[expr.dim] = slice(None, None, expr.step)
        out.copy_(values[tuple(index)])
        return
    if isinstance(expr, Stack):
        for i, part in enumerate(expr.parts):
            target = out.select(expr.dim, i)
            if target.is_contiguous():
                materialize_into(part, reader, target)
            else:
                target.copy_(materialize(part, reader))
        return
    assert isinstance(expr, Interleave)
    k = len(expr.parts)
    rounds = out.unflatten(expr.dim, (expr.shape[expr.dim] // k, k))
    for j, part in enumerate(expr.parts):
        rounds.select(expr.dim + 1, j).copy_(materialize(part, reader))
