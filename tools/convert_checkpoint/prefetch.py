"""``--prefetch``: reading the source checkpoint ahead while Python imports torch and plans.

Importing torch and planning take seconds before the first byte moves (5-7 s on the 16-core
host with a cold cache, 1.5 s on 2 cores), while the disk idles. With ``--prefetch`` a child
process, forked before anything heavy is imported, asks the kernel to read the source files
into the page cache, front to back (``posix_fadvise(WILLNEED)``, one readahead window per
call: the kernel cuts a larger range to one window). A process, not a thread: importing torch
holds the GIL for seconds at a time, which would stall a thread. At most half of the memory
available is read; under torchrun only the first process of a machine does it.

It is off by default because, measured, it costs more than it saves when torch itself is not
in the page cache: the import's own reads of torch's libraries queue behind the prefetch
(a cold ``import torch`` went from 6.5 to 11-15 s on the 16-core host, and from 1.5 to 2.4 s
on 2 cores). Where torch is warm and the checkpoint sits on slow storage, it lets the disk
work during start-up.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".distcp", ".bin")
_DEFAULT_WINDOW = 128 << 10  # the kernel's usual readahead window, where sysfs does not say
_PATH_FLAGS = ("--load_ckpt_path", "--load-ckpt-path", "--input-path", "-i")  # the main command, hf/quantize; kt


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def source_files(path: str) -> list[str]:
    """The weight files under ``path``, in natural order (shards and rank directories in sequence)."""
    out = []
    for dirpath, dirnames, names in os.walk(path):
        dirnames.sort(key=_natural)
        out += [os.path.join(dirpath, n) for n in sorted(names, key=_natural) if n.endswith(WEIGHT_SUFFIXES)]
    return out


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def readahead_window(path: str) -> int:
    """The most one ``WILLNEED`` call reads of ``path``: Linux caps it at the larger of the
    device's readahead and its largest request (sysfs); 128 KiB where unknown."""
    try:
        dev = os.stat(path).st_dev
        block = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        if not os.path.isdir(os.path.join(block, "queue")):
            block = os.path.join(block, "..")  # a partition: the queue is its disk's
        sizes = []
        for name in ("read_ahead_kb", "max_sectors_kb"):
            with open(os.path.join(block, "queue", name)) as f:
                sizes.append(int(f.read()) * 1024)
        return max(sizes) or _DEFAULT_WINDOW
    except (OSError, ValueError):
        return _DEFAULT_WINDOW


def read_ahead(files: list[str], budget: int) -> int:
    """Ask the kernel to read ``files`` into the page cache, front to back, up to ``budget``
    bytes, one readahead window per call (a larger range would be cut to one window);
    returns the bytes asked for."""
    asked = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the run itself reports unreadable files
        try:
            size, window = os.fstat(fd).st_size, readahead_window(path)
            for offset in range(0, size, window):
                if asked >= budget:
                    return asked
                length = min(window, size - offset, budget - asked)
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                asked += length
        except OSError:
            return asked
        finally:
            os.close(fd)
    return asked


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: a killed run reads no further
    except (OSError, AttributeError):
        pass


@dataclass
class Prefetch:
    """The child process reading ahead; ``wait()`` gives its exit status (0: done)."""

    pid: int
    status: int | None = None

    def __post_init__(self) -> None:
        self._reaper = threading.Thread(target=self._reap, daemon=True, name="convert-checkpoint-prefetch")
        self._reaper.start()

    def _reap(self) -> None:
        try:
            self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        except ChildProcessError:
            self.status = -1

    def wait(self) -> int | None:
        self._reaper.join()
        return self.status


def start(path: str) -> Prefetch | None:
    """Begin reading ``path``'s weight files ahead in a forked child process (None when there
    is nothing to do); a daemon thread reaps it."""
    if not hasattr(os, "posix_fadvise") or not hasattr(os, "fork") or not os.path.isdir(path):
        return None
    if os.environ.get("LOCAL_RANK", "0") != "0":  # the processes of one machine share its page cache
        return None
    memory = available_memory()
    if memory is None:
        return None
    files = source_files(path)
    if not files:
        return None
    pid = os.fork()
    if pid == 0:  # the child: nothing but system calls, then out without running any exit handlers
        code = 0
        try:
            _die_with_parent()
            read_ahead(files, memory // 2)
        except BaseException:
            code = 1
        os._exit(code)
    return Prefetch(pid)


def start_from_argv(argv: list[str]) -> Prefetch | None:
    """Prefetch the ``--load_ckpt_path`` of a command line that asks for it (``--prefetch``)
    and will convert (not ``--help`` or ``--dry_run``). Reads the flags loosely: argparse checks
    them later."""
    if "--prefetch" not in argv or any(a in ("-h", "--help", "--dry_run", "--dry-run") for a in argv):
        return None
    for i, arg in enumerate(argv):
        for flag in _PATH_FLAGS:
            if arg == flag and i + 1 < len(argv):
                return start(argv[i + 1])
            if arg.startswith(flag + "="):
                return start(arg.split("=", 1)[1])
    return None
