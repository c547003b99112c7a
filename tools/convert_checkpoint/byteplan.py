"""Tensors that only move bytes, planned as byte ranges of the source files.

Most output tensors are windows and concatenations of source tensors (a TP row split, a
query-group block of a fused QKV, an expert, a TP concatenation on the way back). When every
source tensor of such an expression is stored contiguously and uncompressed in a file (a
safetensors entry, a storage record of a ``.pt`` zip), the output tensor is a list of
``Run``\\ s: "``length`` bytes from ``src`` at ``src_offset`` go to ``dst_offset``". The writers
then move them without building tensors: in the kernel (``os.copy_file_range``) when the runs
are long, with batched scatter reads (``preadv``) into a buffer when they are short (column
windows: one run per row). Expressions that compute (casts, FP8, converters, quantizers) have
no runs and keep the tensor path.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from .tensor_expr import Cat, Expr, Leaf, nbytes

# Where a leaf's whole source tensor starts: (absolute file path, byte offset of element 0),
# for a tensor stored row-major and contiguous; None where the bytes are not in a file as is.
Locate = Callable[[Leaf], "tuple[str, int] | None"]

MAX_RUNS = 1 << 16  # beyond this many runs per tensor, Python bookkeeping costs more than it saves


@dataclass(frozen=True)
class Run:
    src: str
    src_offset: int  # bytes from the start of the source file
    dst_offset: int  # bytes from the tensor's first byte
    length: int  # bytes


class _TooMany(Exception):
    pass


def _leaf_runs(leaf: Leaf, locate: Locate) -> list[tuple[int, str, int, int]] | None:
    """(dst element, src path, src byte offset, elements) of a leaf's window, in window order.
    The source offset is in bytes: a tensor need not start at a multiple of its item size (a
    ``.distcp`` chunk's archive starts anywhere in its file)."""
    where = locate(leaf)
    if where is None:
        return None
    path, base = where
    itemsize = leaf.dtype.itemsize
    shape, offs, win = leaf.source_shape, leaf.offsets, leaf.shape
    if math.prod(win) == 0:
        return []
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    # The window is contiguous from the last dim that is cut; the dims before it give the runs.
    cut = max((d for d in range(len(shape)) if (offs[d], win[d]) != (0, shape[d])), default=-1)
    if cut < 0:
        return [(0, path, base, math.prod(shape))]
    run = win[cut] * strides[cut]
    lead = win[:cut]
    if math.prod(lead) > MAX_RUNS:
        raise _TooMany
    out = []
    for dst, index in enumerate(itertools.product(*(range(n) for n in lead))):
        src = sum((offs[d] + i) * strides[d] for d, i in enumerate(index)) + offs[cut] * strides[cut]
        out.append((dst * run, path, base + src * itemsize, run))
    return out


def _runs(expr: Expr, locate: Locate) -> list[tuple[int, str, int, int]] | None:
    if isinstance(expr, Leaf):
        return _leaf_runs(expr, locate)
    if not isinstance(expr, Cat) or any(p.dtype != expr.dtype for p in expr.parts):
        return None
    d = expr.dim
    item = expr.dtype.itemsize
    row = math.prod(expr.shape[d:])  # output elements per leading index
    out: list[tuple[int, str, int, int]] = []
    start = 0  # where this part's block begins inside an output row
    for part in expr.parts:
        part_runs = _runs(part, locate)
        if part_runs is None:
            return None
        block = math.prod(part.shape[d:])
        for dst, path, src, n in part_runs:  # split each run where a part's row ends
            while n:
                i, within = divmod(dst, block)
                take = min(n, block - within)
                out.append((i * row + start + within, path, src, take))
                dst, src, n = dst + take, src + take * item, n - take
        start += block
        if len(out) > MAX_RUNS * 4:
            raise _TooMany
    return out


def only_moves(expr: Expr) -> bool:
    """Whether ``expr`` is windows and concatenations of source tensors only (no computation)."""
    if isinstance(expr, Leaf):
        return True
    return isinstance(expr, Cat) and all(p.dtype == expr.dtype and only_moves(p) for p in expr.parts)


def buffered_bytes(expr: Expr, in_file: Callable[[Leaf], bool]) -> int:
    """Bytes a worker buffers to write ``expr``: none for a tensor that only moves bytes of
    source tensors lying plainly in files (``in_file``: the source says so at plan time; the
    short-run gather windows of the copy threads are counted apart), else the whole tensor."""
    return 0 if _moves_from_files(expr, in_file) else nbytes(expr)


def _moves_from_files(expr: Expr, in_file: Callable[[Leaf], bool]) -> bool:
    """:func:`only_moves` with every leaf in a file, in one walk (planning DeepSeek-V3 asks for
    75,000 output tensors)."""
    if isinstance(expr, Leaf):
        return in_file(expr)
    return isinstance(expr, Cat) and all(p.dtype == expr.dtype and _moves_from_files(p, in_file) for p in expr.parts)


def plan_runs(expr: Expr, locate: Locate) -> list[Run] | None:
    """The byte runs that produce ``expr`` (sorted by destination, adjacent ones merged), or None
    where it computes or a source tensor is not plainly in a file."""
    if not only_moves(expr):
        return None
    try:
        runs = _runs(expr, locate)
    except _TooMany:
        return None
    if runs is None:
        return None
    item = expr.dtype.itemsize
    runs.sort()
    merged: list[Run] = []
    for dst, path, src, n in runs:
        last = merged[-1] if merged else None
        if last and last.src == path and last.dst_offset + last.length == dst * item \
                and last.src_offset + last.length == src:
            merged[-1] = Run(path, last.src_offset, last.dst_offset, last.length + n * item)
        else:
            merged.append(Run(path, src, dst * item, n * item))
    return merged
