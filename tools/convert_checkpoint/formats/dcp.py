"""``torch.distributed.checkpoint`` files without a process group: ``.metadata`` and ``.distcp``.

A ``.distcp`` file is a concatenation of blobs, each one complete ``torch.save`` archive (a
tensor chunk, or an already serialized object); ``.metadata`` is a pickled
``torch.distributed.checkpoint.metadata.Metadata`` that gives every tensor's global shape and
chunks, and every chunk's (file, offset, length).

Neither direction imports torch. ``.metadata`` is written with stand-ins of torch's metadata
classes, pickled as torch pickles the real ones (so torch's and Megatron's loaders read it),
and read with an unpickler that turns torch's classes into plain records (:class:`DistMetadata`).
A data file is written in place (``endpoints.file_writers.write_zips``: each chunk's archive
laid out by ``torch_zip``) and, since the blob offsets matter only to ``.metadata``, ends with
a small index of its blobs (after the last blob, where no reader looks); ``.metadata`` is built
from those indexes once every file is on disk. A chunk is read by moving its bytes (its
archive indexed by ``torch_zip_index``) or, where the archive is not a plain tensor, with
torch's loader.
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

from .. import dtypes
from ..dtypes import DType
from ..errors import ConversionError
from ..textfile import tmp_path
from .stand_in_pickle import Global, InstanceValue, StandInPickler

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


@dataclass(frozen=True)
class StorageInfo:
    """Where one chunk or object is stored: a blob of a data file."""

    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()  # torch's storage extensions (e.g. compression), not read


@dataclass(frozen=True)
class DistMetadata:
    """What ``.metadata`` says: every entry's name in order, the tensors among them, and where
    each chunk (key: name and chunk offsets) and each object (key: name and None) is stored."""

    names: tuple[str, ...]
    tensors: dict[str, TensorEntry]
    storage: dict[tuple[str, tuple[int, ...] | None], StorageInfo]


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
    """Appends blobs to one data file through ``torch.save``, then its index (``close``): for
    chunks the in-place writer cannot lay out (a dtype ``torch_zip`` does not pickle)."""

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
        self._f.write(index_bytes(self.records))


def index_bytes(records: Sequence[BlobRecord]) -> bytes:
    """The blob index that ends a data file (see :func:`read_index`)."""
    index = json.dumps([[r.fqn, r.offsets, r.sizes, r.offset, r.length] for r in records]).encode()
    return index + _TRAILER_TAIL.pack(len(index), _TRAILER_MAGIC)


def read_index(path: str) -> list[BlobRecord]:
    """The blob index a data file written here ends with."""
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
                   files: Mapping[str, list[BlobRecord]]) -> DistMetadata:
    """``.metadata`` for the blobs in ``files`` (relative path -> its records). Every planned
    chunk and object must be stored, and every tensor's stored chunks must tile it."""
    stored: dict[tuple[str, tuple[int, ...] | None], tuple[str, BlobRecord]] = {}
    for relpath, records in files.items():
        for r in records:
            stored[(r.fqn, r.offsets)] = (relpath, r)
    entries: dict[str, TensorEntry] = {}
    storage: dict[tuple[str, tuple[int, ...] | None], StorageInfo] = {}
    for fqn, entry in tensors.items():
        found = [(o, stored[(fqn, o)]) for o, _ in entry.chunks if (fqn, o) in stored]
        if len(found) != len(entry.chunks):
            missing = next(o for o, _ in entry.chunks if (fqn, o) not in stored)
            raise ConversionError(f"tensor {fqn}: the chunk at {list(missing)} is in no data file")
        chunks = tuple((offsets, r.sizes or ()) for offsets, (_, r) in found)
        problem = tiling_problem(entry.shape, chunks)
        if problem:
            raise ConversionError(f"tensor {fqn}: {problem}; .metadata not written")
        entries[fqn] = TensorEntry(entry.dtype, entry.shape, chunks)
        for offsets, (relpath, r) in found:
            storage[(fqn, offsets)] = StorageInfo(relpath, r.offset, r.length)
    objects = list(objects)
    for fqn in objects:
        if (fqn, None) not in stored:
            raise ConversionError(f"object {fqn} is in no data file")
        relpath, r = stored[(fqn, None)]
        storage[(fqn, None)] = StorageInfo(relpath, r.offset, r.length)
    return DistMetadata((*entries, *objects), entries, storage)


_METADATA = "torch.distributed.checkpoint.metadata."
_CLASSES = {name: Global(_METADATA + name) for name in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
_STORAGE_INFO = Global("torch.distributed.checkpoint.filesystem._StorageInfo")
_SIZE = Global("torch.Size")
_GET_LAYOUT = Global("torch.serialization._get_layout")
_TORCH_DTYPES = {d: Global(f"torch.{d.name}") for d in dtypes.ALL}


class _Call:
    """``func(*args)`` in a pickle (REDUCE): torch.Size, a layout, a memory-format enum."""

    def __init__(self, func: Global, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _size(values: Sequence[int]) -> _Call:
    return _Call(_SIZE, tuple(values))


def metadata_pickle(metadata: DistMetadata) -> bytes:
    """``.metadata`` as torch 2.x pickles its ``Metadata`` (protocol 4; every field of today's
    dataclasses, the list-valued ones included, whose defaults are not class attributes)."""
    state: dict[str, Any] = {}
    for fqn in metadata.names:
        entry = metadata.tensors.get(fqn)
        if entry is None:
            state[fqn] = InstanceValue(_CLASSES["BytesStorageMetadata"], {})
            continue
        properties = InstanceValue(_CLASSES["TensorProperties"], (
            _TORCH_DTYPES[entry.dtype], _Call(_GET_LAYOUT, "torch.strided"), False,
            _Call(_CLASSES["_MEM_FORMAT_ENCODING"], 0), False))
        chunks = [InstanceValue(_CLASSES["ChunkStorageMetadata"], {"offsets": _size(o), "sizes": _size(s)})
                  for o, s in entry.chunks]
        state[fqn] = InstanceValue(_CLASSES["TensorStorageMetadata"],
                                   {"properties": properties, "size": _size(entry.shape), "chunks": chunks})
    storage = {}
    for (fqn, offsets), info in metadata.storage.items():
        index = InstanceValue(_CLASSES["MetadataIndex"],
                              {"fqn": fqn, "index": None, "offset": None if offsets is None else _size(offsets)})
        storage[index] = InstanceValue(_STORAGE_INFO, {"relative_path": info.relative_path, "offset": info.offset,
                                                       "length": info.length})
    storage_meta = InstanceValue(_CLASSES["StorageMeta"],
                                 {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": []})
    top = InstanceValue(_CLASSES["Metadata"], {"state_dict_metadata": state, "planner_data": None,
                                               "storage_data": storage, "storage_meta": storage_meta,
                                               "version": DCP_VERSION})
    buf = io.BytesIO()
    StandInPickler(buf, protocol=4).dump(top)
    return buf.getvalue()


def write_metadata(path: str, metadata: DistMetadata) -> None:
    tmp = tmp_path(path)  # the executor's temporary-name rule: a resumed run clears it
    with open(tmp, "wb") as f:
        f.write(metadata_pickle(metadata))
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


class _Pickled:
    """An instance of one of torch's checkpoint classes as pickled: its class name, the
    arguments it was called with (enums), and the state BUILD gave it."""

    kind = ""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        self.state = state

    def field(self, name: str, position: int | None = None) -> Any:
        """A field from a dict state, or (``position``) from a tuple state (TensorProperties')."""
        if isinstance(self.state, dict):
            return self.state.get(name)
        if position is not None and isinstance(self.state, tuple) and len(self.state) > position:
            return self.state[position]
        return None


def _layout(name: Any) -> Any:
    return name


class _MetadataUnpickler(pickle.Unpickler):
    """torch's checkpoint metadata types become :class:`_Pickled` records, torch.Size a tuple,
    a torch dtype our :class:`DType`; plain values as they are, Megatron's classes stubs.
    Nothing named in the file is ever called except these stand-ins."""

    def __init__(self, f: IO[bytes]):
        super().__init__(f)
        self._kinds: dict[str, type[_Pickled]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            if name not in self._kinds:
                self._kinds[name] = type(name, (_Pickled,), {"kind": name})
            return self._kinds[name]
        if module == "torch":
            if name == "Size":
                return tuple
            if name in _DTYPE_NAMES:
                return _DTYPE_NAMES[name]
            if name in ("device", "layout", "memory_format") or name in _LAYOUT_NAMES:
                return _Stub
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module.split(".")[0] == "megatron":
            return _Stub
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not on the allow-list")


_DTYPE_NAMES = {d.name: d for d in dtypes.ALL}
_LAYOUT_NAMES = {"strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format"}
_ALLOWED = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
            # StorageMeta.checkpoint_id as torch's FileSystemWriter records it (a path object)
            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath")}


def read_metadata(directory: str) -> DistMetadata:
    path = os.path.join(directory, METADATA_NAME)
    try:
        with open(path, "rb") as f:
            top = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ConversionError(f"torch_dist checkpoint {directory} has no {METADATA_NAME}") from None
    except Exception as e:  # pickle raises many types for a damaged file
        raise ConversionError(f"cannot read {path}: {str(e).strip() or type(e).__name__}") from None
    if not isinstance(top, _Pickled) or top.kind != "Metadata":
        found = top.kind if isinstance(top, _Pickled) else type(top).__name__
        raise ConversionError(f"{path} holds a {found}, not torch.distributed.checkpoint Metadata")
    try:
        return _from_pickled(top)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise ConversionError(f"cannot read {path}: a malformed Metadata ({e})") from None


def _from_pickled(top: _Pickled) -> DistMetadata:
    state = top.field("state_dict_metadata") or {}
    tensors: dict[str, TensorEntry] = {}
    for fqn, m in state.items():
        if isinstance(m, _Pickled) and m.kind == "TensorStorageMetadata":
            dtype = m.field("properties").field("dtype", 0)
            if not isinstance(dtype, DType):
                raise ConversionError(f"tensor {fqn} has the dtype {dtype!r}, which is not read")
            chunks = tuple((tuple(int(x) for x in c.field("offsets")), tuple(int(x) for x in c.field("sizes")))
                           for c in m.field("chunks"))
            tensors[fqn] = TensorEntry(dtype, tuple(int(x) for x in m.field("size")), chunks)
    storage: dict[tuple[str, tuple[int, ...] | None], StorageInfo] = {}
    for index, info in (top.field("storage_data") or {}).items():
        offset = index.field("offset")
        transforms = info.field("transform_descriptors") or ()
        storage[(index.field("fqn"), None if offset is None else tuple(int(x) for x in offset))] = StorageInfo(
            info.field("relative_path"), int(info.field("offset")), int(info.field("length")), tuple(transforms))
    return DistMetadata(tuple(state), tensors, storage)


def check_storage(directory: str, metadata: DistMetadata, fqns: Iterable[str]) -> None:
    """Every chunk of ``fqns`` has a storage record inside an existing file (truncation), and the
    chunks tile each tensor (gaps, overlaps): one line naming the tensor or the file."""
    sizes: dict[str, int] = {}
    for fqn in fqns:
        entry = metadata.tensors[fqn]
        problem = tiling_problem(entry.shape, entry.chunks)
        if problem:
            raise ConversionError(f"{directory}: tensor {fqn}: {problem}")
        for offsets, _ in entry.chunks:
            info = metadata.storage.get((fqn, offsets))
            if info is None:
                raise ConversionError(f"{directory}: tensor {fqn}: the chunk at {list(offsets)} has no storage record")
            if info.transforms:
                raise ConversionError(f"{directory}: tensor {fqn} is stored through {list(info.transforms)}, "
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
