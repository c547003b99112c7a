"""Writing a planned file in place: fixed bytes first, each tensor at its offset, read back alongside.

Both writers open the file once, write what does not depend on tensor values (headers,
small records), then let the file context put every tensor at its planned offset (moved file
to file by a few threads, or written from a buffer), while one sequential pass over the file
follows the writes in another thread: it hashes the file (sha256, for ``--resume``), checks
the moved tensors for NaN/Inf and, for a zip, fills in the CRC-32s. The pass reads each
tensor from the page cache once it is in place, so it ends soon after the last write.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..byteplan import Run
from ..formats import torch_zip
from ..formats.direct_io import Aborted, Completion, Writeback, hash_regions, pwrite_all
from ..formats.safetensors_io import PlannedTensor, SafetensorsLayout
from ..materialize import FileContext
from ..tensor_expr import Expr


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)


@dataclass(frozen=True)
class _Placement:
    key: Hashable  # what the read-back waits for
    name: str  # the tensor's name in messages and NaN/Inf warnings
    expr: Expr
    offset: int
    nbytes: int


def _place(fd: int, placements: list[_Placement], ctx: FileContext, finish: Callable[[Callable[[Hashable], None]], str]) -> str:
    """Write every placement at its offset while ``finish`` (the read-back: hashes, CRCs,
    checks) follows in another thread, and return what ``finish`` returns.

    Tensors go in file order, so the read-back is never held up long by a tensor written late
    (writing in source order left the LM head, first in its HF shard, for last: the whole
    read-back came after it). Tensors that only move source bytes go to ``ctx.io_threads``
    threads (the copies release the GIL, so several run at once: more streams for the disk,
    and a file is no longer built by one stream only); tensors that compute are built here.
    """
    placements = sorted(placements, key=lambda p: p.offset)
    completion = Completion()
    writeback = Writeback(fd)
    lock = threading.Lock()

    def done(p: _Placement) -> None:
        completion.mark(p.key)
        with lock:
            writeback.wrote(p.nbytes)

    def move(p: _Placement, runs: list[Run]) -> None:
        ctx.move(p.name, runs, fd, p.offset)
        done(p)

    with ThreadPoolExecutor(1, thread_name_prefix="readback") as reader, \
            ThreadPoolExecutor(max(1, ctx.io_threads), thread_name_prefix="copy") as copiers:
        finished = reader.submit(finish, completion.wait)
        copies = []
        try:
            for p in placements:
                runs = ctx.runs(p.expr)
                if runs is not None:
                    copies.append(copiers.submit(move, p, runs))
                else:
                    ctx.compute(p.name, p.expr, fd, p.offset)
                    done(p)
            for c in copies:
                c.result()
        except BaseException:
            completion.abort()
            for c in copies:
                c.cancel()
            raise
        try:
            return finished.result()
        except Aborted:  # pragma: no cover - only after an abort, which raised above
            raise AssertionError("the read-back stopped before the file was complete") from None


def write_safetensors(path: str, layout: SafetensorsLayout, exprs: Mapping[str, Expr], ctx: FileContext) -> str:
    """A safetensors file of ``layout``, tensor ``t`` being ``exprs[t.name]``; returns its sha256."""
    fd = _open(path)
    try:
        pwrite_all(fd, layout.header, 0)
        os.ftruncate(fd, layout.size)  # a file ending in empty tensors still has its full length

        def check(key: object, chunk: memoryview) -> None:
            assert isinstance(key, PlannedTensor)
            ctx.check_bytes(key.name, key.dtype, chunk)

        def finish(ready: Callable[[Hashable], None]) -> str:
            return hash_regions(fd, layout.regions(), check, ready)

        placements = [_Placement(t, t.name, exprs[t.name], offset, t.nbytes)
                      for t, offset in zip(layout.tensors, layout.offsets)]
        return _place(fd, placements, ctx, finish)
    finally:
        os.close(fd)


def write_rank_zip(path: str, layout: torch_zip.ZipLayout, exprs: Mapping[str, Expr], ctx: FileContext) -> str:
    """A ``.pt`` zip of ``layout``, slot ``s`` being ``exprs[s.name]``; returns its sha256."""
    return write_zips(path, [(0, layout)], b"", exprs, ctx)


def write_zips(path: str, archives: Sequence[tuple[int, torch_zip.ZipLayout]], tail: bytes,
               exprs: Mapping[str, Expr], ctx: FileContext) -> str:
    """A file of zips, each at its byte offset (a rank file is one; a ``.distcp`` file is one
    per chunk, then ``tail``, its index), slot ``s`` being ``exprs[s.name]``; returns its sha256."""
    fd = _open(path)
    try:
        for base, layout in archives:
            torch_zip.write_fixed(fd, layout, base)
        end = archives[-1][0] + archives[-1][1].size if archives else 0
        pwrite_all(fd, tail, end)

        def check(slot: torch_zip.TensorSlot, chunk: memoryview) -> None:
            ctx.check_bytes(slot.title, slot.dtype, chunk)

        def finish(ready: Callable[[Hashable], None]) -> str:
            sha = hashlib.sha256()
            for base, layout in archives:
                torch_zip.Finisher(fd, layout, check, ready, base).feed(sha)
            sha.update(tail)
            return sha.hexdigest()

        placements = []
        for base, layout in archives:
            for record in layout.tensor_records:
                slot = record.slot
                assert slot is not None
                at = base + record.data_offset
                placements.append(_Placement(at, slot.title, exprs[slot.name], at, record.size))
        return _place(fd, placements, ctx, finish)
    finally:
        os.close(fd)
