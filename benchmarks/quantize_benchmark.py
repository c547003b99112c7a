#!/usr/bin/env python
"""Quantization speed and memory (issue 15 item 9): `convert-checkpoint quantize` per scheme.

Two measurements per scheme, both in GB/s of bf16 input:

* **math**: the compressed-tensors quantizer on one group of tensors already in memory (on the
  device for --device cuda): a Llama-8B-sized layer's q/k/v, o, gate/up and down projections
  (NVFP4 shares global scales across q/k/v and gate/up, as in a real run). On a GPU it is
  reported twice: outputs left on the device (the math alone) and copied back to the host (as
  the writer needs them);
* **end to end** (``--end-to-end GB``): the command on a synthetic Llama-shaped bf16 checkpoint of
  that size (benchmarks/make_llama_checkpoint.py), wall time and peak RSS of the whole run.

    python benchmarks/quantize_benchmark.py --device cpu [--schemes FP8_DYNAMIC,NVFP4A16] [--end-to-end 1]
    python benchmarks/quantize_benchmark.py --device cuda --end-to-end 8 --max_workers 8   # GPU machine

Results are printed as a table and written as JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))

import torch  # noqa: E402

SCHEMES = ("FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W8A16", "W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16", "MXFP4",
           "MXFP8A16")
SHAPES = {"llama8b": (4096, 14336, 1024), "llama70b": (8192, 28672, 1024)}  # hidden, ffn, kv width
HIDDEN, FFN, KV = SHAPES["llama8b"]


def layer_tensors(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
              "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN),
              "mlp.down_proj": (HIDDEN, FFN)}
    return {f"model.layers.0.{n}.weight": (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16).to(device)
            for n, s in shapes.items()}


def math_speed(scheme: str, device: str, repeats: int, rounding: str = "fp32", check_bytes: bool = False,
               profile: bool = False) -> dict:
    from convert_checkpoint.converters.quantize_ct import build_quantizer

    tensors = layer_tensors(device)
    config = {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FFN}
    quantizer = build_quantizer(config, tensors.keys(), None, scheme=scheme, device=device, rounding=rounding)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    runs = {"math_gb_s": quantizer.process}
    if device != "cpu":
        runs = {"math_gb_s": quantizer.process_on_device, "math_to_host_gb_s": quantizer.process}
    speeds: dict = {}
    if check_bytes and device != "cpu":  # the device's bytes against the CPU's, on these large tensors
        host = build_quantizer(config, tensors.keys(), None, scheme=scheme, device="cpu", rounding=rounding)
        want = host.process({k: v.cpu() for k, v in tensors.items()})
        got = quantizer.process(dict(tensors))
        speeds["bytes_equal_cpu"] = want.keys() == got.keys() and all(
            want[k].dtype == got[k].dtype and torch.equal(want[k].view(torch.uint8), got[k].view(torch.uint8))
            for k in want)
    if profile and device != "cpu":
        quantizer.process_on_device(dict(tensors))
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                quantizer.process_on_device(dict(tensors))
            torch.cuda.synchronize()
        print(f"\n{scheme}: one layer's math on the device, 3 times (host and GPU time)")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=50))
    for key, fn in runs.items():
        fn(dict(tensors))  # warm-up (kernels, allocator)
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn(dict(tensors))
        if device != "cpu":
            torch.cuda.synchronize()
        speeds[key] = round(nbytes * repeats / (time.perf_counter() - start) / 1e9, 3)
    return speeds


def end_to_end(scheme: str, device: str, src: str, work: str, workers: int) -> tuple[float, float]:
    dst = os.path.join(work, f"out-{scheme}")
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "convert_checkpoint", "quantize", src, dst, "--scheme", scheme, "--device", device,
           "--max_workers", str(workers), "--no_progress"]
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "tools") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    seconds = time.perf_counter() - start
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) * 1024
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    shutil.rmtree(dst, ignore_errors=True)
    return size / seconds / 1e9, peak / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES), help="the layer whose projections are timed")
    ap.add_argument("--rounding", default="fp32", choices=("fp32", "weight_dtype"))
    ap.add_argument("--profile", action="store_true", help="on a GPU, print the kernels of one layer's math")
    ap.add_argument("--check-bytes", action="store_true", help="on a GPU, also compare its bytes with the CPU's")
    ap.add_argument("--end-to-end", type=float, default=0.0, metavar="GB", help="also time the command on a checkpoint of GB")
    ap.add_argument("--max_workers", type=int, default=1)
    ap.add_argument("--work", default="/tmp/quantize_benchmark")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    global HIDDEN, FFN, KV
    HIDDEN, FFN, KV = SHAPES[args.shape]
    schemes = args.schemes.split(",")
    src = os.path.join(args.work, "src")
    if args.end_to_end:
        shutil.rmtree(args.work, ignore_errors=True)
        subprocess.run([sys.executable, os.path.join(HERE, "make_llama_checkpoint.py"), src, "--size-gb",
                        str(args.end_to_end)], check=True, capture_output=True)
    results = []
    print(f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} cores"
          + (f", {torch.cuda.get_device_name()}" if args.device != "cpu" else ""))
    gpu = args.device != "cpu"
    print(f"{'scheme':<12} {'math GB/s':>10}" + (f" {'to host GB/s':>13}" if gpu else "")
          + (f" {'end-to-end GB/s':>16} {'peak RSS GiB':>13}" if args.end_to_end else ""))
    for scheme in schemes:
        row: dict = {"scheme": scheme, "rounding": args.rounding,
                     **math_speed(scheme, args.device, args.repeats, args.rounding, args.check_bytes,
                                     args.profile)}
        print(f"{scheme:<12} {row['math_gb_s']:>10.3f}" + (f" {row['math_to_host_gb_s']:>13.3f}" if gpu else "")
              + (f" bytes==cpu {row['bytes_equal_cpu']}" if "bytes_equal_cpu" in row else ""), end="", flush=True)
        if args.end_to_end:
            row["end_to_end_gb_s"], row["peak_rss_gib"] = (round(v, 3) for v in end_to_end(
                scheme, args.device, src, args.work, args.max_workers))
            print(f" {row['end_to_end_gb_s']:>16.3f} {row['peak_rss_gib']:>13.2f}", end="")
        print(flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "shape": args.shape, "cores": os.cpu_count(), "end_to_end_gb": args.end_to_end,
                       "max_workers": args.max_workers, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
