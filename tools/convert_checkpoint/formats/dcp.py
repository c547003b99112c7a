"""``torch.distributed.checkpoint`` files without a process group: ``.metadata`` and ``.distcp``.

A ``.distcp`` file is a concatenation of blobs, each one complete ``torch.save`` archive (a
tensor chunk, or an already serialized object); ``.metadata`` is a pickled
``torch.distributed.checkpoint.metadata.Metadata`` that gives every tensor's global shape and
chunks, and every chunk's (file, offset, length). torch's own metadata types are used, so
torch's and Megatron's loaders read what is written here.

Writing is streamed: a writer appends one chunk's blob at a time and, since the offsets are
known only once the blobs are written, ends each file with a small index of its blobs (after
the last blob, where no reader looks); ``.metadata`` is built from those indexes once every file
is on disk. Reading parses ``.metadata`` with an allow-list unpickler and ``torch.load``s one
blob at a time.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

if TYPE_CHECKING:  # torch.distributed.checkpoint costs ~0.5 s to import: only where DCP is read or written
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

from .. import dtypes
from ..dtypes import DType
from ..errors import ConversionError
from ..textfile import tmp_path

METADATA_NAME = ".metadata"
DCP_VERSION = "1.0.0"
_TRAILER_MAGIC = b"CCDCPIDX"  # convert_checkpoint's blob index at the end of a .distcp file
_TRAILER_TAIL = struct.Struct("<Q8s")  # index length, magic


@dataclass(frozen=True)
class BlobRecord:
    """One blob of a data file: a tensor chunk (``offsets``/``sizes`` in the global tensor) or a
    serialized object (``offsets`` None)."""

    fqn: str
    offsets: tuple[int, ...] | None
    sizes: tuple[int, ...] | None
    offset: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the checkpoint: dtype, global shape, chunks as (offsets, sizes)."""

    dtype: DType
    shape: tuple[int, ...]
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


# --- coverage ----------------------------------------------------------------------------

def tiling_problem(shape: Sequence[int], chunks: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str | None:
    """Why ``chunks`` (offsets, sizes) do not tile ``shape`` exactly, or None.

    Bounds are checked per chunk, then the volumes must add up to the whole and no two chunks
    may intersect: together that is an exact tiling (no gap, no overlap)."""
    shape = tuple(shape)
    for offsets, sizes in chunks:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            return f"chunk at {list(offsets)} has {len(offsets)} dimensions, the tensor {len(shape)}"
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
            return f"chunk at {list(offsets)} of size {list(sizes)} lies outside the global shape {list(shape)}"
    boxes = [(tuple(o), tuple(s)) for o, s in chunks if math.prod(s) > 0]
    clash = _overlap(boxes, 0)
    if clash is not None:
        return f"chunks at {list(clash[0][0])} and {list(clash[1][0])} overlap"
    covered = sum(math.prod(s) for _, s in boxes)
    if covered != math.prod(shape):
        return f"chunks cover {covered} of {math.prod(shape)} elements of the global shape {list(shape)} (a gap)"
    return None


Box = tuple[tuple[int, ...], tuple[int, ...]]


def _overlap(boxes: list[Box], dim: int) -> tuple[Box, Box] | None:
    """Two boxes that intersect, or None. Boxes whose ranges along ``dim`` meet form a cluster;
    a cluster sharing one range (a grid, as every writer makes) is checked along the next
    dimension, any other cluster pair by pair."""
    if len(boxes) < 2:
        return None
    if dim == len(boxes[0][0]):
        return boxes[0], boxes[1]  # equal ranges on every dimension
    boxes = sorted(boxes, key=lambda b: b[0][dim])
    cluster = [boxes[0]]
    end = boxes[0][0][dim] + boxes[0][1][dim]
    for box in [*boxes[1:], None]:
        if box is not None and box[0][dim] < end:
            cluster.append(box)
            end = max(end, box[0][dim] + box[1][dim])
            continue
        if len({(b[0][dim], b[1][dim]) for b in cluster}) == 1:
            found = _overlap(cluster, dim + 1)
        else:
            found = next(((a, b) for i, a in enumerate(cluster) for b in cluster[i + 1:]
                          if all(max(x, y) < min(x + m, y + n) for x, m, y, n in zip(a[0], a[1], b[0], b[1]))), None)
        if found is not None:
            return found
        if box is not None:
            cluster, end = [box], box[0][dim] + box[1][dim]
    return None


# --- writing -----------------------------------------------------------------------------

class BlobWriter:
    """Appends blobs to one data file, then its index (``close``)."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.records: list[BlobRecord] = []

    def tensor(self, fqn: str, offsets: Sequence[int], value: torch.Tensor) -> None:
        """One chunk; ``value`` has the chunk's shape (leading axes of size 1 included)."""
        start = self._f.tell()
        # A view would save its whole storage: the arena's tensors have their own storage.
        torch.save(value if value.is_contiguous() and value.untyped_storage().nbytes() == value.nbytes
                   else value.contiguous().clone(), self._f)
        self.records.append(BlobRecord(fqn, tuple(offsets), tuple(value.shape), start, self._f.tell() - start))

    def object(self, fqn: str, value: Any) -> None:
        """A serialized object (Megatron's ``_extra_state`` shards: a list of per-shard objects)."""
        start = self._f.tell()
        torch.save(value, self._f)
        self.records.append(BlobRecord(fqn, None, None, start, self._f.tell() - start))

    def close(self) -> None:
        index = json.dumps([[r.fqn, r.offsets, r.sizes, r.offset, r.length] for r in self.records]).encode()
        self._f.write(index)
        self._f.write(_TRAILER_TAIL.pack(len(index), _TRAILER_MAGIC))


def read_index(path: str) -> list[BlobRecord]:
    """The blob index a :class:`BlobWriter` left at the end of ``path``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < _TRAILER_TAIL.size:
            raise ConversionError(f"data file {path} is truncated: no blob index")
        f.seek(size - _TRAILER_TAIL.size)
        length, magic = _TRAILER_TAIL.unpack(f.read(_TRAILER_TAIL.size))
        if magic != _TRAILER_MAGIC or length > size - _TRAILER_TAIL.size:
            raise ConversionError(f"data file {path} has no blob index at its end (truncated, or not written here)")
        f.seek(size - _TRAILER_TAIL.size - length)
        rows = json.loads(f.read(length))
    return [BlobRecord(fqn, tuple(o) if o is not None else None, tuple(s) if s is not None else None, off, n)
            for fqn, o, s, off, n in rows]


def build_metadata(tensors: Mapping[str, TensorEntry], objects: Iterable[str],
                   files: Mapping[str, list[BlobRecord]]) -> Metadata:
    """``.metadata`` for the blobs in ``files`` (relative path -> its records). Every planned
    chunk and object must be stored, and every tensor's stored chunks must tile it."""
    stored: dict[tuple[str, tuple[int, ...] | None], tuple[str, BlobRecord]] = {}
    for relpath, records in files.items():
        for r in records:
            stored[(r.fqn, r.offsets)] = (relpath, r)
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for fqn, entry in tensors.items():
        found = [(o, stored[(fqn, o)]) for o, _ in entry.chunks if (fqn, o) in stored]
        if len(found) != len(entry.chunks):
            missing = next(o for o, _ in entry.chunks if (fqn, o) not in stored)
            raise ConversionError(f"tensor {fqn}: the chunk at {list(missing)} is in no data file")
        problem = tiling_problem(entry.shape, [(o, r.sizes or ()) for o, (_, r) in found])
        if problem:
            raise ConversionError(f"tensor {fqn}: {problem}; .metadata not written")
        chunks = []
        for offsets, (relpath, r) in found:
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(r.sizes or ())))
            storage[MetadataIndex(fqn, torch.Size(offsets))] = _StorageInfo(relpath, r.offset, r.length)
        state[fqn] = TensorStorageMetadata(TensorProperties(dtype=entry.dtype.torch), torch.Size(entry.shape), chunks)
    for fqn in objects:
        if (fqn, None) not in stored:
            raise ConversionError(f"object {fqn} is in no data file")
        relpath, r = stored[(fqn, None)]
        state[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = _StorageInfo(relpath, r.offset, r.length)
    return Metadata(state, planner_data=None, storage_data=storage, storage_meta=StorageMeta(), version=DCP_VERSION)


def write_metadata(path: str, metadata: Metadata) -> None:
    tmp = tmp_path(path)  # the executor's temporary-name rule: a resumed run clears it
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- reading -----------------------------------------------------------------------------

class _Stub:
    """Stands in for classes of other packages in ``.metadata`` (Megatron's metadata-caching
    plans): never called, only stored and ignored."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _MetadataUnpickler(pickle.Unpickler):
    """torch's checkpoint metadata types and plain values only; Megatron's classes become stubs.
    Nothing named in the file is ever called except these constructors."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module.split(".")[0] == "megatron":
            return _Stub
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not on the allow-list")


_ALLOWED = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
            ("torch.serialization", "_get_layout"), ("torch", "device"),
            # StorageMeta.checkpoint_id as torch's FileSystemWriter records it (a path object)
            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath")}


def read_metadata(directory: str) -> Metadata:
    from torch.distributed.checkpoint.metadata import Metadata

    path = os.path.join(directory, METADATA_NAME)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ConversionError(f"torch_dist checkpoint {directory} has no {METADATA_NAME}") from None
    except Exception as e:  # pickle raises many types for a damaged file
        raise ConversionError(f"cannot read {path}: {str(e).strip() or type(e).__name__}") from None
    if not isinstance(metadata, Metadata):
        raise ConversionError(f"{path} holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata")
    return metadata


def tensor_entries(metadata: Metadata) -> dict[str, TensorEntry]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {fqn: TensorEntry(dtypes.of(m.properties.dtype), tuple(m.size), tuple((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks))
            for fqn, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def check_storage(directory: str, metadata: Metadata, fqns: Iterable[str]) -> None:
    """Every chunk of ``fqns`` has a storage record inside an existing file (truncation), and the
    chunks tile each tensor (gaps, overlaps): one line naming the tensor or the file."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    sizes: dict[str, int] = {}
    entries = tensor_entries(metadata)
    for fqn in fqns:
        entry = entries[fqn]
        problem = tiling_problem(entry.shape, entry.chunks)
        if problem:
            raise ConversionError(f"{directory}: tensor {fqn}: {problem}")
        for offsets, _ in entry.chunks:
            info = metadata.storage_data.get(MetadataIndex(fqn, torch.Size(offsets)))
            if info is None:
                raise ConversionError(f"{directory}: tensor {fqn}: the chunk at {list(offsets)} has no storage record")
            if getattr(info, "transform_descriptors", None):  # torch's storage extensions (e.g. compression)
                raise ConversionError(f"{directory}: tensor {fqn} is stored through {info.transform_descriptors}, "
                                      "which is not read (only plain torch.save chunks)")
            if info.relative_path not in sizes:
                file = os.path.join(directory, info.relative_path)
                if not os.path.isfile(file):
                    raise ConversionError(f"{directory}: data file {info.relative_path} is missing (tensor {fqn})")
                sizes[info.relative_path] = os.path.getsize(file)
            if info.offset + info.length > sizes[info.relative_path]:
                raise ConversionError(
                    f"{directory}: data file {info.relative_path} is truncated: {sizes[info.relative_path]} bytes, "
                    f"but tensor {fqn} is stored up to byte {info.offset + info.length}")


def storage_of(metadata: Metadata, fqn: str, offsets: Sequence[int]) -> _StorageInfo:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return metadata.storage_data[MetadataIndex(fqn, torch.Size(offsets))]


def read_blob(path: str, offset: int, length: int,
              load: Callable[[IO[bytes]], Any] | None = None) -> torch.Tensor:
    """One chunk (a tensor of the chunk's shape); ``load`` unpickles the archive (default:
    torch's weights-only loader)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ConversionError(f"data file {path} is truncated at byte {offset + len(data)}")
    try:
        if load is None:
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            value = load(io.BytesIO(data))
    except ConversionError:
        raise
    except Exception as e:  # a damaged archive or a class the weights-only loader refuses
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"cannot read the blob at byte {offset} of {path}: {first}") from None
    if not isinstance(value, torch.Tensor):
        raise ConversionError(f"the blob at byte {offset} of {path} holds a {type(value).__name__}, not a tensor")
    return value
