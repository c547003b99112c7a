"""Byte comparison of ``convert-checkpoint kt`` with kt-kernel 0.7.2.

Run with the kt venv's python (see compat/kt_setup.sh); our side runs in the project's venv
(``.venv``, or $KT_OURS_PYTHON) through the command line:

    bash compat/kt_setup.sh && .venv-kt/bin/python compat/kt_check.py

It writes small DeepSeek-shaped checkpoints (a dense layer, two MoE layers, an MTP layer with
experts, shared experts, router, norms, embeddings, lm_head; expert rows that are all zero, tiny,
huge, and on the exact +-x.5 rounding grid), in bf16, fp16 and block FP8 (attention and experts
with ``weight_scale_inv``), plus a VL-style fused-expert one (``language_model.`` prefix, 3-D
``gate_up_proj``/``down_proj``), and converts each with ``convert-checkpoint kt`` for INT4 and
INT8 and 1/2/4 NUMA parts, merged and ``--no-merge-safetensor``. Two references, two modes:

- ``wheel`` (always): kt-kernel's installed wheel is driven directly, with no script: for every
  MoE layer of the source, the layer's expert stacks (gate/up ``[E, I, H]``, down ``[E, H, I]``
  in bf16, made from the source as kt-kernel's converter makes them: fp16 cast to bf16, FP8
  ``float32(code) * block scale`` rounded to bf16, fused ``gate_up_proj`` transposed and split)
  go into the compiled ``kt_kernel_ext.moe.AMXInt4_MOE`` / ``AMXInt8_MOE`` with a ``MOEConfig``
  in save mode on a ``CPUInfer`` of as many subpools as NUMA parts, and its ``load_weights_task``
  quantizes, packs and writes each expert's per-part weight and scale buffers
  (``_layer_L/_numa_p/INT{4,8}_{proj}_{E}_*Byte_{quant,scale}_.kt``). Every one is compared byte
  for byte with our ``blk.L.ffn_{gate,up,down}_exps.E.numa.p.{weight,scale}`` tensor (merged;
  int8 and float32, 1-D) or our ``.kt`` file at the same path (no-merge), and the sets of names
  must be equal.
- ``script`` (when kt-kernel's ``convert_cpu_weights.py``, which the wheel does not ship, is in
  the venv): the script converts each checkpoint too, and every output tensor is compared byte
  for byte (names, shard, dtype, shape, bytes), with the index's weight map and the copied
  files (every ``.kt`` file in no-merge mode); our ``verify-kt`` must also accept kt-kernel's own
  output (merged, raw, FP8 and fused cases). The script is run on this CPU-only machine with two
  shims, nothing else changed: ``pin_memory`` is dropped (CPU torch refuses it), and for FP8 its
  Triton dequantization kernel (CUDA only) is replaced by the same arithmetic on CPU
  (``float32(code) * block scale`` over its flattened ``[C*M, N]`` stack, returned in fp32 as
  the kernel's output buffer is), with ``.cuda()`` a no-op.

Prints which modes ran. Prints ``SKIPPED: ...`` and exits 0 only when kt_kernel does not import.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KT_SCRIPT = os.path.join(ROOT, os.environ.get("KT_VENV", ".venv-kt"), "convert_cpu_weights.py")
H, I, E = 256, 512, 4  # I/4 = 128: INT4 works at 1, 2 and 4 parts
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _run_kt(argv: list[str]) -> None:
    """In this process: kt-kernel's script with the CPU shims (see the module docstring)."""
    import runpy
    import types

    import torch

    real_empty = torch.empty

    def empty(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return real_empty(*args, **kwargs)

    torch.empty = empty
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **k: fn if fn is not None else (lambda f: f)
    triton.cdiv = lambda a, b: -(-a // b)
    triton.language = types.ModuleType("triton.language")
    triton.language.constexpr = int
    sys.modules["triton"] = triton
    sys.modules["triton.language"] = triton.language

    def weight_dequant(x, s, block_size=128):  # the Triton kernel's arithmetic, on CPU
        m, n = x.shape
        grid = s.repeat_interleave(block_size, 0)[:m].repeat_interleave(block_size, 1)[:, :n]
        return x.to(torch.float32) * grid

    scope = runpy.run_path(KT_SCRIPT, run_name="kt_convert_cpu_weights")
    scope["main"].__globals__["weight_dequant"] = weight_dequant
    sys.argv = [KT_SCRIPT, *argv]
    rc = scope["main"]()
    sys.exit(rc or 0)


# --- kt-kernel's wheel, driven directly ------------------------------------------------------

def _expert_stacks(src: str, input_type: str) -> tuple[dict, dict[int, tuple]]:
    """The source's routed experts per MoE layer as the bf16 stacks kt-kernel quantizes.

    Returns (config, {layer: (gate [E, I, H], up [E, I, H], down [E, H, I])}). Layers at or past
    ``num_hidden_layers`` (MTP) are left out; ``language_model.`` is dropped from names.
    """
    import torch
    from safetensors import safe_open

    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    text = config.get("text_config", config)
    n_layers = text.get("num_hidden_layers")
    tensors = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(src, name), "pt") as f:
                for key in f.keys():
                    tensors[key.replace("language_model.", "")] = f.get_tensor(key)

    def bf16(name: str):
        w = tensors[name]
        if input_type == "fp8":
            scale = tensors[name + "_scale_inv"]
            rows, cols = w.shape
            bh, bw = -(-rows // scale.shape[0]), -(-cols // scale.shape[1])
            grid = scale.repeat_interleave(bh, 0)[:rows].repeat_interleave(bw, 1)[:, :cols]
            return (w.to(torch.float32) * grid).to(torch.bfloat16)
        return w.to(torch.bfloat16)

    stacks = {}
    fused = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj$")
    split = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight$")
    for key in tensors:
        m = fused.match(key)
        if m:
            layer = int(m.group(1))
            gate_up = bf16(key).transpose(1, 2).contiguous()  # [E, H, 2I] -> [E, 2I, H]
            i = gate_up.shape[1] // 2
            down = bf16(f"model.layers.{layer}.mlp.experts.down_proj").transpose(1, 2)  # [E, I, H] -> [E, H, I]
            stacks[layer] = (gate_up[:, :i].contiguous(), gate_up[:, i:].contiguous(), down.contiguous())
        m = split.match(key)
        if m and m.group(2) == "0":
            layer = int(m.group(1))
            experts = text.get("n_routed_experts", text.get("num_experts"))
            stacks[layer] = tuple(
                torch.stack([bf16(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight") for e in range(experts)]).contiguous()
                for proj in ("gate_proj", "up_proj", "down_proj"))
    stacks = {k: v for k, v in sorted(stacks.items()) if n_layers is None or k < n_layers}
    return text, stacks


def _wheel_quantize(src: str, input_type: str, method: str, parts: int, out: str, threads: int = 2) -> None:
    """kt-kernel's compiled online quantization, in save mode, into ``out/_layer_L/_numa_p/*.kt``."""
    import kt_kernel
    import torch

    ext = kt_kernel.kt_kernel_ext
    moe_class = {"int4": ext.moe.AMXInt4_MOE, "int8": ext.moe.AMXInt8_MOE}[method]
    text, stacks = _expert_stacks(src, input_type)
    pool = ext.WorkerPoolConfig()
    pool.subpool_count = parts
    pool.subpool_numa_map = list(range(parts))
    pool.subpool_thread_count = [threads // parts + (1 if i < threads % parts else 0) for i in range(parts)]
    cpu = ext.CPUInfer(pool)
    for layer, (gate, up, down) in stacks.items():
        experts, inter, hidden = gate.shape
        on_gpu = torch.zeros(experts, dtype=torch.bool)  # every expert on the CPU
        cfg = ext.moe.MOEConfig(experts, text.get("num_experts_per_tok", 2), hidden, inter, on_gpu.data_ptr())
        cfg.layer_idx = layer
        cfg.pool = cpu.backend_
        cfg.max_len = 512
        cfg.save, cfg.load = True, False
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
        cfg.path = out
        moe = moe_class(cfg)
        order = torch.arange(experts, dtype=torch.int64)
        cpu.submit(moe.load_weights_task(order.data_ptr()))
        cpu.sync()
        del moe


def _run_wheel(spec_path: str) -> None:
    """In this process (its stdout is the C++ side's chatter): every case of the spec file."""
    with open(spec_path) as f:
        spec = json.load(f)
    for src, input_type, method, parts, out in spec:
        _wheel_quantize(src, input_type, method, parts, out)


def run_wheel(jobs: list[tuple[str, str, str, int, str]], tmp: str) -> float:
    spec = os.path.join(tmp, "wheel_jobs.json")
    with open(spec, "w") as f:
        json.dump(jobs, f)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run-wheel", spec], capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"kt-kernel's wheel failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


KT_FILE = re.compile(r"_layer_(\d+)/_numa_(\d+)/INT[48]_(gate|up|down)_(\d+)_\d+Byte_(quant|scale)_\.kt$")
OUR_EXPERT = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.\d+\.numa\.\d+\.(weight|scale)$")


def compare_wheel(ref: str, ours: str, merged: bool) -> tuple[list[str], int]:
    """kt-kernel's wheel output (.kt files) against ours, per expert, part and projection."""
    import torch

    expected = {}  # our name -> kt-kernel's bytes
    for dirpath, _, names in os.walk(ref):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), ref)
            m = KT_FILE.match(rel)
            if not m:
                continue
            layer, part, proj, expert, kind = m.groups()
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            key = (f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{part}.{'weight' if kind == 'quant' else 'scale'}"
                   if merged else rel)
            expected[key] = data
    if not expected:
        return ["kt-kernel's wheel wrote no .kt files"], 0
    problems = []
    if merged:
        found = {k: t for k, (_, t) in _tensors(ours).items() if OUR_EXPERT.match(k)}
    else:
        found = {}
        for dirpath, _, names in os.walk(ours):
            for name in names:
                if name.endswith(".kt"):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        found[os.path.relpath(os.path.join(dirpath, name), ours)] = f.read()
    if set(expected) != set(found):
        problems.append(f"expert {'tensors' if merged else 'files'} differ: only kt-kernel "
                        f"{sorted(set(expected) - set(found))[:3]}, only ours {sorted(set(found) - set(expected))[:3]}")
    for key in sorted(set(expected) & set(found)):
        got = found[key]
        if merged:
            want_dtype = torch.int8 if key.endswith(".weight") else torch.float32
            if got.dtype != want_dtype or got.dim() != 1:
                problems.append(f"{key}: {got.dtype} {list(got.shape)}, kt-kernel writes {want_dtype} 1-D")
                continue
            got = got.contiguous().view(torch.uint8).numpy().tobytes()
        if got != expected[key]:
            n = min(len(got), len(expected[key]))
            diff = sum(a != b for a, b in zip(got[:n], expected[key][:n])) + abs(len(got) - len(expected[key]))
            problems.append(f"{key}: {diff} of {len(expected[key])} bytes differ from kt-kernel's wheel")
    return problems, len(expected)


# --- checkpoints ------------------------------------------------------------------------------

def _expert_weight(torch, g, rows: int, cols: int):
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[1] = 0  # an all-zero row
    w[2] = torch.randn(cols, generator=g) * 1e-6  # tiny
    w[3] = torch.randn(cols, generator=g) * 30  # huge
    # On the rounding grid: amax 127 (INT8: d = 1) or 112 (INT4), values at exact halves.
    w[4] = torch.arange(cols, dtype=torch.float32).remainder(64) - 31.5
    w[4, 0] = 127
    w[5] = (torch.arange(cols, dtype=torch.float32).remainder(32) - 15.5) * 0.5
    w[5, 0] = 112 * 0.5
    return w.to(torch.bfloat16)


def make_deepseek(path: str, dtype: str = "bf16", seed: int = 0) -> None:
    """Layer 0 dense, layers 1-2 MoE, layer 3 an MTP layer with experts (num_hidden_layers 3)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    w = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    t["model.embed_tokens.weight"] = w(512, H)
    t["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    t["lm_head.weight"] = w(512, H)
    for layer in range(4):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = w(H) + 1
        t[f"{p}.post_attention_layernorm.weight"] = w(H) + 1
        t[f"{p}.self_attn.q_proj.weight"] = w(H, H)
        t[f"{p}.self_attn.o_proj.weight"] = w(H, H)
        if layer == 0:
            for proj, shape in (("gate_proj", (384, H)), ("up_proj", (384, H)), ("down_proj", (H, 384))):
                t[f"{p}.mlp.{proj}.weight"] = w(*shape)
            continue
        t[f"{p}.mlp.gate.weight"] = w(E, H)
        t[f"{p}.mlp.gate.e_score_correction_bias"] = torch.randn(E, generator=g)
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            t[f"{p}.mlp.shared_experts.{proj}.weight"] = w(*shape)
            for e in range(E):
                t[f"{p}.mlp.experts.{e}.{proj}.weight"] = _expert_weight(torch, g, *shape)
        if layer == 3:
            t[f"{p}.eh_proj.weight"] = w(H, 2 * H)
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": H,
              "moe_intermediate_size": I, "intermediate_size": 384, "n_routed_experts": E, "num_experts_per_tok": 2,
              "num_hidden_layers": 3, "num_nextn_predict_layers": 1, "first_k_dense_replace": 1,
              "torch_dtype": "bfloat16", "vocab_size": 512}
    if dtype == "fp16":
        t = {k: v.to(torch.float16) if v.dtype == torch.bfloat16 else v for k, v in t.items()}
        config["torch_dtype"] = "float16"
    if dtype == "fp8":
        for name in [n for n in t if n.endswith("proj.weight") and "eh_proj" not in n]:
            t[name], t[name + "_scale_inv"] = _fp8_blocks(torch, t[name], g)
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128]}
    os.makedirs(path, exist_ok=True)
    names = sorted(t)
    half = len(names) // 2  # two shards, a weight and its scales may be in different ones
    save_file({n: t[n].contiguous() for n in names[:half]}, os.path.join(path, "model-00001-of-00002.safetensors"))
    save_file({n: t[n].contiguous() for n in names[half:]}, os.path.join(path, "model-00002-of-00002.safetensors"))
    _write_side_files(path, config)


def _fp8_blocks(torch, w, g):
    """Block FP8 codes and non-power-of-two scales (so the fp32 product is rounded to bf16)."""
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    scale = (torch.rand(br, bc, generator=g) + 0.5) * float(w.float().abs().max().clamp(min=1e-4)) / 448
    grid = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    codes = (w.float() / grid).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, scale.float()


def make_fused_vl(path: str, seed: int = 1) -> None:
    """Qwen3-VL-style: ``model.language_model.`` names, fused [E, H, 2I] / [E, I, H] experts."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    w = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    t = {"model.language_model.embed_tokens.weight": w(512, H), "model.language_model.norm.weight": w(H) + 1,
         "lm_head.weight": w(512, H), "model.visual.patch_embed.proj.weight": w(H, 48)}
    for layer in range(2):
        p = f"model.language_model.layers.{layer}"
        t[f"{p}.self_attn.q_proj.weight"] = w(H, H)
        t[f"{p}.mlp.gate.weight"] = w(E, H)
        gate_up = torch.stack([torch.cat([_expert_weight(torch, g, I, H), _expert_weight(torch, g, I, H)]).t()
                               for _ in range(E)])
        t[f"{p}.mlp.experts.gate_up_proj"] = gate_up.contiguous()  # [E, H, 2I]
        t[f"{p}.mlp.experts.down_proj"] = torch.stack([_expert_weight(torch, g, H, I).t() for _ in range(E)]).contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(t, os.path.join(path, "model.safetensors"))
    config = {"architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
              "text_config": {"hidden_size": H, "moe_intermediate_size": I, "num_experts": E, "num_experts_per_tok": 2,
                              "num_hidden_layers": 2}}
    _write_side_files(path, config)


def _write_side_files(path: str, config: dict) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:  # kt-kernel does not copy it
        json.dump({"do_sample": False}, f)


# --- runs and comparison -----------------------------------------------------------------------

def run_kt(src: str, out: str, input_type: str, method: str, parts: int, merge: bool) -> float:
    argv = ["--input-path", src, "--input-type", input_type, "--output", out, "--quant-method", method,
            "--cpuinfer-threads", "2", "--threadpool-count", str(parts)] + ([] if merge else ["--no-merge-safetensor"])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run-kt", *argv], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"kt-kernel failed ({' '.join(argv)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def run_ours(src: str, out: str, input_type: str, method: str, parts: int, merge: bool) -> float:
    python = os.environ.get("KT_OURS_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tools") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["-i", src, "--input-type", input_type, "-o", out, "--quant-method", method, "--threadpool-count", str(parts),
            "--no_progress"] + ([] if merge else ["--no-merge-safetensor"])
    start = time.perf_counter()
    proc = subprocess.run([python, "-m", "convert_checkpoint", "kt", *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"ours failed ({' '.join(argv)}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def verify_theirs(src: str, ref: str) -> list[str]:
    """Our verify-kt on kt-kernel's own output: probing, sizes and bounds must accept it."""
    python = os.environ.get("KT_OURS_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tools") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([python, "-m", "convert_checkpoint", "verify-kt", ref, "--source", src], capture_output=True,
                          text=True, env=env)
    return [] if proc.returncode == 0 else [f"verify-kt on kt-kernel's output: rc {proc.returncode}: "
                                            f"{(proc.stdout + proc.stderr).strip()[-600:]}"]


def _tensors(path: str) -> dict:
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    out[key] = (name, f.get_tensor(key))
    return out


def compare_merged(ref: str, ours: str) -> list[str]:
    import torch

    problems = []
    a, b = _tensors(ref), _tensors(ours)
    if set(a) != set(b):
        problems.append(f"tensor names differ: only kt-kernel {sorted(set(a) - set(b))[:4]}, "
                        f"only ours {sorted(set(b) - set(a))[:4]}")
    for key in sorted(set(a) & set(b)):
        (fa, ta), (fb, tb) = a[key], b[key]
        if fa != fb:
            problems.append(f"{key}: in {fa} (kt-kernel) vs {fb} (ours)")
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            problems.append(f"{key}: {ta.dtype} {list(ta.shape)} vs {tb.dtype} {list(tb.shape)}")
        elif not torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)):
            diff = int((ta.reshape(-1).view(torch.uint8) != tb.reshape(-1).view(torch.uint8)).sum())
            problems.append(f"{key}: {diff} bytes differ")
    with open(os.path.join(ref, "model.safetensors.index.json")) as f:
        ia = json.load(f)
    with open(os.path.join(ours, "model.safetensors.index.json")) as f:
        ib = json.load(f)
    if ia != ib:
        problems.append("model.safetensors.index.json differs")
    for name in COPIED + ("generation_config.json",):
        pa, pb = os.path.join(ref, name), os.path.join(ours, name)
        if os.path.exists(pa) != os.path.exists(pb) or (os.path.exists(pa) and not filecmp.cmp(pa, pb, shallow=False)):
            problems.append(f"{name}: present or contents differ")
    return problems


def compare_raw(ref: str, ours: str) -> list[str]:
    def files(root: str) -> dict[str, str]:
        found = {}
        for dirpath, _, names in os.walk(root):
            for name in names:
                if name.endswith(".kt"):
                    found[os.path.relpath(os.path.join(dirpath, name), root)] = os.path.join(dirpath, name)
        return found

    a, b = files(ref), files(ours)
    problems = []
    if set(a) != set(b):
        problems.append(f".kt files differ: only kt-kernel {sorted(set(a) - set(b))[:3]}, only ours {sorted(set(b) - set(a))[:3]}")
    problems += [f"{rel}: bytes differ" for rel in sorted(set(a) & set(b)) if not filecmp.cmp(a[rel], b[rel], shallow=False)]
    if any(n.endswith(".safetensors") for n in os.listdir(ours)):
        problems.append("ours wrote safetensors in no-merge mode")
    return problems


CASES = [  # (source, input type, method, parts, merged)
    ("bf16", "bf16", "int4", 1, True), ("bf16", "bf16", "int4", 2, True), ("bf16", "bf16", "int4", 4, True),
    ("bf16", "bf16", "int8", 1, True), ("bf16", "bf16", "int8", 2, True), ("bf16", "bf16", "int8", 4, True),
    ("bf16", "bf16", "int4", 2, False), ("bf16", "bf16", "int8", 4, False),
    ("fp16", "fp16", "int8", 2, True),
    ("fp8", "fp8", "int4", 2, True), ("fp8", "fp8", "int8", 2, True),
    ("fused", "bf16", "int4", 2, True), ("fused", "bf16", "int8", 1, True),
]


VERIFIED = {2, 7, 9, 11}  # cases whose kt-kernel output our verify-kt also checks (one per source and mode)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-kt":
        _run_kt(sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--run-wheel":
        _run_wheel(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases")
    args = ap.parse_args()
    try:
        import kt_kernel

        kt_kernel.kt_kernel_ext.moe.AMXInt4_MOE, kt_kernel.kt_kernel_ext.moe.AMXInt8_MOE  # noqa: B018
    except (ImportError, AttributeError) as e:
        print(f"SKIPPED: kt-kernel is not importable in {sys.executable} ({e}); run compat/kt_setup.sh")
        return 0
    script = os.path.isfile(KT_SCRIPT)
    if script:
        print("kt check modes: wheel (kt_kernel_ext.moe.AMXInt4_MOE/AMXInt8_MOE driven directly) "
              f"+ script (full comparison with {KT_SCRIPT})")
    else:
        print("kt check modes: wheel only (kt_kernel_ext.moe.AMXInt4_MOE/AMXInt8_MOE driven directly); "
              f"script comparison not run: {KT_SCRIPT} is missing (compat/kt_setup.sh could not obtain it)")
    cases = CASES[: args.cases]
    tmp = tempfile.mkdtemp(prefix="kt_check_")
    failures = 0
    try:
        sources = {"bf16": os.path.join(tmp, "ds_bf16"), "fp16": os.path.join(tmp, "ds_fp16"),
                   "fp8": os.path.join(tmp, "ds_fp8"), "fused": os.path.join(tmp, "vl_fused")}
        make_deepseek(sources["bf16"], "bf16")
        make_deepseek(sources["fp16"], "fp16")
        make_deepseek(sources["fp8"], "fp8")
        make_fused_vl(sources["fused"])
        wheel_refs = {}  # one wheel run per (source, method, parts), shared by merged and no-merge
        for src, itype, method, parts, _ in cases:
            wheel_refs.setdefault((src, method, parts), (sources[src], itype, method, parts,
                                                         os.path.join(tmp, f"wheel_{src}_{method}_{parts}")))
        t_wheel = run_wheel(list(wheel_refs.values()), tmp)
        print(f"kt-kernel's wheel: {len(wheel_refs)} source/method/part-count runs in {t_wheel:.1f} s")
        for i, (src, itype, method, parts, merged) in enumerate(cases):
            label = f"{src} {method} parts={parts} {'merged' if merged else 'no-merge'}"
            ref, ours = os.path.join(tmp, f"kt{i}"), os.path.join(tmp, f"ours{i}")
            t_ours = run_ours(sources[src], ours, itype, method, parts, merged)
            wheel_problems, n_wheel = compare_wheel(wheel_refs[src, method, parts][4], ours, merged)
            problems = [f"wheel: {p}" for p in wheel_problems]
            detail = f"wheel {n_wheel} expert {'tensors' if merged else 'files'}"
            if script:
                t_kt = run_kt(sources[src], ref, itype, method, parts, merged)
                script_problems = compare_merged(ref, ours) if merged else compare_raw(ref, ours)
                if i in VERIFIED:
                    script_problems += verify_theirs(sources[src], ref)
                problems += [f"script: {p}" for p in script_problems]
                count = len(_tensors(ours)) if merged else sum(n.endswith(".kt") for _, _, f in os.walk(ours) for n in f)
                detail += f", script {count} {'tensors' if merged else 'files'} (kt-kernel {t_kt:.1f} s)"
            status = "OK" if not problems else "DIFFERENT"
            print(f"{status}: {label}: {detail}; ours {t_ours:.1f} s")
            for p in problems[:8]:
                print(f"    {p}")
            failures += bool(problems)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    modes = "wheel + script" if script else "wheel only"
    print(f"{len(cases) - failures} of {len(cases)} cases byte-identical ({modes})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
