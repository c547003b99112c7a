#!/usr/bin/env python
"""Time a HF -> MCore -> HF round trip of a ~3 GB Llama checkpoint against plain ``cp -r``.

Steps, repeated ``--repeat`` times (median time and worst memory are reported):

  cp-hf      cp -r HF_DIR                  + sync   (baseline for hf->mcore)
  hf->mcore  convert-checkpoint TP=2 PP=2  + sync
  cp-mcore   cp -r MCORE_DIR               + sync   (baseline for mcore->hf)
  mcore->hf  convert-checkpoint back to HF + sync

Before each step, untimed: the previous output is removed, ``sync`` runs, the machine idles
for ``--settle`` seconds (see ``prefault`` for why) and, with ``--cold``, the page cache is
dropped. The trailing ``sync`` is timed for every step: the converter fsyncs its output files
and ``cp`` fsyncs nothing, so each step pays for getting its bytes to disk. Each copy is
deleted right after it is timed. Memory is sampled every ~50 ms over the whole process tree
(workers included). Finally the round-tripped HF checkpoint is compared bit for bit with the
source.

    python benchmarks/run_benchmark.py [--workdir DIR] [--max-workers 2] [--repeat 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_llama_checkpoint  # sibling script, not a package

GB = 10**9
TIME_TARGET = 1.5  # conversion may take at most this many times the matching cp
RSS_SLACK = 1 * GB  # peak RSS target: 2 x largest output file + this


@dataclass
class Peak:
    rss_tree: int = 0  # max over samples of the summed RSS of the process and all descendants
    rss_single: int = 0  # max RSS of any one process in the tree
    # RSS minus file-backed/shared pages: memory the tree owns, not mmapped page cache.
    anon_tree: int = 0
    pss_tree: int | None = None  # summed PSS (shared pages counted once); only with --pss
    samples: int = 0


class TreeMonitor:
    """Polls a process tree's memory from a background thread until stopped."""

    def __init__(self, pid: int, interval: float = 0.05, pss: bool = False):
        self._root = psutil.Process(pid)
        self._interval = interval
        self._pss = pss
        self._stop = threading.Event()
        self.peak = Peak(pss_tree=0 if pss else None)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Peak:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _sample(self) -> None:
        try:
            procs = [self._root] + self._root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        rss_sum = 0
        anon_sum = 0
        pss_sum = 0
        for p in procs:
            # A worker may exit between listing and reading; skip it for this sample.
            try:
                if self._pss:
                    info = p.memory_full_info()  # reads smaps_rollup: ~5 ms per GB mapped
                    pss_sum += info.pss
                else:
                    info = p.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss_sum += info.rss
            anon_sum += info.rss - info.shared
            self.peak.rss_single = max(self.peak.rss_single, info.rss)
        self.peak.rss_tree = max(self.peak.rss_tree, rss_sum)
        self.peak.anon_tree = max(self.peak.anon_tree, anon_sum)
        if self.peak.pss_tree is not None:
            self.peak.pss_tree = max(self.peak.pss_tree, pss_sum)
        self.peak.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)


@dataclass
class Run:
    """One timed execution of a step."""

    seconds: float  # process + trailing sync
    process_seconds: float
    sync_seconds: float
    user_seconds: float  # CPU time of the whole tree (reaped workers roll up into their parent)
    sys_seconds: float
    peak: Peak


@dataclass
class Step:
    name: str
    command: list[str]
    output_dir: str
    baseline: str | None = None  # name of the cp step this one is compared with
    delete_after: bool = False  # copies go at once: their page cache would squeeze later steps
    runs: list[Run] = field(default_factory=list)
    largest_file: int = 0
    total_bytes: int = 0
    ratio: float | None = None  # median / median of the baseline
    best_ratio: float | None = None  # best / best of the baseline: less exposed to noisy neighbours
    time_ok: bool | None = None
    rss_ok: bool | None = None
    check_round_trip: bool = False  # compare the output with the HF source before it is deleted
    round_trip_problems: list[str] = field(default_factory=list)
    workers: int | None = None  # from the converter's report: as chosen (auto) or given
    io_threads: int | None = None  # from the report: copy threads per worker
    startup_seconds: float | None = None  # from the report: process start to the first byte moved (imports, planning)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def best_seconds(self) -> float:
        return min(r.seconds for r in self.runs)

    @property
    def sync_seconds(self) -> float:
        return statistics.median(r.sync_seconds for r in self.runs)

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(r.user_seconds + r.sys_seconds for r in self.runs)

    @property
    def peak(self) -> Peak:
        """The worst of every run."""
        pss = [r.peak.pss_tree for r in self.runs if r.peak.pss_tree is not None]
        return Peak(
            rss_tree=max(r.peak.rss_tree for r in self.runs),
            rss_single=max(r.peak.rss_single for r in self.runs),
            anon_tree=max(r.peak.anon_tree for r in self.runs),
            pss_tree=max(pss) if pss else None,
            samples=sum(r.peak.samples for r in self.runs),
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(
            seconds=self.seconds,
            best_seconds=self.best_seconds,
            sync_seconds=self.sync_seconds,
            cpu_seconds=self.cpu_seconds,
            peak=asdict(self.peak),
        )
        return d


def drop_caches() -> bool:
    """Empty the page cache (root only); False where the kernel refuses."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def dir_sizes(root: str) -> tuple[int, int]:
    """(largest file, total bytes) under ``root``."""
    largest = total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            size = os.path.getsize(os.path.join(dirpath, name))
            largest = max(largest, size)
            total += size
    return largest, total


def prefault(nbytes: int) -> None:
    """Touch, then free, up to ``nbytes`` of memory, never more than is free (no cache eviction).

    On VMs with virtio-balloon free page reporting (e.g. Firecracker), memory freed in 2 MB
    blocks goes back to the host about 2 s later, and touching it again costs ~2 s/GB of system
    time. Prefaulting makes the pool warm right before a step; it helps a step that starts
    allocating at once (``cp``) more than one that first spends 1.5 s importing torch, so the
    default is ``--settle`` instead.
    """
    n = min(nbytes, psutil.virtual_memory().free - GB)
    if n > 0:
        buf = torch.ones(n, dtype=torch.uint8)
        del buf


def run_step(step: Step, log_dir: str, cold: bool, pss: bool, prefault_bytes: int, settle: float,
             source_dir: str) -> None:
    shutil.rmtree(step.output_dir, ignore_errors=True)
    os.sync()  # leave no earlier step's dirty pages for this step's sync to pay for
    time.sleep(settle)
    prefault(prefault_bytes)  # after the idle, or the idle would undo it
    if cold and not drop_caches():
        raise SystemExit("--cold: cannot write /proc/sys/vm/drop_caches (needs root)")
    log_path = os.path.join(log_dir, f"{step.name.replace('>', '')}.log")
    with open(log_path, "w") as log:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT)
        monitor = TreeMonitor(proc.pid, pss=pss)
        monitor.start()
        try:
            rc = proc.wait()
        finally:
            peak = monitor.stop()
        process_seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        os.sync()
        seconds = time.perf_counter() - start
    if rc != 0:
        with open(log_path) as f:
            sys.stderr.write(f.read()[-4000:])
        raise SystemExit(f"step {step.name} failed with exit code {rc}; log: {log_path}")
    user, sys_ = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    step.runs.append(Run(seconds, process_seconds, seconds - process_seconds, user, sys_, peak))
    step.largest_file, step.total_bytes = dir_sizes(step.output_dir)
    report_path = os.path.join(step.output_dir, "conversion_report.json")
    if step.baseline and os.path.isfile(report_path):
        with open(report_path) as f:
            report = json.load(f)
        step.workers, step.startup_seconds = report.get("workers"), report.get("startup_seconds")
        step.io_threads = report.get("io_threads")
        step.total_bytes -= os.path.getsize(report_path)
    if step.check_round_trip and not step.runs[1:]:  # once, on the first run
        print("verifying the round trip ...", file=sys.stderr)
        step.round_trip_problems = verify_round_trip(source_dir, step.output_dir)
    if step.delete_after:
        shutil.rmtree(step.output_dir)


def hf_weight_map(root: str) -> dict[str, str]:
    with open(os.path.join(root, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def verify_round_trip(src: str, dst: str) -> list[str]:
    """Problems found comparing two HF checkpoints tensor by tensor; empty means bit-exact."""
    a_map, b_map = hf_weight_map(src), hf_weight_map(dst)
    problems = [f"missing after round trip: {k}" for k in sorted(a_map.keys() - b_map.keys())]
    problems += [f"extra after round trip: {k}" for k in sorted(b_map.keys() - a_map.keys())]
    # Group by file pair so each file is opened once; one tensor pair is in memory at a time.
    pairs: dict[tuple[str, str], list[str]] = {}
    for k in sorted(a_map.keys() & b_map.keys()):
        pairs.setdefault((a_map[k], b_map[k]), []).append(k)
    for (fa, fb), keys in pairs.items():
        with safe_open(os.path.join(src, fa), "pt") as ha, safe_open(os.path.join(dst, fb), "pt") as hb:
            for k in keys:
                x, y = ha.get_tensor(k), hb.get_tensor(k)
                if x.dtype != y.dtype or x.shape != y.shape:
                    problems.append(f"{k}: {x.dtype}{list(x.shape)} became {y.dtype}{list(y.shape)}")
                # Compare raw bytes: torch.equal would call -0.0 == 0.0 and NaN != NaN.
                elif not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                    problems.append(f"{k}: values differ")
                del x, y
    return problems


def fmt_gb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GB:.2f} GB" if n >= GB // 10 else f"{n / 10**6:.0f} MB"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_ok(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def print_table(steps: list[Step], pss: bool) -> None:
    head = ["step", "workers", "threads", "start s", "median s", "(sync)", "GB/s", "vs cp", "best s", "vs cp", "CPU s"]
    head += ["peak RSS tree", "peak RSS single", "peak anon tree"]
    head += ["peak PSS tree"] if pss else []
    head += ["largest file", f"time<={TIME_TARGET:g}x cp", "RSS<=2xfile+1GB"]
    rows = []
    for s in steps:
        peak = s.peak
        gbps = f"{s.total_bytes / GB / s.seconds:.2f}" if s.total_bytes and s.seconds > 0 else "-"
        row = [s.name, "-" if s.workers is None else str(s.workers), "-" if s.io_threads is None else str(s.io_threads),
               "-" if s.startup_seconds is None else f"{s.startup_seconds:.1f}",
               f"{s.seconds:.1f}", f"{s.sync_seconds:.1f}", gbps, fmt_ratio(s.ratio)]
        row += [f"{s.best_seconds:.1f}", fmt_ratio(s.best_ratio), f"{s.cpu_seconds:.1f}"]
        row += [fmt_gb(peak.rss_tree), fmt_gb(peak.rss_single), fmt_gb(peak.anon_tree)]
        row += [fmt_gb(peak.pss_tree)] if pss else []
        row += [fmt_gb(s.largest_file), fmt_ok(s.time_ok), fmt_ok(s.rss_ok)]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def build_steps(hf_dir: str, paths: dict[str, str], args: argparse.Namespace) -> list[Step]:
    """cp of the HF source, HF -> MCore for every worker setting, cp of the MCore output, MCore -> HF
    for every worker setting. The first setting's outputs are kept (the round trip is checked
    on them); the others are deleted once measured."""
    convert = [sys.executable, "-m", "convert_checkpoint", "--no_progress"]
    settings = args.max_workers.split(",")

    def flags(setting: str) -> list[str]:  # "W" or "WxT": --max_workers W [--io_threads T]
        w, _, t = setting.partition("x")
        return ["--max_workers", w] + (["--io_threads", t] if t else [])

    steps = [Step("cp-hf", ["cp", "-r", hf_dir, paths["hf_copy"]], paths["hf_copy"], delete_after=True)]
    for i, w in enumerate(settings):
        out = paths["mcore"] if i == 0 else f"{paths['mcore']}-{w}"
        to_mcore = flags(w) + ["--load_platform", "huggingface", "--save_platform", "mcore",
                    "--load_ckpt_path", hf_dir, "--save_ckpt_path", out, "--tensor_model_parallel_size", str(args.tp),
                    "--pipeline_model_parallel_size", str(args.pp), "--ckpt_format", args.ckpt_format]
        steps.append(Step(f"hf->mcore w={w}", convert + to_mcore, out, baseline="cp-hf", delete_after=i > 0))
    steps.append(Step("cp-mcore", ["cp", "-r", paths["mcore"], paths["mcore_copy"]], paths["mcore_copy"], delete_after=True))
    for i, w in enumerate(settings):
        out = paths["hf_back"] if i == 0 else f"{paths['hf_back']}-{w}"
        to_hf = flags(w) + ["--load_platform", "mcore", "--save_platform", "huggingface",
                 "--load_ckpt_path", paths["mcore"], "--save_ckpt_path", out, "--max_shard_size", f"{args.shard_gb:g}GB"]
        # Deleted too (after the first is checked): four 16 GB trees would not fit a 64 GB disk.
        steps.append(Step(f"mcore->hf w={w}", convert + to_hf, out, baseline="cp-mcore", delete_after=True,
                          check_round_trip=i == 0))
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/convert-checkpoint-bench", help="holds the generated source and all outputs")
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs (the generated source is always kept)")
    ap.add_argument("--max-workers", default="auto",
                    help="the converter's --max_workers; several, comma-separated, give one step each (e.g. auto,1,4,8); "
                         "WxT also passes --io_threads T (e.g. 2x1,2x4, autox8)")
    ap.add_argument("--shape", choices=sorted(make_llama_checkpoint.SHAPES), default="small",
                    help="generated layer widths (llama3-8b: the 16.06 GB Meta-Llama-3-8B shape; ignores --size-gb)")
    ap.add_argument("--ckpt-format", default="torch", choices=["torch", "torch_dist"],
                    help="the Megatron format converted to and back (legacy rank files, or torch_dist)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--size-gb", type=float, default=3.0, help="size of the generated checkpoint (only when generating)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="HF shard size, generated and written back")
    ap.add_argument("--repeat", type=int, default=3, help="run the sequence N times; report median time, worst memory")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every step (root only)")
    ap.add_argument("--pss", action="store_true", help="also sample PSS (costs CPU: ~5 ms per GB mapped per sample)")
    ap.add_argument(
        "--prefault-gb",
        type=float,
        default=0.0,
        help="memory to touch and free right before each step (0: off; see README)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to idle before each step, so every step starts from the same memory state (see README)",
    )
    ap.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    args = ap.parse_args(argv)

    work = os.path.abspath(args.workdir)
    hf_dir = os.path.join(work, "hf")
    paths = {name: os.path.join(work, name) for name in ("hf_copy", "mcore", "mcore_copy", "hf_back", "logs")}
    os.makedirs(paths["logs"], exist_ok=True)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        shutil.rmtree(hf_dir, ignore_errors=True)  # a half-written earlier attempt
        print(f"generating {args.size_gb:g} GB Llama checkpoint in {hf_dir}", file=sys.stderr)
        make_llama_checkpoint.write_checkpoint(hf_dir, args.size_gb, args.shard_gb, shape=make_llama_checkpoint.SHAPES[args.shape])
    source_bytes = dir_sizes(hf_dir)[1]
    free = shutil.disk_usage(work).free
    if free < 3 * source_bytes:  # mcore + one copy + hf_back
        raise SystemExit(f"{work}: {free / GB:.1f} GB free, the run needs about {3 * source_bytes / GB:.1f} GB")

    prefault_bytes = int(args.prefault_gb * GB)
    steps = build_steps(hf_dir, paths, args)
    by_name = {s.name: s for s in steps}
    for rep in range(args.repeat):
        for step in steps:
            print(f"[{rep + 1}/{args.repeat}] {step.name} ...", file=sys.stderr)
            run_step(step, paths["logs"], args.cold, args.pss, prefault_bytes, args.settle, hf_dir)
    for step in steps:
        if step.baseline:
            step.ratio = step.seconds / by_name[step.baseline].seconds
            step.best_ratio = step.best_seconds / by_name[step.baseline].best_seconds
            step.time_ok = step.ratio <= TIME_TARGET
            step.rss_ok = step.peak.rss_tree <= 2 * step.largest_file + RSS_SLACK

    problems = [p for step in steps for p in step.round_trip_problems]

    print(
        f"\nsource {fmt_gb(source_bytes)}, {args.ckpt_format}, TP={args.tp} PP={args.pp}, max_workers={args.max_workers}, "
        f"cache={'cold' if args.cold else 'warm'}, settle={args.settle:g}s, prefault={args.prefault_gb:g}GB, "
        f"runs={args.repeat} (median time, worst memory), {os.cpu_count()} CPUs"
    )
    print_table(steps, args.pss)
    print(f"round trip bit-exact: {'yes' if not problems else 'NO'}")
    for p in problems[:20]:
        print(f"  {p}")

    if args.json:
        result = {
            "source_dir": hf_dir,
            "source_bytes": source_bytes,
            "ckpt_format": args.ckpt_format,
            "tp": args.tp,
            "pp": args.pp,
            "max_workers": args.max_workers,
            "cold": args.cold,
            "repeat": args.repeat,
            "prefault_bytes": prefault_bytes,
            "settle_seconds": args.settle,
            "machine": {
                "cpus": os.cpu_count(),
                "memory_bytes": psutil.virtual_memory().total,
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "targets": {
                "time": f"conversion seconds <= {TIME_TARGET} x matching cp seconds",
                "rss": "peak RSS of the process tree <= 2 x largest output file + 1e9 bytes",
            },
            "steps": [s.to_json() for s in steps],
            "round_trip_exact": not problems,
            "round_trip_problems": problems,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")

    if not args.keep:
        for name in ("mcore", "hf_back"):
            shutil.rmtree(paths[name], ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
