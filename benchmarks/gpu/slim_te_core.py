#!/usr/bin/env python
"""Shrink TE's core wheel (transformer-engine-cu13) to what an sm_90 GPU (H100/H200) loads.

libtransformer_engine.so carries cubins for sm_75/80/89/90/100/103/107/120 (about 264 MB of
its 343 MB). A Hopper GPU can only run the sm_90 ones (SASS is not compatible across major
versions and the wheel has no PTX), so this keeps, in each fatbin container of the
``.nv_fatbin`` section, only the sm_90 entries: they are packed after the container's header,
the header's size field is shrunk and the freed bytes are zeroed. Every container keeps its
offset, so the ELF layout, symbols and relocations are untouched. The rewritten wheel (RECORD
hash updated, same file name) compresses to about 32 MB instead of 276 MB, small enough to be
carried to the GPU machine in one call.

    python benchmarks/gpu/slim_te_core.py IN.whl OUT.whl [--keep 90]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import struct
import zipfile

SO = "transformer_engine/wheel_lib/libtransformer_engine.so"
FATBIN_MAGIC = 0xBA55ED50


def elf_section(buf: bytes, wanted: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian section."""
    assert buf[:4] == b"\x7fELF" and buf[4] == 2 and buf[5] == 1, "not an ELF64 LE file"
    e_shoff, = struct.unpack_from("<Q", buf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", buf, 0x3A)

    def sh(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", buf, e_shoff + i * e_shentsize)
        return name, off, size

    _, str_off, _ = sh(e_shstrndx)
    for i in range(e_shnum):
        name, off, size = sh(i)
        end = buf.index(b"\0", str_off + name)
        if buf[str_off + name:end].decode() == wanted:
            return off, size
    raise SystemExit(f"no {wanted} section")


def slim(buf: bytearray, keep: set[int]) -> dict:
    off, size = elf_section(buf, ".nv_fatbin")
    end = off + size
    stats = {"containers": 0, "kept": 0, "dropped": 0, "kept_bytes": 0, "dropped_archs": set()}
    while off < end:
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", buf, off)
        if magic != FATBIN_MAGIC:  # alignment padding between containers
            assert buf[off:off + 8] == b"\0" * 8, f"unexpected bytes at {off:#x}"
            off += 8
            continue
        stats["containers"] += 1
        e, fend = off + hsize, off + hsize + fsize
        kept = []
        while e < fend:
            _kind, _u, ehsize, esize = struct.unpack_from("<HHIQ", buf, e)
            arch, = struct.unpack_from("<I", buf, e + 28)
            if arch in keep:
                kept.append(bytes(buf[e:e + ehsize + esize]))
                stats["kept"] += 1
            else:
                stats["dropped"] += 1
                stats["dropped_archs"].add(arch)
            e += ehsize + esize
        assert e == fend, f"container at {off:#x} does not end where its header says"
        assert kept, f"container at {off:#x} has no entry for {sorted(keep)}"
        body = b"".join(kept)
        stats["kept_bytes"] += len(body)
        buf[off + hsize:fend] = body + b"\0" * (fsize - len(body))
        struct.pack_into("<Q", buf, off + 8, len(body))
        off = fend
    stats["dropped_archs"] = sorted(stats["dropped_archs"])
    return stats


def record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest},{len(data)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--keep", default="90", help="comma-separated SM numbers to keep (default 90)")
    args = ap.parse_args()
    keep = {int(a) for a in args.keep.split(",")}
    with zipfile.ZipFile(args.src) as zi:
        so = bytearray(zi.read(SO))
        stats = slim(so, keep)
        so = bytes(so)
        with zipfile.ZipFile(args.dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
            for info in zi.infolist():
                if info.filename == SO:
                    zo.writestr(info, so, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                elif info.filename.endswith(".dist-info/RECORD"):
                    lines = [f"{SO},{record_hash(so)}" if ln.startswith(SO + ",") else ln
                             for ln in zi.read(info).decode().splitlines()]
                    zo.writestr(info, "\n".join(lines) + "\n")
                else:
                    zo.writestr(info, zi.read(info))
    print(f"{args.dst}: kept sm {sorted(keep)}; {stats}")


if __name__ == "__main__":
    main()
