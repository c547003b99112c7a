"""Atomic small-file writes (metadata, markers, manifests): temp name, fsync, rename."""
from __future__ import annotations

import os


def tmp_path(path: str) -> str:
    """The temporary name a file is written under before it is renamed into place."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}")


def write_text(path: str, text: str, tmp: str | None = None) -> None:
    tmp = tmp or tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
