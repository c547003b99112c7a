#!/usr/bin/env python
"""`convert-checkpoint quantize --device cuda` writes the CPU bytes, in both rounding modes, for
every compressed-tensors scheme; and `--rounding fp32` equals compressed-tensors' Triton kernel
on CUDA (what llm-compressor writes there), `weight_dtype` does not (FP8 per channel).

On a GPU machine (compressed-tensors, pydantic, loguru carried as wheels, README "Quantized
checkpoints out"), from the repository root:

    PYTHONPATH=/tmp/site python3 benchmarks/quantize_cuda_check.py [--multi-only]

First every scheme with four forked workers over every visible GPU (files spread over them),
then both rounding modes in this process on cuda:0. Seen (torch 2.11.0+cu130,
compressed-tensors 0.20.1): on one H200, the in-process part (one shard, before the shards and
the forked part were added): every line cpu==cuda, triton==ours(fp32) True,
triton==ours(weight_dtype) False; on two H200s, ``--multi-only``: every scheme cpu==cuda
(benchmarks/results/quantize_cuda_check_h200x2.log).
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from convert_checkpoint.cli import main  # noqa: E402
from convert_checkpoint.devices import cuda_device_count  # noqa: E402

# Counted through NVML: the runs with several workers fork, and a parent that has initialized
# CUDA cannot fork CUDA workers (so they come first, and the in-process runs after them).
GPUS = cuda_device_count()
if GPUS == 0:
    print("SKIP: no CUDA device")
    sys.exit(0)
MULTI_ONLY = "--multi-only" in sys.argv

root = "/tmp/gq"
src = f"{root}/src"
os.makedirs(src, exist_ok=True)
g = torch.Generator().manual_seed(0)
t = {}
for layer in range(4):
    for n, shape in (("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (256, 512)), ("self_attn.v_proj", (256, 512)),
                     ("self_attn.o_proj", (512, 512)), ("mlp.gate_proj", (1024, 512)), ("mlp.up_proj", (1024, 512)),
                     ("mlp.down_proj", (512, 1024))):
        t[f"model.layers.{layer}.{n}.weight"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    # rows not a multiple of the kernels' tiles or of FP8_BLOCK's 128 (a partial block row)
    t[f"model.layers.{layer}.mlp.odd_proj.weight"] = (torch.randn(264, 640, generator=g) * 0.02).to(torch.bfloat16)
    t[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(512, dtype=torch.bfloat16)
t["lm_head.weight"] = (torch.randn(1000, 512, generator=g) * 0.02).to(torch.bfloat16)
# four shards (one per layer, lm_head with the last), so that several workers and GPUs share the work
weight_map = {}
for shard in range(4):
    name = f"model-{shard + 1:05d}-of-00004.safetensors"
    part = {k: v for k, v in t.items() if k.startswith(f"model.layers.{shard}.") or (shard == 3 and k == "lm_head.weight")}
    save_file(part, f"{src}/{name}", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(part, name))
json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{src}/model.safetensors.index.json", "w"))
json.dump({"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024}, open(f"{src}/config.json", "w"))
def digest(d):
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            h.update(open(f"{d}/{name}", "rb").read())
    return h.hexdigest()[:16]
SCHEMES = ("FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W8A16", "W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16", "MXFP4", "MXFP8A16")


def run(scheme: str, rounding: str, dev: str, *extra: str) -> str:
    d = f"{root}/{scheme}_{rounding}_{dev}{'_'.join(extra)}"
    assert main(["quantize", src, d, "--scheme", scheme, "--rounding", rounding, "--device", dev, "--no_progress",
                 "--overwrite", *extra]) == 0
    return digest(d)


ok = True
# 1. forked workers, every visible GPU (files spread over them by planned bytes in flight)
for scheme in SCHEMES:
    same = run(scheme, "fp32", "cpu") == run(scheme, "fp32", "cuda", "--max_workers", "4")
    ok &= same
    print("RESULT", scheme, f"fp32 cpu==cuda ({GPUS} GPUs, 4 workers)" if same else "fp32 DIFFER on several GPUs", flush=True)
if MULTI_ONLY:
    print("RESULT all cpu==cuda:", ok)
    sys.exit(0 if ok else 1)
# 2. in this process, one GPU, both rounding modes
for scheme in SCHEMES:
    for rounding in ("fp32", "weight_dtype"):
        outs = {dev: run(scheme, rounding, dev) for dev in ("cpu", "cuda:0")}
        same = outs["cpu"] == outs["cuda:0"]
        ok &= same
        print("RESULT", scheme, rounding, "cpu==cuda" if same else f"DIFFER {outs}", flush=True)
# fp32 mode == CT's Triton kernel on CUDA (what llm-compressor does there), FP8 per channel
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from compressed_tensors.utils import impl_backend  # noqa: E402

impl_backend.ENFORCE_EAGER = False
ours = load_file(f"{root}/FP8_DYNAMIC_fp32_cpu/model-00001-of-00004.safetensors")
cpu_bf16 = load_file(f"{root}/FP8_DYNAMIC_weight_dtype_cpu/model-00001-of-00004.safetensors")
w = t["model.layers.0.mlp.up_proj.weight"].cuda()
a = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
s, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), a)
q = quantize(w, s.to(w.dtype), None, a).to(torch.float8_e4m3fn).cpu()
name = "model.layers.0.mlp.up_proj.weight"
print("RESULT triton==ours(fp32):", torch.equal(q.view(torch.uint8), ours[name].view(torch.uint8)),
      "triton==ours(weight_dtype):", torch.equal(q.view(torch.uint8), cpu_bf16[name].view(torch.uint8)))
print("RESULT all cpu==cuda:", ok)
sys.exit(0 if ok else 1)
