"""Byte guard for refactors: run a matrix of conversions and record the sha256 of every output file.

Covers every family, the layout kinds (TP, PP, VPP, custom layer lists, EP, ETP, grouped
experts, local spec, MTP), block FP8 (kept, requantized, quantized from bf16), converters
(pre-stage and HF -> HF), MCore -> MCore and MCore -> HF. Inputs are tiny seeded models, written
under one fixed directory so the resume fingerprints (which hash the source path) compare too.

    python benchmarks/byte_guard.py --out before.json          # on the old commit
    python benchmarks/byte_guard.py --out after.json --compare before.json

``conversion_report.json`` is left out (it holds timings); every other file is hashed,
including the manifest's plan fingerprint.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402

from tiny_models import TinySpec, make_fp8_checkpoint, make_tiny_model  # noqa: E402

WORK = "/tmp/convert_checkpoint_byte_guard"


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def _hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if name == "conversion_report.json":
                continue
            if name.startswith("conversion_manifest"):
                with open(os.path.join(dirpath, name)) as f:
                    out[rel + "#fingerprint"] = json.load(f)["fingerprint"]
                continue
            out[rel] = _sha(os.path.join(dirpath, name))
    return dict(sorted(out.items()))


def _run(argv: list[str]) -> int:
    from convert_checkpoint.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv + ["--no_progress"])
    if rc != 0:
        print(f"  rc={rc}: {err.getvalue().strip().splitlines()[-1:]}")
    return rc


def _convert(src: str, dst: str, load: str, save: str, *flags: str) -> int:
    return _run(["--load_platform", load, "--save_platform", save, "--load_ckpt_path", src,
                 "--save_ckpt_path", dst, *flags])


def cases() -> list[tuple[str, callable]]:
    models: dict[str, str] = {}

    def model(spec: TinySpec, fp8: bool = False) -> str:
        key = spec.key + ("_fp8" if fp8 else "")
        if key not in models:
            path = os.path.join(WORK, "in", key)
            if fp8:
                path = make_fp8_checkpoint(model(spec), path)
            else:
                make_tiny_model(spec, path)
            models[key] = path
        return models[key]

    llama = TinySpec("llama")
    llama_tied = TinySpec("llama", tied=True)
    qwen2 = TinySpec("qwen2")
    qwen3 = TinySpec("qwen3", num_layers=5)
    qwen3_moe = TinySpec("qwen3_moe", mlp_only_layers=(0,))
    qwen2_moe = TinySpec("qwen2_moe", mlp_only_layers=(1,))
    mixtral = TinySpec("mixtral")
    ds3 = TinySpec("deepseek_v3", mtp_layers=1, dtype=torch.bfloat16)
    ds3_wide = TinySpec("deepseek_v3", wide=True, num_layers=2, mtp_layers=1, dtype=torch.bfloat16)
    ds2 = TinySpec("deepseek_v2", first_dense=2)

    out = []

    def hf_mcore_hf(name: str, spec: TinySpec, *flags: str, fp8: bool = False, back: tuple[str, ...] = ()):
        def run(dst: str) -> int:
            mc = os.path.join(dst, "mcore")
            rc = _convert(model(spec, fp8), mc, "huggingface", "mcore", *flags)
            return rc or _convert(mc, os.path.join(dst, "hf"), "mcore", "huggingface", *back)
        out.append((name, run))

    hf_mcore_hf("llama_tp2_pp2", llama, "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2")
    hf_mcore_hf("llama_tied_pp2_vpp2_local", llama_tied, "--pipeline_model_parallel_size", "2",
                "--num-virtual-stages-per-pipeline-rank", "2", "--transformer_impl", "local")
    hf_mcore_hf("llama_custom_layers", llama, "--pipeline_model_parallel_size", "2", "--custom_pipeline_layers", "3,1",
                "--max_shard_size", "20KB")
    hf_mcore_hf("qwen2_tp4", qwen2, "--tensor_model_parallel_size", "4")
    hf_mcore_hf("qwen3_pp2_uneven", qwen3, "--pipeline_model_parallel_size", "2", "--tensor_model_parallel_size", "2")
    hf_mcore_hf("qwen3_moe_ep2_etp1", qwen3_moe, "--tensor_model_parallel_size", "2", "--expert_parallel_size", "2",
                "--expert_tensor_parallel_size", "1")
    hf_mcore_hf("qwen2_moe_grouped", qwen2_moe, "--expert_parallel_size", "2", "--moe-grouped-gemm",
                "--pipeline_model_parallel_size", "2")
    hf_mcore_hf("mixtral_tp2_ep2", mixtral, "--tensor_model_parallel_size", "2", "--expert_parallel_size", "2")
    hf_mcore_hf("deepseek_v3_mtp_pp2_ep2", ds3, "--pipeline_model_parallel_size", "2", "--expert_parallel_size", "2",
                "--tensor_model_parallel_size", "2")
    hf_mcore_hf("deepseek_v3_local", ds3, "--transformer_impl", "local", "--mtp_layer_name", "mtp_model_layer")
    hf_mcore_hf("deepseek_v2_tp2", ds2, "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2")
    hf_mcore_hf("deepseek_v3_fp8_keep", ds3_wide, "--tensor_model_parallel_size", "2", "--expert_parallel_size", "2",
                fp8=True)
    hf_mcore_hf("deepseek_v3_fp8_requant", ds3_wide, "--tensor_model_parallel_size", "2", "--transformer_impl",
                "local", "--force_pow_2_scales", "false", fp8=True)
    hf_mcore_hf("deepseek_v3_bf16_to_fp8", ds3_wide, "--convert_to_fp8", "--expert_parallel_size", "2")
    hf_mcore_hf("deepseek_v3_fp8_dequant_pre", ds3_wide, "--converter", "dequantize", fp8=True)
    hf_mcore_hf("llama_back_with_reference", llama, "--tensor_model_parallel_size", "2",
                back=("--hf_config_path", os.path.join(WORK, "in", llama.key)))

    def mcore_relayout(name: str, spec: TinySpec, first: tuple[str, ...], second: tuple[str, ...]):
        def run(dst: str) -> int:
            a = os.path.join(dst, "a")
            rc = _convert(model(spec), a, "huggingface", "mcore", *first)
            return rc or _convert(a, os.path.join(dst, "b"), "mcore", "mcore", *second)
        out.append((name, run))

    mcore_relayout("llama_mcore_relayout", llama, ("--tensor_model_parallel_size", "2"),
                   ("--pipeline_model_parallel_size", "2", "--num-virtual-stages-per-pipeline-rank", "2"))
    mcore_relayout("ds3_mcore_relayout", ds3, ("--expert_parallel_size", "2", "--pipeline_model_parallel_size", "2"),
                   ("--tensor_model_parallel_size", "2", "--moe-grouped-gemm"))

    def hf_hf(name: str, spec: TinySpec, *converters: str, fp8: bool = True):
        def run(dst: str) -> int:
            argv = ["hf", model(spec, fp8), os.path.join(dst, "hf")]
            for c in converters:
                argv += ["--converter", c]
            return _run(argv)
        out.append((name, run))

    hf_hf("hf_hf_dequantize", ds3_wide, "dequantize")
    hf_hf("hf_hf_fp8_block_fp32", ds3_wide, "fp8_block_dequantizer:dtype=float32")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--compare", help="an earlier run's JSON: list every difference")
    args = p.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    result: dict[str, dict[str, str]] = {}
    for name, run in cases():
        dst = os.path.join(WORK, "out", name)
        rc = run(dst)
        result[name] = {"rc": str(rc), **_hashes(dst)}
        print(f"{name}: rc={rc}, {len(result[name]) - 1} files")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    if not args.compare:
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    differences = 0
    for name in sorted(set(before) | set(result)):
        a, b = before.get(name, {}), result.get(name, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                differences += 1
                print(f"DIFF {name}: {key}: {a.get(key, '(absent)')[:16]} -> {b.get(key, '(absent)')[:16]}")
    print("identical" if not differences else f"{differences} differences")
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main())
