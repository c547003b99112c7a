#!/usr/bin/env python
"""KTransformers CPU-expert speed and memory (issue 16 item 6): `convert-checkpoint kt` on a
DeepSeek-V3-shaped MoE layer (hidden 7168, expert size 2048; 256 experts, fewer with --experts).

Two measurements, both in GB/s of bf16 expert input:

* **math**: ``quant/kt_amx.encode`` (quantize + pack + tile) on one expert's gate, up and down NUMA
  parts already in memory, in this process (torch's threads);
* **end to end**: the command on a synthetic checkpoint of ``--layers`` such layers written first
  (random bf16; not timed), wall time and the peak RSS of the converting process and of its
  largest worker.

    python benchmarks/kt_benchmark.py --experts 16 --layers 2 --max_workers 2      # the 2-core VM
    python benchmarks/kt_benchmark.py --experts 16 --layers 16 --max_workers 16    # a 16-core host: workers
    python benchmarks/kt_benchmark.py --experts 256 --layers 1                     # one full layer, torch threads

Prints one JSON object (``--json FILE`` also writes it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "..", "tools")
sys.path.insert(0, TOOLS)

import torch  # noqa: E402

HIDDEN, INTER = 7168, 2048  # DeepSeek-V3
# Runs the command and reports its own peak (VmHWM: this exec's memory only, unlike ru_maxrss,
# which keeps the forking parent's) and its workers' (forked after the exec).
LAUNCH = """
import json, resource, sys
from convert_checkpoint.cli import main
rc = main(sys.argv[1:])
hwm = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))
print(json.dumps({"main_kib": hwm, "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), file=sys.stderr)
sys.exit(rc)
"""


def math_gbps(method: str, parts: int, repeat: int) -> dict:
    from convert_checkpoint.quant import kt_amx

    scheme = kt_amx.SCHEMES[method]
    it = INTER // parts
    g = torch.Generator().manual_seed(0)
    mats = [(torch.randn(it, HIDDEN, generator=g) * 0.02).to(torch.bfloat16) for _ in range(2)]  # gate, up parts
    mats.append((torch.randn(HIDDEN, it, generator=g) * 0.02).to(torch.bfloat16))  # down part
    kt_amx.encode(mats[0], scheme)  # warm up
    start = time.perf_counter()
    for _ in range(repeat):
        for m in mats:
            kt_amx.encode(m, scheme)
    seconds = time.perf_counter() - start
    nbytes = repeat * sum(m.numel() * 2 for m in mats)
    return {"bytes": nbytes, "seconds": round(seconds, 3), "gb_per_s": round(nbytes / seconds / 1e9, 3),
            "threads": torch.get_num_threads()}


def make_checkpoint(path: str, experts: int, layers: int) -> int:
    """One safetensors file per layer, written expert by expert (bounded memory). Returns the
    expert bytes."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    total = 0
    weight_map = {}
    for layer in range(layers):
        tensors = {}
        for e in range(experts):
            for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)), ("down_proj", (HIDDEN, INTER))):
                tensors[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = (
                    torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
                total += INTER * HIDDEN * 2
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.zeros(experts, HIDDEN, dtype=torch.bfloat16)
        name = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, os.path.join(path, name))
        weight_map.update({k: name for k in tensors})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": HIDDEN,
              "moe_intermediate_size": INTER, "n_routed_experts": experts, "num_experts_per_tok": 8,
              "num_hidden_layers": layers}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return total


def end_to_end(src: str, out: str, method: str, parts: int, workers: int, expert_bytes: int) -> dict:
    env = dict(os.environ, PYTHONPATH=TOOLS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", LAUNCH, "kt", "-i", src, "-o", out, "--quant-method", method,
           "--threadpool-count", str(parts), "--max_workers", str(workers), "--no_progress", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"convert-checkpoint kt failed:\n{proc.stderr[-3000:]}")
    peak = json.loads(proc.stderr.strip().splitlines()[-1])
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return {"seconds": round(seconds, 2), "gb_per_s": round(expert_bytes / seconds / 1e9, 3),
            "peak_rss_main_bytes": peak["main_kib"] * 1024, "peak_rss_worker_bytes": peak["worker_kib"] * 1024,
            "written_bytes": written, "command": "convert-checkpoint " + " ".join(cmd[3:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=256, help="routed experts per layer (DeepSeek-V3: 256)")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers (one output file each: workers run in parallel)")
    ap.add_argument("--quant-method", dest="method", choices=("int4", "int8"), default="int4")
    ap.add_argument("--threadpool-count", dest="parts", type=int, default=2)
    ap.add_argument("--max_workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="math repetitions")
    ap.add_argument("--workdir", help="where the synthetic checkpoint and the output go (default: a temp dir)")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    result = {"machine": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "shape": {"hidden": HIDDEN, "moe_intermediate": INTER, "experts": args.experts, "layers": args.layers},
              "method": args.method, "parts": args.parts, "max_workers": args.max_workers,
              "math": math_gbps(args.method, args.parts, args.repeat)}
    if not args.skip_end_to_end:
        work = args.workdir or tempfile.mkdtemp(prefix="kt_bench_")
        try:
            src = os.path.join(work, "src")
            expert_bytes = make_checkpoint(src, args.experts, args.layers)
            result["end_to_end"] = end_to_end(src, os.path.join(work, "out"), args.method, args.parts,
                                              args.max_workers, expert_bytes)
            result["end_to_end"]["expert_bytes"] = expert_bytes
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
