"""HuggingFace checkpoint directories: lazy index in, sharded safetensors + metadata out."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch

from .. import tensor_expr as te
from ..errors import ConversionError
from ..tensor_expr import Expr, TensorRef, source
from .safetensors_io import SafetensorsReader, TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FP8_SCALE_SUFFIX = "_scale_inv"  # X.weight (e4m3) + X.weight_scale_inv (fp32 block scales)


def fp8_scale_name(weight: str) -> str:
    return weight + FP8_SCALE_SUFFIX


def fp8_quantization_config(config: dict, where: str) -> dict | None:
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


@dataclass
class HFSource:
    root: str
    config: dict
    entries: dict[str, dict[str, TensorEntry]]  # file -> name -> entry
    tensor_file: dict[str, str]  # name -> file

    def leaf(self, name: str) -> Expr:
        """The tensor as an expression; an FP8 weight comes with its block scales."""
        file = self.tensor_file[name]
        e = self.entries[file][name]
        leaf = source(TensorRef(file, name), e.dtype, e.shape)
        if e.dtype == torch.float8_e5m2:
            raise ConversionError(f"tensor {name} in {file} is float8_e5m2; only e4m3 block-FP8 weights are supported")
        if e.dtype != torch.float8_e4m3fn:
            return leaf
        scale_name = fp8_scale_name(name)
        if scale_name not in self.tensor_file:
            raise ConversionError(f"FP8 tensor {name} in {file} has no block scales ({scale_name} is missing)")
        scale_file = self.tensor_file[scale_name]
        s = self.entries[scale_file][scale_name]
        try:
            return te.fp8_blocks(leaf, source(TensorRef(scale_file, scale_name), s.dtype, s.shape))
        except ValueError as err:
            raise ConversionError(f"FP8 tensor {name}: {err}") from None

    def companions(self, name: str) -> list[str]:
        """Tensors read together with ``name`` (an FP8 weight's scales, wherever they are stored)."""
        file = self.tensor_file[name]
        if self.entries[file][name].dtype == torch.float8_e4m3fn:
            return [fp8_scale_name(name)]
        return []

    @property
    def has_fp8(self) -> bool:
        return any(e.dtype == torch.float8_e4m3fn for entries in self.entries.values() for e in entries.values())

    def reader(self) -> SafetensorsReader:
        return SafetensorsReader(self.root, self.entries)


def read_config(root: str) -> dict:
    path = os.path.join(root, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in HuggingFace checkpoint {root}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConversionError(f"unreadable {path}: {e}") from None


def open_source(root: str, check_quantization: bool = True) -> HFSource:
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
        fp8_quantization_config(config, os.path.join(root, "config.json"))
    return HFSource(root, config, entries, tensor_file)


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
