"""HuggingFace safetensors directories: config.json, ``model-*.safetensors`` and their index.

Source: the lazy index of every shard (headers only), FP8 weights paired with their
``weight_scale_inv`` wherever the index puts them, optionally seen through a converter chain.
Target: shards capped at ``--max_shard_size`` (or the source's own shards for HF -> HF),
streamed tensor by tensor; ``finish`` writes config.json (with the FP8 ``quantization_config``
the written tensors call for), the index, and copies the tokenizer and other files.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
else:
    pass

from .. import dtypes
from .. import tensor_expr as tx
from ..config import resolve
from ..config.arch import ModelArch
from ..config.family import FamilySpec
from ..core.naming import natural_key
from ..core.plan import ModelInfo, OutputFile, Plan, TensorJob
from ..dtypes import DType
from ..errors import ConversionError
from ..formats.safetensors_io import PlannedTensor, SafetensorsReader, TensorEntry, plan_layout, read_header
from ..requests import ModelRequest, PlanRequest
from ..tensor_expr import Expr, Leaf, LeafReader, TensorRef, source
from .base import HFSource, HFTarget, Source, in_place_memory
from .file_writers import write_safetensors

if TYPE_CHECKING:
    from ..converters.source import ConvertedIndex
    from ..materialize import FileContext
    from ..report import FileResult

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FP8_SCALE_SUFFIX = "_scale_inv"  # X.weight (e4m3) + X.weight_scale_inv (fp32 block scales)


def fp8_scale_name(weight: str) -> str:
    return weight + FP8_SCALE_SUFFIX


def fp8_quantization_config(config: Mapping[str, Any], where: str) -> dict | None:
    """The ``quantization_config`` of a DeepSeek-style block-FP8 checkpoint, checked; None when
    the checkpoint is not quantized. Other quantization formats are refused, not misread."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "fp8":
        raise ConversionError(
            f"{where}: quantization_config quant_method {method!r} is not supported here (block-scaled FP8, "
            "quant_method 'fp8', is): add --converter dequantize to convert the weights to bf16 on the way"
        )
    block = qc.get("weight_block_size")
    if block is None or [int(b) for b in block] != [128, 128]:
        raise ConversionError(f"{where}: FP8 weight_block_size {block} is not supported; only [128, 128] (DeepSeek's and TE's blocks)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ConversionError(f"{where}: FP8 activation_scheme {qc.get('activation_scheme')!r} (static input scales) is not supported")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ConversionError(f"{where}: FP8 fmt {qc.get('fmt')!r} is not supported; only e4m3")
    return qc


def fp8_quantization_block(pow2: bool, base: dict | None = None) -> dict:
    """``quantization_config`` for HF FP8 output: DeepSeek's layout, ``scale_fmt: ue8m0`` when
    every scale is a power of two (as DeepSeek-V3.1 declares them)."""
    qc = dict(base or {})
    qc.update({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})
    if pow2:
        qc["scale_fmt"] = "ue8m0"
    else:
        qc.pop("scale_fmt", None)
    return qc


def read_config(root: str) -> dict:
    path = os.path.join(root, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in HuggingFace checkpoint {root}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConversionError(f"unreadable {path}: {e}") from None


# --- source --------------------------------------------------------------------------------

@dataclass
class HuggingFaceSource(HFSource):
    format = "huggingface"
    short = "hf"

    root: str
    config: dict
    entries: dict[str, dict[str, TensorEntry]]  # file -> name -> entry (what the planner sees)
    tensor_file: dict[str, str]  # name -> file
    request: ModelRequest = ModelRequest()
    # Set when converters rewrite the checkpoint on the way: ``entries`` then index their output.
    converted: ConvertedIndex | None = None

    @property
    def index(self) -> Mapping[str, str]:
        return self.tensor_file

    @property
    def hf_config(self) -> dict:
        return self.config

    def model(self) -> ModelInfo:
        if self.converted:  # the model path takes full precision or block FP8 only
            fp8_quantization_config(self.config, f"after --converter {' --converter '.join(self.converter_labels)}")
        family, arch = resolve.from_hf_config(self.config, self.request)
        return ModelInfo(family, arch, self.config)

    @property
    def tensor_count(self) -> int:
        return len(self.converted.input_file) if self.converted else len(self.tensor_file)

    def leaf(self, name: str) -> Expr:
        file = self.tensor_file[name]
        e = self.entries[file][name]
        leaf = source(TensorRef(file, name), e.dtype, e.shape)
        if e.dtype == dtypes.FLOAT8_E5M2:
            raise ConversionError(f"tensor {name} in {file} is float8_e5m2; only e4m3 block-FP8 weights are supported")
        if e.dtype != dtypes.FLOAT8_E4M3FN:
            return leaf
        scale_name = fp8_scale_name(name)
        if scale_name not in self.tensor_file:
            raise ConversionError(f"FP8 tensor {name} in {file} has no block scales ({scale_name} is missing)")
        scale_file = self.tensor_file[scale_name]
        s = self.entries[scale_file][scale_name]
        try:
            return tx.fp8_blocks(leaf, source(TensorRef(scale_file, scale_name), s.dtype, s.shape))
        except ValueError as err:
            raise ConversionError(f"FP8 tensor {name}: {err}") from None

    def companions(self, name: str) -> list[str]:
        if self.entries[self.tensor_file[name]][name].dtype == dtypes.FLOAT8_E4M3FN:
            return [fp8_scale_name(name)]
        return []

    def native(self) -> dict[str, list[tuple[str, Expr]]]:
        """Every tensor as a whole leaf, in the file it is stored in; behind converters, each
        group's output in its home file (the shard of the group's first tensor)."""
        order = self.converted.output_order() if self.converted else {f: list(names) for f, names in self.entries.items()}
        out: dict[str, list[tuple[str, Expr]]] = {}
        for file in sorted(self.entries):
            out[file] = [(n, source(TensorRef(file, n), e.dtype, e.shape))
                         for n in order.get(file, ()) for e in (self.entries[file][n],)]
        return out

    @property
    def has_fp8(self) -> bool:
        return any(e.dtype == dtypes.FLOAT8_E4M3FN for entries in self.entries.values() for e in entries.values())

    @property
    def fp8_nominal_dtype(self) -> DType:
        return resolve.param_dtype(self.config)

    def reader(self) -> LeafReader:
        return self.converted.reader() if self.converted else SafetensorsReader(self.root, self.entries)

    def in_file(self, leaf: Leaf) -> bool:
        return not self.converted  # safetensors data is row-major and uncompressed

    def bytes_read_for(self, leaves: Iterable[Leaf]) -> int:
        if self.converted:  # converted tensors are read as whole groups
            return self.converted.bytes_read_for(leaves)
        return super().bytes_read_for(leaves)

    @property
    def largest_group_bytes(self) -> int:
        return self.converted.largest_group_bytes if self.converted else 0

    def describe(self) -> list[str]:
        return [f"converters: {' -> '.join(self.converted.chain.labels)}"] if self.converted else []

    @property
    def converter_labels(self) -> tuple[str, ...]:
        return tuple(self.converted.chain.labels) if self.converted else ()


def open_index(root: str, request: ModelRequest | None = None, check_quantization: bool = True) -> HuggingFaceSource:
    """The lazy index of a HF checkpoint. ``check_quantization`` refuses a ``quantization_config``
    other than block FP8 (off when converters will rewrite the checkpoint first)."""
    if not os.path.isdir(root):
        raise ConversionError(f"--load_ckpt_path {root} is not a directory")
    config = read_config(root)
    index_path = os.path.join(root, INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"unreadable {index_path}: {e}") from None
        files = sorted(set(weight_map.values()))
        for file in files:
            if not os.path.isfile(os.path.join(root, file)):
                raise ConversionError(f"{INDEX_NAME} names {file}, which is missing from {root}")
    else:
        weight_map = {}
        files = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
    if not files:
        others = [f for f in os.listdir(root) if f.endswith(WEIGHT_SUFFIXES)]
        hint = f" (found {others[0]}: only safetensors checkpoints are read)" if others else ""
        raise ConversionError(f"no *.safetensors files in {root}{hint}")
    entries = {file: read_header(os.path.join(root, file)) for file in files}
    tensor_file: dict[str, str] = {}
    for file, names in entries.items():
        for name in names:
            if name in tensor_file:
                raise ConversionError(f"tensor {name} appears in both {tensor_file[name]} and {file}")
            tensor_file[name] = file
    for name, file in weight_map.items():
        if tensor_file.get(name) != file:
            raise ConversionError(f"{INDEX_NAME} says tensor {name} is in {file}, but that file does not hold it")
    if check_quantization:  # refuse other formats early
        fp8_quantization_config(config, os.path.join(root, CONFIG_NAME))
    return HuggingFaceSource(root, config, entries, tensor_file, request or ModelRequest())


def looks_like(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def open_source(request: PlanRequest) -> HuggingFaceSource:
    """The checkpoint, seen through the ``--converter`` pre-stage when there is one."""
    if not request.converters:
        return open_index(request.source_path, request.model)
    from ..converters.source import convert_index

    src = open_index(request.source_path, request.model, check_quantization=False)
    converted = convert_index(src.root, src.config, src.entries, src.tensor_file, request.converters)
    if converted is None:  # the converters found nothing to do: the checkpoint as it is
        fp8_quantization_config(src.config, os.path.join(src.root, CONFIG_NAME))
        return src
    return HuggingFaceSource(src.root, converted.config, converted.entries, converted.tensor_file, request.model,
                             converted)


# --- target --------------------------------------------------------------------------------

def shard_file_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def copy_reference_files(reference_dir: str, target_dir: str) -> list[str]:
    """Copy config, generation config and tokenizer files (every non-weight top-level file)."""
    copied = []
    for name in sorted(os.listdir(reference_dir)):
        src = os.path.join(reference_dir, name)
        if not os.path.isfile(src) or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        shutil.copyfile(src, os.path.join(target_dir, name))
        copied.append(name)
    return copied


def copy_other_files(source_dir: str, target_dir: str, skip: set[str]) -> list[str]:
    """Copy every file under ``source_dir`` that is not a safetensors shard, its index or in
    ``skip`` (relative paths), keeping subdirectories. Returns the relative paths copied."""
    copied = []
    for dirpath, dirnames, names in os.walk(source_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(dirpath, name), source_dir)
            if rel in skip or name.endswith(".safetensors") or name == INDEX_NAME or name.startswith("."):
                continue
            os.makedirs(os.path.dirname(os.path.join(target_dir, rel)) or target_dir, exist_ok=True)
            shutil.copyfile(os.path.join(dirpath, name), os.path.join(target_dir, rel))
            copied.append(rel)
    return copied


def other_weight_files(root: str) -> list[str]:
    """Weight files that are not safetensors (copied unchanged by HF -> HF)."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            if name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".safetensors"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return found


FP8_BY_YAML = "marked dtype: fp8 in the family YAML (--convert_to_fp8 or an FP8 source)"


def _fp8_jobs(name: str, expr: Expr, fp8: bool) -> list[TensorJob]:
    """One tensor, or an FP8 weight's codes and block scales (DeepSeek's ``weight_scale_inv``)."""
    if not (tx.is_fp8(expr) or fp8):
        return [TensorJob(name, expr)]
    if not name.endswith("weight"):
        raise ConversionError(f"block-FP8 tensor {name} is not a weight; HF FP8 stores only weights with block scales")
    q = tx.to_fp8(expr, FP8_BY_YAML)
    return [TensorJob(name, tx.fp8_part(q, "codes")), TensorJob(fp8_scale_name(name), tx.fp8_part(q, "scale"))]


class HuggingFaceTarget(HFTarget):
    format = "huggingface"
    short = "hf"
    file_kind = "safetensors"
    markers = (INDEX_NAME, CONFIG_NAME)

    def __init__(self, target_dir: str, max_shard_size: int, reference_dir: str | None = None):
        super().__init__(target_dir)
        self.max_shard_size = max_shard_size
        self.reference_dir = reference_dir  # --hf_config_path: config and tokenizer files come from here
        self.config: dict | None = None  # config.json to write (None: the reference dir's)
        self.copy_from: str | None = None  # HF -> HF: every other file of the source comes along
        # Converters after the model mapping say what config.json's quantization_config is.
        self.post_stage_config: Callable[[dict], dict] | None = None
        self.notes: list[str] = []

    def plan_files(self, exprs: Mapping[str, Expr], fp8_names: set[str]) -> list[OutputFile]:
        groups: list[list[TensorJob]] = [[]]
        size = 0
        for name in sorted(exprs, key=natural_key):
            jobs = _fp8_jobs(name, exprs[name], name in fp8_names)
            n = sum(tx.nbytes(j.expr) for j in jobs if j.expr is not None)  # a weight and its scales share a file
            if groups[-1] and size + n > self.max_shard_size:
                groups.append([])
                size = 0
            groups[-1].extend(jobs)
            size += n
        names = shard_file_names(len(groups))
        return [OutputFile(fname, self.file_kind, (("", tuple(jobs)),)) for fname, jobs in zip(names, groups)]

    def use_model_config(self, model: ModelInfo) -> None:
        """config.json for a model written from Megatron: the reference one (checked), the one
        saved in the checkpoint (kept true to the architecture), or one made from the architecture."""
        if self.reference_dir:
            _check_reference_config(self.reference_dir, model.family, model.arch)
            return
        if model.hf_config:
            config = dict(model.hf_config)
            # An architecture YAML may have overridden fields on the way in; keep config.json true.
            for arch_field, hf_keys in model.family.config_fields.items():
                if config.get(hf_keys[0]) is not None and getattr(model.arch, arch_field) is not None:
                    config[hf_keys[0]] = getattr(model.arch, arch_field)
            self.config = config
        else:
            self.config = model.family.config_from_arch(model.arch)
            self.notes.append("config.json synthesized from the architecture; pass --hf_config_path to reuse the original one")

    def plan_files_like(self, source: HFSource, notes: list[str]) -> list[OutputFile]:
        files = self.plan_shards(source.native(), notes)
        notes += [f"{f} is copied unchanged: only safetensors files are converted" for f in other_weight_files(source.root)]
        self.config = source.hf_config
        self.copy_from = source.root
        return files

    def plan_shards(self, shards: Mapping[str, list[tuple[str, Expr]]], notes: list[str]) -> list[OutputFile]:
        files = []
        for shard, tensors in shards.items():
            jobs = tuple(TensorJob(name, expr) for name, expr in tensors)
            if jobs:
                files.append(OutputFile(shard, self.file_kind, (("", jobs),)))
            else:
                notes.append(f"{shard} receives no tensors: all of them were converted together with tensors of other shards")
        return files

    def fingerprint_fields(self) -> dict:
        return {"args": None, "hf_config": self.config}

    def memory_bytes(self, out: OutputFile, source: Source) -> int:
        return in_place_memory(out, source)

    def write_file(self, out: OutputFile, path: str, ctx: FileContext) -> str:
        (_, jobs), = out.containers
        by_name = {j.name: j.expr for j in jobs if j.expr is not None}
        planned = [PlannedTensor(j.name, j.expr.dtype, tuple(j.expr.shape)) for j in jobs if j.expr is not None]
        # Tensors are written one at a time, so each reuses the start of the worker's buffer.
        return write_safetensors(path, plan_layout(planned, {"format": "pt"}), by_name, ctx)

    def finish(self, plan: Plan, results: list[FileResult]) -> None:
        from ..manifest import MANIFEST_NAME
        from ..report import REPORT_NAME
        from ..textfile import write_text

        config = self.config
        if self.copy_from:  # HF -> HF: config.json as the converters left it; every other file as it was
            copy_other_files(self.copy_from, self.target_dir, skip={CONFIG_NAME, INDEX_NAME, REPORT_NAME, MANIFEST_NAME})
            written = config
        elif self.reference_dir:
            copy_reference_files(self.reference_dir, self.target_dir)
            config = read_config(self.reference_dir)
            written = self._final_config(config, results)
        else:
            written = self._final_config(config or {}, results)
        if written != config or not self.reference_dir:  # a copied config.json stays byte for byte when true
            write_text(os.path.join(self.target_dir, CONFIG_NAME), json.dumps(written, indent=2, sort_keys=True) + "\n")
        weight_map = {j.name: f.relpath for f, _, j in plan.jobs()}
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(os.path.join(self.target_dir, INDEX_NAME), json.dumps(index, indent=2) + "\n")


    def _final_config(self, config: dict, results: list[FileResult]) -> dict:
        if self.post_stage_config is not None:  # the converters' quantization_config, not the FP8 one
            return self.post_stage_config(config)
        return _with_quantization(config, results)


def _with_quantization(config: dict, results: list[FileResult]) -> dict:
    """config.json's ``quantization_config`` as the written tensors are: DeepSeek's FP8 block
    (``scale_fmt: ue8m0`` when every scale is a power of two), or none for an unquantized output."""
    config = dict(config)
    events = [e for r in results for e in r.fp8_events]
    previous = config.get("quantization_config")
    if events:
        base = previous if isinstance(previous, dict) and previous.get("quant_method") == "fp8" else None
        config["quantization_config"] = fp8_quantization_block(all(e.pow2 for e in events), base)
    else:
        config.pop("quantization_config", None)
    return config


def _check_reference_config(reference: str, family: FamilySpec, arch: ModelArch) -> None:
    """The --hf_config_path config must describe the same model as the checkpoint."""
    ref_arch = family.arch_from_config(read_config(reference))
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
        if getattr(ref_arch, key) != getattr(arch, key):
            raise ConversionError(
                f"--hf_config_path {reference}: its config.json has {key} {getattr(ref_arch, key)}, "
                f"the checkpoint has {getattr(arch, key)}"
            )


def create_target(request: PlanRequest) -> HuggingFaceTarget:
    return HuggingFaceTarget(request.target.path, request.max_shard_size, request.hf_config_path)
