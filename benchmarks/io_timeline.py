#!/usr/bin/env python
"""Where a command's time goes on the disk: read and write MB/s and CPU use, sampled while it runs.

    python benchmarks/io_timeline.py [--interval 0.5] [--cold] [--sync] [--json PATH] -- COMMAND ...

Samples ``/proc/diskstats`` (whole disks, partitions and virtual devices left out) and
``/proc/stat`` every ``--interval`` seconds and prints one line per sample: seconds since the
command started, MB/s read and written, and the share of all cores busy. The command's own
output lines are interleaved, stamped with the same clock. A converter's
``conversion_report.json`` (when ``--report`` names it) adds its start-up and per-file times.
``--cold`` drops the page cache first (needs root); ``--sync`` times a ``sync`` after the command,
as ``run_benchmark.py`` does.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

SECTOR = 512


def whole_disks() -> set[str]:
    """Block devices that are disks, not partitions, loop or RAM devices."""
    names = set()
    for name in os.listdir("/sys/block"):
        if name.startswith(("loop", "ram", "zram", "dm-", "md")):
            continue
        names.add(name)
    return names


def disk_sectors(disks: set[str]) -> tuple[int, int]:
    read = written = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if parts[2] in disks:
                read += int(parts[5])
                written += int(parts[9])
    return read, written


def cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values), idle


class Sampler:
    def __init__(self, interval: float):
        self.interval = interval
        self.disks = whole_disks()
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_t, (last_r, last_w), (last_total, last_idle) = time.perf_counter(), disk_sectors(self.disks), cpu_ticks()
        while not self._stop.wait(self.interval):
            now, (r, w), (total, idle) = time.perf_counter(), disk_sectors(self.disks), cpu_ticks()
            dt = now - last_t
            busy = 1 - (idle - last_idle) / max(total - last_total, 1)
            sample = {"t": round(now - self.t0, 2), "read_mbps": (r - last_r) * SECTOR / dt / 1e6,
                      "write_mbps": (w - last_w) * SECTOR / dt / 1e6, "cpu_busy": busy}
            self.samples.append(sample)
            print(f"[{sample['t']:6.2f}] disk read {sample['read_mbps']:7.0f} MB/s  write {sample['write_mbps']:7.0f} MB/s"
                  f"  cpu {100 * busy:3.0f}%", flush=True)
            last_t, last_r, last_w, last_total, last_idle = now, r, w, total, idle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before the command (needs root)")
    ap.add_argument("--sync", action="store_true", help="time a sync after the command")
    ap.add_argument("--report", help="a conversion_report.json to summarize afterwards")
    ap.add_argument("--json", help="write the samples and totals here")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given")
    subprocess.run(["sync"], check=True)
    if args.cold:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    sampler = Sampler(args.interval)
    t0 = time.perf_counter()
    sampler.start(t0)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[{time.perf_counter() - t0:6.2f}] | {line.rstrip()}", flush=True)
    rc = proc.wait()
    ended = time.perf_counter() - t0
    if args.sync:
        subprocess.run(["sync"], check=True)
    total = time.perf_counter() - t0
    time.sleep(args.interval)  # one more sample: the tail of the sync
    sampler.stop()
    print(f"command {ended:.2f} s, with sync {total:.2f} s, exit {rc}")
    summary: dict = {"command": command, "seconds": ended, "seconds_with_sync": total, "exit": rc}
    if args.report and os.path.isfile(args.report):
        with open(args.report) as f:
            report = json.load(f)
        keep = ("startup_seconds", "fsync_seconds", "workers", "io_threads", "seconds")
        summary["report"] = {k: report.get(k) for k in keep}
        summary["files"] = [(f["path"], f["seconds"]) for f in report.get("files", [])]
        print("report:", json.dumps(summary["report"]))
        for path, seconds in summary["files"]:
            print(f"  {seconds:6.2f} s  {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "samples": sampler.samples}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
