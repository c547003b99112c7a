"""Demo: generate a tiny Llama, convert HF -> MCore (TP=2, PP=2) -> HF, verify, report.

Run with ``bash examples/demo.sh`` (sets up .venv first) or ``.venv/bin/python examples/demo.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", help="where to put the checkpoints (default: a temp dir, removed after)")
    args = parser.parse_args()
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig

    from convert_checkpoint.cli import main as convert

    work = args.workdir or tempfile.mkdtemp(prefix="convert_demo_")
    hf_dir, mcore_dir, back_dir = (os.path.join(work, d) for d in ("hf", "mcore", "hf_back"))
    for d in (hf_dir, mcore_dir, back_dir):
        shutil.rmtree(d, ignore_errors=True)

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4,
                         num_hidden_layers=4, vocab_size=1000, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(hf_dir)
    print(f"1. generated a tiny Llama in {hf_dir}")

    common = ["--no_progress", "--max_workers", "2"]
    t0 = time.perf_counter()
    rc = convert(["--load_platform", "huggingface", "--save_platform", "mcore", "--load_ckpt_path", hf_dir,
                  "--save_ckpt_path", mcore_dir, "--tensor_model_parallel_size", "2",
                  "--pipeline_model_parallel_size", "2"] + common)
    t1 = time.perf_counter()
    if rc:
        return rc
    ranks = sorted(os.listdir(os.path.join(mcore_dir, "release")))
    print(f"2. HF -> MCore (TP=2, PP=2) in {t1 - t0:.2f} s: {', '.join(ranks)}")
    rc = convert(["--load_platform", "mcore", "--save_platform", "huggingface", "--load_ckpt_path", mcore_dir,
                  "--save_ckpt_path", back_dir] + common)
    t2 = time.perf_counter()
    if rc:
        return rc
    print(f"3. MCore -> HF (layout read off the rank files) in {t2 - t1:.2f} s")

    def tensors(path):
        index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"] \
            if os.path.exists(os.path.join(path, "model.safetensors.index.json")) else None
        files = sorted(set(index.values())) if index else ["model.safetensors"]
        out = {}
        for f in files:
            with safe_open(os.path.join(path, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    a, b = tensors(hf_dir), tensors(back_dir)
    same_keys = sorted(a) == sorted(b)
    equal = same_keys and all(torch.equal(a[k], b[k]) for k in a)
    original = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(back_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        same_logits = torch.equal(original(ids).logits, reloaded(ids).logits)
    print(f"4. verify: {len(a)} tensors, same key set: {same_keys}, all torch.equal: {equal}, "
          f"transformers reload gives identical logits: {same_logits}")
    if not args.workdir:
        shutil.rmtree(work)
    ok = equal and same_logits
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
