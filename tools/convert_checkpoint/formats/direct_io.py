"""Moving planned byte runs between files: in the kernel where it can, through a buffer else.

``os.copy_file_range`` copies page cache to page cache without the bytes entering this
process (one copy, as ``cp`` does); file systems or kernels that refuse it (``EXDEV``,
``ENOSYS``, ``EINVAL``, ``EOPNOTSUPP``) fall back to large ``pread``/``pwrite``. Short runs
(a column window is one run per row) are read with ``preadv`` into a buffer instead, many
runs per call, then written with the buffer.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence

from ..byteplan import Run

COPY_MIN = 1 << 20  # runs at least this long are copied file to file; shorter ones are read into a buffer
_CHUNK = 64 << 20
_WRITE_CHUNK = 8 << 20  # one huge pwrite into fresh page cache runs ~10x slower than the same bytes in 8 MB calls
_GAP_MAX = 256 << 10  # a gap this small between two runs of a source is read (into scratch) rather than skipped
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + _WRITE_CHUNK], offset + done)


def read_back(fd: int, start: int, length: int, buf: memoryview) -> Iterator[memoryview]:
    """The bytes [start, start + length) of ``fd`` in chunks of ``buf``'s size."""
    pos = start
    while pos < start + length:
        n = os.preadv(fd, [buf[:min(len(buf), start + length - pos)]], pos)
        if n <= 0:
            raise OSError(errno.EIO, f"short read at byte {pos} of the file being written")
        yield buf[:n]
        pos += n


READ_CHUNK = 8 << 20
_WRITEBACK_STEP = 256 << 20


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """libc's ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` (Linux), None elsewhere."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: queue the writeback, do not wait

    return start


_START_WRITEBACK = _sync_file_range()


class Writeback:
    """Starts the disk writing a file's bytes as they are written (every 256 MB), so reads of
    the source and writes of the output overlap, as in ``cp``, instead of the writes waiting for
    the final fsync (the kernel would start only once a tenth of memory is dirty)."""

    def __init__(self, fd: int):
        self.fd, self.done = fd, 0
        self.written = 0

    def wrote(self, nbytes: int) -> None:
        self.written += nbytes
        if _START_WRITEBACK is not None and self.written - self.done >= _WRITEBACK_STEP:
            _START_WRITEBACK(self.fd, 0, 0)  # the whole file so far: pages already under writeback are skipped
            self.done = self.written


class Aborted(Exception):
    """The writer gave up on the file; the read-back following it stops."""


class Completion:
    """Which regions of a file being written are in place. Several threads write regions in
    any order; the read-back follows in file order, waiting for each region it reaches, so
    hashing runs alongside the copies instead of in a pass after them."""

    def __init__(self) -> None:
        self._done: set[Hashable] = set()
        self._aborted = False
        self._cond = threading.Condition()

    def mark(self, key: Hashable) -> None:
        with self._cond:
            self._done.add(key)
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def wait(self, key: Hashable) -> None:
        with self._cond:
            while key not in self._done:
                if self._aborted:
                    raise Aborted
                self._cond.wait()


def hash_regions(fd: int, regions: Sequence[tuple[int, int, Hashable]],
                 on_chunk: Callable[[Hashable, memoryview], None] | None = None,
                 ready: Callable[[Hashable], None] | None = None) -> str:
    """sha256 of a file written region by region: ``regions`` are (offset, length, key) in file
    order, covering it; ``on_chunk(key, bytes)`` sees each region's bytes as written (the NaN/Inf
    check of tensors that were copied without a buffer). ``ready(key)`` returns once region
    ``key`` is written (regions keyed None are written before the pass starts)."""
    sha = hashlib.sha256()
    buf = memoryview(bytearray(READ_CHUNK))
    pos = 0
    for offset, length, key in regions:
        if offset != pos:
            raise AssertionError(f"regions leave a hole at byte {pos}")
        if ready is not None and key is not None:
            ready(key)
        for chunk in read_back(fd, offset, length, buf):
            sha.update(chunk)
            if on_chunk is not None and key is not None:
                on_chunk(key, chunk)
        pos = offset + length
    return sha.hexdigest()


class RangeMover:
    """Moves runs out of source files; keeps one read-only descriptor per source file. Several
    threads may move runs at once (each has its own buffers)."""

    def __init__(self, copy_range: bool = True) -> None:
        self._fds: dict[str, int] = {}
        self._fds_lock = threading.Lock()
        self._copy_range = copy_range and hasattr(os, "copy_file_range")
        self._local = threading.local()  # per thread: the fallback copy's buffer, the gaps' scratch
        # Test hook: CONVERT_CHECKPOINT_FAULT=kill_in_copy=N SIGKILLs the process once N runs
        # (or batched reads) were done by this mover (in the middle of a file), to prove resume.
        m = re.fullmatch(r"kill_in_copy=(\d+)", os.environ.get("CONVERT_CHECKPOINT_FAULT", ""))
        self._kill_after = int(m.group(1)) if m else None

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._fds_lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _buffer(self, name: str, size: int) -> memoryview:
        buf = getattr(self._local, name, None)
        if buf is None:
            buf = memoryview(bytearray(size))
            setattr(self._local, name, buf)
        return buf

    def copy(self, runs: Sequence[Run], out_fd: int, base: int) -> None:
        """Copy each run to ``out_fd`` at ``base + run.dst_offset``."""
        for run in sorted(runs, key=lambda r: (r.src, r.src_offset)):  # sources read in order
            src, dst, left = run.src_offset, base + run.dst_offset, run.length
            fd = self._fd(run.src)
            while left:
                n = self._copy_some(fd, src, out_fd, dst, min(left, 1 << 30))
                if n <= 0:
                    raise OSError(errno.EIO, f"{run.src} ends before byte {src + left}")
                src, dst, left = src + n, dst + n, left - n
            self._tick()

    def _tick(self) -> None:
        if self._kill_after is not None:
            self._kill_after -= 1
            if self._kill_after < 0:
                os.kill(os.getpid(), signal.SIGKILL)

    def _copy_some(self, fd: int, src: int, out_fd: int, dst: int, n: int) -> int:
        if self._copy_range:
            try:
                return os.copy_file_range(fd, out_fd, n, src, dst)
            except OSError as e:
                if e.errno not in _NO_COPY_RANGE:
                    raise
                self._copy_range = False
        view = self._buffer("bounce", _CHUNK)[:min(n, _CHUNK)]
        got = os.preadv(fd, [view], src)
        if got > 0:
            pwrite_all(out_fd, view[:got], dst)
        return got

    def read_into(self, runs: Sequence[Run], out: memoryview) -> None:
        """Fill ``out`` (the tensor's bytes) from the runs. Runs that lie close together in a
        source file are read by one ``preadv`` straight into their places in ``out``, the small
        gaps between them into scratch (a column window reads its rows whole, in one call)."""
        ordered = sorted(runs, key=lambda r: (r.src, r.src_offset))
        scratch = self._buffer("scratch", _GAP_MAX)  # what is read into it is never looked at
        i = 0
        while i < len(ordered):
            first = ordered[i]
            iov = [out[first.dst_offset:first.dst_offset + first.length]]
            end = first.src_offset + first.length
            j = i + 1
            while j < len(ordered) and len(iov) < _IOV_MAX - 1 and ordered[j].src == first.src \
                    and 0 <= ordered[j].src_offset - end <= _GAP_MAX:
                r = ordered[j]
                if r.src_offset > end:
                    iov.append(scratch[:r.src_offset - end])
                iov.append(out[r.dst_offset:r.dst_offset + r.length])
                end = r.src_offset + r.length
                j += 1
            fd = self._fd(first.src)
            want, pos = end - first.src_offset, first.src_offset
            got = os.preadv(fd, iov, pos)
            if got != want:  # rare: finish the remainder piece by piece
                self._finish_short(fd, iov, pos, got)
            self._tick()
            i = j

    def _finish_short(self, fd: int, iov: list[memoryview], pos: int, got: int) -> None:
        for view in iov:
            if got >= len(view):
                got -= len(view)
                pos += len(view)
                continue
            done = got
            got = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], pos + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short read from a source file")
                done += n
            pos += len(view)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
