"""Where the tensors of a ``torch.save`` zip are, read without torch.

A Megatron rank file is a zip: ``data.pkl`` (the structure) and one uncompressed record per
storage. To plan a conversion only each tensor's dtype, shape, strides and byte offset in the
file are needed, so ``data.pkl`` is unpickled here with stand-ins: a tensor becomes a
:class:`StoredTensor`, a storage the record it names. Only globals that plain ``torch.save``
state dicts use are accepted (tensors, their storage classes, ``OrderedDict``, ``argparse.Namespace``,
torch dtypes among the values (by name), and the inert stand-ins ``te_pickle`` keeps for a
training checkpoint's foreign values); anything else (TE FP8 tensors, parameters, tensors
rebuilt with an explicit dtype ...) raises :class:`NotPlain` and the caller
loads the file with torch instead, which also gives torch's own errors for corrupt files.
No code from the file is ever run.
"""
from __future__ import annotations

import argparse
import collections
import functools
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from .. import dtypes
from ..dtypes import DType

# torch's legacy storage classes: the element type a tensor's storage holds
_STORAGE_DTYPES: dict[str, DType] = {
    "DoubleStorage": dtypes.FLOAT64, "FloatStorage": dtypes.FLOAT32, "HalfStorage": dtypes.FLOAT16,
    "BFloat16Storage": dtypes.BFLOAT16, "LongStorage": dtypes.INT64, "IntStorage": dtypes.INT32,
    "ShortStorage": dtypes.INT16, "CharStorage": dtypes.INT8, "ByteStorage": dtypes.UINT8, "BoolStorage": dtypes.BOOL,
}


class NotPlain(Exception):
    """The file needs torch to be read (a global outside the plain set, or not a torch zip)."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the file: its bytes start at ``offset`` (element 0, absolute in the file)."""

    dtype: DType
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_contiguous(self) -> bool:
        """Row-major without gaps (dimensions of size 1 may have any stride, as in torch)."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass(frozen=True)
class TorchDTypeName:
    """A torch dtype among a file's values, kept by name (Megatron's args hold ``params_dtype``,
    ``main_grads_dtype`` ...; the converter reads none of them)."""

    name: str


@dataclass(frozen=True)
class _StorageClass:
    dtype: DType


@dataclass(frozen=True)
class _Storage:
    dtype: DType
    offset: int  # the record's data offset in the file
    numel: int


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> StoredTensor:
    if not isinstance(storage, _Storage) or requires_grad or backward_hooks or metadata:
        raise NotPlain("tensor with hooks, metadata or an unknown storage")
    shape, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(shape) != len(stride) or storage_offset < 0 or min(shape, default=1) < 0:
        raise NotPlain("malformed tensor")
    if math.prod(shape) and storage_offset + sum((n - 1) * s for n, s in zip(shape, stride)) >= storage.numel:
        raise NotPlain("tensor outside its storage")  # torch's loader says what is wrong
    return StoredTensor(storage.dtype, shape, stride, storage.offset + storage_offset * storage.dtype.itemsize)


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``, as protocol-2 pickles spell ``bytes`` (numpy's RNG state has some)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise NotPlain("_codecs.encode of something other than latin-1 text")
    return text.encode("latin1")


@functools.cache  # built once: a torch_dist source indexes one archive per chunk
def _plain_globals() -> dict[tuple[str, str], Any]:
    from ..quant.te_pickle import TRAINING_STATE  # torch-free stand-ins for a training checkpoint's values

    found: dict[tuple[str, str], Any] = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                                         ("collections", "OrderedDict"): collections.OrderedDict,
                                         ("argparse", "Namespace"): argparse.Namespace,
                                         ("_codecs", "encode"): _latin1_bytes}
    found.update({("torch", name): _StorageClass(d) for name, d in _STORAGE_DTYPES.items()})
    found.update({("torch", d.name): TorchDTypeName(d.name) for d in dtypes.ALL})
    for value, path in TRAINING_STATE:
        module, name = path.rsplit(".", 1)
        found[(module, name)] = value
    return found


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, records: dict[str, tuple[int, int]]):
        super().__init__(io.BytesIO(data))
        self._records = records  # storage key -> (data offset, size in bytes)
        self._globals = _plain_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is None:
            raise NotPlain(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageClass)):
            raise NotPlain(f"persistent id {pid!r}")
        _, cls, key, _location, numel = pid
        record = self._records.get(str(key))
        if record is None or not isinstance(numel, int) or numel * cls.dtype.itemsize > record[1]:
            raise NotPlain(f"storage {key} has no record of its size")
        return _Storage(cls.dtype, record[0], numel)


def data_offset(f: BinaryIO | io.RawIOBase, info: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes start: after its local header, whose name and extra field
    lengths may differ from the central directory's."""
    f.seek(info.header_offset + 26)
    name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


class _Window(io.RawIOBase):
    """Bytes ``start`` to ``start + length`` of a file, read as a file of their own (an archive
    among several in a ``.distcp`` file; its offsets count from its start)."""

    def __init__(self, f: BinaryIO, start: int, length: int):
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def read_index(path: str, start: int = 0, length: int | None = None) -> Any:
    """The unpickled ``data.pkl`` of ``path`` with :class:`StoredTensor` for its tensors; with
    ``start``/``length``, of the archive stored there (the offsets stay the file's)."""
    try:
        with open(path, "rb") as raw:
            if length is None:
                length = os.fstat(raw.fileno()).st_size - start
            with _Window(raw, start, length) as f, zipfile.ZipFile(f) as z:
                pkl_names = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pkl_names) != 1:
                    raise NotPlain("not a torch.save zip")
                prefix = pkl_names[0][: -len("data.pkl")] + "data/"
                records = {}
                for info in z.infolist():
                    if info.filename.startswith(prefix):
                        if info.compress_type != zipfile.ZIP_STORED:
                            raise NotPlain("compressed storage")
                        records[info.filename[len(prefix):]] = (start + data_offset(f, info), info.file_size)
                data = z.read(pkl_names[0])
                order = pkl_names[0][: -len("data.pkl")] + "byteorder"
                if order in z.namelist() and z.read(order) != b"little":  # torch.load would swap bytes; a move would not
                    raise NotPlain("big-endian storages")
    except (OSError, zipfile.BadZipFile, struct.error, KeyError, ValueError) as e:
        raise NotPlain(str(e)) from None
    try:
        return _IndexUnpickler(data, records).load()
    except NotPlain:
        raise
    except Exception as e:  # a malformed pickle: torch's loader reports it
        raise NotPlain(str(e)) from None
