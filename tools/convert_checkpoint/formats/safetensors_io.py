"""safetensors without loading files whole.

Reading parses only the JSON header (to build the lazy index) and later ``pread``s exactly the
byte ranges of the rows a shard needs, straight into the destination tensor. Writing streams
one tensor at a time after a header computed from the plan, so memory stays at the largest
tensor rather than the whole file (``safetensors.torch.save_file`` needs all of them at once).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import dtypes
from ..dtypes import DType
from ..errors import ConversionError
from ..tensor_expr import Leaf

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

DTYPES: dict[str, DType] = dtypes.BY_CODE  # safetensors' dtype names

_MAX_HEADER = 100 * 1024 * 1024
_ROW_CHUNK_BYTES = 64 << 20  # staging for column windows: rows read per pread


@dataclass(frozen=True)
class TensorEntry:
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file


def read_header(path: str) -> dict[str, TensorEntry]:
    """Index of one safetensors file; a corrupt or truncated file is a ConversionError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, _MAX_HEADER):
            raise ConversionError(f"corrupt or truncated safetensors file {path}: header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise ConversionError(f"corrupt safetensors file {path}: unreadable header ({e})") from None
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"corrupt safetensors file {path}: bad header entry for tensor {key}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise ConversionError(f"corrupt safetensors file {path}: tensor {key} has {end - begin} bytes for shape {list(shape)}")
        if data_start + end > size:
            raise ConversionError(
                f"truncated safetensors file {path}: tensor {key} ends at byte {data_start + end}, file has {size}"
            )
        entries[key] = TensorEntry(dtype, shape, data_start + begin)
    return entries


class SafetensorsReader:
    """Reads leaf windows from safetensors files under one root, one open fd per file."""

    def __init__(self, root: str, entries: Mapping[str, Mapping[str, TensorEntry]]):
        self._root = root
        self._entries = entries  # file -> tensor name -> entry
        self._fds: dict[str, int] = {}

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = os.open(os.path.join(self._root, file), os.O_RDONLY)
            self._fds[file] = fd
        return fd

    def read_into(self, leaf: Leaf, out: torch.Tensor) -> None:
        entry = self._entries[leaf.ref.file][leaf.ref.name]
        shape = entry.shape
        row_bytes = entry.dtype.itemsize
        for s in shape[1:]:
            row_bytes *= s
        full_rows = tuple(leaf.offsets[1:]) == (0,) * (len(shape) - 1) and tuple(leaf.shape[1:]) == shape[1:]
        if not shape:  # scalar
            self._pread_into(leaf.ref.file, entry.begin, out.reshape(1))
        elif full_rows and out.is_contiguous():
            start = entry.begin + leaf.offsets[0] * row_bytes
            self._pread_into(leaf.ref.file, start, out)
        else:  # a column window: whole rows are read, a bounded number at a time
            step = max(1, _ROW_CHUNK_BYTES // max(row_bytes, 1))
            for first in range(0, leaf.shape[0], step):
                count = min(step, leaf.shape[0] - first)
                rows = torch.empty((count,) + shape[1:], dtype=entry.dtype.torch)
                self._pread_into(leaf.ref.file, entry.begin + (leaf.offsets[0] + first) * row_bytes, rows)
                window = rows
                for dim in range(1, len(shape)):
                    window = window.narrow(dim, leaf.offsets[dim], leaf.shape[dim])
                out.narrow(0, first, count).copy_(window)

    def whole(self, leaf: Leaf) -> torch.Tensor | None:
        return None  # read from disk like any window

    def locate(self, leaf: Leaf) -> tuple[str, int]:
        """Where the leaf's whole tensor lies (safetensors data is row-major and uncompressed)."""
        return os.path.join(self._root, leaf.ref.file), self._entries[leaf.ref.file][leaf.ref.name].begin

    def _pread_into(self, file: str, offset: int, out: torch.Tensor) -> None:
        view = out.view(torch.uint8).reshape(-1).numpy().data  # ndarray.data: memoryview(array)
        fd = self._fd(file)
        done = 0
        total = len(view)
        while done < total:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ConversionError(f"truncated safetensors file {file}: short read")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SafetensorsLayout:
    """A safetensors file planned from its tensors' dtypes and shapes: the header bytes and
    where each tensor's data starts."""

    header: bytes  # the 8-byte length and the JSON header, padded
    tensors: tuple[PlannedTensor, ...]
    offsets: tuple[int, ...]  # absolute byte offset of each tensor's data

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)

    def regions(self) -> list[tuple[int, int, PlannedTensor | None]]:
        """(offset, length, tensor) over the whole file, in order (for :func:`direct_io.hash_regions`)."""
        return [(0, len(self.header), None)] + [(o, t.nbytes, t) for o, t in zip(self.offsets, self.tensors)]


def plan_layout(tensors: Iterable[PlannedTensor], metadata: Mapping[str, str] | None = None) -> SafetensorsLayout:
    tensors = tuple(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype.code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    head = struct.pack("<Q", len(blob)) + blob
    offsets, pos = [], len(head)
    for t in tensors:
        offsets.append(pos)
        pos += t.nbytes
    return SafetensorsLayout(head, tensors, tuple(offsets))


def write_streaming(
    path: str,
    tensors: Iterable[PlannedTensor],
    produce: Callable[[PlannedTensor], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file whose header is known up front, producing tensors one by one."""
    layout = plan_layout(tensors, metadata)
    with open(path, "wb") as f:
        f.write(layout.header)
        for t in layout.tensors:
            value = produce(t)
            if dtypes.of(value.dtype) != t.dtype or tuple(value.shape) != t.shape:
                raise RuntimeError(f"planned {t.name} as {t.dtype}{list(t.shape)}, got {value.dtype}{list(value.shape)}")
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # reshape first: 0-d tensors cannot be viewed as bytes
