"""HuggingFace checkpoint directories: lazy index in, sharded safetensors + metadata out."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from ..errors import ConversionError
from ..tensor_expr import TensorRef, source, Leaf
from .safetensors_io import SafetensorsReader, TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class HFSource:
    root: str
    config: dict
    entries: dict[str, dict[str, TensorEntry]]  # file -> name -> entry
    tensor_file: dict[str, str]  # name -> file

    def leaf(self, name: str) -> Leaf:
        file = self.tensor_file[name]
        e = self.entries[file][name]
        return source(TensorRef(file, name), e.dtype, e.shape)

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


def open_source(root: str) -> HFSource:
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
