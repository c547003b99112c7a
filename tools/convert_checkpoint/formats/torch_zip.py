"""Megatron ``.pt`` rank files written without ``torch.save``: the layout is planned first.

``torch.save`` needs every tensor of a file in memory at once and copies each through Python.
This writer lays the zip out from the tensors' dtypes and shapes alone, so every tensor's byte
offset in the file is known before any data moves: data can then be copied into place from
the source files (``os.copy_file_range``) or written from a buffer, one tensor at a time.

The archive is what ``torch.save`` writes (pickle protocol 2, records ``data.pkl``,
``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/<n>``, ``version``,
``.data/serialization_id``, data aligned to 64 bytes through an ``FB`` extra field, stored
uncompressed, each record followed by a data descriptor), so ``torch.load`` (also
``weights_only`` and ``mmap``), Megatron and ``zipfile`` read it. CRC-32s are real: they are
computed while the file is hashed (:class:`Finisher`), from the bytes as they are on disk.
Zip64 fields are written where a size or offset needs them (rank files pass 4 GiB).
"""
from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import struct
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .. import dtypes
from ..dtypes import DType
from .direct_io import READ_CHUNK, pwrite_all, read_back
from .stand_in_pickle import Global, StandInPickler

ALIGNMENT = 64
_U32 = 0xFFFFFFFF  # the "see the zip64 field" marker
ZIP64_AT = _U32  # sizes and offsets from here on need zip64 fields (lowered by a test)
# torch's storage class for each element type (``torch.storage._dtype_to_storage_type_map``);
# FP8 has none (torch.save writes it through ``UntypedStorage``), so FP8 tensors take torch.save.
_STORAGE_TYPES: dict[DType, Global] = {d: Global(f"torch.{name}") for d, name in (
    (dtypes.FLOAT64, "DoubleStorage"), (dtypes.FLOAT32, "FloatStorage"), (dtypes.FLOAT16, "HalfStorage"),
    (dtypes.BFLOAT16, "BFloat16Storage"), (dtypes.INT64, "LongStorage"), (dtypes.INT32, "IntStorage"),
    (dtypes.INT16, "ShortStorage"), (dtypes.INT8, "CharStorage"), (dtypes.UINT8, "ByteStorage"),
    (dtypes.BOOL, "BoolStorage"))}
_REBUILD_TENSOR = Global("torch._utils._rebuild_tensor_v2")


def supports(dtype: DType) -> bool:
    """Whether this writer can pickle a tensor of ``dtype`` (others go through ``torch.save``)."""
    return dtype in _STORAGE_TYPES


@dataclass(frozen=True)
class TensorSlot:
    """Stands in the payload for one tensor (contiguous, its own storage) written later."""

    name: str  # unique in the file: "<container>/<tensor>"
    dtype: DType
    shape: tuple[int, ...]
    label: str = ""  # the tensor's name in messages

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _StorageRef:
    def __init__(self, key: int, slot: TensorSlot):
        self.key, self.slot = key, slot


class _SlotPickler(StandInPickler):
    """Pickles a payload whose tensors are :class:`TensorSlot` placeholders, as torch.save would
    pickle the real tensors (``_rebuild_tensor_v2`` over a persistent storage reference), with
    torch's globals written by name: torch is not imported."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=2)
        self.slots: list[TensorSlot] = []

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, TensorSlot):
            return NotImplemented
        ref = _StorageRef(len(self.slots), obj)
        self.slots.append(obj)
        stride = tuple(math.prod(obj.shape[i + 1:]) for i in range(len(obj.shape)))
        return _REBUILD_TENSOR, (ref, 0, obj.shape, stride, False, collections.OrderedDict())

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            slot = obj.slot
            return "storage", _STORAGE_TYPES[slot.dtype], str(obj.key), "cpu", math.prod(slot.shape)
        return None


@dataclass(frozen=True)
class Record:
    name: str
    header_offset: int
    header: bytes  # local file header with the alignment padding
    data_offset: int
    size: int
    payload: bytes | None  # small records' bytes; None for tensor data
    slot: TensorSlot | None

    @property
    def descriptor_offset(self) -> int:
        return self.data_offset + self.size

    @property
    def zip64(self) -> bool:
        return self.size >= ZIP64_AT

    @property
    def descriptor_size(self) -> int:
        return 24 if self.zip64 else 16

    def descriptor(self, crc: int) -> bytes:
        if self.zip64:
            return struct.pack("<IIQQ", 0x08074B50, crc, self.size, self.size)
        return struct.pack("<IIII", 0x08074B50, crc, self.size, self.size)


@dataclass(frozen=True)
class ZipLayout:
    """Where every byte of the file goes; each tensor slot is the data of one ``data/<n>`` record."""

    records: tuple[Record, ...]
    central_offset: int

    @property
    def tensor_records(self) -> list[Record]:
        return [r for r in self.records if r.slot is not None]

    @property
    def size(self) -> int:
        """The archive's length in bytes (the central directory's length does not depend on the CRCs)."""
        return self.central_offset + len(self.central_directory(collections.defaultdict(int)))

    def central_directory(self, crcs: dict[str, int]) -> bytes:
        out = io.BytesIO()
        for r in self.records:
            extra = b""
            size32 = offset32 = None
            fields = []
            if r.size >= ZIP64_AT:
                fields += [r.size, r.size]
                size32 = _U32
            if r.header_offset >= ZIP64_AT:
                fields.append(r.header_offset)
                offset32 = _U32
            if fields:
                extra = struct.pack("<HH", 0x0001, 8 * len(fields)) + struct.pack(f"<{len(fields)}Q", *fields)
            name = r.name.encode()
            out.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45 if fields else 20, 45 if fields else 20,
                                  0x0808, 0, 0, 0, crcs[r.name], size32 or r.size, size32 or r.size,
                                  len(name), len(extra), 0, 0, 0, 0, offset32 or r.header_offset))
            out.write(name)
            out.write(extra)
        cd = out.getvalue()
        n, start, size = len(self.records), self.central_offset, len(cd)
        tail = io.BytesIO()
        zip64 = start + size >= ZIP64_AT or n >= 0xFFFF or any(r.size >= ZIP64_AT or r.header_offset >= ZIP64_AT for r in self.records)
        if zip64:
            eocd64 = start + size
            tail.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, size, start))
            tail.write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
        tail.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                               _U32 if zip64 else size, _U32 if zip64 else start, 0))
        return cd + tail.getvalue()


def _local_header(name: bytes, offset: int) -> bytes:
    """The local header of a record starting at ``offset``, padded so its data is aligned."""
    fixed = 30 + len(name)
    pad = -(offset + fixed + 4) % ALIGNMENT  # an "FB" extra field of ``pad`` bytes
    extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra


def plan(payload: Any, archive: str) -> ZipLayout:
    """Pickle ``payload`` (its tensors are :class:`TensorSlot`) and lay the archive out."""
    buf = io.BytesIO()
    pickler = _SlotPickler(buf)
    pickler.dump(payload)
    pkl = buf.getvalue()
    slots = pickler.slots
    small = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()),
             ("byteorder", b"little")]
    tail = [("version", b"3\n"),
            # torch writes a random id; ours is derived from the pickle so reruns give the same bytes
            (".data/serialization_id", str(int.from_bytes(hashlib.sha256(pkl).digest()[:16], "little")).zfill(40)[:40].encode())]
    entries: list[tuple[str, bytes | None, TensorSlot | None]] = [(n, b, None) for n, b in small]
    entries += [(f"data/{i}", None, s) for i, s in enumerate(slots)]
    entries += [(n, b, None) for n, b in tail]
    records, offset = [], 0
    for name, payload_bytes, slot in entries:
        full = f"{archive}/{name}".encode()
        header = _local_header(full, offset)
        size = len(payload_bytes) if payload_bytes is not None else slot.nbytes  # type: ignore[union-attr]
        record = Record(full.decode(), offset, header, offset + len(header), size, payload_bytes, slot)
        records.append(record)
        offset = record.descriptor_offset + record.descriptor_size
    return ZipLayout(tuple(records), offset)


def write_fixed(fd: int, layout: ZipLayout, base: int = 0) -> None:
    """Every byte that does not depend on the tensors' values (headers and small records), the
    archive starting at byte ``base`` of the file (its own offsets count from there)."""
    for r in layout.records:
        pwrite_all(fd, r.header, base + r.header_offset)
        if r.payload is not None:
            pwrite_all(fd, r.payload, base + r.data_offset)


def save_plain(path: str, payload: Any, archive: str) -> None:
    """``torch.save`` of a payload without tensors (a torch_dist ``common.pt``), made here."""
    layout = plan(payload, archive)
    if layout.tensor_records:
        raise ValueError("save_plain: the payload holds tensors")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_fixed(fd, layout)
        Finisher(fd, layout).run()
        os.fsync(fd)
    finally:
        os.close(fd)


class Finisher:
    """One sequential pass over the written file: each record's CRC-32 (then its descriptor),
    the central directory, and the sha256 of the whole file, in file order. ``on_tensor`` sees
    every tensor's bytes as they are on disk (for the NaN/Inf check). With ``ready``, the pass
    can run while the tensors are still being written: it calls ``ready(offset)`` with a tensor
    record's data offset in the file before reading it and reads it once that returns. An
    archive at byte ``base`` of a file of several (a ``.distcp``) is finished by ``feed``,
    which adds its bytes to the file's hash."""

    def __init__(self, fd: int, layout: ZipLayout, on_tensor: Callable[[TensorSlot, memoryview], None] | None = None,
                 ready: Callable[[Hashable], None] | None = None, base: int = 0):
        self.fd, self.layout, self.on_tensor, self.ready, self.base = fd, layout, on_tensor, ready, base

    def run(self) -> str:
        sha = hashlib.sha256()
        self.feed(sha)
        return sha.hexdigest()

    def feed(self, sha: Any) -> None:
        base = self.base
        buf = memoryview(bytearray(READ_CHUNK))
        crcs: dict[str, int] = {}
        for r in self.layout.records:
            sha.update(r.header)
            crc = 0
            if r.payload is not None:
                crc = zlib.crc32(r.payload)
                sha.update(r.payload)
            else:
                if self.ready is not None:
                    self.ready(base + r.data_offset)
                for chunk in read_back(self.fd, base + r.data_offset, r.size, buf):
                    crc = zlib.crc32(chunk, crc)
                    sha.update(chunk)
                    if self.on_tensor is not None and r.slot is not None:
                        self.on_tensor(r.slot, chunk)
            crcs[r.name] = crc
            descriptor = r.descriptor(crc)
            pwrite_all(self.fd, descriptor, base + r.descriptor_offset)
            sha.update(descriptor)
        tail = self.layout.central_directory(crcs)
        pwrite_all(self.fd, tail, base + self.layout.central_offset)
        sha.update(tail)
