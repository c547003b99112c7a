"""Writing a planned file in place: fixed bytes first, each tensor at its offset, one read-back.

Tensors are written in the order their bytes lie in the source files, not the output's order
(offsets are fixed, so the order is free): each source file is then read front to back.

Both writers open the file once, write what does not depend on tensor values (headers,
small records), then let the file context put every tensor at its planned offset (moved file
to file, or written from a buffer), and finish with one sequential pass over the file that
hashes it (sha256, for ``--resume``), checks the moved tensors for NaN/Inf and, for a zip,
fills in the CRC-32s. The pass reads what was just written, from the page cache.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch

from ..formats import torch_zip
from ..formats.direct_io import Writeback, hash_regions, pwrite_all
from ..formats.safetensors_io import PlannedTensor, SafetensorsLayout
from ..materialize import FileContext
from ..tensor_expr import Expr


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: the read-back checks run over 8 MB chunks, where waking a thread
    pool costs ~50x the reduction itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)


def write_safetensors(path: str, layout: SafetensorsLayout, exprs: Mapping[str, Expr], ctx: FileContext) -> str:
    """A safetensors file of ``layout``, tensor ``t`` being ``exprs[t.name]``; returns its sha256."""
    fd = _open(path)
    try:
        pwrite_all(fd, layout.header, 0)
        writeback = Writeback(fd)
        placed = sorted(zip(layout.tensors, layout.offsets), key=lambda p: ctx.source_position(exprs[p[0].name]))
        for t, offset in placed:
            ctx.write(t.name, exprs[t.name], fd, offset)
            writeback.wrote(t.nbytes)

        def check(key: object, chunk: memoryview) -> None:
            assert isinstance(key, PlannedTensor)
            ctx.check_bytes(key.name, key.dtype, chunk)

        os.ftruncate(fd, layout.size)  # a file ending in empty tensors still has its full length
        with one_thread():
            return hash_regions(fd, layout.regions(), check)
    finally:
        os.close(fd)


def write_rank_zip(path: str, layout: torch_zip.ZipLayout, exprs: Mapping[str, Expr], ctx: FileContext) -> str:
    """A ``.pt`` zip of ``layout``, slot ``s`` being ``exprs[s.name]``; returns its sha256."""
    fd = _open(path)
    try:
        torch_zip.write_fixed(fd, layout)
        writeback = Writeback(fd)
        records = sorted(layout.tensor_records, key=lambda r: ctx.source_position(exprs[r.slot.name]))  # type: ignore[union-attr]
        for record in records:
            slot = record.slot
            assert slot is not None
            ctx.write(slot.title, exprs[slot.name], fd, record.data_offset)
            writeback.wrote(record.size)

        def check(slot: torch_zip.TensorSlot, chunk: memoryview) -> None:
            ctx.check_bytes(slot.title, slot.dtype, chunk)

        with one_thread():
            return torch_zip.Finisher(fd, layout, check).run()
    finally:
        os.close(fd)
