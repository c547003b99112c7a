#!/usr/bin/env python
"""`convert-checkpoint quantize --device cuda` writes the CPU bytes, in both rounding modes, for
every compressed-tensors scheme; and `--rounding fp32` equals compressed-tensors' Triton kernel
on CUDA (what llm-compressor writes there), `weight_dtype` does not (FP8 per channel).

On a GPU machine (compressed-tensors, pydantic, loguru carried as wheels, README "Quantized
checkpoints out"), from the repository root:

    PYTHONPATH=/tmp/site python3 benchmarks/quantize_cuda_check.py

Seen on one H200 (torch 2.11.0+cu130, compressed-tensors 0.20.1): every line cpu==cuda;
triton==ours(fp32) True, triton==ours(weight_dtype) False.
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import torch  # noqa: E402

if not torch.cuda.is_available():
    print("SKIP: no CUDA device")
    sys.exit(0)
from safetensors.torch import load_file, save_file  # noqa: E402

from convert_checkpoint.cli import main  # noqa: E402

root = "/tmp/gq"
src = f"{root}/src"
os.makedirs(src, exist_ok=True)
g = torch.Generator().manual_seed(0)
t = {}
for layer in range(2):
    for n, shape in (("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (256, 512)), ("self_attn.v_proj", (256, 512)),
                     ("self_attn.o_proj", (512, 512)), ("mlp.gate_proj", (1024, 512)), ("mlp.up_proj", (1024, 512)),
                     ("mlp.down_proj", (512, 1024))):
        t[f"model.layers.{layer}.{n}.weight"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    t[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(512, dtype=torch.bfloat16)
t["lm_head.weight"] = (torch.randn(1000, 512, generator=g) * 0.02).to(torch.bfloat16)
save_file(t, f"{src}/model.safetensors", metadata={"format": "pt"})
json.dump({"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024}, open(f"{src}/config.json", "w"))
def digest(d):
    return hashlib.sha256(open(f"{d}/model.safetensors", "rb").read()).hexdigest()[:16]
ok = True
for scheme in ("FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W8A16", "W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16", "MXFP4", "MXFP8A16"):
    for rounding in ("fp32", "weight_dtype"):
        outs = {}
        for dev in ("cpu", "cuda"):
            d = f"{root}/{scheme}_{rounding}_{dev}"
            assert main(["quantize", src, d, "--scheme", scheme, "--rounding", rounding, "--device", dev, "--no_progress", "--overwrite"]) == 0
            outs[dev] = digest(d)
        same = outs["cpu"] == outs["cuda"]
        ok &= same
        print("RESULT", scheme, rounding, "cpu==cuda" if same else f"DIFFER {outs}", flush=True)
# fp32 mode == CT's Triton kernel on CUDA (what llm-compressor does there), FP8 per channel
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from compressed_tensors.utils import impl_backend  # noqa: E402

impl_backend.ENFORCE_EAGER = False
ours = load_file(f"{root}/FP8_DYNAMIC_fp32_cpu/model.safetensors")
cpu_bf16 = load_file(f"{root}/FP8_DYNAMIC_weight_dtype_cpu/model.safetensors")
w = t["model.layers.0.mlp.up_proj.weight"].cuda()
a = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
s, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), a)
q = quantize(w, s.to(w.dtype), None, a).to(torch.float8_e4m3fn).cpu()
name = "model.layers.0.mlp.up_proj.weight"
print("RESULT triton==ours(fp32):", torch.equal(q.view(torch.uint8), ours[name].view(torch.uint8)),
      "triton==ours(weight_dtype):", torch.equal(q.view(torch.uint8), cpu_bf16[name].view(torch.uint8)))
print("RESULT all cpu==cuda:", ok)
sys.exit(0 if ok else 1)
