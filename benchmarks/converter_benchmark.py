#!/usr/bin/env python
"""Dequantize a compressed-tensors W4A16 checkpoint: ours vs compressed-tensors' own entry point.

Builds a synthetic checkpoint (``--tensors`` linear weights of ``--rows`` x ``--cols``, bf16,
quantized by the library's qparams and compressor, group 128, split over ``--shards`` files with
every scale in the shard after its weight: cross-shard dependencies), then runs, each in a fresh
process, timed with its peak RSS (``ru_maxrss`` of the process tree's largest member):

  ours     convert_checkpoint(SRC, DST, "ct_dequantizer", max_workers=W)   (fsyncs its output)
  library  compressed_tensors.entrypoints.convert.convert_checkpoint(SRC, DST,
           CompressedTensorsDequantizer(SRC), max_workers=1) + sync

and checks both outputs are bit-identical.

    python benchmarks/converter_benchmark.py [--workdir DIR] [--max-workers 2] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def build(src: str, tensors: int, rows: int, cols: int, shards: int) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from quantized_fixtures import ct_compress, ct_scheme

    from compressed_tensors import __version__
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    scheme = ct_scheme("W4A16", 128)
    os.makedirs(src, exist_ok=True)
    files = [{} for _ in range(shards)]
    torch.manual_seed(0)
    for i in range(tensors):
        module = f"model.layers.{i}.mlp.up_proj"
        packed = ct_compress(torch.randn(rows, cols, dtype=torch.bfloat16), scheme)
        shard = i * shards // tensors
        for k, v in packed.items():  # scales one shard later than their weight
            files[(shard + (k != "weight_packed")) % shards][f"{module}.{k}"] = v.contiguous()
    weight_map = {}
    for n, tensors_of in enumerate(files):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors_of, os.path.join(src, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors_of})
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=scheme.format,
                                quantization_status=QuantizationStatus.COMPRESSED)
    qc = json.loads(json.dumps(config.model_dump(), default=lambda v: getattr(v, "value", str(v))))
    qc["version"] = __version__
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "quantization_config": qc}, f)


RUNNERS = {
    "ours": "from convert_checkpoint import convert_checkpoint; "
            "convert_checkpoint({src!r}, {dst!r}, 'ct_dequantizer', max_workers={workers}, progress=False)",
    "library": "import os; from compressed_tensors.entrypoints.convert import convert_checkpoint, CompressedTensorsDequantizer; "
               "convert_checkpoint({src!r}, {dst!r}, CompressedTensorsDequantizer({src!r}), max_workers=1); os.sync()",
}


def run(kind: str, src: str, dst: str, workers: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    code = RUNNERS[kind].format(src=src, dst=dst, workers=workers)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + "\nimport resource; print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-2000:]}")
    rss = max(int(x) for x in proc.stdout.split("RSS")[-1].split()) * 1024
    out_bytes = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst) if f.endswith(".safetensors"))
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(rss / 2**30, 2), "output_gb": round(out_bytes / 1e9, 3),
            "gb_per_s": round(out_bytes / 1e9 / seconds, 3)}


def same_outputs(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    x, y = load(a), load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/converter_bench")
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--max-workers", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    src = os.path.join(a.workdir, "w4a16")
    if not os.path.isdir(src):
        build(src, a.tensors, a.rows, a.cols, a.shards)
    results = {"source_gb": round(sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 1e9, 3)}
    results["library"] = run("library", src, os.path.join(a.workdir, "lib"), 1)
    results["ours_1_worker"] = run("ours", src, os.path.join(a.workdir, "ours1"), 1)
    results[f"ours_{a.max_workers}_workers"] = run("ours", src, os.path.join(a.workdir, "ours"), a.max_workers)
    results["identical"] = same_outputs(os.path.join(a.workdir, "lib"), os.path.join(a.workdir, "ours"))
    print(json.dumps(results, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
