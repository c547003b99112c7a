#!/usr/bin/env python
"""Plan a full-size conversion without its data: how long planning and validation take, and
what the plan says, for a real model's shapes.

The HF checkpoint is *sparse*: real safetensors headers (names, shapes, offsets) over files
truncated to their full length, so a 1.3 TB DeepSeek-V3 takes no disk space. Tensor names and
shapes come from the family's convertors for the given config.json (plus its MTP layers), so
this measures the planner at scale; correctness is the test suite's job. With ``--fp8`` the
checkpoint is laid out as DeepSeek publishes it: the family YAML's ``dtype: fp8`` weights in
F8_E4M3 with their F32 ``weight_scale_inv`` block grids, and a ``quantization_config``.

    python benchmarks/plan_full_size.py [--fp8] CONFIG_JSON WORK_DIR -- <convert-checkpoint layout flags>
e.g. the DeepSeek-V3 example's layout:
    python benchmarks/plan_full_size.py dsv3_config.json /tmp/dsv3 -- --tensor_model_parallel_size 8 \\
      --pipeline_model_parallel_size 8 --custom_pipeline_layers 8,7,8,8,8,8,8,6 \\
      --expert_parallel_size 32 --expert_tensor_parallel_size 1 --moe-grouped-gemm
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

from convert_checkpoint.cli import main as convert_main
from convert_checkpoint.config.family import family_for_hf_config
from convert_checkpoint.mapping import build_convertors, fp8_hf_names
from convert_checkpoint.quant.fp8_block import scale_shape

SHARD_BYTES = 5 * 10**9
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def expected_tensors(config: dict, fp8: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    family = family_for_hf_config(config)
    arch = family.arch_from_config(config)
    convertors = build_convertors(family, arch)
    quantized = fp8_hf_names(convertors) if fp8 else set()
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for conv in convertors:
        for name, shape in conv.hf_shapes().items():
            if name in quantized:
                tensors[name] = (shape, torch.float8_e4m3fn)
                tensors[name + "_scale_inv"] = (scale_shape(shape), torch.float32)
            else:
                dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
                tensors[name] = (shape, dtype)
    return tensors


def write_sparse_checkpoint(config: dict, out: str, fp8: bool = False) -> tuple[int, int]:
    os.makedirs(out, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    if fp8:
        config = dict(config, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                   "weight_block_size": [128, 128]})
    for name, (shape, dtype) in expected_tensors(config, fp8).items():
        n = dtype.itemsize
        for s in shape:
            n *= s
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += n
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape, dtype in tensors:
            n = dtype.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)  # sparse: no data blocks are allocated
        total += offset
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return len(shards), total


def main() -> int:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser()
    p.add_argument("config_json")
    p.add_argument("work_dir")
    p.add_argument("--fp8", action="store_true", help="DeepSeek's FP8 layout (weight + weight_scale_inv)")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    config = json.load(open(args.config_json))
    hf_dir = os.path.join(args.work_dir, "hf")
    t0 = time.perf_counter()
    files, total = write_sparse_checkpoint(config, hf_dir, args.fp8)
    print(f"sparse HF checkpoint: {files} files, {total / 1e12:.3f} TB (apparent) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    rc = convert_main(["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf_dir,
                       "--save_ckpt_path", os.path.join(args.work_dir, "mcore"), "--dry_run", *flags])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"plan + validation (--dry_run): {seconds:.1f} s, peak RSS {peak:.2f} GiB, exit {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
