"""KTransformers AMX INT4/INT8 expert weights: per-row symmetric quantization and the tiled byte
layout kt-kernel's CPU kernels read (numerics only; the file layout is ``endpoints/kt_cpu``).

A matrix ``[n, k]`` (HF ``[out, in]`` order, bf16 values) becomes ``n`` fp32 scales and
``n*k`` (INT8) or ``n*k/2`` (INT4) bytes:

* INT8: ``d = amax * fl32(1/127)`` (kt-kernel is built with -ffast-math, which turns the division
  into a multiply by the rounded reciprocal; ``ieee=True`` gives the true quotient), codes
  ``sat8(RNE(w * (1/d)))``.
* INT4: ``d = fl32(amax / 112)``, ``q8 = sat8(RNE(w * (1/d)))`` in [-112, 112], then a second
  rounding to [-7, 7]: ``sign(q8) * ((|q8| + 8) >> 4)`` (half away from zero). Dequantized as
  ``v * 16 * d``. Two nibbles per byte: within each 128-column group the first 64 columns go to
  the low nibbles of 64 bytes, the next 64 to the high nibbles.
* Bytes are cut into blocks of NB rows x KB bytes, written block after block (rows outer); inside
  a block, tiles of 32 rows x 64 bytes (row tiles outer), each two halves of 16 rows stored as a
  16x16 transpose of 4-byte groups (AMX's VNNI layout for the B operand).

Every row is independent and the only reduction is a max, so results do not depend on threads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AmxScheme:
    name: str  # kt-kernel's file prefix: INT4 or INT8
    bits: int
    k_multiple: int  # the reduction dimension must be a multiple of this
    block_rows: int  # NB
    block_bytes: int  # KB, in bytes of packed codes


INT8 = AmxScheme("INT8", 8, 64, 64, 3584)
INT4 = AmxScheme("INT4", 4, 128, 128, 1792)
SCHEMES = {"int4": INT4, "int8": INT8}
_TILE_ROWS, _HALF, _GROUP_BYTES, _STEP_BYTES = 32, 16, 4, 64


def weight_bytes(n: int, k: int, scheme: AmxScheme) -> int:
    return n * k * scheme.bits // 8


def row_scales(amax: torch.Tensor, scheme: AmxScheme, ieee: bool = False) -> torch.Tensor:
    """fp32 scale per row from the row's max |w| (fp32)."""
    if scheme.bits == 8:
        if ieee:
            return amax / torch.tensor(127.0, dtype=torch.float32)
        return amax * torch.tensor(1.0 / 127.0, dtype=torch.float32)  # fl32(1/127), fp32 multiply
    # INT4: the expression is evaluated in double (112.0 is a double literal), then rounded once.
    return (amax.double() * (1.0 / 112.0) if not ieee else amax.double() / 112.0).float()


def row_amax(f: torch.Tensor) -> torch.Tensor:
    """max |w| per row of fp32 ``f`` (one pass; +0.0 for a zero row, never -0.0)."""
    low, high = torch.aminmax(f, dim=1)
    return torch.maximum(high, low.neg()).abs_()


def quantize(w: torch.Tensor, scheme: AmxScheme, ieee: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 ``[n, k]``: INT8 codes, or INT4 values in [-7, 7]) and fp32 scales ``[n]``."""
    f = w.to(torch.float32)
    d = row_scales(row_amax(f), scheme, ieee)
    inv = torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))  # a true fp32 division
    q = f.mul_(inv[:, None]).round_().clamp_(-128, 127)  # round() is half-to-even, as cvtps2dq
    if scheme.bits == 4:  # (|q| + 8) >> 4 with q's sign; exact in fp32 for these small integers
        q = q.abs().add_(8).mul_(1.0 / 16).floor_().copysign_(q)
    return q.to(torch.int8), d


def _nibbles(v: torch.Tensor) -> torch.Tensor:
    """INT4 values ``[n, k]`` -> bytes ``[n, k/2]`` (low nibbles: first 64 of each 128 columns)."""
    n, k = v.shape
    u = v.view(torch.uint8).view(n, k // 128, 2, 64) & 0x0F
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(n, k // 2)


def _blocks(n: int, kb: int, scheme: AmxScheme):
    """(row start, rows, byte start, bytes, output offset) of every block, in output order."""
    offset = 0
    for r0 in range(0, n, scheme.block_rows):
        rows = min(scheme.block_rows, n - r0)
        for c0 in range(0, kb, scheme.block_bytes):
            cols = min(scheme.block_bytes, kb - c0)
            yield r0, rows, c0, cols, offset
            offset += rows * cols


def tile(packed: torch.Tensor, scheme: AmxScheme) -> torch.Tensor:
    """Row-major code bytes ``[n, kb]`` (uint8) -> the tiled 1-D layout."""
    n, kb = packed.shape
    out = torch.empty(n * kb, dtype=torch.uint8)
    for r0, rows, c0, cols, offset in _blocks(n, kb, scheme):
        block = packed[r0:r0 + rows, c0:c0 + cols].reshape(
            rows // _TILE_ROWS, 2, _HALF, cols // _STEP_BYTES, _HALF, _GROUP_BYTES)
        out[offset:offset + rows * cols].view(
            rows // _TILE_ROWS, cols // _STEP_BYTES, 2, _HALF, _HALF, _GROUP_BYTES).copy_(block.permute(0, 3, 1, 4, 2, 5))
    return out


def untile(flat: torch.Tensor, n: int, kb: int, scheme: AmxScheme) -> torch.Tensor:
    """The inverse of :func:`tile`: 1-D bytes -> row-major ``[n, kb]`` (uint8)."""
    flat = flat.view(torch.uint8)
    out = torch.empty(n, kb, dtype=torch.uint8)
    for r0, rows, c0, cols, offset in _blocks(n, kb, scheme):
        block = flat[offset:offset + rows * cols].view(
            rows // _TILE_ROWS, cols // _STEP_BYTES, 2, _HALF, _HALF, _GROUP_BYTES)
        out[r0:r0 + rows, c0:c0 + cols] = block.permute(0, 2, 4, 1, 3, 5).reshape(rows, cols)
    return out


def encode(w: torch.Tensor, scheme: AmxScheme, ieee: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, k]`` weights -> (1-D int8 weight bytes, 1-D fp32 scales), as kt-kernel stores them."""
    q, d = quantize(w, scheme, ieee)
    packed = _nibbles(q) if scheme.bits == 4 else q.view(torch.uint8)
    return tile(packed, scheme).view(torch.int8), d


def decode(weight: torch.Tensor, scale: torch.Tensor, n: int, k: int, scheme: AmxScheme) -> torch.Tensor:
    """Dequantized fp32 ``[n, k]`` from stored bytes and scales (kt-kernel's ``to_mat``)."""
    packed = untile(weight, n, k * scheme.bits // 8, scheme)
    if scheme.bits == 8:
        return packed.view(torch.int8).to(torch.float32) * scale[:, None]
    groups = packed.view(n, k // 128, 1, 64)
    nib = torch.cat([groups & 0x0F, groups >> 4], dim=2).view(n, k).to(torch.int16)
    values = torch.where(nib >= 8, nib - 16, nib).to(torch.float32)
    return values * 16.0 * scale[:, None]


def error_bound(scale: torch.Tensor, scheme: AmxScheme) -> torch.Tensor:
    """Largest |w - decoded| per row: half a step for INT8; 8.5 steps of ``d`` for INT4 (the
    second rounding adds up to 8 to the first one's 0.5)."""
    return scale * (0.5 if scheme.bits == 8 else 8.5)


def within_bound(error: torch.Tensor, values: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``error <= bound`` up to fp32 rounding: ``d`` is the rounded amax/127 (or /112), so codes
    times ``d`` miss the ideal grid by a few ulps of the value (ties show it)."""
    return error <= bound * (1 + 2.0**-16) + values.abs() * 2.0**-18
