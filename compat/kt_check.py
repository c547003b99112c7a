"""Byte comparison of ``convert-checkpoint kt`` with kt-kernel 0.7.2's own ``convert_cpu_weights.py``.

Run with the kt venv's python (see compat/kt_setup.sh); our side runs in the project's venv
(``.venv``, or $KT_OURS_PYTHON) through the command line:

    bash compat/kt_setup.sh && .venv-kt/bin/python compat/kt_check.py

It writes small DeepSeek-shaped checkpoints (a dense layer, two MoE layers, an MTP layer with
experts, shared experts, router, norms, embeddings, lm_head; expert rows that are all zero, tiny,
huge, and on the exact +-x.5 rounding grid), in bf16, fp16 and block FP8 (attention and experts
with ``weight_scale_inv``), plus a VL-style fused-expert one (``language_model.`` prefix, 3-D
``gate_up_proj``/``down_proj``). Each is converted by kt-kernel and by us, for INT4 and INT8 and
1/2/4 NUMA parts, merged and ``--no-merge-safetensor``, and every output tensor is compared byte
for byte (names, dtype, shape, bytes), with the index's weight map and the copied files; our
``verify-kt`` must also accept kt-kernel's own output (merged, raw, FP8 and fused cases).

kt-kernel is run on this CPU-only machine with two shims, nothing else changed: ``pin_memory``
is dropped (CPU torch refuses it), and for FP8 its Triton dequantization kernel (CUDA only) is
replaced by the same arithmetic on CPU (``float32(code) * block scale`` over its flattened
``[C*M, N]`` stack, returned in fp32 as the kernel's output buffer is), with ``.cuda()`` a no-op.

Prints ``SKIPPED: ...`` and exits 0 when kt-kernel or the script is unavailable.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases")
    args = ap.parse_args()
    try:
        import kt_kernel  # noqa: F401
    except ImportError as e:
        print(f"SKIPPED: kt-kernel is not importable in {sys.executable} ({e}); run compat/kt_setup.sh")
        return 0
    if not os.path.isfile(KT_SCRIPT):
        print(f"SKIPPED: {KT_SCRIPT} is missing; run compat/kt_setup.sh")
        return 0
    tmp = tempfile.mkdtemp(prefix="kt_check_")
    failures = 0
    try:
        sources = {"bf16": os.path.join(tmp, "ds_bf16"), "fp16": os.path.join(tmp, "ds_fp16"),
                   "fp8": os.path.join(tmp, "ds_fp8"), "fused": os.path.join(tmp, "vl_fused")}
        make_deepseek(sources["bf16"], "bf16")
        make_deepseek(sources["fp16"], "fp16")
        make_deepseek(sources["fp8"], "fp8")
        make_fused_vl(sources["fused"])
        for i, (src, itype, method, parts, merged) in enumerate(CASES[: args.cases]):
            label = f"{src} {method} parts={parts} {'merged' if merged else 'no-merge'}"
            ref, ours = os.path.join(tmp, f"kt{i}"), os.path.join(tmp, f"ours{i}")
            t_kt = run_kt(sources[src], ref, itype, method, parts, merged)
            t_ours = run_ours(sources[src], ours, itype, method, parts, merged)
            problems = compare_merged(ref, ours) if merged else compare_raw(ref, ours)
            if i in VERIFIED:
                problems += verify_theirs(sources[src], ref)
            count = len(_tensors(ours)) if merged else sum(n.endswith(".kt") for _, _, f in os.walk(ours) for n in f)
            status = "OK" if not problems else "DIFFERENT"
            print(f"{status}: {label}: {count} {'tensors' if merged else 'files'} "
                  f"(kt-kernel {t_kt:.1f} s, ours {t_ours:.1f} s)")
            for p in problems[:8]:
                print(f"    {p}")
            failures += bool(problems)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(CASES[: args.cases]) - failures} of {len(CASES[: args.cases])} cases byte-identical")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
