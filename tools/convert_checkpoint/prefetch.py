"""Reading the source checkpoint ahead while Python imports torch and plans the conversion.

Importing torch and planning take seconds before the first byte moves (4-5 s on a 16-core
host), and reading a cold checkpoint is what a conversion waits for most. So the command line
asks the kernel to read the source files into the page cache (``posix_fadvise(WILLNEED)``,
from a background thread started before anything heavy is imported): the disk works during
start-up, and it reads each file front to back instead of in the order the workers' ranges
happen to ask for. At most half of the memory available is asked for (the page cache gives
it back under pressure anyway); under torchrun only the first process of a machine does it.
``--no_prefetch`` turns it off.
"""
from __future__ import annotations

import os
import re
import threading

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".distcp", ".bin")
_STEP = 64 << 20
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


def _read_ahead(files: list[str], budget: int) -> None:
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the run itself reports unreadable files
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, _STEP):
                if budget <= 0:
                    return
                length = min(_STEP, size - offset)
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                budget -= length
        except OSError:
            return
        finally:
            os.close(fd)


def start(path: str) -> threading.Thread | None:
    """Begin reading ``path``'s weight files ahead in a daemon thread (None when nothing to do)."""
    if not hasattr(os, "posix_fadvise") or not os.path.isdir(path):
        return None
    if os.environ.get("LOCAL_RANK", "0") != "0":  # the processes of one machine share its page cache
        return None
    memory = available_memory()
    if memory is None:
        return None
    thread = threading.Thread(target=_read_ahead, args=(source_files(path), memory // 2), daemon=True,
                              name="convert-checkpoint-prefetch")
    thread.start()
    return thread


def start_from_argv(argv: list[str]) -> threading.Thread | None:
    """Prefetch the ``--load_ckpt_path`` of a command line that will convert (not ``--help``,
    ``--dry_run`` or ``--no_prefetch``). Reads the flags loosely: argparse checks them later."""
    if any(a in ("-h", "--help", "--dry_run", "--dry-run", "--no_prefetch", "--no-prefetch") for a in argv):
        return None
    for i, arg in enumerate(argv):
        for flag in _PATH_FLAGS:
            if arg == flag and i + 1 < len(argv):
                return start(argv[i + 1])
            if arg.startswith(flag + "="):
                return start(arg.split("=", 1)[1])
    return None
