"""Megatron-Core ``torch_dist`` checkpoints, read and written without building a model.

Layout on disk (megatron-core's ``dist_checkpointing`` with the torch backend)::

    SAVE/latest_checkpointed_iteration.txt   "release"
    SAVE/release/metadata.json               the 4 backend keys megatron-core 0.13-0.20 read
    SAVE/release/.metadata                   torch.distributed.checkpoint Metadata (pickle)
    SAVE/release/__0_<i>.distcp              data files: one torch.save archive per chunk
    SAVE/release/common.pt                   args, checkpoint_version 3.0, iteration 0

The tensors are global (layout-free); their keys are Megatron's sharded keys
(``mcore_dist_keys``). Source: ``.metadata`` is parsed, every tensor's chunks must tile it and
lie inside their files, each canonical tensor is the tiling of the chunk windows that hold it;
a chunk whose archive holds a plain tensor is moved as byte runs, any other is loaded (only
the blobs a file needs); optimizer state is skipped. Target: each canonical tensor is one
chunk per layer/expert (fc1: a gate and an up chunk, as Megatron stores them; large tensors in
row blocks), each chunk one archive laid out in place in a ``.distcp`` file that the
executor's workers write independently; ``finish`` checks the written chunks tile every tensor
before it writes ``.metadata``. Neither direction imports torch where every chunk only moves.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

from .. import dtypes
from .. import tensor_expr as tx
from ..config.resolve import param_dtype
from ..core.canonical import CanonicalTensor, Sections, Split
from ..core.plan import ModelInfo, OutputFile, Plan, TensorJob
from ..errors import ConversionError
from ..formats import dcp, torch_zip, torch_zip_index
from ..formats.torch_zip_index import StoredTensor
from ..layout.from_flags import layout_from_flags, validate_tensor_parallel
from ..layout.pipeline import PipelineLayout
from ..layout.placement import MTP_INNER_LAYER, ParallelLayout
from ..layout.tensor_parallel import shard
from ..quant import fp8_block, te_pickle
from ..quant.te_pickle import Fp8BlockRecord
from ..requests import LayoutRequest, ModelRequest, PlanRequest, VocabPadding
from ..tensor_expr import Expr, Leaf, TensorRef
from .base import CanonicalSource, CanonicalTarget, Source, in_place_memory
from .file_writers import write_zips
from .mcore_dist_keys import KeyRules, ParsedKey, Slot, mtp_inner_name, parse_key, section_of, slot
from .mcore_legacy import (
    CHECKPOINT_VERSION,
    TRACKER_NAME,
    archive_name,
    load_file,
    mcore_args,
    model_from_args,
    resolve_checkpoint_dir,
    without_zip_crc32,
)

if TYPE_CHECKING:
    import argparse

    from ..materialize import FileContext
    from ..report import FileResult

METADATA_JSON = "metadata.json"
COMMON_NAME = "common.pt"
# megatron-core 0.16 builds its CheckpointingConfig from exactly these keys; later versions ignore extras.
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
# How the model's sharded state dict was built: stacked layers, no per-shard keys (Megatron's defaults).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
FILE_BYTES = 1 << 30  # a .distcp file (one worker's unit of work) holds up to this much
CHUNK_BYTES = 256 << 20  # a chunk (one blob: what a reader loads at once) holds up to this much
BLOB_ARCHIVE = "archive"  # the top directory torch.save gives an archive written to a stream
_SKIPPED_PREFIXES = ("optimizer.",)


def dist_root(path: str) -> str:
    """The directory holding metadata.json: ``path`` itself, or its release/ or iter_ directory."""
    if os.path.isfile(os.path.join(path, METADATA_JSON)):
        return path
    return resolve_checkpoint_dir(path)[0]


def looks_like(path: str) -> bool:
    try:
        return os.path.isfile(os.path.join(dist_root(path), METADATA_JSON))
    except ConversionError:
        return False


# --- source --------------------------------------------------------------------------------

@dataclass
class DistSource(CanonicalSource):
    format = "mcore_dist"
    short = "mcore"

    root: str
    metadata: dcp.DistMetadata
    keys: dict[str, ParsedKey]  # model tensor keys
    entries: dict[str, dcp.TensorEntry]
    skipped: int = 0  # optimizer-state entries, not read
    common: dict = field(default_factory=dict)
    request: ModelRequest = ModelRequest()
    hf_config_path: str | None = None
    arch_origin: str = "the checkpoint's saved architecture"
    _blobs: dict[tuple[str, str], StoredTensor | None] = field(default_factory=dict, repr=False)

    def args(self) -> argparse.Namespace | None:
        return self.common.get("args")

    def model(self) -> ModelInfo:
        model, self.arch_origin = model_from_args(self.args(), self.request, self.hf_config_path)
        return model

    @property
    def tensor_count(self) -> int:
        return len(self.keys)

    def describe(self) -> list[str]:
        if not self.skipped:
            return []
        return [f"the torch_dist checkpoint holds {self.skipped} optimizer-state entries: skipped, only the model "
                "weights are read"]

    def reader(self) -> DistReader:
        return DistReader(self)

    def bytes_read_for(self, leaves: Iterable[Leaf]) -> int:
        """A window that moves costs its own bytes; any other its whole blob (a chunk is one
        torch.save archive, loaded whole), once per file."""
        blobs, moved = set(), 0
        for leaf in leaves:
            if self.in_file(leaf):
                moved += tx.nbytes(leaf)
            else:
                blobs.add((leaf.ref.file, (leaf.ref.part or "").split("@")[0]))
        return moved + sum(int(at.split("+")[1]) for _, at in blobs)

    def in_file(self, leaf: Leaf) -> bool:
        return self.stored_offset(leaf) is not None

    def stored_offset(self, leaf: Leaf) -> int | None:
        """Where the leaf's tensor starts in its data file, where its chunk's archive holds a
        plain contiguous tensor of the leaf's dtype (indexed without torch, once per blob);
        None where the chunk must be loaded (a TE FP8 pickle, a chunk without its layer axes)."""
        assert leaf.ref.part is not None
        at, local = leaf.ref.part.split("@")
        stored = self._blob_tensor(leaf.ref.file, at)
        index = tuple(int(i) for i in local.split(",")) if local else ()
        if (stored is None or not stored.is_contiguous or stored.dtype != leaf.dtype
                or stored.shape != (*stored.shape[:len(index)], *leaf.source_shape)
                or any(i >= n for i, n in zip(index, stored.shape))):
            return None
        return stored.offset + sum(i * st for i, st in zip(index, stored.stride)) * stored.dtype.itemsize

    def _blob_tensor(self, file: str, at: str) -> StoredTensor | None:
        key = (file, at)
        if key not in self._blobs:
            offset, length = (int(x) for x in at.split("+"))
            try:
                found = torch_zip_index.read_index(os.path.join(self.root, file), offset, length)
            except torch_zip_index.NotPlain:
                found = None
            self._blobs[key] = found if isinstance(found, StoredTensor) else None
        return self._blobs[key]

    def canonical(self, tensors: list[CanonicalTensor], model: ModelInfo,
                  flags: LayoutRequest) -> tuple[dict[str, Expr], ParallelLayout]:
        pieces, shapes, owner = self._pieces()
        out: dict[str, Expr] = {}
        for t in tensors:
            if t.name not in pieces:
                raise ConversionError(f"{self.root}: no torch_dist tensor holds {t.name} (expected from "
                                      f"{self.arch_origin})")
            shape, key = shapes[t.name], owner[t.name]
            rows_ok = shape[:1] >= t.shape[:1] if t.split is Split.VOCAB else shape[:1] == t.shape[:1]
            if not rows_ok or shape[1:] != t.shape[1:]:
                raise ConversionError(f"{self.root}: torch_dist tensor {key} holds {t.name} as {list(shape)}, expected "
                                      f"{list(t.shape)} from {self.arch_origin}")
            expr = assemble(pieces[t.name], shape)
            out[t.name] = tx.narrow(expr, 0, 0, t.shape[0]) if t.split is Split.VOCAB else expr
        unused = sorted(set(pieces) - set(out))
        if unused:
            raise ConversionError(f"unmapped tensor {owner[unused[0]]} ({unused[0]}) in {self.root}: the family's "
                                  "convertors do not produce it")
        return out, self._layout(tensors, model, flags)

    def _pieces(self) -> tuple[dict[str, list[tuple[tuple[int, ...], Expr]]], dict[str, tuple[int, ...]], dict[str, str]]:
        """Canonical name -> its chunk windows (offset in the tensor, leaf), shape, and key."""
        pieces: dict[str, list[tuple[tuple[int, ...], Expr]]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        owner: dict[str, str] = {}
        for key, parsed in self.keys.items():
            entry = self.entries[key]
            n = len(parsed.axes)
            if len(entry.shape) < n:
                raise ConversionError(f"{self.root}: torch_dist tensor {key} of shape {list(entry.shape)} lacks its "
                                      f"{'/'.join(parsed.axes)} axes")
            for offsets, sizes in entry.chunks:
                info = self.metadata.storage[(key, offsets)]
                for index in itertools.product(*(range(o, o + s) for o, s in zip(offsets[:n], sizes[:n]))):
                    local = ",".join(str(i - o) for i, o in zip(index, offsets))
                    ref = TensorRef(info.relative_path, key, None, f"{info.offset}+{info.length}@{local}")
                    name = parsed.canonical(tuple(index))
                    at, shape, holder = tuple(offsets[n:]), tuple(entry.shape[n:]), key
                    section = section_of(name)
                    if section is not None:  # a GatedDeltaNet block: its rows of the canonical tensor
                        name, blocks, i = section
                        head = key[: -len(blocks[i])]
                        rows = [self._block_rows(head + block, n) for block in blocks]
                        at, shape, holder = (at[0] + sum(rows[:i]), *at[1:]), (sum(rows), *shape[1:]), head[:-1]
                    if owner.get(name, holder) != holder:  # e.g. a layer stored both stacked and on its own
                        raise ConversionError(f"{self.root}: {name} is held by both torch_dist tensors "
                                              f"{owner[name]} and {holder}")
                    pieces.setdefault(name, []).append((at, tx.source(ref, entry.dtype, sizes[n:])))
                    shapes[name], owner[name] = shape, holder
        return pieces, shapes, owner

    def _block_rows(self, key: str, axes: int) -> int:
        entry = self.entries.get(key)
        if entry is None:
            raise ConversionError(f"{self.root}: torch_dist tensor {key} (a gated delta-net block) is missing")
        return int(entry.shape[axes])

    def _layout(self, tensors: list[CanonicalTensor], model: ModelInfo, flags: LayoutRequest) -> ParallelLayout:
        """What the checkpoint says about its layout: none but its naming (tensors are global)."""
        arch = model.arch
        inner = {n for k in self.keys if (n := mtp_inner_name(k))}
        if len(inner) > 1:
            raise ConversionError(f"{self.root}: MTP layers use both {' and '.join(sorted(inner))} names")
        detected = inner.pop() if inner else None
        if flags.mtp_layer_name is not None and detected is not None and flags.mtp_layer_name != detected:
            raise ConversionError(f"--mtp_layer_name {flags.mtp_layer_name} disagrees with the checkpoint's {detected} names")
        embedding = next((self.entries[k].shape[0] for k in self.keys if k == "embedding.word_embeddings.weight"),
                         arch.vocab_size)
        return ParallelLayout(1, PipelineLayout(1, 1, (arch.num_layers,)), self._impl(flags), embedding,
                              arch.tied_embeddings, num_experts=arch.num_experts or 0,
                              mtp_num_layers=arch.mtp_num_layers,
                              mtp_inner_name=detected or flags.mtp_layer_name or MTP_INNER_LAYER)

    def _impl(self, flags: LayoutRequest) -> str:
        """TE or local spec, where the keys tell them apart; else the flag, the saved args, or TE.

        MLA layers: TE fuses the q/kv norms into the up projections, the local spec keeps them.
        Other layers: the local spec renames the pre-MLP norm on MoE layers too, TE keeps it
        there. Dense non-MLA layers have the same keys under both."""
        keys = self.keys
        if any(".linear_kv_up_proj.layer_norm_" in k or ".linear_q_up_proj.layer_norm_" in k for k in keys):
            return "transformer_engine"
        if any(".self_attention.kv_layernorm." in k for k in keys):
            return "local"
        if any(".pre_mlp_layernorm." in k for k in keys) and any(".linear_qkv." in k for k in keys):
            return "transformer_engine"
        args = self.args()
        return flags.transformer_impl or getattr(args, "transformer_impl", None) or "transformer_engine"


def assemble(pieces: list[tuple[tuple[int, ...], Expr]], shape: tuple[int, ...], dim: int = 0) -> Expr:
    """The tensor of ``shape`` that the windows tile (checked on open): slabs along ``dim``
    between every window edge, each assembled along the next dimension."""
    first = pieces[0][1]
    if dim == len(shape) or (len(pieces) == 1 and tuple(first.shape[dim:]) == tuple(shape[dim:])):
        return first
    cuts = sorted({0, shape[dim], *(o[dim] for o, _ in pieces), *(o[dim] + e.shape[dim] for o, e in pieces)})
    slabs = []
    for lo, hi in zip(cuts, cuts[1:]):
        inside = [(tuple(lo if d == dim else x for d, x in enumerate(o)), tx.narrow(e, dim, lo - o[dim], hi - lo))
                  for o, e in pieces if o[dim] < hi and o[dim] + e.shape[dim] > lo]
        slabs.append(assemble(inside, tuple(hi - lo if d == dim else s for d, s in enumerate(shape)), dim + 1))
    return tx.cat(slabs, dim)


class DistReader:
    """Reads leaf windows: a plain tensor chunk is moved from its file (``locate``); any other
    is loaded, and recently loaded blobs are kept up to a byte cap (a chunk of several layers
    serves each of them)."""

    _CACHE_BYTES = 512 << 20

    def __init__(self, src: DistSource):
        self._src = src
        self._root = src.root
        self._blobs: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()

    def locate(self, leaf: Leaf) -> tuple[str, int] | None:
        offset = self._src.stored_offset(leaf)
        return None if offset is None else (os.path.join(self._root, leaf.ref.file), offset)

    def _blob(self, file: str, offset: int, length: int) -> torch.Tensor:
        key = (file, offset)
        if key in self._blobs:
            self._blobs.move_to_end(key)
            return self._blobs[key]
        value = dcp.read_blob(os.path.join(self._root, file), offset, length, _load_chunk)
        self._blobs[key] = value
        while len(self._blobs) > 1 and sum(t.nbytes for t in self._blobs.values()) > self._CACHE_BYTES:
            self._blobs.popitem(last=False)
        return value

    def read_into(self, leaf: Leaf, out: torch.Tensor) -> None:
        assert leaf.ref.part is not None
        at, local = leaf.ref.part.split("@")
        offset, length = (int(x) for x in at.split("+"))
        t = self._blob(leaf.ref.file, offset, length)
        index = tuple(int(i) for i in local.split(",")) if local else ()
        if index and t.dim() == len(index) + len(leaf.source_shape):  # the leaf's layer/expert in the chunk
            t = t[index]
        elif index and any(index):  # a chunk without its layer/expert axes must be a chunk of one
            raise ConversionError(f"{os.path.join(self._root, leaf.ref.file)}: the chunk of {leaf.ref.name} at byte "
                                  f"{offset} has {t.dim()} dimensions, .metadata says {len(index) + len(leaf.source_shape)}")
        if tuple(t.shape) != leaf.source_shape or dtypes.of(t.dtype) != leaf.dtype:
            raise ConversionError(
                f"{os.path.join(self._root, leaf.ref.file)}: the chunk of {leaf.ref.name} at byte {offset} holds "
                f"{tx.dtype_name(t.dtype)} {list(t.shape)}, .metadata says {tx.dtype_name(leaf.dtype)} {list(leaf.source_shape)}")
        out.copy_(leaf.window(t))

    def whole(self, leaf: Leaf) -> torch.Tensor | None:
        return None

    def close(self) -> None:
        self._blobs.clear()


def _load_chunk(f: IO[bytes]) -> torch.Tensor:
    """A chunk blob: a tensor, or (megatron-core <= 0.16 with FP8 parameters, which saves them
    as they are) a pickled TE block-FP8 tensor, read without TE and dequantized to its nominal
    dtype, as megatron-core >= 0.17 stores it and as TE's ``dequantize()`` gives it."""
    value = te_pickle.load(f, mmap=False)
    if isinstance(value, Fp8BlockRecord):
        try:
            value.check("FP8 chunk")
        except ValueError as e:
            raise ConversionError(str(e)) from None
        return fp8_block.dequantize_blocks(value.codes, value.scale_inv, value.nominal_dtype)
    return value


_SINGLETON = re.compile(r"\.weight_[wv]$|\.experts\.experts\.\d+\.|^\d+\.")


def open_checkpoint(path: str, request: ModelRequest | None = None, hf_config_path: str | None = None) -> DistSource:
    if not os.path.isdir(path):
        raise ConversionError(f"--load_ckpt_path {path} is not a directory")
    root = dist_root(path)
    meta_path = os.path.join(root, METADATA_JSON)
    try:
        with open(meta_path) as f:
            backend = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {meta_path}: {e}") from None
    if not isinstance(backend, dict) or backend.get("sharded_backend") != "torch_dist":
        found = backend.get("sharded_backend") if isinstance(backend, dict) else backend
        raise ConversionError(f"{meta_path}: sharded_backend {found!r}; only torch_dist checkpoints are read")
    metadata = dcp.read_metadata(root)
    entries = metadata.tensors
    keys: dict[str, ParsedKey] = {}
    skipped = 0
    for fqn in metadata.names:
        if fqn.startswith(_SKIPPED_PREFIXES):
            skipped += 1
        elif fqn in entries:
            if _SINGLETON.search(fqn):
                raise ConversionError(f"{root}: tensor {fqn} is in megatron-core's singleton_local_shards form "
                                      "(0.15.0rc1's default), which is not read; save it with singleton_local_shards=False")
            parsed = parse_key(fqn)
            if parsed is None:
                raise ConversionError(f"{root}: tensor {fqn} is not a GPTModel weight nor optimizer state")
            keys[fqn] = parsed
    if not keys:
        raise ConversionError(f"{root}: the torch_dist checkpoint holds no model tensors")
    dcp.check_storage(root, metadata, keys)
    common_path = os.path.join(root, COMMON_NAME)
    common = load_file(common_path) if os.path.isfile(common_path) else {}
    return DistSource(root, metadata, keys, {k: entries[k] for k in keys}, skipped, common,
                      request or ModelRequest(), hf_config_path)


def open_source(request: PlanRequest) -> DistSource:
    return open_checkpoint(request.source_path, request.model, request.hf_config_path)


# --- target --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedChunk:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]  # leading layer/expert axes of size 1 included


class DistTarget(CanonicalTarget):
    format = "mcore_dist"
    short = "mcore"
    file_kind = "distcp"
    markers = (TRACKER_NAME, os.path.join("release", dcp.METADATA_NAME), os.path.join("release", METADATA_JSON),
               os.path.join("release", COMMON_NAME))

    def __init__(self, target_dir: str, flags: LayoutRequest, vocab: VocabPadding, file_bytes: int = FILE_BYTES):
        super().__init__(target_dir)
        self.flags = flags
        self.vocab = vocab
        self.file_bytes = file_bytes
        self.args: argparse.Namespace | None = None
        self._layout: ParallelLayout | None = None
        self.tensors: dict[str, dcp.TensorEntry] = {}  # planned: key -> dtype, global shape, chunks
        self.objects: dict[str, None] = {}  # _extra_state object keys, in order
        self._tensor_chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self._chunks: dict[str, PlannedChunk] = {}  # job name -> chunk
        self._dequantized = 0  # block-FP8 source tensors written in their nominal dtype

    @property
    def data_dir(self) -> str:
        return os.path.join(self.target_dir, "release")

    @property
    def layout(self) -> ParallelLayout:
        assert self._layout is not None, "plan_files() first"
        return self._layout

    def plan_files(self, exprs: Mapping[str, Expr], tensors: list[CanonicalTensor], model: ModelInfo,
                   fp8_output: bool) -> list[OutputFile]:
        """Every canonical tensor into chunks of its Megatron key, packed into ``.distcp`` files.

        The layout flags do not change the tensors (torch_dist is global); they go into the
        saved args, with the padded vocabulary, as the layout to train with."""
        arch = model.arch
        if arch.vision is not None:  # its keys would need LoongForge's VLM prefixes, which only rank files have here
            raise ConversionError(f"--ckpt_format torch_dist: the {arch.family} vision-language model is written as "
                                  "legacy rank files only for now; drop --ckpt_format")
        layout = self._layout = layout_from_flags(self.flags, self.vocab, arch)
        validate_tensor_parallel(arch, tensors, layout)
        self.args = mcore_args(model, layout, self.vocab)
        self.args.ckpt_format = "torch_dist"
        # per-layer keys when the layer kinds vary (MoE / dense, delta-net / full attention)
        stacked = not isinstance(arch.moe_layer_freq, list) and arch.linear_attention_pattern is None
        rules = KeyRules(layout.transformer_impl, stacked=stacked,
                         num_layers=arch.num_layers, num_experts=arch.num_experts or 0,
                         mtp_inner_name=layout.mtp_inner_name)
        names = {t.name for t in tensors}
        nominal = param_dtype(model.hf_config or {})
        items: list[TensorJob] = []
        for t in tensors:
            expr = exprs[t.name]
            if tx.is_fp8(expr):  # megatron-core >= 0.17 stores FP8 parameters dequantized, in their nominal dtype
                expr = tx.cast(expr, nominal)
                self._dequantized += 1
            if t.split is Split.VOCAB:
                expr = shard(expr, Split.VOCAB, 1, 0, layout.padded_vocab_size)
            where = slot(t.name, rules, names)
            if isinstance(t.split, Sections) and t.split.names:  # a GatedDeltaNet block per key
                start = 0
                for block, rows in zip(t.split.names, t.split.sizes):
                    part = Slot(f"{where.key}.{block}", where.index, where.grid)
                    self._add_tensor(t, part, tx.narrow(expr, 0, start, rows), items)
                    start += rows
            else:
                self._add_tensor(t, where, expr, items)
            if t.extra_state_module is not None and not t.name.startswith(("output_layer.", "embedding.")):
                module_key = where.key[: len(where.key) - (len(t.name) - len(t.extra_state_module))]
                extra = where.extra_state_key(module_key)
                if extra not in self.objects:  # fc1's gate and up share their module
                    self.objects[extra] = None
                    items.append(TensorJob(extra, None))
        self.tensors = {key: dcp.TensorEntry(entry.dtype, entry.shape, tuple(self._tensor_chunks[key]))
                        for key, entry in self.tensors.items()}
        return self._pack(items)

    def _add_tensor(self, t: CanonicalTensor, where: Slot, expr: Expr, items: list[TensorJob]) -> None:
        shape = (*where.grid, *expr.shape)
        known = self.tensors.get(where.key)
        if known is not None and (known.shape != shape or known.dtype != expr.dtype):
            raise ConversionError(
                f"torch_dist key {where.key}: {t.name} is {tx.dtype_name(expr.dtype)} {list(expr.shape)}, unlike the "
                f"other layers' {tx.dtype_name(known.dtype)} {list(known.shape[len(where.grid):])}: layers of "
                "different shapes cannot share a stacked key")
        chunks = self._tensor_chunks.setdefault(where.key, [])
        lead = (1,) * len(where.index)
        for start, rows in _row_blocks(t, expr):
            window = tx.narrow(expr, 0, start, rows) if expr.shape else expr
            offsets = (*where.index, *((start,) + (0,) * (len(expr.shape) - 1) if expr.shape else ()))
            sizes = (*lead, *window.shape)
            name = f"{where.key}@{','.join(map(str, offsets))}"
            self._chunks[name] = PlannedChunk(where.key, offsets, sizes)
            chunks.append((offsets, sizes))
            items.append(TensorJob(name, window))
        self.tensors[where.key] = dcp.TensorEntry(expr.dtype, shape, ())  # chunks filled in by plan_files

    def _pack(self, items: list[TensorJob]) -> list[OutputFile]:
        files: list[list[TensorJob]] = [[]]
        size = 0
        for job in items:
            n = tx.nbytes(job.expr) if job.expr is not None else 0
            if files[-1] and size + n > self.file_bytes:
                files.append([])
                size = 0
            files[-1].append(job)
            size += n
        return [OutputFile(f"__0_{i}.distcp", self.file_kind, (("", tuple(jobs)),)) for i, jobs in enumerate(files)]

    def check_plan(self, plan: Plan) -> None:
        """Every tensor's planned chunks tile it (the same check runs on the written files)."""
        if self._dequantized:
            plan.notes.append(
                f"FP8: {self._dequantized} block-FP8 tensors are written dequantized to "
                f"{tx.dtype_name(param_dtype(plan.model.hf_config or {}) if plan.model else dtypes.BFLOAT16)}, as "
                "megatron-core >= 0.17 stores FP8 parameters in torch_dist (codes and scales are not kept)")
        for key, entry in self.tensors.items():
            problem = dcp.tiling_problem(entry.shape, entry.chunks)
            if problem:
                raise ConversionError(f"torch_dist tensor {key}: {problem}")

    def fingerprint_fields(self) -> dict:
        return {"args": sorted((k, repr(v)) for k, v in vars(self.args).items()) if self.args else None,
                "hf_config": None}

    def describe(self, plan: Plan) -> list[str]:
        several = sum(1 for e in self.tensors.values() if len(e.chunks) > 1)
        return [f"torch_dist: {len(self.tensors)} tensors ({several} in several chunks), "
                f"{len(self.objects)} _extra_state objects, {len(plan.files)} .distcp files"]

    def memory_bytes(self, out: OutputFile, source: Source) -> int:
        return out.nbytes if _through_torch_save(out) else in_place_memory(out, source)

    def write_file(self, out: OutputFile, path: str, ctx: FileContext) -> str | None:
        """The file's blobs in place, each chunk's archive laid out from its dtype and shape (a
        chunk that only moves bytes is copied into it); a chunk of a dtype the layout cannot
        pickle sends the file through torch.save, a chunk at a time. Returns its sha256."""
        if _through_torch_save(out):
            self._save_through_torch(out, path, ctx)
            return None
        archives: list[tuple[int, torch_zip.ZipLayout]] = []
        records: list[dcp.BlobRecord] = []
        exprs: dict[str, Expr] = {}
        offset = 0
        extra_state = torch_zip.plan([None], BLOB_ARCHIVE)  # every _extra_state object is the same archive
        for _, job in out.jobs():
            if job.expr is None:  # Megatron's ShardedObject payload: a list of per-shard objects
                layout = extra_state
                records.append(dcp.BlobRecord(job.name, None, None, offset, layout.size))
            else:
                chunk = self._chunks[job.name]
                layout = torch_zip.plan(torch_zip.TensorSlot(job.name, job.expr.dtype, chunk.sizes, chunk.key), BLOB_ARCHIVE)
                records.append(dcp.BlobRecord(chunk.key, chunk.offsets, chunk.sizes, offset, layout.size))
                exprs[job.name] = job.expr
            archives.append((offset, layout))
            offset += layout.size
        return write_zips(path, archives, dcp.index_bytes(records), exprs, ctx)

    def _save_through_torch(self, out: OutputFile, path: str, ctx: FileContext) -> None:
        with open(path, "wb") as f, without_zip_crc32():
            writer = dcp.BlobWriter(f)
            for _, job in out.jobs():
                if job.expr is None:
                    writer.object(job.name, [None])
                    continue
                chunk = self._chunks[job.name]
                writer.tensor(chunk.key, chunk.offsets, ctx.value(job.name, job.expr).view(chunk.sizes))
            writer.close()

    def finish(self, plan: Plan, results: list[FileResult]) -> None:
        """``.metadata`` from the blob indexes of the written files (their chunks must tile
        every tensor), then common.pt, metadata.json and, last, the tracker."""
        from ..textfile import tmp_path, write_text

        files = {f.relpath: dcp.read_index(os.path.join(self.data_dir, f.relpath)) for f in plan.files}
        metadata = dcp.build_metadata(self.tensors, self.objects, files)
        common = {"args": self.args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                  "content_metadata": dict(CONTENT_METADATA)}
        common_path = os.path.join(self.data_dir, COMMON_NAME)
        torch_zip.save_plain(tmp_path(common_path), common, archive_name(common_path))
        os.replace(tmp_path(common_path), common_path)
        dcp.write_metadata(os.path.join(self.data_dir, dcp.METADATA_NAME), metadata)
        write_text(os.path.join(self.data_dir, METADATA_JSON), json.dumps(BACKEND))
        write_text(os.path.join(self.target_dir, TRACKER_NAME), "release")


def _through_torch_save(out: OutputFile) -> bool:
    """A chunk of a dtype ``torch_zip`` cannot pickle (FP8 has no storage class) goes through torch.save."""
    return any(not torch_zip.supports(j.expr.dtype) for j in out.tensor_jobs() if j.expr is not None)


def _row_blocks(t: CanonicalTensor, expr: Expr) -> list[tuple[int, int]]:
    """Row ranges of a tensor's chunks: fc1's gate and up halves apart (Megatron's own chunks),
    each cut into blocks of at most ``CHUNK_BYTES``."""
    if not expr.shape:
        return [(0, 0)]
    rows = expr.shape[0]
    halves = [(0, rows // 2), (rows // 2, rows - rows // 2)] if t.split is Split.GATED_COLUMN and rows % 2 == 0 \
        else [(0, rows)]
    row_bytes = max(1, math.prod(expr.shape[1:]) * expr.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    return [(s, min(step, start + n - s)) for start, n in halves for s in range(start, start + n, step)]


def create_target(request: PlanRequest) -> DistTarget:
    if request.fp8.convert_to_fp8:
        raise ConversionError("--convert_to_fp8: torch_dist holds FP8 parameters dequantized (as megatron-core >= 0.17 "
                              "saves them); drop the flag, or write legacy rank files (--ckpt_format torch)")
    return DistTarget(request.target.path, request.layout, request.vocab, min(request.max_shard_size, FILE_BYTES))
