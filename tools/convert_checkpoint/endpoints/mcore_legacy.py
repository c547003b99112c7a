"""Megatron-Core legacy per-rank checkpoints (``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``).

Source: every rank file loaded memory-mapped (weights only; TE FP8 parameters as plain
records); the layout (TP, PP, VPP, layers per chunk, EP, ETP, TE or local names, MTP naming,
padded vocab) is read off the files, then the flags that were given are checked against it;
the shards are joined back into canonical tensors.
Target: the layout the flags ask for, one ``torch.save`` zip per rank (TE FP8 parameters
pickled as TE's tensors), Megatron's args saved in each so the way back needs no flag;
``finish`` writes the tracker file.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

from .. import dtypes
from .. import tensor_expr as te
from ..config import resolve
from ..config.arch import ModelArch
from ..config.vision import vision_arch
from ..core.canonical import WORD_EMBEDDINGS, CanonicalTensor, TPSplit
from ..core.plan import ModelInfo, OutputFile, Plan, TensorJob
from ..dtypes import DType
from ..errors import ConversionError
from ..formats import torch_zip, torch_zip_index
from ..formats.torch_zip_index import StoredTensor
from ..layout.from_flags import layout_from_flags, validate_tensor_parallel
from ..layout.pipeline import PipelineLayout
from ..layout.placement import (
    LANGUAGE_PREFIX,
    MTP_INNER_LAYER,
    MTP_INNER_NAMES,
    VISION_PREFIXES,
    ParallelLayout,
    RankKey,
    place,
    placement_sort_key,
)
from ..layout.table import placement_table
from ..layout.tensor_parallel import shard, shard_shape, unshard
from ..materialize import is_fp8_tensor
from ..quant import te_pickle
from ..quant.fp8_block import scales_are_pow2
from ..quant.te_pickle import Fp8BlockRecord
from ..requests import LayoutRequest, ModelRequest, PlanRequest, VocabPadding
from ..tensor_expr import Expr, Leaf, TensorRef, source
from .base import CanonicalSource, CanonicalTarget, Source, in_place_memory
from .file_writers import write_rank_zip

if TYPE_CHECKING:
    from ..materialize import FileContext
    from ..report import FileResult

TRACKER_NAME = "latest_checkpointed_iteration.txt"
FILE_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")

def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """Megatron's ``get_checkpoint_name`` rule: PPP only with PP > 1, EEE only with EP > 1."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def iteration_dir_name(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def rank_file(rank: RankKey, layout: ParallelLayout) -> str:
    """The rank file of a model-parallel rank, relative to the iteration directory."""
    return os.path.join(rank_dir_name(rank.tp, rank.pp, layout.pipeline.pp, rank.ep, layout.ep), FILE_NAME)


def rank_files(layout: ParallelLayout) -> list[str]:
    return [rank_file(r, layout) for r in layout.ranks()]


_KEPT_ENTRIES = re.compile(r"model\d*|args|checkpoint_version|iteration")
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def load_file(path: str) -> dict:
    """The index of a rank file: its tensors as :class:`StoredTensor` (dtype, shape, byte offset),
    read without torch; a file that needs torch (TE FP8 parameters, torch dtypes in its args ...)
    is loaded as :func:`load_tensors` does.

    Only the model entries and the args are kept: a training checkpoint's optimizer state, LR
    scheduler and RNG state are unpickled (allow-listed, their tensors never read) and dropped."""
    try:
        loaded = torch_zip_index.read_index(path)
    except torch_zip_index.NotPlain:
        return load_tensors(path)
    return _kept(path, loaded)


def load_tensors(path: str) -> dict:
    """Memory-mapped, weights-only load: tensors stay on disk until sliced. TE FP8 parameters
    come back as plain records (``quant/te_pickle``), without TE and without running code."""
    try:
        loaded = te_pickle.load(path)
    except Exception as e:  # torch raises many types for corrupt zips/pickles
        text = str(e).strip()
        refused = _REFUSED_GLOBAL.search(text)
        if refused:
            name = refused.group(1).rstrip(".,")
            raise ConversionError(
                f"cannot read Megatron checkpoint file {path}: it references {name}, which is not on the allow-list "
                "(tensors, containers, argparse.Namespace, TE FP8 tensors and the RNG and optimizer values of "
                "Megatron training checkpoints); code in a checkpoint is never run") from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise ConversionError(f"cannot read Megatron checkpoint file {path}: {first}") from None
    return _kept(path, loaded)


def _kept(path: str, loaded: object) -> dict:
    if not isinstance(loaded, dict):
        raise ConversionError(f"Megatron checkpoint file {path} holds a {type(loaded).__name__}, not a dict")
    loaded = {k: v for k, v in loaded.items() if isinstance(k, str) and _KEPT_ENTRIES.fullmatch(k)}
    for key, value in loaded.items():
        if isinstance(value, dict):
            for name, t in value.items():
                if isinstance(t, Fp8BlockRecord):
                    try:
                        t.check(f"{path}: {key}/{name}")
                    except ValueError as e:
                        raise ConversionError(str(e)) from None
    return loaded


def model_from_args(args: argparse.Namespace | None, request: ModelRequest,
                    hf_config_path: str | None) -> tuple[ModelInfo, str]:
    """The model of a Megatron checkpoint (legacy or torch_dist) from its saved args, the
    model flags and --hf_config_path; and where its architecture came from (for messages)."""
    found = resolve.for_megatron_checkpoint(vars(args) if args is not None else None, request, hf_config_path)
    hf_config = getattr(args, "convert_checkpoint_hf_config", None) if args is not None else None
    hf_config = hf_config or found.hf_config
    hf_dtypes = getattr(args, "convert_checkpoint_hf_dtypes", None) if args is not None else None
    return ModelInfo(found.family, found.arch, dict(hf_config) if hf_config else None, dict(hf_dtypes or {})), found.origin


@dataclass
class McoreSource(CanonicalSource):
    format = "mcore"
    short = "mcore"

    root: str  # the release/ or iter_XXXXXXX/ directory
    iteration: int | None
    files: dict[str, dict] = field(default_factory=dict)  # relpath -> loaded dict (mmap)
    request: ModelRequest = ModelRequest()
    hf_config_path: str | None = None  # --hf_config_path: the model's HF directory (family, architecture)
    arch_origin: str = "the checkpoint's saved architecture"  # where model() found the architecture

    def model(self) -> ModelInfo:
        """Ours: the architecture saved in the args. Another writer's (LoongForge, Megatron
        training): from --hf_config_path, --config_file or --convert_file, cross-checked against the
        sizes its Megatron args state (``config/resolve.for_megatron_checkpoint``) and then against
        the tensor shapes (``infer_layout``, ``gather``)."""
        model, self.arch_origin = model_from_args(self.args(), self.request, self.hf_config_path)
        return model

    @property
    def tensor_count(self) -> int:
        return sum(len(self.state_dict(f, k)) for f in self.files for k in self.containers(f))

    def canonical(self, tensors: list[CanonicalTensor], model: ModelInfo,
                  flags: LayoutRequest) -> tuple[dict[str, Expr], ParallelLayout]:
        layout = infer_layout(self, flags, model.arch)
        return gather(self, tensors, layout), layout

    def rank_dirs(self) -> list[str]:
        return sorted(os.path.dirname(f) for f in self.files)

    def containers(self, file: str) -> list[str]:
        return sorted(k for k, v in self.files[file].items() if re.fullmatch(r"model\d*", k) and isinstance(v, dict))

    def state_dict(self, file: str, container: str) -> dict:
        return self.files[file][container]

    def leaf(self, file: str, container: str, name: str) -> Expr:
        t = self.files[file][container][name]
        if isinstance(t, Fp8BlockRecord):  # codes and scale grid, read separately
            codes = source(TensorRef(file, name, container, "codes"), dtypes.FLOAT8_E4M3FN, t.shape)
            scale = source(TensorRef(file, name, container, "scale"), dtypes.FLOAT32, tuple(t.scale_inv.shape))
            return te.fp8_blocks(codes, scale)
        return source(TensorRef(file, name, container), dtypes.of(t.dtype), tuple(t.shape))

    def fp8_records(self):
        for loaded in self.files.values():
            for value in loaded.values():
                if isinstance(value, dict):
                    yield from (t for t in value.values() if isinstance(t, Fp8BlockRecord))

    @property
    def has_fp8(self) -> bool:
        return next(self.fp8_records(), None) is not None

    @property
    def fp8_nominal_dtype(self) -> DType | None:
        first = next(self.fp8_records(), None)
        return dtypes.of(first.nominal_dtype) if first is not None else None

    def args(self) -> argparse.Namespace | None:
        for loaded in self.files.values():
            args = loaded.get("args")
            if isinstance(args, argparse.Namespace):
                return args
        return None

    def reader(self) -> McoreReader:
        return McoreReader(self)

    def in_file(self, leaf: Leaf) -> bool:
        if leaf.ref.part is not None:
            return False
        stored = self.files.get(leaf.ref.file, {}).get(leaf.ref.container, {}).get(leaf.ref.name)
        return isinstance(stored, StoredTensor) and stored.is_contiguous and stored.dtype == leaf.dtype

    def entries(self) -> Iterator[tuple[str, str, str]]:
        """(file, container, name) of every stored entry."""
        for file in sorted(self.files):
            for key in self.containers(file):
                for name in self.state_dict(file, key):
                    yield file, key, name


class McoreReader:
    """Reads leaf windows through its own memory maps, dropped on ``close``.

    Pages touched through a map count towards RSS until it is unmapped, so each output file
    gets fresh maps instead of reusing the planner's (which would grow to the whole model).
    """

    def __init__(self, src: McoreSource):
        self._src = src
        self._open: dict[str, dict] = {}
        self._bases: dict[str, int | None] = {}

    def _tensor(self, leaf: Leaf) -> torch.Tensor:
        file = leaf.ref.file
        if file not in self._open:
            self._open[file] = load_tensors(os.path.join(self._src.root, file))
        t = self._open[file][leaf.ref.container][leaf.ref.name]
        if leaf.ref.part is not None:
            t = t.codes if leaf.ref.part == "codes" else t.scale_inv
        return t

    def read_into(self, leaf: Leaf, out: torch.Tensor) -> None:
        out.copy_(leaf.window(self._tensor(leaf)))

    def whole(self, leaf: Leaf) -> torch.Tensor | None:
        return None

    def locate(self, leaf: Leaf) -> tuple[str, int] | None:
        """Where the leaf's tensor lies in its ``.pt`` file: its storage record's offset in the
        zip plus its own offset in the storage (contiguous tensors of a map of the file only)."""
        if leaf.ref.part is not None:
            return None
        stored = self._src.files[leaf.ref.file][leaf.ref.container][leaf.ref.name]
        if isinstance(stored, StoredTensor):  # indexed without torch: the offset is in the index
            return (os.path.join(self._src.root, leaf.ref.file), stored.offset) if self._src.in_file(leaf) else None
        t = self._tensor(leaf)
        if not t.is_contiguous() or dtypes.of(t.dtype) != leaf.dtype:
            return None
        base = self._base(leaf.ref.file)
        if base is None:
            return None
        return os.path.join(self._src.root, leaf.ref.file), t.untyped_storage().data_ptr() - base + int(t.storage_offset()) * t.element_size()

    def _base(self, file: str) -> int | None:
        """The address the file is mapped at. torch maps a whole ``.pt`` file and each storage is
        a slice at its record's data offset; the base is found from one storage and accepted only
        if it puts every storage of the file exactly on a record."""
        if file not in self._bases:
            self._bases[file] = storage_map_base(os.path.join(self._src.root, file), self._open[file])
        return self._bases[file]

    def close(self) -> None:
        self._open.clear()
        self._bases.clear()


def storage_map_base(path: str, loaded: dict) -> int | None:
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            records = set()
            for info in z.infolist():
                if "/data/" in info.filename and info.compress_type == zipfile.ZIP_STORED:
                    records.add(torch_zip_index.data_offset(f, info))
    except (OSError, zipfile.BadZipFile, struct.error):
        return None
    ptrs = {t.untyped_storage().data_ptr() for sd in loaded.values() if isinstance(sd, dict)
            for t in sd.values() if isinstance(t, torch.Tensor) and t.numel()}
    if not ptrs or not records:
        return None
    lowest = min(ptrs)
    for record in sorted(records):
        base = lowest - record
        if all(p - base in records for p in ptrs):
            return base
    return None


def resolve_checkpoint_dir(path: str) -> tuple[str, int | None]:
    """Accept the root holding the tracker file, or a release/iter_ directory itself."""
    if not os.path.isdir(path):
        raise ConversionError(f"--load_ckpt_path {path} is not a directory")
    tracker = os.path.join(path, TRACKER_NAME)
    base = os.path.basename(os.path.normpath(path))
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if text == "release":
            return os.path.join(path, "release"), None
        if not text.isdigit():
            raise ConversionError(f"{tracker} holds {text!r}, expected 'release' or an iteration number")
        return os.path.join(path, iteration_dir_name(int(text))), int(text)
    if base == "release":
        return path, None
    m = re.fullmatch(r"iter_(\d{7})", base)
    if m:
        return path, int(m.group(1))
    if os.path.isdir(os.path.join(path, "release")):
        return os.path.join(path, "release"), None
    raise ConversionError(f"--load_ckpt_path {path}: no {TRACKER_NAME} and no release/ or iter_*/ directory")


def open_checkpoint(path: str, request: ModelRequest | None = None, hf_config_path: str | None = None) -> McoreSource:
    root, iteration = resolve_checkpoint_dir(path)
    if not os.path.isdir(root):
        raise ConversionError(f"Megatron checkpoint directory {root} does not exist")
    src = McoreSource(root, iteration, request=request or ModelRequest(), hf_config_path=hf_config_path)
    for name in sorted(os.listdir(root)):
        if not _RANK_DIR.match(name):
            continue
        file = os.path.join(name, FILE_NAME)
        full = os.path.join(root, file)
        if not os.path.isfile(full):
            raise ConversionError(f"rank directory {os.path.join(root, name)} has no {FILE_NAME}")
        src.files[file] = load_file(full)
    if not src.files:
        raise ConversionError(f"no mp_rank_*/{FILE_NAME} files in {root}")
    return src


def parse_rank_dir(name: str) -> tuple[int, int | None, int | None]:
    m = _RANK_DIR.match(name)
    if not m:
        raise ValueError(name)
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None), (int(m.group(3)) if m.group(3) else None)


def rank_payload(containers: dict[str, dict], args: argparse.Namespace, iteration: int | None) -> dict:
    """What a rank file holds: the model containers, then Megatron's bookkeeping entries."""
    payload: dict = dict(containers)
    payload["checkpoint_version"] = CHECKPOINT_VERSION
    payload["iteration"] = 0 if iteration is None else iteration
    payload["args"] = args
    return payload


def archive_name(path: str) -> str:
    """The zip's top directory, as torch.save names it: the file name without its extension
    (the executor's temporary name hides the final one, so that is recovered first)."""
    name = os.path.basename(path)
    m = re.fullmatch(r"\.(.+)\.tmp-\d+", name)
    return os.path.splitext(m.group(1) if m else name)[0]


def save_rank_file(path: str, containers: dict[str, dict], args: argparse.Namespace, iteration: int | None) -> None:
    payload = rank_payload(containers, args, iteration)
    with without_zip_crc32():
        if any(isinstance(t, te_pickle.BlockwiseParam) for sd in containers.values() for t in sd.values()):
            te_pickle.save(payload, path)  # FP8 parameters pickled as TE tensors, without TE
        else:
            torch.save(payload, path)


@contextlib.contextmanager
def without_zip_crc32():
    """torch.save spends ~30% of its time on zip CRC32s that torch.load never checks."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    set_ = getattr(torch.serialization, "set_crc32_options", None)
    if get is None or set_ is None:  # torch < 2.6
        yield
        return
    previous = get()
    set_(False)
    try:
        yield
    finally:
        set_(previous)


def looks_like(path: str) -> bool:
    """A tracker file, a release/ directory, or a release/iter_ directory itself."""
    return any(os.path.exists(os.path.join(path, p)) for p in (TRACKER_NAME, "release")) or \
        bool(re.fullmatch(r"release|iter_\d{7}", os.path.basename(os.path.normpath(path))))


def open_source(request: PlanRequest) -> McoreSource:
    # --hf_config_path names the model's HF directory: for a checkpoint whose args do not carry
    # the architecture, its config.json says which model this is (the HF target copies its files).
    return open_checkpoint(request.source_path, request.model, request.hf_config_path)


# --- the layout, read off the files --------------------------------------------------------

def _single_suffix_is_expert_rank(src: McoreSource, flags: LayoutRequest) -> bool:
    """``mp_rank_TT_XXX`` is ambiguous: Megatron drops PPP at PP=1 and EEE at EP=1.

    Decided by the flags if given, else by the saved args, else by content: pipeline stages
    hold different decoder layers, while EP ranks of one stage hold the same dense names."""
    if flags.ep is not None or flags.pp is not None:
        return (flags.ep or 1) > 1 and (flags.pp or 1) == 1
    args = src.args()
    if args is not None and hasattr(args, "pipeline_model_parallel_size"):
        # Megatron calls it expert_model_parallel_size, the incumbent expert_parallel_size.
        ep = getattr(args, "expert_model_parallel_size", None) or getattr(args, "expert_parallel_size", None) or 1
        return getattr(args, "pipeline_model_parallel_size", 1) == 1 and ep > 1
    dirs = src.rank_dirs()
    if not dirs or len(dirs[0].split("_")) != 4:
        return False

    def dense_names(d: str) -> set[str]:
        file = f"{d}/{FILE_NAME}"
        return {n for key in src.containers(file) for n in src.state_dict(file, key) if ".experts." not in n}

    return all(dense_names(d) == dense_names(dirs[0]) for d in dirs if d.startswith(dirs[0][:11]))


def _check_flag(flag: str, given: object, found: object) -> None:
    if given is not None and given != found:
        raise ConversionError(f"{flag} {given} disagrees with the checkpoint, whose rank files hold {found}")


def infer_layout(src: McoreSource, flags: LayoutRequest, arch: ModelArch) -> ParallelLayout:
    """Read TP, PP, VPP, layers per chunk and naming off the rank files; given flags must agree."""
    tp, pp, ep = _rank_grid(src, flags)
    stage_files = [rank_dir_name(0, p, pp, 0, ep) + "/" + FILE_NAME for p in range(pp)]
    for file in stage_files:
        if file not in src.files:
            raise ConversionError(f"{src.root}: rank file {file} is missing")
    first = stage_files[0]
    containers = src.containers(first)
    vpp = len(containers)
    if containers != (["model"] if vpp == 1 else [f"model{i}" for i in range(vpp)]):
        raise ConversionError(f"{first}: unexpected model entries {containers}")
    prefix = LANGUAGE_PREFIX if arch.vision is not None else ""  # vision-language: the language model's prefix
    counts = _layers_per_chunk(src, stage_files, vpp, prefix)
    _check_flag("--tensor_model_parallel_size", flags.tp, tp)
    _check_flag("--pipeline_model_parallel_size", flags.pp, pp)
    _check_flag("--num-virtual-stages-per-pipeline-rank", flags.virtual_stages, vpp)
    if flags.custom_pipeline_layers is not None and tuple(flags.custom_pipeline_layers) != tuple(counts):
        raise ConversionError(
            f"--custom_pipeline_layers {','.join(map(str, flags.custom_pipeline_layers))} disagrees with the checkpoint, "
            f"whose chunks hold {','.join(map(str, counts))} layers"
        )
    if sum(counts) != arch.num_layers:
        raise ConversionError(
            f"the checkpoint's model chunks hold {sum(counts)} decoder layers ({','.join(map(str, counts))}), "
            f"but the architecture has num_layers {arch.num_layers} (from {src.arch_origin})"
        )
    pipe = PipelineLayout(pp, vpp, tuple(counts))
    te_named = any(n.endswith((".layer_norm_weight", ".layer_norm_bias")) for _, _, n in src.entries())
    impl = "transformer_engine" if te_named else "local"
    if flags.transformer_impl is not None and flags.transformer_impl != impl:
        raise ConversionError(f"--transformer_impl {flags.transformer_impl} disagrees with the checkpoint's {impl} names")
    embed = src.state_dict(first, containers[0]).get(prefix + WORD_EMBEDDINGS)
    padded = tuple(embed.shape)[0] * tp if embed is not None else arch.vocab_size
    if padded < arch.vocab_size:
        raise ConversionError(f"embedding rows {padded} are fewer than vocab_size {arch.vocab_size} (from {src.arch_origin})")
    args = src.args()
    saved_padded = getattr(args, "padded_vocab_size", None) if args is not None else None
    if embed is not None and isinstance(saved_padded, int) and saved_padded != padded:
        raise ConversionError(
            f"the checkpoint's saved Megatron args say padded_vocab_size {saved_padded}, but its embedding shards "
            f"hold {padded} rows ({tuple(embed.shape)[0]} x TP={tp})"
        )
    etp, grouped = _infer_experts(src, stage_files, arch, tp, ep)
    _check_flag("--expert_parallel_size", flags.ep, ep)
    _check_flag("--expert_tensor_parallel_size", flags.etp, etp or tp)
    if flags.grouped_gemm and not grouped:
        raise ConversionError("--moe-grouped-gemm disagrees with the checkpoint, whose experts use local_experts names")
    return ParallelLayout(tp, pipe, impl, padded, arch.tied_embeddings, ep=ep, etp=etp,
                          num_experts=arch.num_experts or 0, grouped_gemm=grouped,
                          mtp_num_layers=arch.mtp_num_layers,
                          mtp_inner_name=_infer_mtp_inner_name(src, flags, pipe, ep),
                          encoder_tp=_infer_encoder_tp(src, first, containers[0], flags, arch, tp))


def _infer_encoder_tp(src: McoreSource, file: str, container: str, flags: LayoutRequest, arch: ModelArch,
                      tp: int) -> int | None:
    """Vision-language models: the vision tower's TP size, from its first qkv shard's rows."""
    if arch.vision is None:
        return None
    vision = vision_arch(arch)
    name = f"{VISION_PREFIXES[0][1]}decoder.layers.0.self_attention.linear_qkv.weight"
    qkv = src.state_dict(file, container).get(name)
    if qkv is None:
        raise ConversionError(f"{file}: the vision tower's {name} is missing (a {arch.family} checkpoint holds its "
                              "vision tower in the first pipeline stage)")
    full = vision.q_dim + 2 * vision.kv_dim
    rows = tuple(qkv.shape)[0]
    if rows == 0 or full % rows or tp % (full // rows):
        raise ConversionError(f"{file}: {name} has {rows} rows, which no encoder TP size dividing TP {tp} gives "
                              f"for the vision tower's {full}")
    _check_flag("--encoder_tensor_model_parallel_size", flags.encoder_tp, full // rows)
    return full // rows


def _rank_grid(src: McoreSource, flags: LayoutRequest) -> tuple[int, int, int]:
    """(TP, PP, EP) sizes from the rank directory names."""
    tp_ranks, pp_ranks, ep_ranks = set(), set(), set()
    single_suffix_is_ep = _single_suffix_is_expert_rank(src, flags)
    for d in src.rank_dirs():
        tp_rank, a, b = parse_rank_dir(d)
        pp_rank, ep_rank = (a, b) if b is not None else ((0, a) if single_suffix_is_ep else (a, 0))
        tp_ranks.add(tp_rank)
        pp_ranks.add(pp_rank or 0)
        ep_ranks.add(ep_rank or 0)
    return max(tp_ranks) + 1, max(pp_ranks) + 1, max(ep_ranks) + 1


def _layers_per_chunk(src: McoreSource, stage_files: list[str], vpp: int, prefix: str = "") -> list[int]:
    """Decoder layers in each virtual stage (chunk-major, as --custom_pipeline_layers lists them)."""
    pp = len(stage_files)
    counts = [0] * (pp * vpp)
    for p, file in enumerate(stage_files):
        for chunk, key in enumerate(src.containers(file)):
            layers = {int(m.group(1)) for n in src.state_dict(file, key)
                      if (m := re.match(re.escape(prefix) + r"decoder\.layers\.(\d+)\.", n))}
            counts[chunk * pp + p] = max(layers) + 1 if layers else 0
    return counts


_MTP_INNER = re.compile(rf"^mtp\.layers\.\d+\.({'|'.join(MTP_INNER_NAMES)})\.")


def _infer_mtp_inner_name(src: McoreSource, flags: LayoutRequest, pipe: PipelineLayout, ep: int) -> str:
    """megatron-core <= 0.16 names an MTP layer's decoder layer transformer_layer, 0.19 mtp_model_layer."""
    rank, chunk = pipe.rank_and_chunk(pipe.last_vstage)
    file = rank_dir_name(0, rank, pipe.pp, 0, ep) + "/" + FILE_NAME
    found = {m.group(1) for n in src.state_dict(file, pipe.container(chunk)) if (m := _MTP_INNER.match(n))}
    if len(found) > 1:
        raise ConversionError(f"{file}: MTP layers use both {' and '.join(sorted(found))} names")
    detected = found.pop() if found else None
    if flags.mtp_layer_name is not None and detected is not None and flags.mtp_layer_name != detected:
        raise ConversionError(f"--mtp_layer_name {flags.mtp_layer_name} disagrees with the checkpoint's {detected} names")
    return detected or flags.mtp_layer_name or MTP_INNER_LAYER


_GROUPED_FC1 = re.compile(r"\.mlp\.experts\.linear_fc1\.weight\d+$")
_LOCAL_FC1 = re.compile(r"\.mlp\.experts\.local_experts\.\d+\.linear_fc1\.weight$")
_EXPERT_INDEX = re.compile(r"^\.mlp\.experts\.(?:local_experts\.(\d+)\.linear_fc1\.weight|linear_fc1\.weight(\d+))$")


def _infer_experts(src: McoreSource, files: list[str], arch: ModelArch, tp: int, ep: int) -> tuple[int | None, bool]:
    """(ETP size, or None when it equals TP; grouped-GEMM naming) from the first expert fc1 shard
    in the stages' files (a stage may hold only dense layers)."""
    if not arch.num_experts:
        return None, False
    moe_ffn = arch.moe_ffn_hidden_size or 0
    for file, key in ((f, k) for f in files for k in src.containers(f)):
        state = src.state_dict(file, key)
        for name, value in state.items():
            grouped = bool(_GROUPED_FC1.search(name))
            if grouped or _LOCAL_FC1.search(name):
                rows = tuple(value.shape)[0]
                if rows == 0 or (2 * moe_ffn) % rows:
                    raise ConversionError(f"{file}: expert tensor {name} has {rows} rows, which no ETP size gives for "
                                          f"moe_ffn_hidden_size {moe_ffn} (from {src.arch_origin})")
                etp = 2 * moe_ffn // rows
                layer = name[: name.index(".mlp.experts.")]
                local = {m.group(1) or m.group(2) for n in state
                         if n.startswith(layer) and (m := _EXPERT_INDEX.match(n[len(layer):]))}
                if len(local) * ep != arch.num_experts:
                    raise ConversionError(
                        f"{file}: MoE layer {layer} holds {len(local)} experts per expert-parallel rank x EP {ep} = "
                        f"{len(local) * ep} experts, but the architecture says num_experts {arch.num_experts} "
                        f"(from {src.arch_origin})"
                    )
                return (None if etp == tp else etp), grouped
    raise ConversionError(f"{files[0]}: the architecture has {arch.num_experts} experts (from {src.arch_origin}), "
                          "but no stage holds expert weights")


def gather(src: McoreSource, tensors: list[CanonicalTensor], layout: ParallelLayout) -> dict[str, Expr]:
    """Full canonical expressions, each the join of its shards; every stored entry is used."""
    expected_files = set(rank_files(layout))
    present = set(src.files)
    if present != expected_files:
        extra = sorted(present - expected_files)
        missing = sorted(expected_files - present)
        raise ConversionError(
            f"{src.root}: rank files do not match TP={layout.tp} PP={layout.pipeline.pp}: "
            + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
        )
    placements, _ = place(tensors, layout)
    shards: dict[str, dict[int, Expr]] = {}
    splits: dict[str, TPSplit] = {}
    consumed: set[tuple[str, str, str]] = set()
    for p in placements:
        file = rank_file(p.rank, layout)
        sd = src.state_dict(file, p.container) if p.container in src.files[file] else None
        if sd is None or p.name not in sd:
            raise ConversionError(f"missing tensor {p.container}/{p.name} in {os.path.join(src.root, file)}")
        value = sd[p.name]
        want = shard_shape(p.canonical.shape, p.split, p.shard_count, layout.padded_vocab_size)
        if tuple(value.shape) != want:
            raise ConversionError(
                f"tensor {p.container}/{p.name} in {file} has shape {list(value.shape)}, expected {list(want)} "
                f"at TP={layout.tp} from {src.arch_origin}"
            )
        consumed.add((file, p.container, p.name))
        splits[p.canonical.name] = p.split
        if not p.embedding_copy:
            shards.setdefault(p.canonical.name, {}).setdefault(p.shard_rank, src.leaf(file, p.container, p.name))
    for file, key, name in src.entries():
        # _extra_state holds TE/FP8 metadata, never weights.
        if (file, key, name) not in consumed and not name.endswith("._extra_state"):
            raise ConversionError(
                f"unmapped tensor {key}/{name} in {os.path.join(src.root, file)}: "
                "the family's convertors do not produce it"
            )
    canonical = {}
    for t in tensors:
        per_rank = shards[t.name]
        canonical[t.name] = unshard([per_rank[r] for r in range(len(per_rank))], splits[t.name], t.shape[0])
    return canonical


# --- target --------------------------------------------------------------------------------

FP8_BY_YAML = "marked dtype: fp8 in the family YAML (--convert_to_fp8 or an FP8 source)"


def mcore_args(model: ModelInfo, layout: ParallelLayout, vocab: VocabPadding) -> argparse.Namespace:
    arch, family = model.arch, model.family
    pipe = layout.pipeline
    args = argparse.Namespace(
        # Megatron's own argument names, so Megatron tooling can read them.
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        kv_channels=arch.kv_channels,
        vocab_size=arch.vocab_size,
        padded_vocab_size=layout.padded_vocab_size,
        make_vocab_size_divisible_by=vocab.make_vocab_size_divisible_by,
        normalization=arch.normalization,
        norm_epsilon=arch.norm_epsilon,
        add_qkv_bias=arch.add_qkv_bias,
        add_bias_linear=False,
        qk_layernorm=arch.qk_layernorm,
        swiglu=True,
        untie_embeddings_and_output_weights=not arch.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        max_position_embeddings=arch.max_position_embeddings,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=pipe.pp,
        virtual_pipeline_model_parallel_size=pipe.vpp if pipe.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        num_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_grouped_gemm=layout.grouped_gemm,
        moe_layer_freq=arch.moe_layer_freq,
        moe_shared_expert_intermediate_size=arch.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=arch.shared_expert_gate,
        moe_router_enable_expert_bias=arch.router_expert_bias,
        multi_latent_attention=arch.multi_latent_attention,
        q_lora_rank=arch.q_lora_rank,
        kv_lora_rank=arch.kv_lora_rank,
        qk_head_dim=arch.qk_head_dim,
        qk_pos_emb_head_dim=arch.qk_pos_emb_head_dim,
        v_head_dim=arch.v_head_dim,
        mtp_num_layers=arch.mtp_num_layers or None,
        transformer_impl=layout.transformer_impl,
        # Ours: enough to convert back without any flag.
        convert_checkpoint_family=family.name,
        convert_checkpoint_arch=arch.to_dict(),
        convert_checkpoint_pipeline_layers=list(pipe.layers_per_vstage),
        convert_checkpoint_hf_config=model.hf_config or {},
    )
    if arch.rotary_percent != 1.0:  # Megatron's --rotary-percent (partial RoPE), only where it is not the default
        args.rotary_percent = arch.rotary_percent
    if arch.dsa_indexer_n_heads:  # DeepSeek-V3.2: megatron-core's DSA ("dsa" attention variant)
        args.experimental_attention_variant = "dsa"
        args.dsa_indexer_n_heads = arch.dsa_indexer_n_heads
        args.dsa_indexer_head_dim = arch.dsa_indexer_head_dim
    if arch.linear_attention_pattern is not None:  # Qwen3-Next / Qwen3.5: megatron-core's gated delta-net layers
        args.experimental_attention_variant = "gated_delta_net"
        args.linear_attention_freq = list(arch.linear_attention_pattern)
        for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_conv_kernel_dim"):
            setattr(args, name, getattr(arch, name))
    if arch.attention_output_gate:
        args.attention_output_gate = True
    if arch.layernorm_zero_centered_gamma:
        args.layernorm_zero_centered_gamma = True
    args.__dict__.update(_gpt_oss_args(model))
    if model.hf_dtypes:  # HF tensors Megatron holds in another dtype: restored on the way back
        args.convert_checkpoint_hf_dtypes = dict(sorted(model.hf_dtypes.items()))
    return args


def _gpt_oss_args(model: ModelInfo) -> dict:
    """GPT-OSS's settings that are not weights, as megatron-core names them (for a training run
    that builds the model from the saved args): biased linears, the attention sinks, the clamped
    SwiGLU (quick_gelu GLU, offset 1) and the sliding window on the layers ``layer_types`` marks
    (HF keeps q - k < sliding_window, megatron's (left, 0) keeps q - k <= left)."""
    config = model.hf_config or {}
    if model.family.name != "gpt_oss":
        return {}
    out: dict = {"add_bias_linear": True, "softmax_type": "learnable", "glu_linear_offset": 1.0,
                 "activation_func_clamp_value": float(config.get("swiglu_limit", 7.0)), "quick_geglu": True}
    layer_types = config.get("layer_types") or []
    if config.get("sliding_window") and "sliding_attention" in layer_types:
        out["window_size"] = (int(config["sliding_window"]) - 1, 0)
        out["window_attn_skip_freq"] = [int(t == "sliding_attention") for t in layer_types]
    return out


class McoreTarget(CanonicalTarget):
    format = "mcore"
    short = "mcore"
    file_kind = "mcore"
    markers = (TRACKER_NAME,)

    def __init__(self, target_dir: str, flags: LayoutRequest, vocab: VocabPadding):
        super().__init__(target_dir)
        self.flags = flags
        self.vocab = vocab
        self.iteration: int | None = None  # a "release" checkpoint, as the incumbent writes
        self.args: argparse.Namespace | None = None
        self._layout: ParallelLayout | None = None

    @property
    def data_dir(self) -> str:
        return os.path.join(self.target_dir, iteration_dir_name(self.iteration))

    @property
    def layout(self) -> ParallelLayout:
        assert self._layout is not None, "plan_files() first"
        return self._layout

    def plan_files(self, exprs: Mapping[str, Expr], tensors: list[CanonicalTensor], model: ModelInfo,
                   fp8_output: bool) -> list[OutputFile]:
        """Validate the layout, then shard every canonical tensor into its rank files.

        A shard of an FP8 tensor stays FP8 (whole blocks kept, a cut block requantized: TE
        quantizes each rank's shard on its own); with ``fp8_output`` the YAML's ``dtype: fp8``
        tensors are quantized per shard too."""
        layout = self._layout = layout_from_flags(self.flags, self.vocab, model.arch)
        validate_tensor_parallel(model.arch, tensors, layout)
        self.args = mcore_args(model, layout, self.vocab)
        placements, extras = place(tensors, layout)
        jobs: dict[tuple[str, str], list[TensorJob]] = {}
        for p in placements:
            expr = exprs[WORD_EMBEDDINGS if p.embedding_copy else p.canonical.name]
            sharded = shard(expr, p.split, p.shard_count, p.shard_rank, layout.padded_vocab_size)
            if te.is_fp8(sharded) or (fp8_output and p.canonical.fp8 and not p.embedding_copy):
                sharded = te.to_fp8(sharded, FP8_BY_YAML)
            jobs.setdefault((rank_file(p.rank, layout), p.container), []).append(TensorJob(p.name, sharded))
        for x in extras:
            jobs.setdefault((rank_file(x.rank, layout), x.container), []).append(TensorJob(x.name, None))
        files = []
        for relpath in rank_files(layout):
            containers = []
            for chunk in range(layout.pipeline.vpp):
                key = layout.pipeline.container(chunk)
                # Stable sort keeps each layer's module order and puts extra states after their weights.
                ordered = sorted(jobs.get((relpath, key), []), key=lambda j: placement_sort_key(j.name))
                containers.append((key, tuple(ordered)))
            files.append(OutputFile(relpath, self.file_kind, tuple(containers)))
        return files

    def check_plan(self, plan: Plan) -> None:
        """Megatron's FP8 flags in the saved args, as training with these parameters would set them."""
        if plan.fp8 is None or self.args is None:
            return
        recipe = plan.fp8.recipe
        self.args.fp8 = "e4m3"
        self.args.fp8_recipe = "blockwise"
        self.args.fp8_param_gather = True
        self.args.convert_checkpoint_fp8 = {"force_pow_2_scales": recipe.pow2, "amax_epsilon": recipe.amax_epsilon}

    def fingerprint_fields(self) -> dict:
        return {"args": sorted((k, repr(v)) for k, v in vars(self.args).items()) if self.args else None,
                "hf_config": None}

    def describe(self, plan: Plan) -> list[str]:
        return placement_table(self.layout, plan.arch) if plan.arch is not None else []

    def memory_bytes(self, out: OutputFile, source: Source) -> int:
        return out.nbytes if _through_torch_save(out) else in_place_memory(out, source)

    def write_file(self, out: OutputFile, path: str, ctx: FileContext) -> str | None:
        entries = [j for _, j in out.jobs() if j.expr is not None]
        assert self.args is not None
        if not _through_torch_save(out):
            # Planned in place: each tensor is moved or written at its offset, one at a time.
            slots = {id(j): torch_zip.TensorSlot(f"{key}/{j.name}", j.expr.dtype, tuple(j.expr.shape), j.name)
                     for key, jobs in out.containers for j in jobs if j.expr is not None}
            placeholders = {key: {j.name: slots.get(id(j)) for j in jobs} for key, jobs in out.containers}
            layout = torch_zip.plan(rank_payload(placeholders, self.args, self.iteration), archive_name(path))
            exprs = {f"{key}/{j.name}": j.expr for key, jobs in out.containers for j in jobs if j.expr is not None}
            return write_rank_zip(path, layout, exprs, ctx)
        plain = [j for j in entries if not is_fp8_tensor(j.expr)]
        buffers = ctx.carve([(j.expr.dtype, tuple(j.expr.shape)) for j in plain if j.expr is not None])
        values: dict[int, object] = {}
        for job, buf in zip(plain, buffers):
            assert job.expr is not None
            values[id(job)] = ctx.fill(job.name, job.expr, buf)
        policy = ctx.fp8_policy
        for job in entries:
            if is_fp8_tensor(job.expr):  # pickled as TE's Float8BlockwiseQTensor
                assert job.expr is not None and policy is not None
                codes, scale = ctx.fp8_pair(job.name, job.expr)
                values[id(job)] = te_pickle.blockwise_param(  # the quantizer says what the scales are
                    codes, scale, policy.nominal_dtype.torch, scales_are_pow2(scale), policy.recipe.amax_epsilon)
        containers = {key: {j.name: values.get(id(j)) for j in jobs} for key, jobs in out.containers}
        save_rank_file(path, containers, self.args, self.iteration)
        return None

    def finish(self, plan: Plan, results: list[FileResult]) -> None:
        from ..textfile import write_text

        write_text(os.path.join(self.target_dir, TRACKER_NAME), "release" if self.iteration is None else str(self.iteration))


def _through_torch_save(out: OutputFile) -> bool:
    """A rank file with TE FP8 parameters (their TE pickles) or a dtype the in-place writer cannot
    pickle goes through torch.save, every tensor in memory at once."""
    return any(is_fp8_tensor(j.expr) or not torch_zip.supports(j.expr.dtype) for j in out.tensor_jobs() if j.expr is not None)


def create_target(request: PlanRequest) -> McoreTarget:
    return McoreTarget(request.target.path, request.layout, request.vocab)
