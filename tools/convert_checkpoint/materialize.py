"""Turn an output file's planned tensors into values, for the target that writes the file.

The executor makes one ``FileContext`` per output file in the worker that builds it; the
target's ``write_file`` asks it for each tensor. It owns the reusable buffer tensors are carved
from, the FP8 keep/requantize/quantize decisions, and the NaN/Inf checks.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

if TYPE_CHECKING:
    import torch
else:
    from .torch_import import torch

from . import dtypes
from . import tensor_expr as tx
from .byteplan import Run, plan_runs
from .dtypes import DType
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

    def carve(self, specs: list[tuple[DType, tuple[int, ...]]]) -> list[torch.Tensor]:
        sizes = [dtype.itemsize * math.prod(shape) for dtype, shape in specs]
        total = sum(-(-n // self._ALIGN) * self._ALIGN for n in sizes)
        if self._buffer is None or self._buffer.numel() < total:
            self._buffer = None  # free the old one first
            self._buffer = torch.empty(max(total, 1), dtype=torch.uint8)
        view = self._buffer.numpy().data  # ndarray.data: memoryview(array)
        out, offset = [], 0
        for (dtype, shape), n in zip(specs, sizes):
            if n == 0:
                out.append(torch.empty(shape, dtype=dtype.torch))
                continue
            out.append(torch.frombuffer(view, dtype=dtype.torch, count=n // dtype.itemsize, offset=offset).view(shape))
            offset += -(-n // self._ALIGN) * self._ALIGN
        return out

    def release(self) -> None:
        self._buffer = None


ARENA = Arena()  # one per process (workers are forked, each gets its own)


def nonfinite_count(t: torch.Tensor) -> int:
    """NaN/Inf elements of ``t``. A sum is NaN/Inf when any element is (fast path: one vectorized
    reduction); only then are they counted. FP8 e4m3 has NaN codes only (0x7F/0xFF); FP8 e5m2
    is counted by its bits."""
    if t.numel() == 0:
        return 0
    if t.dtype == torch.float8_e4m3fn:
        low = t.view(torch.uint8) & 0x7F
        return int((low == 0x7F).sum()) if int(low.max()) == 0x7F else 0
    if t.dtype == torch.float8_e5m2:  # no arithmetic on it: exponent all ones is Inf or NaN
        return int(((t.view(torch.uint8) & 0x7C) == 0x7C).sum())
    if not t.dtype.is_floating_point or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


# NaN/Inf by bit pattern, on the raw bytes: (unsigned view, mask, value) where ``bits & mask ==
# value`` marks a NaN or Inf (exponent all ones; e4m3fn has NaN codes only, S.1111.111). numpy
# does this at memory speed and without the GIL; torch's isfinite on bf16 converts first.
_NONFINITE_BITS: dict[DType, tuple[type, int, int]] = {
    dtypes.BFLOAT16: (np.uint16, 0x7F80, 0x7F80),
    dtypes.FLOAT16: (np.uint16, 0x7C00, 0x7C00),
    dtypes.FLOAT32: (np.uint32, 0x7F800000, 0x7F800000),
    dtypes.FLOAT64: (np.uint64, 0x7FF0000000000000, 0x7FF0000000000000),
    dtypes.FLOAT8_E4M3FN: (np.uint8, 0x7F, 0x7F),
    dtypes.FLOAT8_E5M2: (np.uint8, 0x7C, 0x7C),
}


def nonfinite_in_bytes(dtype: DType, chunk: memoryview) -> int:
    """NaN/Inf elements among the whole elements of ``chunk``, the raw bytes of a ``dtype`` tensor."""
    whole = len(chunk) - len(chunk) % dtype.itemsize
    if not whole:
        return 0
    bits = _NONFINITE_BITS.get(dtype)
    if bits is None:
        return nonfinite_count(torch.frombuffer(chunk[:whole], dtype=dtype.torch))
    view, mask, value = bits
    codes: np.ndarray = np.frombuffer(chunk[:whole], dtype=view)
    return int(np.count_nonzero((codes & view(mask)) == view(value)))


# A tensor gathered from short runs goes through a buffer at most this large at a time.
_GATHER_WINDOW = 64 << 20


def _windows(runs: Sequence[Run], size: int) -> list[tuple[int, list[Run]]]:
    """The runs of a tensor grouped by destination into windows of about ``size`` bytes: pairs
    of (window start, its runs with destination offsets relative to that start). A run is
    never split, so a window holding one long run can be larger."""
    out: list[tuple[int, list[Run]]] = []
    start, group = 0, list[Run]()
    for r in sorted(runs, key=lambda r: r.dst_offset):
        if group and r.dst_offset + r.length - start > size:
            out.append((start, group))
            start, group = r.dst_offset, []
        group.append(Run(r.src, r.src_offset, r.dst_offset - start, r.length))
    if group:
        out.append((start, group))
    return out


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
    io_threads: int = 1  # threads moving this file's tensors at once (the writers' copies)

    def __post_init__(self) -> None:
        self._fp8 = Fp8Materializer(self.reader, self.fp8_policy or Fp8Policy())
        self._nonfinite: dict[str, int] = {}  # name -> NaN/Inf count, in the order found
        self._check_lock = threading.Lock()  # moved tensors are checked by the read-back thread
        self._gather = threading.local()  # per copying thread: the buffer short runs are gathered in
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

    @property
    def nonfinite(self) -> list[tuple[str, int]]:
        return list(self._nonfinite.items())

    def runs(self, expr: Expr) -> list[Run] | None:
        """The byte runs of source files ``expr`` consists of; None where it computes."""
        return plan_runs(expr, self._locate) if self._locate is not None else None

    def move(self, name: str, runs: Sequence[Run], fd: int, offset: int) -> None:
        """Put the bytes of ``runs`` into ``fd`` at ``offset``: file to file where every run is
        long, else gathered by batched reads into a buffer and written, a window at a time.
        Safe to call from several threads at once (each tensor from one)."""
        if all(r.length >= COPY_MIN for r in runs):
            self._mover.copy(runs, fd, offset)
        else:
            for start, group in _windows(runs, _GATHER_WINDOW):
                length = max(r.dst_offset + r.length for r in group)
                buf = getattr(self._gather, "buf", None)
                if buf is None or len(buf) < length:
                    buf = self._gather.buf = memoryview(bytearray(max(length, 1 << 20)))
                self._mover.read_into(group, buf[:length])
                pwrite_all(fd, buf[:length], offset + start)
        self.moved.add(name)

    def write(self, name: str, expr: Expr, fd: int, offset: int) -> None:
        """Put tensor ``name`` into the file ``fd`` at byte ``offset``. A tensor that only moves
        bytes of source files goes file to file (long runs) or through batched reads (short
        runs); anything that computes is materialized and written from the buffer."""
        runs = self.runs(expr)
        if runs is not None:
            self.move(name, runs, fd, offset)
        else:
            self.compute(name, expr, fd, offset)

    def compute(self, name: str, expr: Expr, fd: int, offset: int) -> None:
        """Materialize ``expr`` (a tensor that computes) and write it into ``fd`` at ``offset``."""
        value = self.value(name, expr)
        if value.numel():
            pwrite_all(fd, value.contiguous().reshape(-1).view(torch.uint8).numpy().data, offset)

    def check_bytes(self, name: str, dtype: DType, chunk: memoryview) -> None:
        """The NaN/Inf check of a moved tensor, on its bytes as written (a chunk at a time)."""
        if name in self.moved and dtype.is_floating_point:
            self._found(name, nonfinite_in_bytes(dtype, chunk))

    @property
    def fp8_events(self) -> list[Fp8Event]:
        return self._fp8.events

    def carve(self, specs: list[tuple[DType, tuple[int, ...]]]) -> list[torch.Tensor]:
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
        self._found(name, sum(nonfinite_count(t) for t in tensors))

    def _found(self, name: str, bad: int) -> None:
        if not bad:
            return
        if self.strict_values:
            raise ConversionError(f"tensor {name} for {self.relpath} holds {bad} NaN/Inf values (from the source); "
                                  "--strict_values makes that an error")
        with self._check_lock:  # a tensor checked a chunk at a time adds up
            self._nonfinite[name] = self._nonfinite.get(name, 0) + bad
