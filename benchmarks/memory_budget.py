#!/usr/bin/env python
"""Peak memory under ``--max_memory``, for several budgets and two model sizes.

For each generated Llama-shaped checkpoint (``--sizes`` in GB) and each budget (``--budgets`` in
GiB), HF -> MCore (TP=2, PP=2 by default) runs with ``--max_workers`` workers and the process
tree's memory is sampled (RSS summed over processes, and PSS, which counts pages the forked
workers share once). The claim to check: the tree stays within the budget + 1 GiB, and its
peak follows the budget, not the model size. Also times one process with one worker, one
process with two workers and two processes under torchrun, to show what multiple processes
buy on this machine.

    python benchmarks/memory_budget.py [--workdir DIR] [--sizes 3,6] [--budgets 2,4,8] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_llama_checkpoint  # noqa: E402  (sibling script)
from run_benchmark import TreeMonitor  # noqa: E402

GIB = 2**30


def source(workdir: str, size_gb: float) -> str:
    path = os.path.join(workdir, f"hf_{size_gb:g}gb")
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_llama_checkpoint.main([path, "--size-gb", str(size_gb)])
    return path


def timed(cmd: list[str], pss: bool = True) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    monitor = TreeMonitor(proc.pid, pss=pss)
    monitor.start()
    _, err = proc.communicate()
    peak = monitor.stop()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return seconds, {"rss_tree": peak.rss_tree, "pss_tree": peak.pss_tree, "rss_single": peak.rss_single}


def convert_cmd(src: str, out: str, tp: int, pp: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "convert_checkpoint", "--load_platform", "huggingface", "--save_platform", "mcore",
            "--load_ckpt_path", src, "--save_ckpt_path", out, "--tensor_model_parallel_size", str(tp),
            "--pipeline_model_parallel_size", str(pp), "--overwrite", "--no_progress", *extra]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/convert-checkpoint-bench")
    ap.add_argument("--sizes", default="3,6", help="model sizes in GB")
    ap.add_argument("--budgets", default="2,4,8", help="--max_memory values in GiB")
    ap.add_argument("--max-workers", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    out = os.path.join(args.workdir, "budget_out")
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        src = source(args.workdir, size)
        for budget in (float(b) for b in args.budgets.split(",")):
            seconds, peak = timed(convert_cmd(src, out, args.tp, args.pp, "--max_workers", str(args.max_workers),
                                              "--max_memory", f"{budget:g}GiB"))
            report = json.load(open(os.path.join(out, "conversion_report.json")))
            row = {"model_gb": size, "budget_gib": budget, "seconds": round(seconds, 1),
                   "in_flight_gib": report["memory"]["max_in_flight_planned_bytes"] / GIB,
                   "rss_tree_gib": peak["rss_tree"] / GIB, "pss_tree_gib": peak["pss_tree"] / GIB,
                   "within_budget_plus_1gib": peak["pss_tree"] <= (budget + 1) * GIB}
            rows.append(row)
            print(f"model {size:4g} GB  budget {budget:3g} GiB  in flight {row['in_flight_gib']:.2f} GiB  "
                  f"PSS tree {row['pss_tree_gib']:.2f} GiB  RSS tree {row['rss_tree_gib']:.2f} GiB  "
                  f"{'ok' if row['within_budget_plus_1gib'] else 'OVER'}  {seconds:.1f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    # What several processes buy here: same conversion, 1 worker / 2 workers / torchrun x 2.
    src = source(args.workdir, float(args.sizes.split(",")[0]))
    speed = {}
    for label, cmd in (
        ("1 process, 1 worker", convert_cmd(src, out, args.tp, args.pp, "--max_workers", "1")),
        ("1 process, 2 workers", convert_cmd(src, out, args.tp, args.pp, "--max_workers", "2")),
        ("torchrun, 2 processes x 1 worker", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", "2", "-m"] + convert_cmd(src, out, args.tp, args.pp)[2:]),
    ):
        seconds, peak = timed(cmd, pss=False)
        speed[label] = round(seconds, 1)
        print(f"{label:34s} {seconds:6.1f} s  RSS tree {peak['rss_tree'] / GIB:.2f} GiB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budgets": rows, "speed": speed, "cpus": os.cpu_count()}, f, indent=2)
    return 0 if all(r["within_budget_plus_1gib"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
