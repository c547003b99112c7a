"""Turn an output file's planned tensors into values, for the target that writes the file.

The executor makes one ``FileContext`` per output file in the worker that builds it; the
target's ``write_file`` asks it for each tensor. It owns the reusable buffer tensors are carved
from, the FP8 keep/requantize/quantize decisions, and the NaN/Inf checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

import torch

from . import tensor_expr as tx
from .byteplan import only_moves, plan_runs
from .errors import ConversionError
from .formats.direct_io import COPY_MIN, RangeMover, pwrite_all
from .quant.fp8_materialize import Fp8Event, Fp8Materializer, Fp8Policy
from .tensor_expr import Expr, LeafReader


class Arena:
    """Per-process buffer that output tensors are carved from, reused across files.

    Allocating and freeing a fresh buffer per file makes every file pay first-touch page
    faults again (costly on VMs that hand freed memory back to the host). Each carved tensor
    has its own storage (``torch.frombuffer``), so ``torch.save`` writes only its bytes.
    """

    _ALIGN = 64

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def carve(self, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        sizes = [dtype.itemsize * math.prod(shape) for dtype, shape in specs]
        total = sum(-(-n // self._ALIGN) * self._ALIGN for n in sizes)
        if self._buffer is None or self._buffer.numel() < total:
            self._buffer = None  # free the old one first
            self._buffer = torch.empty(max(total, 1), dtype=torch.uint8)
        view = self._buffer.numpy().data  # ndarray.data: memoryview(array)
        out, offset = [], 0
        for (dtype, shape), n in zip(specs, sizes):
            if n == 0:
                out.append(torch.empty(shape, dtype=dtype))
                continue
            out.append(torch.frombuffer(view, dtype=dtype, count=n // dtype.itemsize, offset=offset).view(shape))
            offset += -(-n // self._ALIGN) * self._ALIGN
        return out

    def release(self) -> None:
        self._buffer = None


ARENA = Arena()  # one per process (workers are forked, each gets its own)


def nonfinite_count(t: torch.Tensor) -> int:
    """NaN/Inf elements of ``t``. A sum is NaN/Inf when any element is (fast path: one vectorized
    reduction); only then are they counted. FP8 e4m3 has NaN codes only (0x7F/0xFF)."""
    if t.numel() == 0:
        return 0
    if t.dtype == torch.float8_e4m3fn:
        low = t.view(torch.uint8) & 0x7F
        return int((low == 0x7F).sum()) if int(low.max()) == 0x7F else 0
    if not t.dtype.is_floating_point or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def is_fp8_tensor(expr: Expr | None) -> TypeGuard[tx.Fp8Blocks | tx.Quantize]:
    """A whole block-FP8 parameter (codes and scales together), as Megatron rank files hold them."""
    return isinstance(expr, (tx.Fp8Blocks, tx.Quantize))


@dataclass
class FileContext:
    """What a target's ``write_file`` uses to produce the tensors of one output file."""

    relpath: str
    reader: LeafReader
    fp8_policy: Fp8Policy | None
    strict_values: bool = False

    def __post_init__(self) -> None:
        self._fp8 = Fp8Materializer(self.reader, self.fp8_policy or Fp8Policy())
        self.nonfinite: list[tuple[str, int]] = []
        self._mover = RangeMover()
        self.moved: set[str] = set()  # tensors whose bytes never passed through a tensor: checked on read-back
        locate = getattr(self.reader, "locate", None)
        self._locate = self._memo(locate) if locate is not None else None

    @staticmethod
    def _memo(locate):
        """Each leaf located once per file (the writers ask twice: to order, then to move)."""
        seen: dict = {}

        def cached(leaf: tx.Leaf):
            if leaf not in seen:
                seen[leaf] = locate(leaf)
            return seen[leaf]

        return cached

    def close(self) -> None:
        self.reader.close()
        self._mover.close()

    def write(self, name: str, expr: Expr, fd: int, offset: int) -> None:
        """Put tensor ``name`` into the file ``fd`` at byte ``offset``. A tensor that only moves
        bytes of source files goes file to file (long runs) or through one batched read (short
        runs); anything that computes is materialized and written from the buffer."""
        runs = plan_runs(expr, self._locate) if self._locate is not None else None
        if runs is not None:
            if all(r.length >= COPY_MIN for r in runs):
                self._mover.copy(runs, fd, offset)
            else:
                (buf,) = ARENA.carve([(torch.uint8, (tx.nbytes(expr),))])
                view = buf.numpy().data
                self._mover.read_into(runs, view)
                pwrite_all(fd, view, offset)
            self.moved.add(name)
            return
        value = self.value(name, expr)
        if value.numel():
            pwrite_all(fd, value.contiguous().reshape(-1).view(torch.uint8).numpy().data, offset)

    def source_position(self, expr: Expr) -> tuple[str, int]:
        """Where ``expr``'s first source bytes lie (file, offset): the writers put tensors in this
        order, so each source file is read front to back instead of in the output's order."""
        leaf = next(tx.leaves(expr), None)
        if leaf is None:
            return ("", 0)
        # only what will be moved is located (computed tensors are read whole anyway)
        where = self._locate(leaf) if self._locate is not None and only_moves(expr) else None
        return where if where is not None else (leaf.ref.file, 0)

    def check_bytes(self, name: str, dtype: torch.dtype, chunk: memoryview) -> None:
        """The NaN/Inf check of a moved tensor, on its bytes as written (a chunk at a time)."""
        if name in self.moved and len(chunk) >= dtype.itemsize:
            whole = len(chunk) - len(chunk) % dtype.itemsize
            self.check(name, [torch.frombuffer(chunk[:whole], dtype=dtype)])

    @property
    def fp8_events(self) -> list[Fp8Event]:
        return self._fp8.events

    def carve(self, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        return ARENA.carve(specs)

    def fill(self, name: str, expr: Expr, out: torch.Tensor) -> torch.Tensor:
        """Materialize ``expr`` into ``out`` (a carved buffer) and check its values."""
        tx.materialize_into(expr, self.reader, out)
        self.check(name, [out])
        return out

    def value(self, name: str, expr: Expr) -> torch.Tensor:
        """One tensor of a file written a tensor at a time: a converter's output as it is (no
        copy), an FP8 part, else carved from the start of the arena."""
        if isinstance(expr, tx.Fp8Part):  # a weight's codes, then its scales (cached)
            value = self._fp8.part(expr, name)
        else:
            whole = self.reader.whole(expr) if isinstance(expr, tx.Leaf) and expr.is_whole else None
            if whole is None:
                (value,) = ARENA.carve([(expr.dtype, tuple(expr.shape))])
                tx.materialize_into(expr, self.reader, value)
            else:
                value = whole
        self.check(name, [value])
        return value

    def fp8_pair(self, name: str, expr: tx.Fp8Blocks | tx.Quantize) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scale_inv) of a block-FP8 parameter: kept, requantized or quantized."""
        codes, scale = self._fp8.pair(expr, name)
        self.check(name, [codes, scale])
        return codes, scale

    def check(self, name: str, tensors: list[torch.Tensor]) -> None:
        bad = sum(nonfinite_count(t) for t in tensors)
        if not bad:
            return
        if self.strict_values:
            raise ConversionError(f"tensor {name} for {self.relpath} holds {bad} NaN/Inf values (from the source); "
                                  "--strict_values makes that an error")
        if self.nonfinite and self.nonfinite[-1][0] == name:  # a tensor checked a chunk at a time
            self.nonfinite[-1] = (name, self.nonfinite[-1][1] + bad)
        else:
            self.nonfinite.append((name, bad))
