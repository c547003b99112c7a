"""Tensor-parallel split and merge of canonical tensors, as pure expression transforms."""
from __future__ import annotations

from .. import tensor_expr as te
from ..core.canonical import Sections, Split, TPSplit
from ..tensor_expr import Expr

__all__ = ["Sections", "Split", "TPSplit", "divides", "padded_vocab_size", "shard", "shard_shape", "unshard"]


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def shard_shape(shape: tuple[int, ...], split: TPSplit, tp: int, padded_rows: int | None = None) -> tuple[int, ...]:
    out = list(shape)
    if split in (Split.COLUMN, Split.GATED_COLUMN) or isinstance(split, Sections):
        out[0] //= tp
    elif split is Split.ROW:
        out[1] //= tp
    elif split is Split.VOCAB:
        out[0] = (padded_rows or shape[0]) // tp
    return tuple(out)


def divides(shape: tuple[int, ...], split: TPSplit, tp: int, padded_rows: int | None = None) -> bool:
    if isinstance(split, Sections):
        return all(size % tp == 0 for size in split.sizes)
    if split is Split.COLUMN:
        return shape[0] % tp == 0
    if split is Split.GATED_COLUMN:
        return shape[0] % (2 * tp) == 0
    if split is Split.ROW:
        return shape[1] % tp == 0
    if split is Split.VOCAB:
        return (padded_rows or shape[0]) % tp == 0
    return True


def shard(expr: Expr, split: TPSplit, tp: int, rank: int, padded_rows: int | None = None) -> Expr:
    if isinstance(split, Sections):
        starts = [sum(split.sizes[:i]) for i in range(len(split.sizes))]
        return te.cat([te.split_even(te.narrow(expr, 0, s, n), 0, tp, rank) for s, n in zip(starts, split.sizes)], 0)
    if split is Split.REPLICATED:
        return expr
    if split is Split.COLUMN:
        return te.split_even(expr, 0, tp, rank)
    if split is Split.ROW:
        return te.split_even(expr, 1, tp, rank)
    if split is Split.GATED_COLUMN:
        half = expr.shape[0] // 2
        gate = te.narrow(expr, 0, 0, half)
        up = te.narrow(expr, 0, half, half)
        return te.cat([te.split_even(gate, 0, tp, rank), te.split_even(up, 0, tp, rank)], 0)
    if split is Split.VOCAB:
        rows = expr.shape[0]
        padded = padded_rows or rows
        if padded > rows:
            # Megatron's own converters pad with copies of the last real row.
            expr = te.cat([expr, te.repeat(te.narrow(expr, 0, rows - 1, 1), 0, padded - rows)], 0)
        elif padded < rows:
            raise ValueError(f"padded vocab {padded} smaller than {rows} rows")
        return te.split_even(expr, 0, tp, rank)
    raise AssertionError(split)


def unshard(shards: list[Expr], split: TPSplit, rows: int | None = None) -> Expr:
    """Inverse of :func:`shard`; ``rows`` is the real (unpadded) row count for VOCAB."""
    if isinstance(split, Sections):
        tp = len(shards)
        parts, start = [], 0
        for size in split.sizes:
            parts += [te.narrow(s, 0, start, size // tp) for s in shards]
            start += size // tp
        return te.cat(parts, 0)
    if split is Split.REPLICATED:
        return shards[0]
    if split in (Split.COLUMN,):
        return te.cat(shards, 0)
    if split is Split.ROW:
        return te.cat(shards, 1)
    if split is Split.GATED_COLUMN:
        halves = [s.shape[0] // 2 for s in shards]
        gate = [te.narrow(s, 0, 0, h) for s, h in zip(shards, halves)]
        up = [te.narrow(s, 0, h, h) for s, h in zip(shards, halves)]
        return te.cat(gate + up, 0)
    if split is Split.VOCAB:
        full = te.cat(shards, 0)
        return te.narrow(full, 0, 0, rows if rows is not None else full.shape[0])
    raise AssertionError(split)
